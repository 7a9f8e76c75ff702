"""The paper's random-neuron control: the experts' values forced on random neurons."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import torch

from steer.core.experts import ExpertSet
from steer.core.intervention import Intervention
from steer.experiments.study.config import CONTROL_LAYERS


def random_control(experts: ExpertSet, concept: str, k: int, seed: int, *, layers: str = "any",
                   positions: str = "all") -> tuple[Intervention, dict]:
    """The paper's control: the values of the first k experts of `concept`, forced on k random neurons.

    layers="any": neurons drawn uniformly from the whole model; "matched": each value goes to a
    random neuron of its expert's layer. Neurons among the concept's experts (all of the set, not
    only the first k) are never drawn. Returns the intervention and a description (seed, neurons,
    a hash of the values, which equals the experts' for the same k).
    """
    n_layers, width = experts.shape
    e = experts.experts[concept]
    k = min(k, len(e["layer"]))
    values = e["value"][:k].float()
    taken = set((e["layer"] * width + e["unit"]).tolist())
    gen = torch.Generator().manual_seed(seed)
    if layers == "any":
        chosen = [i for i in torch.randperm(n_layers * width, generator=gen).tolist() if i not in taken][:k]
    elif layers == "matched":
        chosen, used = [], set(taken)
        for layer in e["layer"][:k].tolist():
            for unit in torch.randperm(width, generator=gen).tolist():
                i = layer * width + unit
                if i not in used:
                    used.add(i)
                    chosen.append(i)
                    break
    else:
        raise ValueError(f"layers={layers!r}; choose one of {CONTROL_LAYERS}")
    if len(chosen) < k:
        raise ValueError(f"only {len(chosen)} non-expert neurons available for {k} random neurons")
    idx = torch.tensor(chosen, dtype=torch.long)
    iv = Intervention(n_layers, width, positions=positions).set(idx // width, idx % width, values)
    info = {"seed": seed, "n_neurons": len(iv), "layers": layers, "values_sha": values_sha(values),
            "layer_histogram": dict(sorted(Counter((idx // width).tolist()).items()))}
    return iv, info


def values_sha(values: torch.Tensor) -> str:
    return hashlib.sha256(np.sort(values.float().numpy()).tobytes()).hexdigest()[:16]


def control_seed(seed: int, concept: str, i: int) -> int:
    return int(hashlib.sha256(f"control:{seed}:{concept}:{i}".encode()).hexdigest()[:8], 16)
