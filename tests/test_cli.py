"""The command line end to end on a tiny saved checkpoint: find-experts, then score without a forward."""
import json

import pytest

from steer.cli import main
from steer.core.experts import ExpertSet
from tiny import tiny_model, tiny_tokenizer

LINES = ["en\tthe cat sat", "en\ta dog", "en\tthe end", "fr\tle chat", "fr\tun chien", "fr\tla fin",
         "de\tdie Katze", "de\tein Hund", "de\tdas Ende"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    corpus = d / "corpus.tsv"
    corpus.write_text("\n".join(LINES) + "\n")
    return d, corpus


def test_find_experts_then_score(checkpoint, tmp_path, capsys):
    ckpt, corpus = checkpoint
    out = tmp_path / "run"
    main(["find-experts", "--model", str(ckpt), "--corpus", str(corpus), "-k", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Layer histogram" in printed and "Shared experts" in printed
    experts = ExpertSet.load(out / "experts")
    assert experts.concepts == ["en", "fr", "de"] and len(experts.rows("fr")) == 4
    run = json.loads((out / "run.json").read_text())
    assert run["sentences"] == 9 and run["pooling"] == "max"
    assert run["backend"] == "fused"  # --backend auto (the default) on a float32 Llama on the CPU

    main(["score", str(out), "--out", str(tmp_path / "re"), "--recipe", "sundar2025", "-k", "3",
          "--targets", "fr", "--negatives", "en,de"])
    re = ExpertSet.load(tmp_path / "re" / "experts")
    assert re.concepts == ["fr"] and re.meta["selection"]["by"] == "auroc"
    assert re.meta["splits"] == [{"name": "fr", "positive": ["fr"], "negative": ["en", "de"]}]
    assert all(r["score"] > 0.5 for r in re.rows("fr"))


def test_missing_responses_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["score", str(tmp_path), "--out", str(tmp_path / "x")])
    assert exit.value.code == 2
    assert "neither responses.safetensors nor state.safetensors" in capsys.readouterr().err


def test_unknown_model_path_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["info", "--model", str(tmp_path / "no" / "such" / "model")])
    assert exit.value.code == 2 and "neither a built-in model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):  # --debug: the exception itself
        main(["info", "--model", str(tmp_path / "no" / "such" / "model"), "--debug"])


def test_stream_mode_gives_the_exact_experts(checkpoint, tmp_path, capsys):
    ckpt, corpus = checkpoint
    common = ["find-experts", "--model", str(ckpt), "--corpus", str(corpus), "-k", "3"]
    main(common + ["--mode", "exact", "--out", str(tmp_path / "exact")])
    main(common + ["--mode", "stream", "--bins", "4", "--backend", "fused", "--out", str(tmp_path / "stream")])
    assert "refine: short-list of" in capsys.readouterr().out
    exact, stream = ExpertSet.load(tmp_path / "exact" / "experts"), ExpertSet.load(tmp_path / "stream" / "experts")
    for c in exact.concepts:
        assert [(r["layer"], r["unit"]) for r in exact.rows(c)] == [(r["layer"], r["unit"]) for r in stream.rows(c)]
    main(["score", str(tmp_path / "stream"), "--out", str(tmp_path / "re"), "-k", "2"])
    assert "certified within" in capsys.readouterr().out


def test_each_check_runs_once_from_the_command_line_to_the_scores(checkpoint, tmp_path, monkeypatch, capsys):
    """The options, the corpus's labels, the splits and the model-dependent checks each run once on
    the way from `steer find-experts` to the expert set, and all but the last before the model loads."""
    from steer import find
    from steer.engine import models

    calls = []

    def counted(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in [(find.FindConfig, "validate"), (find, "check_labels"), (find, "splits_for"),
                        (find.FindConfig, "check_model"), (find, "choose_mode"), (models, "load_model")]:
        counted(owner, name)
    ckpt, corpus = checkpoint
    main(["find-experts", "--model", str(ckpt), "--corpus", str(corpus), "-k", "2", "--out", str(tmp_path / "o")])
    assert calls == ["validate", "check_labels", "splits_for", "load_model", "check_model", "choose_mode"]
