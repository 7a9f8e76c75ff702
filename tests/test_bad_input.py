"""Bad input: each case is a clear error (or a warning and a documented result), and nothing is
lost: the outputs of an earlier run in the same --out, and its checkpoints, stay byte for byte."""
import json
import shutil
import warnings

import pytest
import torch
import transformers as T

from steer.cli import main
from steer.engine.collect import collect_stream
from steer.core.corpus import open_corpus
from steer.core.experts import ExpertSet
from steer.engine.models import load_model
from steer.core.stream import StreamState
from tiny import tiny_model, tiny_tokenizer

LINES = ["en\tthe cat sat", "en\ta dog", "en\tthe end", "fr\tle chat", "fr\tun chien", "fr\tla fin",
         "de\tdie Katze", "de\tein Hund", "de\tdas Ende"]
STREAM = ["--mode", "stream", "--bins", "4", "--calibration", "5", "--batch-size", "2", "-k", "3"]


def save_checkpoint(path, model):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint, a corpus, and an earlier successful stream run in base/earlier."""
    d = tmp_path_factory.mktemp("bad")
    save_checkpoint(d / "ckpt", tiny_model("llama"))
    (d / "corpus.tsv").write_text("\n".join(LINES) + "\n")
    main(["find-experts", "--model", str(d / "ckpt"), "--corpus", str(d / "corpus.tsv"), *STREAM,
          "--out", str(d / "earlier")])
    return d


def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(base, tmp_path):
    """A copy of the earlier run's outputs, and their bytes."""
    out = tmp_path / "out"
    shutil.copytree(base / "earlier", out)
    before = snapshot(out)
    assert {"state.safetensors", "statistics.csv", "summary.txt", "run.json",
            "experts/experts.json", "experts/experts.safetensors"} <= set(before)
    return out, before


def find(base, out, *extra, corpus=None, model=None):
    main(["find-experts", "--model", str(model or base / "ckpt"), "--corpus", str(corpus or base / "corpus.tsv"),
          *STREAM, "--out", str(out), "--debug", *extra])  # --debug: the exception itself, not exit 2


def test_empty_corpus_or_label(base, earlier, tmp_path):
    out, before = earlier
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.tsv: no sentences \(empty corpus\)"):
        find(base, out, corpus=empty)
    blank = tmp_path / "blank.tsv"
    blank.write_text("en\t   \nfr\t\n")
    with pytest.warns(UserWarning, match="dropped 2 empty"), pytest.raises(ValueError, match="no sentences"):
        find(base, out, corpus=blank)
    nolabel = tmp_path / "nolabel.tsv"
    nolabel.write_text("en\tok\n\tbonjour\n")
    with pytest.raises(ValueError, match=r"nolabel\.tsv:2: empty label"):
        find(base, out, corpus=nolabel)
    with pytest.raises(ValueError, match="labels must be non-empty and distinct"):
        find(base, out, "--labels", "en,en")
    assert snapshot(out) == before


def test_label_without_positives_or_negatives_follows_the_rule(base, earlier, tmp_path):
    out, before = earlier
    # a declared label absent from the corpus: no positives -> AP and AUROC NaN, with warnings
    for mode in ("stream", "exact"):
        with pytest.warns(UserWarning) as caught:
            find(base, tmp_path / mode, "--labels", "en,fr,de,xx", "--mode", mode)
        text = " ".join(str(w.message) for w in caught)
        assert "declared labels ['xx'] have no sentences" in text and "no positive" in text
        experts = ExpertSet.load(tmp_path / mode / "experts")
        assert experts.concepts == ["en", "fr", "de", "xx"] and experts.rows("xx") == []
        assert len(experts.rows("fr")) == 3
        stats = (tmp_path / mode / "statistics.csv").read_text().splitlines()
        assert all(",nan,nan," in row for row in stats if row.startswith("xx,"))
    # a corpus of one label: no negatives, no experts -> refused before the forward pass (issue 17)
    one = tmp_path / "one.tsv"
    one.write_text("\n".join(line for line in LINES if line.startswith("fr")) + "\n")
    with pytest.raises(ValueError, match=r"the corpus has one label \('fr'\): experts need at least two"):
        find(base, tmp_path / "one", corpus=one)
    assert not (tmp_path / "one" / "experts").exists()
    assert snapshot(out) == before


def test_nonfinite_activations_are_counted_and_reported(base, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5] = float("nan")  # neuron L1/5 is NaN on every token
    save_checkpoint(tmp_path / "nan", model)
    for mode in ("stream", "exact"):
        with pytest.warns(UserWarning, match=r"Non-finite responses \(NaN/inf\): 9 in 1 neurons"):
            find(base, tmp_path / mode, "--mode", mode, model=tmp_path / "nan")
        summary = (tmp_path / mode / "summary.txt").read_text()
        assert "Non-finite responses (NaN/inf): 9 in 1 neurons, never binned" in summary and "L1/5 (9)" in summary
        assert json.loads((tmp_path / mode / "run.json").read_text())["nonfinite"]["worst"] == [[1, 5, 9]]
        experts = ExpertSet.load(tmp_path / mode / "experts")
        assert all((r["layer"], r["unit"]) != (1, 5) for c in experts.concepts for r in experts.rows(c))
        assert all(",nan,nan," in row for row in (tmp_path / mode / "statistics.csv").read_text().splitlines()
                   if row.split(",")[1:3] == ["1", "5"])
    state = StreamState.load(tmp_path / "stream" / "state.safetensors")
    assert state.nonfinite.tolist() == [9 if i == 48 + 5 else 0 for i in range(96)]
    assert int(state.counts[:, 48 + 5].sum()) == 0  # never binned


