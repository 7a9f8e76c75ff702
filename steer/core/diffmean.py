"""DiffMean: steering the residual stream along a difference of label means (CLaS-Bench).

Input: per label, the mean over its tokens of each decoder layer's output (the residual stream
after layer l, Hugging Face's `hidden_states[l + 1]` except after the last layer, where that
one is after the final norm): `TokenStats.residual_mean`, [C, L, D].
The direction of a target at layer l is the target's mean minus the source's, scaled to unit
length; CLaS-Bench adds `strength x direction` to one layer's output at every position
(`diffmean_intervention`, a residual-site `Intervention`: mul 1, add on every hidden unit).
Without a single source language (the embedding study), the source is the mean of the other
labels' means: "target minus the mean of the others" (`source=None`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.core.intervention import Intervention


def diffmean_difference(residual_mean: torch.Tensor, label_names: Sequence[str], target: str,
                        source: str | None = None) -> torch.Tensor:
    """[L, D] float64, per layer: mean(target) - mean(source), or minus the mean of the other
    labels' means when `source` is None."""
    names = [str(n) for n in label_names]
    unknown = [n for n in (target, source) if n is not None and n not in names]
    if unknown:
        raise ValueError(f"labels {unknown} not among {names}")
    if source == target:
        raise ValueError(f"source and target are both {target!r}")
    means = residual_mean.double()
    t = names.index(target)
    if source is None:
        others = [c for c in range(len(names)) if c != t]
        if not others:
            raise ValueError("the mean of the other labels needs a second label")
        base = means[others].mean(0)
    else:
        base = means[names.index(source)]
    return means[t] - base  # [L, D]


def diffmean_directions(residual_mean: torch.Tensor, label_names: Sequence[str], target: str,
                        source: str | None = None) -> torch.Tensor:
    """[L, D] float32 unit vectors, one per layer: `diffmean_difference` scaled to length 1."""
    diff = diffmean_difference(residual_mean, label_names, target, source)
    norm = diff.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError(f"the means of {target!r} and its source are equal at layers "
                         f"{(norm.flatten() == 0).nonzero().flatten().tolist()}: no direction")
    return (diff / norm).float()


def diffmean_intervention(directions: torch.Tensor, layer: int, strength: float, *,
                          positions: str = "all", device=None) -> Intervention:
    """A residual-site `Intervention` adding `strength x directions[layer]` to that layer's output."""
    L, D = directions.shape
    if not 0 <= layer < L:
        raise ValueError(f"layer {layer} out of range: {L} layers")
    iv = Intervention(L, D, positions, device=device or directions.device, site="residual")
    return iv.shift(layer, torch.arange(D), strength * directions[layer].float())
