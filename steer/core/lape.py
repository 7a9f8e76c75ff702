"""LAPE: language-specific neurons by activation-probability entropy (Tang et al., ACL 2024).

Input: per label (language), the fraction of its tokens on which each neuron's activation
`act(gate_proj(x))` is positive (`TokenStats.activation_probability`, [C, L, M]). Selection as
the authors' `identify.py` (RUCAIBox/Language-Specific-Neurons) does it:

1. normalise each neuron's probabilities across the C labels (0 / 0 -> 0) and take their
   entropy (natural log, 0 log 0 = 0): low entropy = the neuron fires for few languages;
2. the bar: the `filter_rate` quantile (k-th smallest value, k = round(n * rate)) of all L x M x C
   probabilities; a neuron whose probability is above the bar for no label is dropped;
3. keep the round(L x M x `top_rate`) neurons of lowest entropy (ties by flat index: a stable
   sort, where the reference's `topk` leaves them to the device);
4. assign each kept neuron to every label whose probability is above the `activation_bar_ratio`
   quantile (the same bar at the defaults): a neuron may belong to several languages, so each
   language gets a variable number of neurons.

Defaults: `top_rate` 0.05 (the reference's original value, and CLaS-Bench's reported setting;
its current code uses 0.01), `filter_rate` 0.95, `activation_bar_ratio` 0.95.

Interventions (`lape_intervention`), as LAPE / CLaS-Bench apply them, at the activation site
(`act(gate)` before `* up`): deactivate (zero) the neurons of some languages and activate the
target's neurons (set to the target's mean activation over its tokens, negative values counted).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.core.intervention import Intervention

TOP_RATE, FILTER_RATE, ACTIVATION_BAR_RATIO = 0.05, 0.95, 0.95


@dataclass
class LapeNeurons:
    """Each label's LAPE neurons: (layers, units) int64 tensors sorted by (layer, unit)."""

    label_names: list[str]
    neurons: dict[str, tuple[torch.Tensor, torch.Tensor]]
    settings: dict

    def __len__(self) -> int:
        return len({(l, u) for layers, units in self.neurons.values() for l, u in zip(layers.tolist(), units.tolist())})

    def sizes(self) -> dict[str, int]:
        return {name: int(layers.numel()) for name, (layers, _) in self.neurons.items()}


def _quantile_value(flat: torch.Tensor, rate: float) -> float:
    """The k-th smallest value, k = round(n * rate) (at least 1): the reference's `kthvalue` bar."""
    return float(flat.kthvalue(max(1, round(flat.numel() * rate))).values)


def lape_entropy(probability: torch.Tensor) -> torch.Tensor:
    """[L, M] entropy of each neuron's activation probabilities [C, L, M] normalised across labels."""
    p = probability.double()
    normed = torch.nan_to_num(p / p.sum(0, keepdim=True), nan=0.0)
    return -(normed * torch.where(normed > 0, normed.log(), 0.0)).sum(0)


def select_lape(probability: torch.Tensor, label_names: Sequence[str], *, top_rate: float = TOP_RATE,
                filter_rate: float = FILTER_RATE, activation_bar_ratio: float = ACTIVATION_BAR_RATIO) -> LapeNeurons:
    """LAPE neurons of every label from activation probabilities [C, L, M] (see the module docstring)."""
    C, L, M = probability.shape
    if C != len(label_names) or C < 2:
        raise ValueError(f"{C} probability rows for labels {list(label_names)}: LAPE needs one per label, two or more")
    for name, rate in (("top_rate", top_rate), ("filter_rate", filter_rate),
                       ("activation_bar_ratio", activation_bar_ratio)):
        if not 0 < rate <= 1:
            raise ValueError(f"{name}={rate}: must be in (0, 1]")
    p = probability.double().cpu()
    flat = p.flatten()
    entropy = lape_entropy(p).flatten()  # [L*M]
    entropy[(p > _quantile_value(flat, filter_rate)).sum(0).flatten() == 0] = torch.inf
    keep = torch.sort(entropy, stable=True).indices[: round(L * M * top_rate)]  # lowest entropy first
    above = p.flatten(1)[:, keep] > _quantile_value(flat, activation_bar_ratio)  # [C, K]
    neurons = {}
    for c, name in enumerate(label_names):
        chosen = keep[above[c]].sort().values  # flat = layer * M + unit, so sorted by (layer, unit)
        neurons[str(name)] = (chosen // M, chosen % M)
    settings = {"method": "lape", "top_rate": top_rate, "filter_rate": filter_rate,
                "activation_bar_ratio": activation_bar_ratio, "kept": int(keep.numel())}
    return LapeNeurons([str(n) for n in label_names], neurons, settings)


def lape_intervention(found: LapeNeurons, activation_mean: torch.Tensor, *, activate: str | None = None,
                      deactivate: Sequence[str] = (), positions: str = "all", device=None) -> Intervention:
    """An activation-site `Intervention`: zero the neurons of the `deactivate` labels, then set the
    neurons of `activate` to that label's mean activation (`activation_mean` [C, L, M], e.g.
    `TokenStats.activation_mean()`); a neuron in both is activated."""
    C, L, M = activation_mean.shape
    unknown = [n for n in [activate, *deactivate] if n is not None and n not in found.neurons]
    if unknown:
        raise ValueError(f"labels {unknown} have no LAPE neurons here (labels: {found.label_names})")
    iv = Intervention(L, M, positions, device=device or activation_mean.device, site="activation")
    for name in deactivate:
        iv.zero(*found.neurons[name])
    if activate is not None:
        layers, units = found.neurons[activate]
        c = found.label_names.index(activate)
        iv.set(layers, units, activation_mean[c, layers, units].float())
    return iv
