"""Expert sets: the neurons that best separate a concept, with the value each is forced to.

`select_experts` ranks every neuron of a `Scores` table: top-k by AP or AUROC,
ties broken by the other score and then by (layer, unit), so a top-k is deterministic;
optional bottom-k = the neurons with the lowest AUROC below 0.5 (they switch off for the
concept); optional layer filter. Two recipes are one option apart:

    finding experts (Suau et al. 2022, ml-selfcond)   by="ap",    value="on_p50"
    the seed paper (Sundar et al. 2025)                 by="auroc", value="on_mean" (AUROC > 0.5)

An `ExpertSet` is a directory: `experts.safetensors` (per concept: layer, unit, value, score,
other score, sign) and `experts.json` (format version, model name, fingerprint, signature and
dtype, architecture, shape, labels, settings, corpus hash, package version). Loading it against a
model of other shapes is an error; same shapes with other weights (`NeuronLayout.same_weights`:
the same checkpoint in another dtype is the same weights) is a warning.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steer.core import artifacts
from steer.core.adapters import NeuronLayout
from steer.core.intervention import Intervention
from steer.core.metrics import check_k, rank_neurons
from steer.core.scores import Scores

FORMAT_VERSION = 2  # 2: experts.safetensors is a steer.experts file (artifacts.py); 1 is still read
FILES = ("experts.json", "experts.safetensors")
SCORES = ("ap", "auroc")
VALUES = ("on_p50", "on_mean", "on_p90")
RECIPES = {  # name -> (score, value, min_auroc)
    "finding-experts": ("ap", "on_p50", None),
    "sundar2025": ("auroc", "on_mean", 0.5),
}
FIELDS = ("layer", "unit", "value", "score", "other", "sign")
CONTROL_LAYERS = ("any", "matched")  # where `random_control` draws its neurons


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

    def check_k(self, concept: str, k: int, name: str = "k", *, allow_zero: bool = False) -> int:
        """`k` as an int if `concept` holds that many experts (`metrics.check_k`), else ValueError."""
        return check_k(k, name, allow_zero=allow_zero, available=len(self._get(concept)["layer"]),
                       where=f"the set holds {{n}} experts for {concept!r}")

    def intervention(self, concept: str, model: nn.Module | None = None, *, k: int | None = None,
                     positions: str = "all", strength: float = 1.0) -> Intervention:
        """Force the first k experts of `concept` to `strength` x their value.

        k: None (all of them) or 1 .. the number the set holds (else ValueError).
        With `model`, its shapes are checked (error) and its fingerprint compared (warning), and
        the buffers are built where its neurons live.
        """
        e = self._get(concept)
        k = len(e["layer"]) if k is None else self.check_k(concept, k)
        device = "cpu"
        if model is not None:
            self.check(model)
            device = NeuronLayout(model).device
        iv = Intervention(*self.shape, positions=positions, device=device)
        return iv.set(e["layer"][:k], e["unit"][:k], e["value"][:k] * strength)

    def check(self, model: nn.Module, neuron_module: str | None = None) -> None:
        layout = NeuronLayout(model, neuron_module)
        if (layout.n_layers, layout.width) != self.shape:
            raise ValueError(
                f"expert set is for {self.meta.get('model')!r} with {self.shape[0]} layers x {self.shape[1]} "
                f"neurons; this model has {layout.n_layers} x {layout.width}"
            )
        if not layout.same_weights(self.meta):  # steer/core/adapters.py: in any load dtype
            m = self.meta
            found = ", ".join(str(v) for v in (m.get("fingerprint"), m.get("dtype")) if v is not None)
            old = "" if m.get("signature") is not None else (
                "; the set predates dtype-independent fingerprints, so a load in another dtype than the "
                "set's also gets this warning")
            warnings.warn(
                f"expert set was found on model {m.get('model')!r} (fingerprint {found}); this model has "
                f"the same shapes but other weights ({layout.fingerprint()}, "
                f"{layout.dtype}){old}", stacklevel=2)

    def save(self, directory) -> Path:
        """Write the set atomically (steer/core/artifacts.py: a temporary directory swapped in).

        experts.safetensors (a steer.experts file: tensors, metadata and sha256) is the set;
        experts.json is a readable copy of its metadata, which `load` checks against it. An
        existing directory holding other files is refused, never replaced."""
        tensors = {f"{c}/{f}": t for c, e in self.experts.items() for f, t in e.items()}
        meta = {**self.meta, "format_version": FORMAT_VERSION, "concepts": self.concepts}
        with artifacts.atomic_directory(directory, owned=FILES) as tmp:
            artifacts.save(tmp / FILES[1], tensors, meta, kind="experts", version=FORMAT_VERSION)
            (tmp / FILES[0]).write_text(json.dumps(meta, indent=2))  # fsynced with the directory
        return Path(directory)

    @classmethod
    def load(cls, directory, model: nn.Module | None = None) -> "ExpertSet":
        """Read a set written by `save` (or in format 1, before hashes). A corrupt, truncated or
        newer-format set raises ValueError naming the file; with `model`, `check` runs (another
        shape: ValueError; same shapes, other weights: a warning)."""
        d = Path(directory)
        aside = artifacts.moved_aside(d)
        if aside:
            raise FileNotFoundError(f"{d} is missing: a save was interrupted after moving the "
                                    f"previous expert set aside to {aside[-1]} (rename it back)")
        for name in FILES:
            if not (d / name).exists():
                raise FileNotFoundError(f"{d} is not an expert set: {name} is missing")
        try:
            try:
                manifest = json.loads((d / FILES[0]).read_text())
                found = int(manifest.get("format_version"))
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{d / FILES[0]} is corrupt or truncated ({e})") from None
            if found > FORMAT_VERSION:
                raise artifacts.newer(d / FILES[0], "expert-set", found, FORMAT_VERSION)
            if found == 1:  # no hash, metadata in experts.json only
                tensors, meta = artifacts.read_tensors(d / FILES[1]), manifest
            else:
                tensors, meta = artifacts.load(d / FILES[1], kind="experts", version=FORMAT_VERSION)[:2]
                if json.dumps(meta, sort_keys=True) != json.dumps(manifest, sort_keys=True):
                    raise ValueError(f"{d / FILES[0]} does not match the metadata of {d / FILES[1]} "
                                     "(edited, or copied from another set)")
            concepts = meta.pop("concepts", None)
            if not isinstance(concepts, list):
                raise ValueError(f"{d / FILES[0]} lists no concepts")
            experts = {}
            for c in concepts:
                artifacts.check_shapes(d / FILES[1], tensors, {f"{c}/{f}": (None,) for f in FIELDS})
                experts[c] = {f: tensors[f"{c}/{f}"] for f in FIELDS}
                if len({len(t) for t in experts[c].values()}) != 1:
                    raise ValueError(f"{d / FILES[1]}: the tensors of {c!r} differ in length")
        except ValueError as e:
            raise ValueError(f"cannot read the expert set in {d}: {e}") from None
        out = cls(experts, meta)
        if model is not None:
            try:
                out.check(model)
            except ValueError as e:
                raise ValueError(f"{d}: {e}") from None
        return out


def random_control(experts: ExpertSet, concept: str, k: int, seed: int, *, layers: str = "any",
                   positions: str = "all", strength: float = 1.0) -> tuple[Intervention, dict]:
    """The random-neuron control: the values of `concept`'s first k experts (times `strength`)
    forced on k random neurons, none of which is among the concept's experts (the whole set,
    not only the first k).

    k: 0 (an empty intervention) .. the experts the set holds (else ValueError, `check_k`).
    layers="any": neurons drawn from a seeded permutation of the whole model (layers x units);
    "matched": each value goes to a random neuron of its expert's layer (a seeded permutation of
    the layer's units per value, each neuron used once). Other `layers`: ValueError.
    Returns the intervention and a description: seed, n_neurons, layers, values_sha (a hash of
    the forced values, `values_sha`; at strength 1 it equals the experts' for the same k) and
    layer_histogram (layer -> neurons drawn there).
    """
    if layers not in CONTROL_LAYERS:
        raise ValueError(f"layers={layers!r}; choose one of {CONTROL_LAYERS}")
    k = experts.check_k(concept, k, allow_zero=True)
    n_layers, width = experts.shape
    e = experts.experts[concept]
    values = e["value"][:k].float() * strength
    taken = set((e["layer"] * width + e["unit"]).tolist())
    gen = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    if k and layers == "any":
        chosen = [i for i in torch.randperm(n_layers * width, generator=gen).tolist() if i not in taken][:k]
    elif k:  # matched
        used = set(taken)
        for layer in e["layer"][:k].tolist():
            for unit in torch.randperm(width, generator=gen).tolist():
                i = layer * width + unit
                if i not in used:
                    used.add(i)
                    chosen.append(i)
                    break
    if len(chosen) < k:
        raise ValueError(f"only {len(chosen)} non-expert neurons available for {k} random neurons")
    idx = torch.tensor(chosen, dtype=torch.long)
    iv = Intervention(n_layers, width, positions=positions)
    if k:
        iv.set(idx // width, idx % width, values)
    info = {"seed": seed, "n_neurons": len(iv), "layers": layers, "values_sha": values_sha(values),
            "layer_histogram": dict(sorted(Counter((idx // width).tolist()).items()))}
    return iv, info


def values_sha(values: torch.Tensor) -> str:
    """A short hash of a multiset of values (sorted float32): equal for the same values in any order."""
    return hashlib.sha256(np.sort(values.float().numpy()).tobytes()).hexdigest()[:16]


def select_experts(scores: Scores, k: int = 100, *, by: str = "ap", value: str = "on_p50", bottom_k: int = 0,
                   layers: list[int] | None = None, min_auroc: float | None = None,
                   splits: list[str] | None = None) -> ExpertSet:
    """Top-k (and bottom-k) experts of every split of `scores` (or of the named `splits`).

    k >= 1 and bottom_k >= 0, at most the neurons of the model (of `layers`): else ValueError
    (`check_k`). A split with fewer eligible neurons (finite score, AUROC > min_auroc; for
    bottom-k AUROC < 0.5) gets fewer experts, with a warning naming it. A split without
    negative sentences (a one-label corpus) ranks nothing: ValueError.
    """
    if by not in SCORES:
        raise ValueError(f"by={by!r}; choose one of {SCORES}")
    if value not in VALUES:
        raise ValueError(f"value={value!r}; choose one of {VALUES}")
    n_layers, width = scores.stats["ap"].shape[1:]
    if layers is not None and any(not 0 <= l < n_layers for l in layers):
        raise IndexError(f"layers {layers} out of range: the model has {n_layers} layers")
    n = (n_layers if layers is None else len(set(layers))) * width
    where = "the model has {n} neurons" if layers is None else f"layers {layers} hold {{n}} neurons"
    k = check_k(k, "k", available=n, where=where)
    bottom_k = check_k(bottom_k, "bottom_k", allow_zero=True, available=n, where=where)
    n_neg = scores.n_neg
    for name in splits or [s.name for s in scores.splits]:
        if n_neg is not None and int(n_neg[scores.index(name)]) == 0:
            raise ValueError(f"label {name!r} has no negative sentences (a corpus with one label?): "
                             "experts need at least two labels")
    keep = torch.zeros(n_layers, width, dtype=torch.bool)
    keep[list(range(n_layers)) if layers is None else layers] = True
    other = "auroc" if by == "ap" else "ap"
    experts = {}
    for name in splits or [s.name for s in scores.splits]:
        i = scores.index(name)
        primary = scores.stats[by][i].masked_fill(~keep, float("nan")).flatten()  # [L*M]
        secondary = scores.stats[other][i].flatten()
        top_ok = primary.isfinite() if min_auroc is None else primary.isfinite() & (scores.stats["auroc"][i].flatten() > min_auroc)
        if int(top_ok.sum()) < k:
            rule = f"finite {by}" + ("" if min_auroc is None else f" and AUROC > {min_auroc}")
            warnings.warn(f"label {name!r}: only {int(top_ok.sum())} neurons have {rule}: "
                          f"{int(top_ok.sum())} experts, not k={k}", stacklevel=2)
        top = rank_neurons(primary.masked_fill(~top_ok, float("nan")), secondary, min(k, int(top_ok.sum())))
        auc = scores.stats["auroc"][i].masked_fill(~keep, float("nan")).flatten()
        low_ok = auc < 0.5
        if int(low_ok.sum()) < bottom_k:
            warnings.warn(f"label {name!r}: only {int(low_ok.sum())} neurons have AUROC < 0.5: "
                          f"{int(low_ok.sum())} bottom experts, not bottom_k={bottom_k}", stacklevel=2)
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
        "dtype": s.get("dtype"), "signature": s.get("signature"),
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
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(["split", "layer", "unit", *stats])
    for i, sp in enumerate(scores.splits):
        cols = [scores.stats[s][i].flatten().tolist() for s in stats]
        for j in range(n_layers * width):
            w.writerow([sp.name, j // width, j % width, *(f"{c[j]:.6g}" for c in cols)])
    return artifacts.atomic_write_text(path, f.getvalue())


def export_selfcond(scores: Scores, directory, layer_names: list[str], group: str = "language") -> list[Path]:
    """ml-selfcond's `<concept>/expertise/expertise.csv` + `expertise_info.json` for every split."""
    n_layers, width = scores.stats["ap"].shape[1:]
    out = []
    for i, sp in enumerate(scores.splits):
        d = Path(directory) / sp.name / "expertise"
        d.mkdir(parents=True, exist_ok=True)
        cols = {s: scores.stats[s][i].flatten().float().tolist() for s in ("ap", "off_mean", "on_p50", "on_p90")}
        f = io.StringIO()
        w = csv.writer(f)
        w.writerow(["ap", "off_mean", "on_p50", "on_p90", "layer", "unit", "uuid", "concept", "group"])
        for j in range(n_layers * width):
            w.writerow([*(f"{cols[s][j]:.7g}" for s in cols), layer_names[j // width], j % width, j, sp.name, group])
        artifacts.atomic_write_text(d / "expertise.csv", f.getvalue())
        ap = scores.stats["ap"][i].flatten()
        thresholds = torch.linspace(0.5, 1.0, 501, dtype=torch.float64)
        info = {
            "concept": sp.name, "group": group, "max_ap": float(ap.nan_to_num(-1).max()),
            "layer_names": layer_names, "total_neurons": n_layers * width,
            "neurons_at_ap": {f"{t:0.5f}": int((ap > t).sum()) for t in thresholds.tolist()},
        }
        artifacts.atomic_write_text(d / "expertise_info.json", json.dumps(info, indent=4))
        out.append(d)
    return out
