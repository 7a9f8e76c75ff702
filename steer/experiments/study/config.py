"""The study's configuration: `StudyConfig`, its validation, and what `--full` changes.

The corpora are the Bible's (discovery, dev and test splits) unless `discovery_corpus` (a
labelled file) or `eval_corpus` (an aligned file, cut into dev and test) replace them.
`validate` reads those files and checks they hold what the run needs (every target and negative
in the discovery corpus, every language a column of the eval corpus, non-empty splits), and that
the languages still taken from the Bible have a Bible version: a bad corpus fails before the
model loads. With an eval corpus, `languages` not given explicitly are its columns (`as_config`,
where explicit values are told from defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from steer.core.corpus import load_corpus, parallel_from_file, sample_per_label, split_parallel
from steer.core.packaged_corpora import BIBLE_VERSIONS
from steer.core.experts import CONTROL_LAYERS, RECIPES
from steer.core.runtime import DTYPES
from steer.experiments.study.methods import METHODS, TOKEN_METHODS

SCHEMA = "steer.study/1"
CRITERIA = ("a", "ab")
SIDES = ("both", "target")


@dataclass
class StudyConfig:
    """Everything a study run depends on. `layer=None` is the last hidden state (the paper's)."""

    model: str = "gemma-3-270m"
    dtype: str = "auto"  # runtime.native_dtype: bf16 on GPUs (cc 8.0+) and AMX-BF16 CPUs, else fp32
    device: str = "auto"
    targets: list[str] = field(default_factory=lambda: ["fr", "de"])
    languages: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "it", "pt", "ru", "zh"])
    negatives: list[str] = field(default_factory=lambda: ["zh"])  # besides the other targets
    recipe: str = "sundar2025"
    pooling: str = "mean"
    n_discovery: int = 300
    n_dev: int = 100
    n_test: int = 200
    n_control: int = 50
    n_paraphrase: int = 100
    k_grid: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    layer: int | None = None
    layer_search: bool = False
    layer_profile: bool = True  # dev retrieval at every hidden state (descriptive unless layer_search)
    criterion: str = "a"
    center: bool = False
    sides: str = "both"
    control_seeds: int = 5
    control_layers: str = "any"
    udhr: bool = True
    paraphrases: bool = True
    test_k_sweep: bool = False
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 32
    skip_bos: bool = True
    out: str = "docs/study"
    cache_dir: str | None = "default"  # "default": <steer cache>/study; None: no disk cache
    generation_results: str | None = None
    threads: int | None = None
    progress: bool = True
    full: bool = False
    eval_corpus: str | None = None  # aligned TSV/JSONL (parallel_from_file) for dev and test; None: the Bible
    discovery_corpus: str | None = None  # labelled file or folder (load_corpus); None: the Bible
    # methods compared (methods.py); beyond experts, each gets a dev-chosen strength and the same tests
    methods: list[str] = field(default_factory=lambda: ["experts"])
    lape_rates: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05])  # LAPE top_rate grid
    diffmean_layers: list[int] | None = None  # None: a quarter, half and three quarters up
    diffmean_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # x |target - others|
    n_generate: int = 40  # BOS-prompted samples per method and target (language steering in generation)
    gen_tokens: int = 32  # new tokens per sample
    n_heldout: int = 40  # held-out test sentences of the target for perplexity (dev sentences in the curves)
    # dose curves (curves.py): added to the methods study in `out`, on dev only
    curves: bool = False
    curve_k: list[int] = field(default_factory=lambda: [50, 100, 200, 400])  # experts and random, at 1x
    curve_multipliers: list[float] = field(default_factory=lambda: [2.0, 4.0])  # x the values, at the largest k
    curve_lape_rates: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])
    curve_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # DiffMean, every layer
    n_curve_dev: int = 24  # dev verses per language for the curves' retrieval

    def validate(self) -> "StudyConfig":
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose auto or one of {sorted(DTYPES)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}; choose one of {sorted(RECIPES)}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r}; choose one of {CRITERIA}")
        if self.sides not in SIDES:
            raise ValueError(f"sides={self.sides!r}; choose one of {SIDES}")
        if self.control_layers not in CONTROL_LAYERS:
            raise ValueError(f"control_layers={self.control_layers!r}; choose one of {CONTROL_LAYERS}")
        if len(set(self.languages)) != len(self.languages) or len(self.languages) < 3:
            raise ValueError(f"need at least 3 distinct languages, got {self.languages}")
        missing = [t for t in self.targets if t not in self.languages]
        if not self.targets or missing:
            raise ValueError(f"targets {missing or self.targets} must be among the languages {self.languages}")
        if not self.k_grid or min(self.k_grid) < 1:
            raise ValueError(f"k_grid must hold positive integers, got {self.k_grid}")
        if self.control_seeds < 1:
            raise ValueError("control_seeds must be at least 1")
        if not 0 < self.n_control <= self.n_test:
            raise ValueError(f"n_control={self.n_control} must be in 1..n_test={self.n_test}")
        self.k_grid = sorted(set(int(k) for k in self.k_grid))
        self._check_methods()
        self._check_corpora()
        return self

    def _check_methods(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or "experts" not in self.methods or len(set(self.methods)) < len(self.methods):
            raise ValueError(f"methods {self.methods}: distinct names from {METHODS}, experts among them")
        if not self.lape_rates or not all(0 < r <= 1 for r in self.lape_rates):
            raise ValueError(f"lape_rates {self.lape_rates}: each in (0, 1]")
        if not self.diffmean_scales or min(self.diffmean_scales) <= 0:
            raise ValueError(f"diffmean_scales {self.diffmean_scales}: positive numbers")
        if self.diffmean_layers is not None and (not self.diffmean_layers or min(self.diffmean_layers) < 0):
            raise ValueError(f"diffmean_layers {self.diffmean_layers}: decoder layers from 0")
        if min(self.n_generate, self.gen_tokens, self.n_heldout) < 1:
            raise ValueError("n_generate, gen_tokens and n_heldout must be at least 1")
        if self.curves:
            if (not self.curve_k or min(self.curve_k) < 1 or not self.curve_lape_rates
                    or not all(0 < r <= 1 for r in self.curve_lape_rates) or not self.curve_scales
                    or min(self.curve_scales) <= 0 or min(self.curve_multipliers, default=1) <= 0):
                raise ValueError("curve_k: positive integers; curve_lape_rates in (0, 1]; curve_scales and "
                                 "curve_multipliers: positive numbers")
            if not 2 <= self.n_curve_dev <= self.n_dev:
                raise ValueError(f"n_curve_dev={self.n_curve_dev} must be in 2..n_dev={self.n_dev}")
            self.curve_k = sorted(set(int(k) for k in self.curve_k))

    def discovery_languages(self) -> list[str]:
        """The discovery languages: targets and negatives (the experts' splits), and every language
        when LAPE or DiffMean run (their token statistics compare all of them)."""
        extra = self.languages if any(m in TOKEN_METHODS for m in self.methods) else []
        return list(dict.fromkeys(self.targets + self.negatives + extra))

    def _check_corpora(self) -> None:
        """Each corpus holds what the run needs (see the module docstring)."""
        discovery = self.discovery_languages()
        if self.discovery_corpus is None:
            _bible_languages("targets and negatives", discovery, "--discovery-corpus")
        else:
            corpus = load_corpus(_readable(self.discovery_corpus, "discovery_corpus", folder=True))
            sample_per_label(corpus, discovery, self.n_discovery, self.seed)
        if self.eval_corpus is None:
            _bible_languages("languages", self.languages, "--eval-corpus")
        else:
            par = parallel_from_file(_readable(self.eval_corpus, "eval_corpus"))
            par.select(self.languages)
            split_parallel(par, self.n_dev, self.n_test, self.seed)


def _readable(path: str, option: str, folder: bool = False) -> Path:
    """`path` as a Path if it is a readable file (or folder); else a ValueError naming `option`."""
    p = Path(path)
    if not (p.is_file() or (folder and p.is_dir())):
        raise ValueError(f"{option}={path!r}: no such file{' or folder' if folder else ''}")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{option}={path!r}: not readable")
    return p


def _bible_languages(what: str, languages: list[str], option: str) -> None:
    missing = [language for language in languages if language not in BIBLE_VERSIONS]
    if missing:
        raise ValueError(f"{what} {', '.join(missing)} have no Bible version (available: "
                         f"{', '.join(BIBLE_VERSIONS)}); give their text with {option}")


def eval_languages(path: str) -> list[str]:
    """The language columns of an eval corpus: the study's default languages with it."""
    return parallel_from_file(_readable(path, "eval_corpus")).languages


#: what `--full` changes: the complete protocol, for a bigger machine
FULL = dict(
    targets=["en", "de", "fr", "es", "ja"],
    languages=list(BIBLE_VERSIONS),
    n_discovery=1000, n_dev=200, n_test=500, n_control=500, n_paraphrase=500,
    k_grid=[10, 25, 50, 100, 200, 500, 1000, 2000],
    test_k_sweep=True,
    layer_profile=False,  # 22 languages x 18 hidden states per condition is heavy; --layer-search still works
)


def as_config(config) -> StudyConfig:
    """A `StudyConfig` from itself, a dict or an argparse namespace (`full` first applies `FULL`).

    Values None count as not given. With an `eval_corpus` and no `languages`, the languages are
    the file's columns (over `FULL`'s and the default; an explicit list wins)."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    config = dict(config)
    full = bool(config.get("full"))
    given = {k: v for k, v in config.items() if v is not None}
    base = {**(FULL if full else {}), **given}
    if given.get("eval_corpus") and "languages" not in given:
        base["languages"] = eval_languages(given["eval_corpus"])
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = set(base) - names
    if unknown:
        raise TypeError(f"unknown study options {sorted(unknown)}")
    cfg = StudyConfig(**base)
    if "cache_dir" in config and config["cache_dir"] is None:  # an explicit None: no disk cache
        cfg.cache_dir = None
    return cfg
