"""`steer study` end to end on a tiny random model and synthetic parallel text (seconds, offline).

The corpus functions and the model loader of the study's protocol are monkeypatched: every
language is a deterministic character transform of the same base sentences, so rows stay aligned
and each split has its own sentences. A log records which split each corpus call asked for, and a spy on
`protocol.choose` records what the selection saw, so the tests can check that k is chosen from dev
records only and before anything of the test split is loaded.
"""
import json
import logging
import random
from collections import Counter

import pytest
import torch

from steer.cli import study as cli
from steer.experiments.study import cache, config, control, protocol
from steer.experiments.study.report import render_only
from steer.core import corpus as C
from steer.core.corpus import Parallel
from steer.core.experts import ExpertSet, random_control, values_sha

from tiny import tiny_model, tiny_tokenizer

WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore".split()
LANGS = ["en", "fr", "de", "zh"]


def _shift(text, n):
    return "".join(chr((ord(c) - 97 + n) % 26 + 97) if "a" <= c <= "z" else c for c in text)


TRANSFORMS = {
    "en": lambda s: s,
    "fr": lambda s: _shift(s, 1) + " é",
    "de": lambda s: " ".join(w[::-1] for w in s.split()) + " ß",
    "zh": lambda s: s.upper(),
    "es": lambda s: _shift(s, 3) + " ñ",
    "ru": lambda s: "".join(chr(0x430 + (ord(c) - 97) % 32) if "a" <= c <= "z" else c for c in s),
    "it": lambda s: _shift(s, 7) + " à",
}


def _base(split, n, seed, salt=""):
    rng = random.Random(f"{split}:{seed}:{salt}")
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(n)]


class FakeData:
    """Synthetic stand-ins for the corpus functions; `log` lists (function, split) calls."""

    def __init__(self, test_salt=""):
        self.log, self.test_salt = [], test_salt

    def parallel(self, languages, split="test", n=None, seed=0, **_):
        self.log.append(("bible_parallel", split))
        n = n or 12
        base = _base(split, n, seed, self.test_salt if split == "test" else "")
        return Parallel({l: [TRANSFORMS[l](s) for s in base] for l in languages},
                        [f"{split}:{i}" for i in range(n)], {"split": split, "synthetic": True})

    def corpus(self, languages, split="discovery", n_per_language=None, seed=0, **_):
        self.log.append(("bible_corpus", split))
        base = _base(split, n_per_language or 12, seed)
        return Parallel({l: [TRANSFORMS[l](s) for s in base] for l in languages},
                        [f"{split}:{i}" for i in range(len(base))], {"split": split}).to_corpus()

    def paraphrases(self, language, split="test", n=None, seed=0, **_):
        self.log.append(("bible_paraphrases", split))
        base = _base(split, n or 12, seed, self.test_salt if split == "test" else "")
        first = [TRANSFORMS[language](s) for s in base]
        second = [TRANSFORMS[language](" ".join(s.split()[::-1])) for s in base]
        return Parallel({f"{language}:1": first, f"{language}:2": second},
                        [f"{split}:{i}" for i in range(len(base))], {"split": split})

    def udhr(self, languages=None):
        self.log.append(("udhr_parallel", "udhr"))
        languages = list(languages) if languages is not None else ["en", "fr", "de", "zh", "es", "ru"]
        base = _base("udhr", 8, 0)
        return Parallel({l: [TRANSFORMS[l](s) for s in base] for l in languages},
                        [f"udhr:{i}" for i in range(len(base))], {"source": "synthetic"})


@pytest.fixture
def fake(monkeypatch):
    data = FakeData()
    monkeypatch.setattr(protocol, "bible_parallel", data.parallel)
    monkeypatch.setattr(protocol, "bible_corpus", data.corpus)
    monkeypatch.setattr(protocol, "bible_paraphrases", data.paraphrases)
    monkeypatch.setattr(protocol, "udhr_parallel", data.udhr)
    model = tiny_model("gemma3")
    monkeypatch.setattr(protocol, "load_model", lambda name, **kw: (model, tiny_tokenizer()))
    return data


