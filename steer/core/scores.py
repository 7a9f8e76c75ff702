"""Scores: typed per-neuron statistics and the two ways to get them.

`Responses` (exact mode: every sentence's pooled response, [N, L, M]) and a `StreamState`
(stream mode: per-label histograms, `score_state`) both become `Scores`: per `Split` (positive
labels against negative ones), every statistic of every neuron as [S, L, M], and the number of
positive / negative sentences of each split as [S]. The statistics themselves are computed in
`steer.core.metrics` (exact) and `steer.core.stream` (histograms, with certificates);
`shortlist_scores` names the neurons whose exact score could still reach a top-k, which
`steer.engine.collect.refine` rescores. Neurons with non-finite responses are scored NaN.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from steer.core import artifacts
from steer.core.metrics import score_splits
from steer.core.stream import StreamState, shortlist
from steer.core.token_stats import TokenStats

RESPONSES_VERSION = 1  # steer.responses files (artifacts.py); unversioned older ones are read
COUNTS = ("n_pos", "n_neg")  # per split [S], beside the per-neuron statistics


def _nonfinite_info(counts: torch.Tensor, width: int, top: int = 10) -> dict:
    """Summary of per-neuron non-finite response counts [L*M] (JSON-able)."""
    counts = counts.flatten().to(torch.int64).cpu()
    bad = torch.nonzero(counts).squeeze(1)
    worst = bad[torch.argsort(counts[bad], descending=True, stable=True)][:top].tolist()
    return {"responses": int(counts.sum()), "neurons": int(bad.numel()),
            "worst": [[i // width, i % width, int(counts[i])] for i in worst]}


def nonfinite_message(settings: dict) -> str | None:
    """One line about non-finite (NaN / inf) responses, or None when there were none."""
    info = settings.get("nonfinite") or {}
    if not info.get("neurons"):
        return None
    cells = ", ".join(f"L{l}/{u} ({c:,})" for l, u, c in info["worst"])
    more = ", ..." if info["neurons"] > len(info["worst"]) else ""
    return (f"Non-finite responses (NaN/inf): {info['responses']:,} in {info['neurons']:,} "
            f"neurons, never binned; those neurons are scored NaN and cannot be experts: "
            f"{cells}{more}")


def _mask_nonfinite(stats: dict, bad: torch.Tensor) -> None:
    """Scores of neurons with non-finite responses ([L*M] bool `bad`) set to NaN, in place
    (`stats`: [S, L*M] per statistic, and the [S] counts, left alone)."""
    if not bool(bad.any()):
        return
    for key, v in stats.items():
        if key not in COUNTS and v.is_floating_point():
            v[:, bad.to(v.device)] = math.nan


@dataclass
class Responses:
    """Pooled responses of every sentence at every neuron, with the labels that split them."""

    values: torch.Tensor  # [N, L, M] fp32
    label_ids: torch.Tensor  # [N] int64 into label_names
    label_names: list[str]
    keys: list[str]
    settings: dict = field(default_factory=dict)
    token_stats: TokenStats | None = None  # LAPE / DiffMean sums of the same pass, if asked for

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    def score(self, splits=None) -> "Scores":
        """AP, AUROC and response statistics of every neuron for each split (default: one-vs-rest).

        A neuron with a non-finite response is scored NaN (with a warning) and reported in
        `settings["nonfinite"]`."""
        splits = [Split.one_vs_rest(c) for c in self.label_names] if splits is None else splits
        ids = [s.label_ids(self.label_names) for s in splits]
        flat = self.values.reshape(len(self.values), -1)  # [N, L*M]
        counts = (~torch.isfinite(flat)).sum(0)  # [L*M]
        bad = counts > 0
        layers, width = self.shape
        settings = dict(self.settings, nonfinite=_nonfinite_info(counts, width))
        if bool(bad.any()):
            warnings.warn(nonfinite_message(settings), stacklevel=2)
            flat = torch.where(torch.isfinite(flat), flat, 0.0)  # a copy; scored NaN below
        stats = score_splits(flat, self.label_ids, ids, names=[s.name for s in splits])
        _mask_nonfinite(stats, bad)
        return Scores.from_flat(stats, splits, settings, self.shape)

    def save(self, path) -> None:
        """Write atomically as a steer.responses file (steer/core/artifacts.py: safetensors, format
        version, sha256); label names, keys and settings go to its metadata."""
        meta = {"label_names": self.label_names, "keys": self.keys, "settings": self.settings}
        tensors = {"values": self.values, "label_ids": self.label_ids}
        if self.token_stats is not None:
            meta["token_stats"] = {"kinds": list(self.token_stats.kinds), "hidden": self.token_stats.hidden}
            tensors.update(self.token_stats.stored())
        artifacts.save(path, tensors, meta, kind="responses", version=RESPONSES_VERSION)

    @classmethod
    def load(cls, path, *, shape: tuple[int, int] | None = None) -> "Responses":
        """Read a file written by `save` (or an unversioned one of steer before artifacts.py).
        A file that is not responses, is corrupt or truncated, was written by a newer steer, or
        (given `shape` = (layers, width)) is of another shape raises ValueError naming it."""
        head = artifacts.header(path)
        if "format" not in head and "steer" in head:  # unversioned, without a hash
            t = artifacts.read_tensors(path)
            try:
                meta = json.loads(head["steer"])
            except ValueError as e:
                raise ValueError(f"{path} is corrupt: unreadable metadata ({e})") from None
        else:
            t, meta = artifacts.load(path, kind="responses", version=RESPONSES_VERSION)[:2]
        artifacts.check_shapes(path, t, {"values": (None, *(shape or (None, None)))})
        n = t["values"].shape[0]
        artifacts.check_shapes(path, t, {"label_ids": (n,)})
        missing = [k for k in ("label_names", "keys", "settings") if k not in meta]
        ids = t["label_ids"]
        if missing or len(meta["keys"]) != n or (n and not 0 <= int(ids.min()) <= int(ids.max()) < len(meta["label_names"])):
            raise ValueError(f"{path} is not a valid responses file ({n} sentences; metadata "
                             f"missing {missing} or keys / label ids that do not match)")
        stats = None
        if meta.get("token_stats"):
            stats = TokenStats(meta["label_names"], meta["token_stats"]["kinds"], *t["values"].shape[1:],
                               meta["token_stats"]["hidden"])
            try:
                stats.load_(t)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        return cls(t["values"], ids, meta["label_names"], meta["keys"], meta["settings"], stats)


@dataclass(frozen=True)
class Split:
    """Positive labels against negative labels (None: every other label)."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None = None

    @classmethod
    def one_vs_rest(cls, label: str) -> "Split":
        return cls(label, (label,))

    def label_ids(self, names: list[str]):
        unknown = [c for c in self.positive + (self.negative or ()) if c not in names]
        if unknown:
            raise ValueError(f"split {self.name!r} names labels {unknown} absent from the corpus ({names})")
        neg = None if self.negative is None else [names.index(c) for c in self.negative]
        return [names.index(c) for c in self.positive], neg

    def to_json(self) -> dict:
        return {"name": self.name, "positive": list(self.positive),
                "negative": None if self.negative is None else list(self.negative)}


