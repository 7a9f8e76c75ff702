"""The study's configuration: `StudyConfig`, its validation, and what `--full` changes."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from steer.core.corpus import BIBLE_VERSIONS
from steer.core.experts import CONTROL_LAYERS, RECIPES
from steer.core.runtime import DTYPES

SCHEMA = "steer.study/1"
CRITERIA = ("a", "ab")
SIDES = ("both", "target")


@dataclass
class StudyConfig:
    """Everything a study run depends on. `layer=None` is the last hidden state (the paper's)."""

    model: str = "gemma-3-270m"
    dtype: str = "auto"  # runtime.native_dtype: bf16 where the device computes it natively, else fp32
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
        return self


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
    """A `StudyConfig` from itself, a dict or an argparse namespace (`full` first applies `FULL`)."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    config = dict(config)
    full = bool(config.get("full"))
    base = {**(FULL if full else {}), **{k: v for k, v in config.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = set(base) - names
    if unknown:
        raise TypeError(f"unknown study options {sorted(unknown)}")
    cfg = StudyConfig(**base)
    if "cache_dir" in config and config["cache_dir"] is None:  # an explicit None: no disk cache
        cfg.cache_dir = None
    return cfg