def _config(tmp_path, **kw):
    cfg = dict(model="tiny", targets=["fr", "de"], languages=LANGS, negatives=["zh"], n_discovery=10, n_dev=8,
               n_test=10, n_control=6, n_paraphrase=8, k_grid=[2, 5], control_seeds=5, n_boot=40,
               out=str(tmp_path / "out"), cache_dir=None, progress=False, batch_size=4, threads=1)
    cfg.update(kw)
    return cfg


@pytest.fixture
def spy_choose(monkeypatch, fake):
    calls = []
    real = protocol.choose

    def spy(records, *args, **kw):
        calls.append({"records": [dict(r) for r in records], "log_len": len(fake.log), "log": list(fake.log)})
        return real(records, *args, **kw)

    monkeypatch.setattr(protocol, "choose", spy)
    return calls


def test_pipeline_end_to_end(tmp_path, fake, spy_choose):
    res = protocol.run_study(_config(tmp_path))
    out = tmp_path / "out"
    for name in ("report.md", "results.json", "retrieval_per_language.png", "retrieval_change_heatmap.png",
                 "k_sweep_dev.png", "layers_dev.png", "random_control.png", "projection_fr.png", "projection_de.png"):
        assert (out / name).exists(), name
        if name.endswith(".png"):
            assert (out / name).stat().st_size < 200_000
    saved = json.loads((out / "results.json").read_text())
    for key in ("schema", "config", "environment", "corpora", "model", "experts", "dev", "test", "control",
                "paraphrases", "udhr", "stages", "total_seconds", "figures", "verdict"):
        assert key in saved, key
    assert set(saved["corpora"]) >= {"discovery", "dev", "test", "udhr", "paraphrases"}
    assert all(len(e["hash"]) == 64 for k, e in saved["corpora"].items() if k != "paraphrases")
    for t in ("fr", "de"):
        block = saved["test"][t]
        assert block["k"] == saved["dev"]["chosen"]["k"][t] in (2, 5)
        for s in ("a", "b"):
            pre, lo, hi = block["retrieval"]["raw"]["settings"][s]["pre"]
            assert 0 <= lo <= pre <= hi <= 1
        assert block["distances"]["pre"]["mean_pairwise"] is not None
        assert set(block["correlation"]["raw"]["pre"]) >= {"mean_level", "sentence_level"}
        assert set(saved["paraphrases"][t]) == {"en", "fr", "de"}
        assert set(saved["paraphrases"][t]["en"]["raw"]) >= {"pre", "post", "mixed"}
        assert saved["udhr"][t]["retrieval"]["raw"]["settings"]["a"]["pairs"] == 3
    assert saved["environment"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## k sweep (dev split)", "## Distances", "## Retrieval vs distance",
                    "## Paraphrase retrieval", "## Random-neuron control", "## UDHR", "## Run"):
        assert heading in report
    assert res["dev"]["chosen"] == saved["dev"]["chosen"]


def test_k_chosen_on_dev_before_any_test_data(tmp_path, fake, spy_choose):
    res = protocol.run_study(_config(tmp_path))
    assert len(spy_choose) == 1
    call = spy_choose[0]
    assert call["records"] and {r["split"] for r in call["records"]} == {"dev"}
    assert {r["k"] for r in call["records"]} == {0, 2, 5}
    # at the time of the choice only discovery and dev data had been requested
    assert {split for _, split in call["log"]} == {"discovery", "dev"}
    assert any(split == "test" for _, split in fake.log[call["log_len"]:])
    # the reported choice is what the selection returned from those records
    again = protocol.choose(call["records"], ["fr", "de"], "a", False, res["dev"]["readout_default"])
    assert again["k"] == res["dev"]["chosen"]["k"]