@dataclass
class Scores:
    """Per-split statistics of every neuron: `stats[name]` is [S, L, M]; `n_pos` / `n_neg` ([S],
    None when unknown) count each split's positive / negative sentences."""

    stats: dict[str, torch.Tensor]
    splits: list[Split]
    settings: dict
    n_pos: torch.Tensor | None = None
    n_neg: torch.Tensor | None = None

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], splits, settings: dict, shape: tuple[int, int]) -> "Scores":
        """From [S, L*M] statistics and [S] counts, as `metrics.score_splits` returns them."""
        stats = {k: v.reshape(len(splits), *shape) for k, v in flat.items() if k not in COUNTS}
        return cls(stats, list(splits), settings, flat["n_pos"], flat["n_neg"])

    def flat(self) -> dict[str, torch.Tensor]:
        """Every statistic as [S, L*M] (views) and the counts: `from_flat`'s input."""
        return {**{k: v.flatten(1) for k, v in self.stats.items()}, "n_pos": self.n_pos, "n_neg": self.n_neg}

    def index(self, name: str) -> int:
        names = [s.name for s in self.splits]
        if name not in names:
            raise KeyError(f"no split named {name!r}; splits: {names}")
        return names.index(name)


def score_state(state: StreamState, splits=None) -> Scores:
    """Histogram scores of every neuron for each split (default one-vs-rest), with certificates.

    Neurons with non-finite responses are scored NaN and reported in settings["nonfinite"]."""
    splits = [Split.one_vs_rest(c) for c in state.label_names] if splits is None else splits
    layers, width = state.settings["layers"], state.settings["width"]
    per_split = [state.score(*s.label_ids(state.label_names)) for s in splits]
    stats = {key: torch.stack([r[key] for r in per_split]).cpu() for key in per_split[0]}  # [S, L*M]
    for key in COUNTS:  # per split, as in exact scores: sentences, not finite responses per neuron
        stats[key] = stats[key].max(1).values
    bad = state.nonfinite.cpu() > 0
    _mask_nonfinite(stats, bad)
    settings = dict(state.settings, nonfinite=_nonfinite_info(state.nonfinite, width))
    if bool(bad.any()):
        warnings.warn(nonfinite_message(settings), stacklevel=2)
    return Scores.from_flat(stats, splits, settings, (layers, width))


def shortlist_scores(hist: Scores, *, k: int = 100, by: str | tuple[str, ...] = "ap",
                     bottom_k: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """The neurons of histogram scores (`score_state`) that could be in any split's exact top-k by
    each score in `by` (or its bottom-k by AUROC): sorted flat indices [K], and the size of each
    split's short-list. `refine` rescores exactly these."""
    flat = hist.flat()  # [S, L*M]
    sizes, keep = {}, []
    for i, sp in enumerate(hist.splits):
        chosen = torch.cat([shortlist(flat[b][i], flat[f"{b}_bound"][i], k)
                            for b in ((by,) if isinstance(by, str) else by)])
        if bottom_k:
            chosen = torch.cat([chosen, shortlist(flat["auroc"][i], flat["auroc_bound"][i], bottom_k, largest=False)])
        sizes[sp.name] = int(chosen.numel())
        keep.append(chosen)
    return torch.cat(keep).unique(), sizes
