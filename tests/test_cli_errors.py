"""Bad input on the command line: one line on stderr, exit code 2, before any model loads where
possible, and nothing written or overwritten."""
import json

import pytest

from steer.cli import main
from tiny import tiny_model, tiny_tokenizer

LINES = ["en\tthe cat sat", "en\ta dog", "en\tthe end", "fr\tle chat", "fr\tun chien", "fr\tla fin",
         "de\tdie Katze", "de\tein Hund", "de\tdas Ende"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint, its corpus, and one finished find-experts run (the earlier outputs)."""
    d = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(d / "ckpt")
    tiny_tokenizer().save_pretrained(d / "ckpt")
    (d / "corpus.tsv").write_text("\n".join(LINES) + "\n")
    main(["find-experts", "--model", str(d / "ckpt"), "--corpus", str(d / "corpus.tsv"), "-k", "3",
          "--out", str(d / "out")])
    return d


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(argv, capsys, match, code=2):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_bad_k_is_refused_before_the_model_loads(run, capsys, tmp_path, monkeypatch):
    import steer.engine.models

    monkeypatch.setattr(steer.engine.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    find = ["find-experts", "--model", str(run / "ckpt"), "--corpus", str(run / "corpus.tsv")]
    fails([*find, "-k", "-5", "--out", str(tmp_path / "a")], capsys, "k=-5")
    fails([*find, "--bottom-k", "-1", "--out", str(tmp_path / "a")], capsys, "bottom_k=-1")
    fails(["generate", "--experts", str(run / "out" / "experts"), "--concept", "fr", "-k", "-3"], capsys, "k=-3")
    fails(["generate", "--experts", str(run / "out" / "experts"), "--concept", "fr", "-k", "100"], capsys,
          "the set holds 3 experts")
    fails(["generate", "--experts", str(run / "out" / "experts"), "--concept", "xx"], capsys, "'xx' is not in")
    assert not (tmp_path / "a").exists()


def test_score_with_more_experts_than_neurons(run, capsys, tmp_path):
    fails(["score", str(run / "out"), "--out", str(tmp_path / "re"), "-k", "100000"], capsys, "k=100000")
    assert not (tmp_path / "re").exists()


def test_unwritable_out_is_found_before_the_compute(run, capsys, tmp_path):
    before = snapshot(run / "out")
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    find = ["find-experts", "--model", str(run / "ckpt"), "--corpus", str(run / "corpus.tsv")]
    fails([*find, "--out", str(a_file)], capsys, "exists and is not a directory")
    fails([*find, "--out", str(a_file / "sub")], capsys, "is a file, not a directory")
    fails(["score", str(run / "out"), "--out", str(a_file / "sub")], capsys, "is a file, not a directory")
    fails(["generate", "--prompt", "x", "--out", str(a_file / "x.jsonl")], capsys, "is not a directory")
    fails(["generate", "--prompt", "x", "--out", str(tmp_path)], capsys, "is a directory")
    assert a_file.read_text() == "not a folder" and snapshot(run / "out") == before


def test_corpus_shape_errors(run, capsys, tmp_path):
    single = tmp_path / "single.tsv"
    single.write_text("".join(f"en\tsentence number {i}\n" for i in range(6)))
    find = ["find-experts", "--model", str(run / "ckpt"), "--out", str(tmp_path / "o")]
    fails([*find, "--corpus", str(single)], capsys, "one label")
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("".join(f"{line.split(chr(9))[1]} and more words\t{line.split(chr(9))[0]}\n" for line in LINES))
    fails([*find, "--corpus", str(swapped)], capsys, "swapped.tsv")
    assert not (tmp_path / "o").exists()


def test_generate_uses_the_model_of_the_expert_set(run, capsys, tmp_path):
    """No --model: the model recorded in the expert set (here the tiny checkpoint, not Gemma)."""
    meta = json.loads((run / "out" / "experts" / "experts.json").read_text())
    assert meta["model"] == str(run / "ckpt")
    out = tmp_path / "g.jsonl"
    main(["generate", "--experts", str(run / "out" / "experts"), "--concept", "fr", "-k", "2",
          "--prompt", "le", "--max-new-tokens", "3", "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[0])
    assert row["model"] == str(run / "ckpt") and row["k"] == 2
