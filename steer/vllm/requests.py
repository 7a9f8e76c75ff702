"""The request contract: which neurons a vLLM request steers, checked at admission.

A request names its steering in `SamplingParams.extra_args` with flat keys (vLLM's HTTP
`vllm_xargs` only takes flat values), the same offline and over HTTP:

    {"steer_experts": "<expert-set directory>", "steer_label": "fr",
     "steer_k": 100, "steer_positions": "all", "steer_strength": 1.0}

`steer_experts` and `steer_label` are required once any `steer_*` key is given; `steer_k`
defaults to every expert the set holds for the label, `steer_positions` to "all",
`steer_strength` to 1. `SteerRequest.parse` reads them (ValueError naming the problem) and
`SteerRequest.intervention` builds the `Intervention` through `ExpertSet.intervention`: the
same set, k, strength and positions give the same buffers as steer's transformers path.
`SteerLogits.validate_params` runs both in vLLM's front end, before a request reaches the
engine, so a bad request is refused (ValueError offline, HTTP 400 online) and the engine and
the other requests go on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from steer.core.experts import ExpertSet
from steer.core.intervention import POSITIONS, Intervention

PREFIX = "steer_"
KEYS = ("steer_experts", "steer_label", "steer_k", "steer_positions", "steer_strength")


@dataclass(frozen=True)
class SteerRequest:
    experts: str
    label: str
    k: int | None = None
    positions: str = "all"
    strength: float = 1.0

    @classmethod
    def parse(cls, extra_args: dict | None) -> "SteerRequest | None":
        """The steering a request asks for (None: no `steer_*` key), or ValueError."""
        given = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
        if not given:
            return None
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise ValueError(f"steer: unknown key(s) {unknown}; the keys are {list(KEYS)}")
        for key in ("steer_experts", "steer_label"):
            if not isinstance(given.get(key), str) or not given[key]:
                raise ValueError(f"steer: {key} is required (a string) with any steer_* key; got {given.get(key)!r}")
        k = given.get("steer_k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"steer: steer_k={k!r}: a positive integer")
        positions = given.get("steer_positions", "all")
        if positions not in POSITIONS:
            raise ValueError(f"steer: steer_positions={positions!r}; choose one of {POSITIONS}")
        strength = given.get("steer_strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"steer: steer_strength={strength!r}: a finite number")
        return cls(os.path.abspath(given["steer_experts"]), given["steer_label"], k, positions, float(strength))

    def intervention(self, shape: tuple[int, int]) -> Intervention:
        """The Intervention this request forces, for a model of `shape` (layers, MLP width), on
        the CPU; ValueError for a missing or unreadable set, another model's shapes, an unknown
        label, k out of range or non-finite values."""
        experts = _load(self.experts, set_time(self.experts))
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
        iv = experts.intervention(self.label, k=k, positions=self.positions, strength=self.strength)
        if not bool(torch.isfinite(iv.add[iv.mask]).all()):
            raise ValueError(f"steer: the values of {self.label!r} in {self.experts} (x strength "
                             f"{self.strength}) are not all finite")
        return iv


def set_time(path: str) -> float:
    """The modification time of the set's tensors (ValueError where there is no set)."""
    try:
        return os.stat(os.path.join(path, "experts.safetensors")).st_mtime
    except OSError:
        raise ValueError(f"steer: no expert set at {path} (steer_experts: a directory written by "
                         "ExpertSet.save or `steer find-experts`)") from None


@lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> ExpertSet:
    """An expert set, read once per process (and again when its file changes)."""
    try:
        return ExpertSet.load(path)
    except (OSError, KeyError) as e:
        raise ValueError(f"steer: cannot read the expert set at {path}: {e}") from None
