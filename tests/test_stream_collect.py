"""Streaming collection + exact refine returns exactly the exact mode's experts and values."""
import random

import pytest
import torch

from steer.core.scores import Split, score_state
from steer.engine.collect import collect, collect_stream, refine
from steer.core.corpus import Corpus
from steer.core.experts import select_experts
from steer.core.stream import StreamState
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def setting():
    rng = random.Random(0)
    alphabets = {"a": "abcdefgh ", "b": "mnopqrst ", "c": "abmnxyz "}
    texts, labels = [], []
    for label, chars in alphabets.items():
        for _ in range(30):
            texts.append("".join(rng.choice(chars) for _ in range(rng.randint(3, 12))))
            labels.append(label)
    corpus = Corpus(texts, labels)
    model = tiny_model("llama")
    return model, tiny_tokenizer(), corpus, collect(model, tiny_tokenizer(), corpus, progress=False)


@pytest.mark.parametrize("by,value,bottom_k", [("ap", "on_p50", 0), ("auroc", "on_mean", 3)])
def test_stream_plus_refine_equals_exact(setting, by, value, bottom_k):
    model, tok, corpus, exact = setting
    splits = [Split.one_vs_rest("a"), Split("b", ("b",), ("a",))]
    state = collect_stream(model, tok, corpus, bins=8, calibration=40, batch_size=7, progress=False)
    assert state.n.tolist() == [30, 30, 30] and int(state.counts.sum()) == 90 * state.edges.shape[0]
    hist = select_experts(score_state(state, splits), k=10, by=by, value=value, bottom_k=bottom_k)
    want = select_experts(exact.score(splits), k=10, by=by, value=value, bottom_k=bottom_k)
    got = select_experts(refine(model, tok, corpus, state, splits, k=10, by=by, bottom_k=bottom_k,
                                progress=False), k=10, by=by, value=value, bottom_k=bottom_k)
    differs = False
    for name in ("a", "b"):
        for f in ("layer", "unit", "sign"):
            assert torch.equal(got.experts[name][f], want.experts[name][f]), (name, f)
        torch.testing.assert_close(got.experts[name]["value"], want.experts[name]["value"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.experts[name]["score"], want.experts[name]["score"], rtol=1e-12, atol=1e-12)
        differs |= not torch.equal(hist.experts[name]["unit"], want.experts[name]["unit"])
        differs |= not torch.allclose(hist.experts[name]["value"], want.experts[name]["value"])
    assert differs  # 8 bins are coarse: without the refine pass the answer would not be exact


def test_stream_state_is_independent_of_batching_and_round_trips(setting, tmp_path):
    model, tok, corpus, _ = setting
    a = collect_stream(model, tok, corpus, bins=16, calibration=30, batch_size=4, progress=False)
    b = collect_stream(model, tok, corpus, bins=16, calibration=30, batch_size=13, progress=False)
    torch.testing.assert_close(a.edges, b.edges, rtol=1e-6, atol=1e-7)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.n, b.n)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-6, atol=1e-6)
    a.save(tmp_path / "s.safetensors")
    back = StreamState.load(tmp_path / "s.safetensors")
    assert torch.equal(back.counts, a.counts) and back.settings == a.settings


def test_refine_refuses_another_corpus(setting):
    model, tok, corpus, _ = setting
    state = collect_stream(model, tok, corpus, bins=8, calibration=20, progress=False)
    with pytest.raises(ValueError, match="corpus hash differs"):
        refine(model, tok, corpus.subset(range(60)), state, k=3, progress=False)