def test_test_split_never_influences_a_choice(tmp_path, fake, monkeypatch):
    first = protocol.run_study(_config(tmp_path / "one", layer_search=True))
    other = FakeData(test_salt="different test verses")
    monkeypatch.setattr(protocol, "bible_parallel", other.parallel)
    monkeypatch.setattr(protocol, "bible_paraphrases", other.paraphrases)
    second = protocol.run_study(_config(tmp_path / "two", layer_search=True))
    assert first["dev"]["records"] == second["dev"]["records"]
    assert first["dev"]["chosen"] == second["dev"]["chosen"]
    assert first["corpora"]["test"]["hash"] != second["corpora"]["test"]["hash"]
    assert first["test"]["fr"]["retrieval"] != second["test"]["fr"]["retrieval"]


def test_choose_rejects_non_dev_records_and_breaks_ties():
    recs = [{"split": "dev", "target": "fr", "k": k, "layer": 2, "a": a, "b": 0.1}
            for k, a in ((0, 0.2), (10, 0.5), (25, 0.5), (50, 0.4))]
    assert protocol.choose(recs, ["fr"], "a", False, 2)["k"] == {"fr": 10}
    recs_b = [dict(r, b=b) for r, b in zip(recs, (0.1, 0.1, 0.3, 0.9))]
    assert protocol.choose(recs_b, ["fr"], "ab", False, 2)["k"] == {"fr": 50}
    with pytest.raises(ValueError, match="dev records only"):
        protocol.choose(recs + [dict(recs[1], split="test")], ["fr"], "a", False, 2)


def _expert_set():
    layer = torch.tensor([0, 0, 1, 1, 1, 0])
    unit = torch.tensor([3, 7, 1, 2, 40, 11])
    return ExpertSet({"fr": {"layer": layer, "unit": unit, "value": torch.tensor([1.5, -0.5, 2.0, 0.25, 3.0, 1.0]),
                             "score": torch.linspace(1, 0.6, 6), "other": torch.zeros(6),
                             "sign": torch.ones(6, dtype=torch.int8)}},
                     {"layers": 2, "width": 48})


@pytest.mark.parametrize("layers", ["any", "matched"])
def test_random_control_same_count_and_values(layers):
    es = _expert_set()
    e = es.experts["fr"]
    expert_ids = set((e["layer"] * 48 + e["unit"]).tolist())  # the whole set, not only the first 4
    seen = set()
    for seed in range(5):
        iv, info = random_control(es, "fr", 4, seed, layers=layers)
        assert len(iv) == info["n_neurons"] == 4
        idx = iv.mask.nonzero()
        ids = set((idx[:, 0] * 48 + idx[:, 1]).tolist())
        assert not ids & expert_ids
        assert sorted(iv.add[iv.mask].tolist()) == sorted(e["value"][:4].tolist())
        assert (iv.mul[iv.mask] == 0).all()
        assert info["values_sha"] == values_sha(e["value"][:4]) == values_sha(e["value"][:4].flip(0))
        assert info["seed"] == seed and info["layers"] == layers
        assert info["layer_histogram"] == dict(sorted(Counter(idx[:, 0].tolist()).items()))
        if layers == "matched":
            assert sorted(idx[:, 0].tolist()) == sorted(e["layer"][:4].tolist())
        again, _ = random_control(es, "fr", 4, seed, layers=layers)  # same seed, same neurons
        assert torch.equal(again.mask, iv.mask) and torch.equal(again.add, iv.add)
        seen.add(frozenset(ids))
    assert len(seen) == 5  # seeds draw different neurons


