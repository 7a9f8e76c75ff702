"""`find_experts`, the library verb of the main job, against the pieces it is made of."""
import pytest
import torch

from steer import Corpus, find_experts, select_experts
from steer import collect
from steer.core.scores import Split
from steer.find import FindConfig, choose_mode
from tiny import tiny_model, tiny_tokenizer

TEXTS = {"en": ["the cat sat", "a dog ran far", "the end is near", "we went home", "it rains today"],
         "fr": ["le chat dort", "un chien court", "la fin est proche", "nous sommes partis", "il pleut"],
         "de": ["die Katze schläft", "ein Hund rennt", "das Ende naht", "wir gingen heim", "es regnet heute"]}


@pytest.fixture(scope="module")
def setting():
    texts = [t for lang in TEXTS for t in TEXTS[lang]]
    labels = [lang for lang in TEXTS for _ in TEXTS[lang]]
    return tiny_model("llama"), tiny_tokenizer(), Corpus(texts, labels)


def _pairs(experts, concept):
    e = experts.experts[concept]
    return list(zip(e["layer"].tolist(), e["unit"].tolist())), e["value"]


def test_exact_mode_equals_the_pieces_by_hand(setting):
    model, tok, corpus = setting
    found = find_experts(model, tok, corpus, k=7, recipe="sundar2025", targets=["fr", "de"], progress=False)
    assert found.mode == "exact" and found.responses is not None
    splits = [Split("fr", ("fr",), ("en", "de")), Split("de", ("de",), ("en", "fr"))]
    scores = collect(model, tok, corpus, progress=False).score(splits)
    hand = select_experts(scores, 7, by="auroc", value="on_mean", min_auroc=0.5)
    assert found.experts.concepts == hand.concepts == ["fr", "de"]
    for c in hand.concepts:
        got, want = _pairs(found.experts, c), _pairs(hand, c)
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1])
    for name in ("ap", "auroc", "on_mean"):
        torch.testing.assert_close(found.scores.stats[name], scores.stats[name], equal_nan=True)


def test_stream_mode_equals_exact_modes_top_k(setting):
    model, tok, corpus = setting
    exact = find_experts(model, tok, corpus, k=5, mode="exact", progress=False)
    stream = find_experts(model, tok, corpus, k=5, mode="stream", bins=4, calibration=6, progress=False)
    assert stream.mode == "stream" and stream.state is not None
    for c in exact.experts.concepts:
        got, want = _pairs(stream.experts, c), _pairs(exact.experts, c)
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1])


def test_auto_mode_follows_the_memory_budget():
    config = FindConfig(memory_budget_gib=1.0)
    assert choose_mode(config, n_sentences=1000, n_neurons=1000) == "exact"
    assert choose_mode(config, n_sentences=2**20, n_neurons=1000) == "stream"  # 4 GiB of responses
    assert choose_mode(FindConfig(checkpoint="x", checkpoint_every=5), 10, 10) == "stream"
    with pytest.raises(ValueError, match="checkpoints are a streaming feature"):
        FindConfig(mode="exact", checkpoint="x", resume=True).validate()


def test_bad_options_fail_before_any_forward(setting):
    model, tok, corpus = setting
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad, match in [(dict(k=-5), "k"), (dict(mode="fast"), "mode 'fast'"),
                           (dict(recipe="mine"), "recipe 'mine'"), (dict(targets=["xx"]), r"\['xx'\] are not in"),
                           (dict(checkpoint_every=3), "need a checkpoint path"),
                           (dict(layers=[5]), r"layers \[5\] out of range"),
                           (dict(k=50, layers=[0]), "k=50 but the chosen layers hold 48 neurons"),
                           (dict(targets=["en"], negatives=["en"]), "no negative label"),
                           (dict(batch_size=0), "batch_size"), (dict(max_tokens=-1), "max_tokens"),
                           (dict(bins=2, mode="stream"), "bins"), (dict(backend="cuda"), "backend='cuda'")]:
            with pytest.raises(ValueError, match=match):
                find_experts(model, tok, corpus, progress=False, **bad)
    finally:
        handle.remove()
    assert not calls


def test_more_experts_than_neurons_fails_before_any_forward(setting):
    model, tok, corpus = setting
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="k=1000 but the model has 96 neurons"):
            find_experts(model, tok, corpus, k=1000, progress=False)
    finally:
        handle.remove()
    assert not calls


def test_default_backend_is_auto_fused_here_with_the_hooks_results(setting):
    """The default collects through the fused patch where that gives the hooks' exact bits (a
    float32 Llama on the CPU) and records the backend that ran; exact and stream results equal
    the hooks' bit for bit."""
    model, tok, corpus = setting
    assert FindConfig().backend == "auto"
    auto = find_experts(model, tok, corpus, k=5, progress=False)
    hooks = find_experts(model, tok, corpus, k=5, backend="hooks", progress=False)
    assert auto.settings["backend"] == "fused" and hooks.settings["backend"] == "hooks"
    assert torch.equal(auto.responses.values, hooks.responses.values)
    auto = find_experts(model, tok, corpus, k=5, mode="stream", bins=4, calibration=5, progress=False)
    hooks = find_experts(model, tok, corpus, k=5, mode="stream", bins=4, calibration=5, backend="hooks",
                         progress=False)
    assert auto.state.digest() == hooks.state.digest()
    for key, t in auto.scores.flat().items():
        assert torch.equal(t, hooks.scores.flat()[key]), key
    for c in auto.experts.concepts:
        assert _pairs(auto.experts, c)[0] == _pairs(hooks.experts, c)[0]
        assert torch.equal(_pairs(auto.experts, c)[1], _pairs(hooks.experts, c)[1])
