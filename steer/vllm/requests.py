"""The request contract: what a vLLM request steers, checked at admission.

A request names its steering in `SamplingParams.extra_args` with flat keys (vLLM's HTTP
`vllm_xargs` only takes flat values), the same offline and over HTTP, in one of two forms:

    {"steer_experts": "<expert-set directory>", "steer_label": "fr",
     "steer_k": 100, "steer_positions": "all", "steer_strength": 1.0}
    {"steer_intervention": "<file written by Intervention.save>", "steer_positions": "last"}

An expert set steers the neuron site: `steer_label` is required with it, `steer_k` defaults to
every expert the set holds for the label, `steer_strength` to 1. A saved intervention (LAPE's,
DiffMean's, a hand-made one) steers its own site (neuron, activation or residual) with its own
values. `steer_positions` defaults to "all" (an intervention file: its own positions).
`SteerRequest.parse` reads the keys (ValueError naming the problem) and
`SteerRequest.intervention` builds the `Intervention` (through `ExpertSet.intervention` or
`Intervention.load`), so a request steers as steer's transformers path does with the same
buffers. The plugin runs both in vLLM's front end, before a request reaches the engine, so a
bad request is refused (ValueError offline, HTTP 400 online) and the engine and the other
requests go on.

A third key is steer's own: `{"steer_collect": [row, label id, skipped positions]}` marks a
prefill of expert discovery (steer/vllm/discovery.py sends it; `collect_request` reads it), which
steers nothing: the worker pools its neuron tensor.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from steer.core.experts import ExpertSet
from steer.core.intervention import POSITIONS, Intervention

PREFIX = "steer_"
KEYS = ("steer_experts", "steer_label", "steer_k", "steer_positions", "steer_strength", "steer_intervention")
COLLECT = "steer_collect"  # [row, label id, skipped positions]: a prefill of steer's discovery (discovery.py)
EXPERT_KEYS = ("steer_label", "steer_k", "steer_strength")  # only with steer_experts


class Dims(NamedTuple):
    """A served model's sizes: decoder layers, MLP width, residual width."""

    layers: int
    width: int
    hidden: int

    def shape(self, site: str) -> tuple[int, int]:
        """[layers, units] of an intervention at `site`."""
        return self.layers, self.hidden if site == "residual" else self.width