def test_random_control_strength_k_and_layers():
    es = _expert_set()
    e = es.experts["fr"]
    iv, info = random_control(es, "fr", 3, 0, strength=2.0, positions="prompt")
    assert sorted(iv.add[iv.mask].tolist()) == sorted((2.0 * e["value"][:3]).tolist())
    assert iv.positions == "prompt" and info["values_sha"] == values_sha(2.0 * e["value"][:3])
    base, _ = random_control(es, "fr", 3, 0)
    assert torch.equal(base.mask, iv.mask)  # strength scales the values, not the draw
    iv, info = random_control(es, "fr", 0, 0, layers="matched")
    assert len(iv) == 0 and info["n_neurons"] == 0 and info["layer_histogram"] == {}
    with pytest.raises(ValueError, match=r"k=7 but the set holds 6 experts for 'fr'"):
        random_control(es, "fr", 7, 0)
    with pytest.raises(ValueError, match=r"k=-1: must be an integer >= 0"):
        random_control(es, "fr", -1, 0)
    with pytest.raises(ValueError, match=r"layers='same'; choose one of \('any', 'matched'\)"):
        random_control(es, "fr", 2, 0, layers="same")
    with pytest.raises(KeyError):
        random_control(es, "xx", 2, 0)


def test_random_control_keeps_the_study_draw():
    """The draw the study's committed numbers came from: a seeded permutation of all neurons
    ("any") or of the expert's layer ("matched"), skipping the whole expert set."""
    es = _expert_set()
    e = es.experts["fr"]
    taken = set((e["layer"] * 48 + e["unit"]).tolist())
    for seed in (0, control.control_seed(0, "fr", 1)):
        gen = torch.Generator().manual_seed(seed)
        want = [i for i in torch.randperm(2 * 48, generator=gen).tolist() if i not in taken][:4]
        iv, _ = random_control(es, "fr", 4, seed)
        got = iv.mask.flatten().nonzero().flatten().tolist()
        assert got == sorted(want)
        gen, want, used = torch.Generator().manual_seed(seed), [], set(taken)
        for layer in e["layer"][:4].tolist():
            unit = next(u for u in torch.randperm(48, generator=gen).tolist() if layer * 48 + u not in used)
            used.add(layer * 48 + unit)
            want.append(layer * 48 + unit)
        iv, _ = random_control(es, "fr", 4, seed, layers="matched")
        assert iv.mask.flatten().nonzero().flatten().tolist() == sorted(want)


def test_pipeline_control_matches_experts(tmp_path, fake):
    res = protocol.run_study(_config(tmp_path, paraphrases=False, udhr=False))
    for t in ("fr", "de"):
        c = res["control"][t]
        assert len(c["seeds"]) == 5 and c["random"]["n_seeds"] == 5
        assert len({s["seed"] for s in c["seeds"]}) == 5
        for s in c["seeds"]:
            assert s["n_neurons"] == c["k"] == res["dev"]["chosen"]["k"][t]
            assert s["values_sha"] == c["experts_values_sha"]
    assert "paraphrases" not in res and "udhr" not in res


def test_one_side_variant_and_layer_search(tmp_path, fake):
    res = protocol.run_study(_config(tmp_path, sides="target", layer_search=True, center=True, criterion="ab",
                                  paraphrases=False, udhr=False, control_seeds=1))
    chosen = res["dev"]["chosen"]
    assert chosen["layer"] in (1, 2) and set(chosen["layer_scores"]) == {"1", "2"}
    assert res["dev"]["representation"] == "centred"
    # only the target language is intervened: setting (b) is untouched
    for t in ("fr", "de"):
        b = res["test"][t]["retrieval"]["raw"]["settings"]["b"]
        assert b["pre"][0] == b["post"][0] and b["delta"][0] == 0


def test_cache_reuses_unsteered_embeddings(tmp_path, fake):
    cfg = _config(tmp_path, cache_dir=str(tmp_path / "cache"), paraphrases=False, udhr=False, control_seeds=1)
    first = protocol.run_study(cfg)
    assert any((tmp_path / "cache").glob("*-base.safetensors"))
    second = protocol.run_study(cfg)
    computed = {s["stage"]: s.get("computed_sentences") for s in second["stages"]}
    assert computed["dev sweep"] == 0 and computed["test"] == 0 and computed["random control"] == 0
    assert first["test"] == second["test"]


