"""Expert sets: the neurons that best separate a concept, with the value each is forced to.

`select_experts` ranks every neuron of a `Scores` table (DESIGN.md §1): top-k by AP or AUROC,
ties broken by the other score and then by (layer, unit), so a top-k is deterministic;
optional bottom-k = the neurons with the lowest AUROC below 0.5 (they switch off for the
concept); optional layer filter. Two recipes are one option apart:

    finding experts (Suau et al. 2022, ml-selfcond)   by="ap",    value="on_p50"
    the seed paper (Sundar et al. 2025)                 by="auroc", value="on_mean" (AUROC > 0.5)

An `ExpertSet` is a directory: `experts.safetensors` (per concept: layer, unit, value, score,
other score, sign) and `experts.json` (format version, model name and fingerprint,
architecture, shape, labels, settings, corpus hash, package version). Loading it against a model
of other shapes is an error; same shapes with another fingerprint is a warning.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import NeuronSites
from .collect import Scores
from .intervention import Intervention
from .metrics import rank_neurons

FORMAT_VERSION = 1
SCORES = ("ap", "auroc")
VALUES = ("on_p50", "on_mean", "on_p90")
RECIPES = {  # name -> (score, value, min_auroc)
    "finding-experts": ("ap", "on_p50", None),
    "sundar2025": ("auroc", "on_mean", 0.5),
}
FIELDS = ("layer", "unit", "value", "score", "other", "sign")


def package_version() -> str:
    try:
        return version("steer-experts")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ExpertSet:
    """Per concept, tensors `layer`, `unit`, `value`, `score`, `other`, `sign` ([k]); plus metadata."""

    experts: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.experts)

    @property
    def shape(self) -> tuple[int, int]:
        return self.meta["layers"], self.meta["width"]

    def rows(self, concept: str) -> list[dict]:
        e = self._get(concept)
        return [{f: e[f][i].item() for f in FIELDS} for i in range(len(e["layer"]))]

    def _get(self, concept: str) -> dict[str, torch.Tensor]:
        if concept not in self.experts:
            raise KeyError(f"no experts for {concept!r}; concepts: {self.concepts}")
        return self.experts[concept]

    def intervention(self, concept: str, model: nn.Module | None = None, *, k: int | None = None,
                     positions: str = "all", strength: float = 1.0) -> Intervention:
        """Force the first k experts of `concept` to `strength` x their value.

        With `model`, its shapes are checked (error) and its fingerprint compared (warning).
        """
        if model is not None:
            self.check(model)
        e = self._get(concept)
        k = len(e["layer"]) if k is None else k
        if k > len(e["layer"]):
            raise ValueError(f"k={k} but the set holds {len(e['layer'])} experts for {concept!r}")
        iv = Intervention(*self.shape, positions=positions)
        return iv.set(e["layer"][:k], e["unit"][:k], e["value"][:k] * strength)

    def check(self, model: nn.Module, neuron_module: str | None = None) -> None:
        sites = NeuronSites(model, neuron_module)
        if (sites.n_layers, sites.width) != self.shape:
            raise ValueError(
                f"expert set is for {self.meta.get('model')!r} with {self.shape[0]} layers x {self.shape[1]} "
                f"neurons; this model has {sites.n_layers} x {sites.width}"
            )
        if sites.fingerprint() != self.meta.get("fingerprint"):
            warnings.warn(
                f"expert set was found on model {self.meta.get('model')!r} (fingerprint "
                f"{self.meta.get('fingerprint')}); this model has the same shapes but other weights "
                f"({sites.fingerprint()})", stacklevel=2)

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"{c}/{f}": t.contiguous() for c, e in self.experts.items() for f, t in e.items()}
        save_file(tensors, str(d / "experts.safetensors"))
        (d / "experts.json").write_text(json.dumps({**self.meta, "concepts": self.concepts}, indent=2))
        return d

    @classmethod
    def load(cls, directory) -> "ExpertSet":
        d = Path(directory)
        for name in ("experts.json", "experts.safetensors"):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d} is not an expert set: {name} is missing")
        try:
            meta = json.loads((d / "experts.json").read_text())
            tensors = load_file(str(d / "experts.safetensors"))
        except Exception as e:  # corrupt or truncated files
            raise ValueError(f"cannot read the expert set in {d}: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d}: expert-set format {meta.get('format_version')}, this steer reads {FORMAT_VERSION}")
        experts = {c: {f: tensors[f"{c}/{f}"] for f in FIELDS} for c in meta.pop("concepts")}
        return cls(experts, meta)


def select_experts(scores: Scores, k: int = 100, *, by: str = "ap", value: str = "on_p50", bottom_k: int = 0,
                   layers: list[int] | None = None, min_auroc: float | None = None,
                   splits: list[str] | None = None) -> ExpertSet:
    """Top-k (and bottom-k) experts of every split of `scores` (or of the named `splits`)."""
    if by not in SCORES:
        raise ValueError(f"by={by!r}; choose one of {SCORES}")
    if value not in VALUES:
        raise ValueError(f"value={value!r}; choose one of {VALUES}")
    n_layers, width = scores.stats["ap"].shape[1:]
    if layers is not None and any(not 0 <= l < n_layers for l in layers):
        raise IndexError(f"layers {layers} out of range: the model has {n_layers} layers")
    keep = torch.zeros(n_layers, width, dtype=torch.bool)
    keep[list(range(n_layers)) if layers is None else layers] = True
    other = "auroc" if by == "ap" else "ap"
    experts = {}
    for name in splits or [s.name for s in scores.splits]:
        i = scores.index(name)
        primary = scores.stats[by][i].masked_fill(~keep, float("nan")).flatten()  # [L*M]
        secondary = scores.stats[other][i].flatten()
        top_ok = primary.isfinite() if min_auroc is None else primary.isfinite() & (scores.stats["auroc"][i].flatten() > min_auroc)
        top = rank_neurons(primary.masked_fill(~top_ok, float("nan")), secondary, min(k, int(top_ok.sum())))
        auc = scores.stats["auroc"][i].masked_fill(~keep, float("nan")).flatten()
        low_ok = auc < 0.5
        bottom = rank_neurons(auc.masked_fill(~low_ok, float("nan")), scores.stats["ap"][i].flatten(),
                              min(bottom_k, int(low_ok.sum())), largest=False)
        idx = torch.cat([top, bottom])
        experts[name] = {
            "layer": idx // width, "unit": idx % width,
            "value": scores.stats[value][i].flatten()[idx].float(),
            "score": scores.stats[by][i].flatten()[idx], "other": secondary[idx],
            "sign": torch.cat([torch.ones(len(top)), -torch.ones(len(bottom))]).to(torch.int8),
        }
    s = scores.settings
    meta = {
        "format_version": FORMAT_VERSION, "steer_version": package_version(),
        "model": s.get("model"), "fingerprint": s.get("fingerprint"), "architecture": s.get("architecture"),
        "layers": n_layers, "width": width,
        "labels": s.get("labels"), "splits": [sp.to_json() for sp in scores.splits],
        "selection": {"k": k, "by": by, "value": value, "bottom_k": bottom_k, "layers": layers, "min_auroc": min_auroc},
        "statistics": {key: s.get(key) for key in ("pooling", "skip_special", "max_length", "mode")},
        "corpus": s.get("corpus"), "corpus_hash": s.get("corpus_hash"),
    }
    return ExpertSet(experts, meta)


def export_statistics(scores: Scores, path) -> Path:
    """Every neuron's statistics for every split as one CSV (split, layer, unit, ap, auroc, ...)."""
    stats = ("ap", "auroc", "on_mean", "on_p50", "on_p90", "off_mean")
    n_layers, width = scores.stats["ap"].shape[1:]
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "layer", "unit", *stats])
        for i, sp in enumerate(scores.splits):
            cols = [scores.stats[s][i].flatten().tolist() for s in stats]
            for j in range(n_layers * width):
                w.writerow([sp.name, j // width, j % width, *(f"{c[j]:.6g}" for c in cols)])
    return path


def export_selfcond(scores: Scores, directory, layer_names: list[str], group: str = "language") -> list[Path]:
    """ml-selfcond's `<concept>/expertise/expertise.csv` + `expertise_info.json` for every split."""
    n_layers, width = scores.stats["ap"].shape[1:]
    out = []
    for i, sp in enumerate(scores.splits):
        d = Path(directory) / sp.name / "expertise"
        d.mkdir(parents=True, exist_ok=True)
        cols = {s: scores.stats[s][i].flatten().float().tolist() for s in ("ap", "off_mean", "on_p50", "on_p90")}
        with (d / "expertise.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ap", "off_mean", "on_p50", "on_p90", "layer", "unit", "uuid", "concept", "group"])
            for j in range(n_layers * width):
                w.writerow([*(f"{cols[s][j]:.7g}" for s in cols), layer_names[j // width], j % width, j, sp.name, group])
        ap = scores.stats["ap"][i].flatten()
        thresholds = torch.linspace(0.5, 1.0, 501, dtype=torch.float64)
        info = {
            "concept": sp.name, "group": group, "max_ap": float(ap.nan_to_num(-1).max()),
            "layer_names": layer_names, "total_neurons": n_layers * width,
            "neurons_at_ap": {f"{t:0.5f}": int((ap > t).sum()) for t in thresholds.tolist()},
        }
        (d / "expertise_info.json").write_text(json.dumps(info, indent=4))
        out.append(d)
    return out