def test_sentences_longer_than_the_context(base, earlier, tmp_path):
    out, before = earlier
    with pytest.raises(ValueError, match=r"sentence 'en/1' has 12 tokens, more than the limit of 5"):
        find(base, out, "--max-length", "5", "--too-long", "error")
    assert snapshot(out) == before
    model = tiny_model("llama")
    model.config.max_position_embeddings = 8  # a model with a context of 8 tokens
    save_checkpoint(tmp_path / "short", model)
    with pytest.raises(ValueError, match="more than the limit of 8"):
        find(base, out, "--too-long", "error", model=tmp_path / "short")
    assert snapshot(out) == before
    with pytest.warns(UserWarning, match=r"'en/1' has 12 tokens, more than the limit of 8 .* truncated"):
        find(base, tmp_path / "cut", model=tmp_path / "short")
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["truncated"] == sum(len(line.split("\t")[1]) + 1 > 8 for line in LINES) == 5


def test_unknown_architecture(base, earlier, tmp_path):
    out, before = earlier
    neox = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=48, vocab_size=300))
    save_checkpoint(tmp_path / "neox", neox)
    for mode in ("auto", "stream"):
        with pytest.raises(ValueError, match=r"unknown architecture 'gpt_neox'.*neuron_module"):
            find(base, out, "--mode", mode, model=tmp_path / "neox")
    assert snapshot(out) == before


def test_expert_file_for_another_model(base, earlier):
    out, before = earlier
    experts = ExpertSet.load(out / "experts")
    with pytest.raises(ValueError, match=r"expert set is for .* with 2 layers x 48 neurons; this model has 2 x 128"):
        experts.intervention("fr", tiny_model("bloom"))
    with pytest.warns(UserWarning, match="same shapes but other weights"):
        experts.intervention("fr", tiny_model("llama", seed=1))
    model, _ = load_model(str(base / "ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experts.intervention("fr", model)  # its own model: no warning
    assert snapshot(out) == before


def test_out_of_range_neuron_indices(base, earlier, tmp_path):
    out, before = earlier
    experts = ExpertSet.load(out / "experts")
    experts.experts["fr"]["unit"][0] = 48
    edited = experts.save(tmp_path / "edited")
    with pytest.raises(IndexError, match="unit index 48 out of range: the model has 48 units"):
        ExpertSet.load(edited).intervention("fr", tiny_model("llama"))
    experts.experts["fr"]["unit"][0] = 0
    experts.experts["fr"]["layer"][0] = 2
    with pytest.raises(IndexError, match="layer index 2 out of range"):
        experts.intervention("fr")
    with pytest.raises(ValueError, match="k=9 but the set holds 3 experts"):
        experts.intervention("fr", k=9)
    assert snapshot(out) == before


def test_corrupt_or_truncated_checkpoint(base, earlier):
    out, before = earlier
    model, tok = load_model(str(base / "ckpt"))
    ckpt = out / "checkpoint.safetensors"
    collect_stream(model, tok, open_corpus(base / "corpus.tsv"), bins=4, calibration=5, batch_size=2,
                   checkpoint=ckpt, checkpoint_every=1, progress=False)
    good = ckpt.read_bytes()
    before = snapshot(out)
    ckpt.write_bytes(good[: len(good) - 100])  # truncated (a copy killed mid-transfer)
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors is corrupt or truncated"):
        find(base, out, "--resume")
    assert ckpt.read_bytes() == good[: len(good) - 100]
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # one flipped bit in the tensors: the header still parses
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupt: its tensors or metadata do not match the sha256"):
        find(base, out, "--resume")
    shutil.copy(out / "state.safetensors", ckpt)
    with pytest.raises(ValueError, match="is a streaming state, not a checkpoint"):
        find(base, out, "--resume")
    ckpt.write_bytes(good)
    assert snapshot(out) == before


def test_corrupt_or_truncated_expert_or_state_file(base, earlier, tmp_path):
    out, before = earlier
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = (bad / "experts" / "experts.safetensors").read_bytes()
    (bad / "experts" / "experts.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read the expert set"):
        ExpertSet.load(bad / "experts")
    (bad / "experts" / "experts.json").write_text('{"format_version": 1, "conc')
    with pytest.raises(ValueError, match="cannot read the expert set"):
        ExpertSet.load(bad / "experts")
    data = (bad / "state.safetensors").read_bytes()
    (bad / "state.safetensors").write_bytes(data[:50])
    with pytest.raises(ValueError, match=r"state\.safetensors is corrupt or truncated"):
        main(["score", str(bad), "--out", str(out), "--debug"])  # writing over the earlier outputs: refused first
    assert snapshot(out) == before