def test_cache_of_other_numerics_is_not_reused(tmp_path, fake, monkeypatch):
    """Embeddings of a steer whose numerics differ in any bit are never mixed with this one's."""
    cfg = _config(tmp_path, cache_dir=str(tmp_path / "cache"), paraphrases=False, udhr=False, control_seeds=1)
    protocol.run_study(cfg)
    files = set((tmp_path / "cache").iterdir())
    monkeypatch.setattr(cache, "NUMERICS", cache.NUMERICS + 1)
    again = protocol.run_study(cfg)
    assert {s["stage"]: s.get("cached_sentences") for s in again["stages"]}["dev sweep"] == 0
    assert set((tmp_path / "cache").iterdir()) > files  # new files beside the old ones


def test_cli_parser_full_and_overrides():
    from steer.cli import parser

    p = parser()  # the real `steer` parser: every option it adds (--debug, --device, ...) is handled
    args = p.parse_args(["study", "--full", "--k-grid", "5,10", "--no-cache", "--quiet", "--debug"])
    cfg = cli.config_from_args(args)
    assert cfg.targets == ["en", "de", "fr", "es", "ja"] and len(cfg.languages) == 22
    assert cfg.k_grid == [5, 10] and cfg.cache_dir is None and cfg.progress is False and cfg.test_k_sweep
    cfg = cli.config_from_args(p.parse_args(["study", "--targets", "fr", "--layer", "11", "--center"]))
    assert cfg.targets == ["fr"] and cfg.layer == 11 and cfg.center and cfg.cache_dir == "default"
    assert cfg.languages == config.StudyConfig().languages and not cfg.full
    with pytest.raises(ValueError):
        config.as_config({"targets": ["xx"]}).validate()


def test_generation_section_and_render_only(tmp_path, fake):
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation.json").write_text(json.dumps(
        {"summary": "steering fr experts", "rows": [{"k": 10, "fraction_target": 0.4}, {"k": 50, "fraction_target": 0.9}]}))
    protocol.run_study(_config(tmp_path, paraphrases=False, udhr=False, control_seeds=1))
    report = (out / "report.md").read_text()
    assert "## Language steering in generation" in report and "fraction_target" in report
    (out / "report.md").unlink()
    render_only(out / "results.json")
    assert (out / "report.md").read_text() == report
    # a study in a sub-folder is listed as a variant of this one
    (out / "variant").mkdir()
    (out / "variant" / "results.json").write_text((out / "results.json").read_text())
    render_only(out / "results.json")
    assert "## Variants of this run" in (out / "report.md").read_text()
    assert "(variant/report.md)" in (out / "report.md").read_text()


# --- the user's corpora (--eval-corpus, --discovery-corpus) -------------------------------------

def _write_parallel(path, languages, n):
    """An aligned TSV: a header of codes, then row i = every language's form of base sentence i."""
    rows = ["\t".join(TRANSFORMS[l](s) for l in languages) for s in _base("eval file", n, 0)]
    path.write_text("\n".join(["\t".join(languages), *rows]) + "\n", encoding="utf-8")
    return str(path)


def _write_labelled(path, languages, n):
    path.write_text("".join(f"{l}\t{TRANSFORMS[l](s)}\n" for l in languages for s in _base("disc file", n, 0)),
                    encoding="utf-8")
    return str(path)


