"""The methods `steer study --methods` compares: each a family of interventions, one strength chosen on dev.

    experts   the target's top-k neuron experts forced to their values (k; x multiplier)  neuron site
    random    the same values on k random neurons, none of the target's experts (k;
              `random_control`, the control's first seed)                               neuron site
    lape      the target's LAPE neurons set to its mean activation (the LAPE top_rate)    activation site
    diffmean  strength x the unit direction (target mean - mean of the other languages)
              added to one layer's output at every position (layer, scale)               residual site

LAPE and DiffMean read token statistics (`TokenStats`) collected over the discovery text of every
study language, so LAPE's entropy and DiffMean's "mean of the others" see all of them. In the embedding study there is no single source language, so LAPE
only activates (CLaS-Bench also deactivates the source's neurons) and DiffMean subtracts the mean
of the other languages' means (CLaS-Bench: the source's mean). DiffMean's strength is a multiple
(`scale`) of that difference's length at the layer (1: shift by the mean difference itself), so
one grid fits models whose residual streams differ in size by orders of magnitude (Gemma-3's
mean residual is 10^3-10^4 long, the fr-vs-others difference ~6-15 % of it; CLaS-Bench's
absolute 1-10 was tuned on 8B models); the absolute strength is recorded with each setting.

A setting is a JSON-able dict; a method's `grid(target)` lists them weakest first, so a tie on
dev goes to the weaker intervention (`choice.choose_setting`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steer.core.diffmean import diffmean_difference, diffmean_directions, diffmean_intervention
from steer.core.experts import ExpertSet, random_control
from steer.core.intervention import Intervention
from steer.core.lape import lape_intervention, select_lape
from steer.core.token_stats import TokenStats
from steer.experiments.study.control import control_seed

METHODS = ("experts", "lape", "diffmean", "random")
TOKEN_METHODS = {"lape": "activation", "diffmean": "residual"}  # methods that need token statistics


@dataclass
class Method:
    """One method: its intervention site, its dev grid per target, and the intervention of a setting."""

    name: str
    site: str
    grid: Callable[[str], list[dict]]
    build: Callable[[str, dict], Intervention]


def default_diffmean_layers(n_layers: int) -> list[int]:
    """A quarter, half and three quarters of the way up (0-based decoder layers)."""
    return sorted({max(0, min(n_layers - 1, round(n_layers * f) - 1)) for f in (0.25, 0.5, 0.75)})


def make_methods(names: list[str], cfg, experts: ExpertSet, k_grid: dict[str, list[int]],
                 stats: TokenStats | None, device: torch.device) -> dict[str, Method]:
    """The study's methods by name (see the module docstring); `k_grid`: target -> k values; their
    interventions are built on `device` (the model's neurons')."""
    out: dict[str, Method] = {}
    for name in names:
        if name == "experts":
            out[name] = Method(name, "neuron", lambda t: [{"k": k} for k in k_grid[t]],
                               lambda t, s: experts.intervention(t, k=s["k"], strength=s.get("multiplier", 1.0)))
        elif name == "random":
            out[name] = Method(name, "neuron", lambda t: [{"k": k} for k in k_grid[t]],
                               lambda t, s: random_control(experts, t, s["k"], control_seed(cfg.seed, t, 0),
                                                           layers=cfg.control_layers,
                                                           strength=s.get("multiplier", 1.0))[0])
        elif name == "lape":
            out[name] = _lape(stats, cfg.lape_rates)
        elif name == "diffmean":
            out[name] = _diffmean(stats, cfg.diffmean_layers, cfg.diffmean_scales)
        else:
            raise ValueError(f"method {name!r}; choose from {METHODS}")
    return {name: dataclasses.replace(m, build=lambda t, s, b=m.build: b(t, s).to(device)) for name, m in out.items()}


def _lape(stats: TokenStats, rates: list[float]) -> Method:
    probability, mean = stats.activation_probability(), stats.activation_mean()
    found = {rate: select_lape(probability, stats.label_names, top_rate=rate) for rate in sorted(rates)}

    def grid(t: str) -> list[dict]:
        return [{"top_rate": r, "neurons": f.sizes()[t]} for r, f in found.items() if f.sizes()[t]]

    return Method("lape", "activation", grid, lambda t, s: lape_intervention(found[s["top_rate"]], mean, activate=t))


def _diffmean(stats: TokenStats, layers: list[int] | None, scales: list[float]) -> Method:
    means = stats.residual_mean()  # [C, L, D] float64
    names = stats.label_names
    layers = layers if layers is not None else default_diffmean_layers(means.shape[1])
    if max(layers) >= means.shape[1]:
        raise ValueError(f"diffmean_layers {layers}: the model has decoder layers 0..{means.shape[1] - 1}")
    directions: dict[str, torch.Tensor] = {}

    def direction(t: str) -> torch.Tensor:
        if t not in directions:
            directions[t] = diffmean_directions(means, names, t)
        return directions[t]

    def grid(t: str) -> list[dict]:
        norm = diffmean_difference(means, names, t).norm(dim=1)  # [L]: the mean difference's length
        return [{"layer": l, "scale": s, "strength": float(s * norm[l])} for s in sorted(scales) for l in layers]

    return Method("diffmean", "residual", grid, lambda t, s: diffmean_intervention(direction(t), s["layer"], s["strength"]))


def describe(setting: dict) -> str:
    """A setting in a table cell: "k=50", "k=400, 2x", "top_rate=0.02 (311 neurons)", "layer 9, 0.5x (81.2)"."""
    if "k" in setting:
        return f"k={setting['k']}" + (f", {setting['multiplier']:g}x" if "multiplier" in setting else "")
    if "top_rate" in setting:
        return f"top_rate={setting['top_rate']:g} ({setting['neurons']} neurons)"
    return f"layer {setting['layer']}, {setting['scale']:g}x ({setting['strength']:.3g})"
