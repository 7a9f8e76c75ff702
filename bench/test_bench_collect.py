"""Collection on a tiny random Gemma-3 model: bare forward vs steer.collect vs today's way.

    pytest bench/test_bench_collect.py --benchmark-only
"""
import random

import pytest
import torch

import todays_way
from steer.core.adapters import base_inputs
from steer.engine.batching import batches, pad, tokenize
from steer.engine.collect import collect
from steer.core.corpus import Corpus
from tiny import tiny_model, tiny_tokenizer

BATCH = 16


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    words = ["the", "cat", "le", "chien", "das", "ist", "gut", "hello", "world", "fin", "ende", "und"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(48)]
    labels = [["en", "fr", "de"][i % 3] for i in range(len(texts))]
    return tiny_model("gemma3"), tiny_tokenizer(), Corpus(texts, labels)


def bare(model, tok, corpus):
    ids, _ = tokenize(tok, corpus.texts, corpus.keys, True, None)
    with torch.inference_mode():
        for rows in batches([len(t) for t in ids], BATCH):
            input_ids = pad([ids[i] for i in rows], 0, tok.padding_side)
            mask = pad([[1] * len(ids[i]) for i in rows], 0, tok.padding_side)
            model.base_model(**base_inputs(model, input_ids, mask))


@pytest.mark.benchmark(group="collect-tiny")
def test_bare_forward(benchmark, setup):
    model, tok, corpus = setup
    benchmark(bare, model, tok, corpus)


@pytest.mark.benchmark(group="collect-tiny")
def test_steer_collect(benchmark, setup):
    model, tok, corpus = setup
    r = benchmark(collect, model, tok, corpus, batch_size=BATCH, progress=False)
    assert r.values.shape[0] == len(corpus)


@pytest.mark.benchmark(group="collect-tiny")
def test_todays_way_collect(benchmark, setup):
    model, tok, corpus = setup
    resp, _ = benchmark(todays_way.collect, model, tok, corpus.texts, BATCH)
    assert resp[0].shape[0] == len(corpus)
