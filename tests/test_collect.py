"""Exact collection: pooled responses are the hand-computed ones, whatever the batching or padding."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from steer.core.adapters import NeuronLayout
from steer.core.scores import Responses, Split
from steer.engine.collect import collect
from steer.core.corpus import Corpus
from tiny import tiny_model, tiny_tokenizer

TEXTS = ["the cat sat", "a dog", "le chat est là", "un chien", "das ist gut", "ein Hund bellt laut",
         "the end", "fin", "ende gut alles gut", "hello world", "bonjour", "hallo"]
LABELS = ["en", "en", "fr", "fr", "de", "de", "en", "fr", "de", "en", "fr", "de"]


@pytest.fixture(scope="module")
def corpus():
    return Corpus(TEXTS, LABELS)


def run(model, corpus, side="right", **kw):
    tok = tiny_tokenizer()
    tok.padding_side = side
    return collect(model, tok, corpus, progress=False, **kw)


def alone(model, text, pooling, skip_bos=True):
    """Pooled neuron values of one sentence computed directly from captured neuron tensors."""
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(text)["input_ids"]])
    layout = NeuronLayout(model)
    out = {}
    hs = [m.register_forward_pre_hook(lambda mod, a, l=l: out.__setitem__(l, layout.view(a[0], 1)[0])) for l, m in enumerate(layout.modules)]
    with torch.no_grad():
        model.base_model(input_ids=ids)
    for h in hs:
        h.remove()
    h = torch.stack([out[l][1:] if skip_bos else out[l] for l in range(layout.n_layers)])  # [L, T, M]
    return h.amax(1) if pooling == "max" else h.mean(1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_responses_are_hand_computed(family, pooling, corpus):
    model = tiny_model(family)
    r = run(model, corpus, pooling=pooling, batch_size=5)
    assert r.values.shape == (12, 2, NeuronLayout(model).width)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(r.values[i], alone(model, text, pooling), rtol=1e-5, atol=1e-6)


def test_special_tokens_count_when_asked(corpus):
    model = tiny_model("llama")
    r = run(model, corpus, skip_special=False)
    torch.testing.assert_close(r.values[3], alone(model, TEXTS[3], "max", skip_bos=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bloom", "xglm"])
def test_batch_size_padding_side_and_order_do_not_matter(family, corpus):
    model = tiny_model(family)
    ref = run(model, corpus, batch_size=1)
    for side in ("right", "left"):
        torch.testing.assert_close(run(model, corpus, side=side, batch_size=7).values, ref.values, rtol=1e-5, atol=1e-6)
    perm = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(0))
    shuffled = run(model, corpus.subset(perm), side="left", batch_size=7)
    torch.testing.assert_close(shuffled.values, ref.values[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_padding_never_reaches_a_pooled_value(side, pooling, corpus):
    model = tiny_model("llama")
    ref = run(model, corpus, side=side, pooling=pooling, batch_size=1).values
    layout = NeuronLayout(model)
    call = {}
    planted = []

    def plant(module, args):  # runs before the pooling hooks: huge values at every padding position
        h = args[0].clone()
        h[call["mask"] == 0] = 1e6
        planted.append(bool((call["mask"] == 0).any()))
        return (h,)

    handles = [layout.stack.register_forward_pre_hook(lambda m, a, kw: call.__setitem__("mask", kw["attention_mask"]), with_kwargs=True)]
    handles += [m.register_forward_pre_hook(plant) for m in layout.modules]
    try:
        got = run(model, corpus, side=side, pooling=pooling, batch_size=12).values
    finally:
        for h in handles:
            h.remove()
    assert any(planted)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_scores_match_sklearn_and_round_trip(tmp_path, corpus):
    model = tiny_model("qwen2")
    r = run(model, corpus)
    r.save(tmp_path / "r.safetensors")
    back = Responses.load(tmp_path / "r.safetensors")
    assert torch.equal(back.values, r.values) and back.label_names == ["en", "fr", "de"]
    assert back.settings["corpus_hash"] == corpus.hash()
    scores = back.score([Split.one_vs_rest("fr"), Split("fr-vs-de", ("fr",), ("de",))])
    y = np.array([l == "fr" for l in LABELS])
    x = r.values.reshape(12, -1).double().numpy()
    for j in [0, 5, 50, 95]:
        assert scores.stats["ap"][0].flatten()[j] == pytest.approx(average_precision_score(y, x[:, j]), abs=1e-12)
        assert scores.stats["auroc"][0].flatten()[j] == pytest.approx(roc_auc_score(y, x[:, j]), abs=1e-12)
        keep = np.array([l in ("fr", "de") for l in LABELS])
        assert scores.stats["auroc"][1].flatten()[j] == pytest.approx(roc_auc_score(y[keep], x[keep, j]), abs=1e-12)


def test_bad_input_is_a_clear_error(corpus):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="pooling="):
        run(model, corpus, pooling="median")
    with pytest.raises(ValueError, match="absent from the corpus"):
        run(model, corpus).score([Split.one_vs_rest("ja")])
