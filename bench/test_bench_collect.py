"""Collection on a tiny random Gemma-3 model: bare forward vs steer.collect vs today's way.

    pytest bench/test_bench_collect.py --benchmark-only

Every case checks what it timed (outside the timed call) against one sentence at a time by hand:
the bare forward's hidden states, steer's and today's pooled responses; and that collection
leaves the model bare (no hook left, the bare forward bit for bit what it was).
"""
import random

import numpy as np
import pytest
import torch

import todays_way
from steer.core.adapters import NeuronLayout, base_inputs
from steer.engine.backends import attached
from steer.engine.batching import batches, pad, tokenize
from steer.engine.collect import collect
from steer.core.corpus import Corpus
from tiny import tiny_model, tiny_tokenizer

BATCH = 16
CLOSE = dict(rtol=1e-5, atol=1e-5)  # batched and padded vs one sentence alone: rounding only


def by_hand(model, tok, texts):
    """One sentence at a time, no padding: max-pooled neuron values over the tokens after BOS
    [N, L, M], and the last hidden states [T, H] of each sentence."""
    layout = NeuronLayout(model)
    pooled, hidden = [], []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        seen = {}
        handles = [m.register_forward_pre_hook(lambda mod, a, l=l: seen.__setitem__(l, layout.view(a[0], 1)[0]))
                   for l, m in enumerate(layout.modules)]
        try:
            with torch.inference_mode():
                out = model.base_model(**base_inputs(model, ids, torch.ones_like(ids)))
        finally:
            for h in handles:
                h.remove()
        pooled.append(torch.stack([seen[l][1:].amax(0) for l in range(layout.n_layers)]))
        hidden.append(out.last_hidden_state[0])
    return torch.stack(pooled), hidden


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    words = ["the", "cat", "le", "chien", "das", "ist", "gut", "hello", "world", "fin", "ende", "und"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(48)]
    labels = [["en", "fr", "de"][i % 3] for i in range(len(texts))]
    model, tok, corpus = tiny_model("gemma3"), tiny_tokenizer(), Corpus(texts, labels)
    pooled, hidden = by_hand(model, tok, texts)
    return model, tok, corpus, pooled, hidden, bare(model, tok, corpus)


def bare(model, tok, corpus):
    """The base model over collect's batches; returns (rows, attention mask, last hidden states)
    of each batch."""
    ids, _ = tokenize(tok, corpus.texts, corpus.keys, True, None)
    out = []
    with torch.inference_mode():
        for rows in batches([len(t) for t in ids], BATCH):
            input_ids = pad([ids[i] for i in rows], 0, tok.padding_side)
            mask = pad([[1] * len(ids[i]) for i in rows], 0, tok.padding_side)
            out.append((rows, mask, model.base_model(**base_inputs(model, input_ids, mask)).last_hidden_state))
    return out


def assert_bare(model, tok, corpus, before):
    """Nothing left on the model: no hook or backend, and the bare forward exactly as before."""
    assert attached(model) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    for (rows, mask, h), (rows0, mask0, h0) in zip(bare(model, tok, corpus), before, strict=True):
        assert rows == rows0 and torch.equal(mask, mask0) and torch.equal(h, h0)


@pytest.mark.benchmark(group="collect-tiny")
def test_bare_forward(benchmark, setup):
    model, tok, corpus, _, hidden, before = setup
    out = benchmark(bare, model, tok, corpus)
    assert sorted(i for rows, _, _ in out for i in rows) == list(range(len(corpus)))  # every sentence once
    for rows, mask, h in out:
        for j, i in enumerate(rows):
            torch.testing.assert_close(h[j][mask[j].bool()], hidden[i], **CLOSE)
    assert_bare(model, tok, corpus, before)


@pytest.mark.benchmark(group="collect-tiny")
def test_steer_collect(benchmark, setup):
    model, tok, corpus, pooled, _, before = setup
    r = benchmark(collect, model, tok, corpus, batch_size=BATCH, progress=False)
    assert r.values.shape == pooled.shape == (len(corpus), 2, NeuronLayout(model).width)
    torch.testing.assert_close(r.values, pooled, **CLOSE)
    assert [r.label_names[i] for i in r.label_ids] == corpus.labels
    assert_bare(model, tok, corpus, before)


@pytest.mark.benchmark(group="collect-tiny")
def test_todays_way_collect(benchmark, setup):
    model, tok, corpus, pooled, _, before = setup
    resp, timing = benchmark(todays_way.collect, model, tok, corpus.texts, BATCH)
    got = torch.from_numpy(np.stack([resp[l] for l in sorted(resp)], 1))  # [N, L, M]
    assert got.shape == pooled.shape
    torch.testing.assert_close(got, pooled, **CLOSE)
    assert timing["tokens"] == sum(len(tok(t)["input_ids"]) for t in corpus.texts)
    assert_bare(model, tok, corpus, before)