def test_eval_corpus_end_to_end(tmp_path, fake, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("steer"), "propagate", True)  # an earlier CLI test may have stopped it
    tsv = _write_parallel(tmp_path / "eval.tsv", ["fr", "ru", "zh", "it"], 24)
    cfg = _config(tmp_path, eval_corpus=tsv, targets=["fr", "ru"], n_dev=8, n_test=40, control_seeds=1)
    del cfg["languages"]  # the file's columns
    with caplog.at_level(logging.INFO, logger=protocol.__name__):
        res = protocol.run_study(cfg)
    assert res["config"]["languages"] == ["fr", "ru", "zh", "it"] and res["config"]["eval_corpus"] == tsv
    assert {f for f, _ in fake.log} == {"bible_corpus", "bible_paraphrases", "udhr_parallel"}  # discovery from the Bible
    dev, test = C.split_parallel(C.parallel_from_file(tsv), 8, 40, seed=0)
    assert (len(dev), len(test)) == (4, 20)  # 24 rows, shared 8 : 40
    for split, par in (("dev", dev), ("test", test)):
        entry = res["corpora"][split]
        assert entry["hash"] == par.hash() and entry["n"] == len(par)
        assert entry["description"]["source"] == tsv and entry["description"]["split"] == split
        assert entry["description"]["corpus_hash"] == C.parallel_from_file(tsv).hash()
    assert not set(dev.keys) & set(test.keys)
    assert res["control"]["rows"] == 6 and res["test"]["ru"]["k"] in (2, 5)
    # the controls run for the languages they have, and say what they skipped
    assert set(res["paraphrases"]["fr"]) == {"fr"} and set(res["corpora"]["paraphrases"]) == {"fr"}
    assert set(res["udhr"]) == {"pre", "fr", "ru"}
    assert "paraphrases: en, es, de not among the languages, skipped" in caplog.text
    assert "udhr: it not in the UDHR, skipped" in caplog.text


def test_discovery_corpus_end_to_end(tmp_path, fake):
    disc = _write_labelled(tmp_path / "disc.tsv", ["en", "fr", "de", "zh", "es"], 14)
    res = protocol.run_study(_config(tmp_path, discovery_corpus=disc, n_discovery=10, paraphrases=False, udhr=False,
                                     control_seeds=1))
    assert ("bible_corpus", "discovery") not in fake.log and ("bible_parallel", "dev") in fake.log
    entry = res["corpora"]["discovery"]
    assert entry["n"] == 30 and entry["description"]["n_per_label"] == {"fr": 10, "de": 10, "zh": 10}
    assert entry["description"]["source"] == disc and entry["description"]["seed"] == 0
    assert entry["hash"] == C.sample_per_label(C.load_corpus(disc), ["fr", "de", "zh"], 10).hash()
    assert res["experts"]["targets"]["fr"]["n_pos"] == 10 and res["experts"]["targets"]["fr"]["n_neg"] == 20


def test_corpus_errors_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(protocol, "load_model", no_model)
    disc = _write_labelled(tmp_path / "disc.tsv", ["en", "fr", "de"], 5)
    tsv = _write_parallel(tmp_path / "eval.tsv", ["en", "fr", "de"], 6)
    bad = tmp_path / "bad.tsv"
    bad.write_text("en\tfr\tde\na\tb\tc\na\t\tc\n", encoding="utf-8")
    cases = [
        (dict(discovery_corpus=disc), r"disc\.tsv: no sentences labelled zh \(labels present: en, fr, de\)"),
        (dict(discovery_corpus=str(tmp_path / "none")), r"discovery_corpus='.*none': no such file or folder"),
        (dict(eval_corpus=tsv), r"eval\.tsv: languages zh are not among its columns \['en', 'fr', 'de'\]"),
        (dict(eval_corpus=str(tmp_path / "none.tsv")), r"eval_corpus='.*none\.tsv': no such file"),
        (dict(eval_corpus=str(bad), languages=None), r"bad\.tsv:3: empty text for fr"),
        (dict(eval_corpus=tsv, languages=None, n_dev=1, n_test=200), r"eval\.tsv: 6 row\(s\), too few"),
        (dict(languages=["fr", "de", "nl"]), r"languages nl have no Bible version .* --eval-corpus"),
        (dict(negatives=["nl"]), r"targets and negatives nl have no Bible version .* --discovery-corpus"),
    ]
    for options, error in cases:
        cfg = {k: v for k, v in _config(tmp_path, **options).items() if v is not None}
        with pytest.raises(ValueError, match=error):
            protocol.run_study(cfg)