@dataclass(frozen=True)
class SteerRequest:
    experts: str | None = None
    label: str | None = None
    k: int | None = None
    positions: str | None = None  # None: "all", or an intervention file's own
    strength: float = 1.0
    file: str | None = None  # steer_intervention

    @classmethod
    def parse(cls, extra_args: dict | None) -> "SteerRequest | None":
        """The steering a request asks for (None: no `steer_*` key), or ValueError."""
        given = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
        if not given or collect_request(extra_args) is not None:
            return None
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise ValueError(f"steer: unknown key(s) {unknown}; the keys are {list(KEYS)}")
        positions = given.get("steer_positions")
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"steer: steer_positions={positions!r}; choose one of {POSITIONS}")
        if "steer_intervention" in given:
            extra = sorted(set(given) & {"steer_experts", *EXPERT_KEYS})
            if extra:
                raise ValueError(f"steer: steer_intervention steers with its own values; {extra} go with steer_experts")
            path = given["steer_intervention"]
            if not isinstance(path, str) or not path:
                raise ValueError(f"steer: steer_intervention={path!r}: the path of a file written by Intervention.save")
            return cls(positions=positions, file=os.path.abspath(path))
        for key in ("steer_experts", "steer_label"):
            if not isinstance(given.get(key), str) or not given[key]:
                raise ValueError(f"steer: {key} is required (a string) with any steer_* key; got {given.get(key)!r}")
        k = given.get("steer_k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"steer: steer_k={k!r}: a positive integer")
        strength = given.get("steer_strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"steer: steer_strength={strength!r}: a finite number")
        return cls(os.path.abspath(given["steer_experts"]), given["steer_label"], k, positions, float(strength))

    @property
    def source(self) -> str:
        """The file the steering is read from (its modification time names its version)."""
        return self.file if self.file is not None else os.path.join(self.experts, "experts.safetensors")

    def version(self) -> float:
        """The modification time of `source` (ValueError naming what is missing)."""
        try:
            return os.stat(self.source).st_mtime
        except OSError:
            if self.file is None:
                raise ValueError(f"steer: no expert set at {self.experts} (steer_experts: a directory "
                                 "written by ExpertSet.save or `steer find-experts`)") from None
            raise ValueError(f"steer: no intervention file at {self.file} (steer_intervention: a file "
                             "written by Intervention.save)") from None

    def intervention(self, dims: Dims) -> Intervention:
        """The Intervention this request applies to a model of `dims`, on the CPU; ValueError for
        a missing or unreadable file, another model's shapes, an unknown label, k out of range or
        non-finite values."""
        if self.file is not None:
            iv = _load_intervention(self.file, self.version())
            if iv.shape != dims.shape(iv.site):
                raise ValueError(f"steer: {self.file} holds a {iv.site}-site intervention of {iv.shape[0]} layers x "
                                 f"{iv.shape[1]} units; the served model has {' x '.join(map(str, dims.shape(iv.site)))} there")
            if not bool(torch.isfinite(iv.mul[iv.mask]).all() and torch.isfinite(iv.add[iv.mask]).all()):
                raise ValueError(f"steer: the values in {self.file} are not all finite")
            return iv if self.positions in (None, iv.positions) else iv.with_positions(self.positions)
        shape = dims.shape("neuron")
        experts = _load(self.experts, self.version())
        if experts.shape != tuple(shape):
            raise ValueError(f"steer: expert set {self.experts} is for {experts.shape[0]} layers x "
                             f"{experts.shape[1]} neurons ({experts.meta.get('model')!r}); the served model "
                             f"has {shape[0]} x {shape[1]}")
        if self.label not in experts.concepts:
            raise ValueError(f"steer: no experts for label {self.label!r} in {self.experts}; labels: {experts.concepts}")
        try:
            k = None if self.k is None else experts.check_k(self.label, self.k, "steer_k")
        except ValueError as e:
            raise ValueError(f"steer: {e}") from None
        iv = experts.intervention(self.label, k=k, positions=self.positions or "all", strength=self.strength)
        if not bool(torch.isfinite(iv.add[iv.mask]).all()):
            raise ValueError(f"steer: the values of {self.label!r} in {self.experts} (x strength "
                             f"{self.strength}) are not all finite")
        return iv


def collect_request(extra_args: dict | None) -> tuple[int, int, frozenset] | None:
    """(row, label id, skipped prompt positions) of a collection request (None: not one), or
    ValueError. Steer's discovery sends them (steer/vllm/discovery.py); it steers nothing."""
    value = (extra_args or {}).get(COLLECT)
    if value is None:
        return None
    others = sorted(k for k in extra_args if k.startswith(PREFIX) and k != COLLECT)
    if others:
        raise ValueError(f"steer: a {COLLECT} request collects responses; it cannot also steer ({others})")
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[2], (list, tuple))
    numbers = list(value[:2]) + list(value[2]) if ok else []
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
        raise ValueError(f"steer: {COLLECT}={value!r}: [row, label id, [skipped positions]], integers >= 0")
    return int(value[0]), int(value[1]), frozenset(value[2])


@lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> ExpertSet:
    """An expert set, read once per process (and again when its file changes)."""
    try:
        return ExpertSet.load(path)
    except (OSError, KeyError) as e:
        raise ValueError(f"steer: cannot read the expert set at {path}: {e}") from None


@lru_cache(maxsize=64)
def _load_intervention(path: str, mtime: float) -> Intervention:
    """A saved intervention, read once per process (and again when its file changes)."""
    try:
        return Intervention.load(path)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"steer: cannot read the intervention at {path}: {e}") from None