def test_cli_corpus_options(tmp_path):
    from steer.cli import parser

    tsv = _write_parallel(tmp_path / "eval.tsv", ["en", "fr", "de", "it"], 4)
    p = parser()
    cfg = cli.config_from_args(p.parse_args(["study", "--eval-corpus", tsv, "--discovery-corpus", "d.tsv"]))
    assert cfg.eval_corpus == tsv and cfg.discovery_corpus == "d.tsv" and cfg.languages == ["en", "fr", "de", "it"]
    cfg = cli.config_from_args(p.parse_args(["study", "--eval-corpus", tsv, "--languages", "fr,de,it"]))
    assert cfg.languages == ["fr", "de", "it"]  # an explicit list wins
    cfg = cli.config_from_args(p.parse_args(["study", "--full", "--eval-corpus", tsv]))
    assert cfg.languages == ["en", "fr", "de", "it"]  # over --full's Bible languages
    assert cli.config_from_args(p.parse_args(["study"])).eval_corpus is None
    with pytest.raises(ValueError, match="eval_corpus='nowhere.tsv': no such file"):
        cli.config_from_args(p.parse_args(["study", "--eval-corpus", "nowhere.tsv"]))


def test_methods_compared_on_an_eval_corpus(tmp_path, fake):
    """`steer study --methods experts,lape,diffmean,random --eval-corpus small.tsv` on a tiny model:
    every method gets a dev-chosen setting from its own grid, the test measures and generation."""
    tsv = _write_parallel(tmp_path / "small.tsv", ["en", "fr", "de", "zh"], 24)
    from steer.cli.main import main

    main(["study", "--model", "tiny", "--eval-corpus", tsv, "--methods", "experts,lape,diffmean,random",
          "--targets", "fr,de", "--negatives", "zh", "--n-discovery", "10", "--n-dev", "8", "--n-test", "10",
          "--n-control", "6", "--n-paraphrase", "8", "--k-grid", "2,5", "--control-seeds", "1", "--n-boot", "40",
          "--no-udhr", "--lape-rates", "0.05,0.2", "--diffmean-scales", "0.5,1", "--n-generate", "4",
          "--gen-tokens", "4", "--n-heldout", "3", "--batch-size", "4", "--threads", "1", "--no-cache", "--quiet",
          "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    m = res["methods"]
    assert m["names"] == ["experts", "lape", "diffmean", "random"]
    assert m["sites"] == {"experts": "neuron", "lape": "activation", "diffmean": "residual", "random": "neuron"}
    assert set(res["corpora"]["discovery"]["description"]["n_per_label"]) == {"fr", "de", "zh"}  # the experts'
    assert set(res["corpora"]["token_statistics"]["description"]["n_per_label"]) == {"en", "fr", "de", "zh"}
    for t in ("fr", "de"):
        assert m["chosen"]["experts"][t] == {"k": res["dev"]["chosen"]["k"][t]}  # the k sweep's own choice
        grid = [r["setting"] for r in m["dev"]["diffmean"][t]]
        assert len(grid) == 2 * 2 and {s["layer"] for s in grid} == {0, 1}  # 2 scales x 2 layers (of 2)
        for name in m["names"]:
            chosen = m["chosen"][name][t]
            assert chosen is not None, (name, t)  # every method has a grid here
            best = max(r["a"] for r in m["dev"][name][t])
            assert next(r for r in m["dev"][name][t] if r["setting"] == chosen)["a"] >= best - 1e-9
            test = m["test"][name][t]
            assert set(test["retrieval"]["raw"]["settings"]) >= {"a", "a_reverse", "b"}
            g = m["generation"][name][t]
            assert g["n"] == 4 and 0 <= g["fraction"] <= 1 and g["ppl"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Methods compared" in report and "methods.png" in report
    assert (tmp_path / "out" / "methods.png").exists()
