"""Interventions on neurons: dense per-layer override buffers, and the positions they steer.

An `Intervention` holds three dense buffers per model, each [layers, width]:
`mask` (which neurons are overridden), `mul` and `add`. At a steered position every masked
neuron becomes `h * mul + add` (computed in fp32, cast back), which covers the four operations:

    set v    mul 0, add v        scale s  mul s, add 0
    add v    mul 1, add v        zero     mul 0, add 0

Buffers are updated in place, so a compiled graph or a patched model that holds them sees a new
expert set without being rebuilt. `positions` chooses where the override applies:
"all" tokens, the "last" real token of every forward call, the "prompt" (forward calls without
a KV cache: the prefill) or "generated" tokens (calls that extend a cache: decoding steps);
`steered_tokens` turns that into a [B, T] mask for one forward call.

Applying it is the backends' job (`steer.engine.backends`: `intervene`, hooks or the fused patch); the
override itself is `kernels/fused_mlp_ref.py::apply_override`, shared by every path.
"""
from __future__ import annotations

import torch
from torch import nn

from steer.core.adapters import NeuronSites

POSITIONS = ("all", "last", "prompt", "generated")


class Intervention:
    """Dense override buffers `mask`, `mul`, `add`, each [n_layers, width]."""

    def __init__(self, n_layers: int, width: int, positions: str = "all", device: str | torch.device = "cpu"):
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
        self.positions = positions
        self.mask = torch.zeros(n_layers, width, dtype=torch.bool, device=device)
        self.mul = torch.ones(n_layers, width, dtype=torch.float32, device=device)
        self.add = torch.zeros(n_layers, width, dtype=torch.float32, device=device)

    @classmethod
    def for_model(cls, model: nn.Module, positions: str = "all", neuron_module: str | None = None) -> "Intervention":
        sites = NeuronSites(model, neuron_module)
        return cls(sites.n_layers, sites.width, positions, device=sites.modules[0].weight.device)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def _index(self, layers, units):
        layers = torch.as_tensor(layers, dtype=torch.long).reshape(-1)
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        if layers.numel() == 1 and units.numel() > 1:
            layers = layers.expand(units.numel())
        if layers.shape != units.shape:
            raise ValueError(f"{layers.numel()} layer indices for {units.numel()} unit indices")
        n_layers, width = self.shape
        for name, idx, size in (("layer", layers, n_layers), ("unit", units, width)):
            bad = (idx < 0) | (idx >= size)
            if bad.any():
                raise IndexError(f"{name} index {int(idx[bad][0])} out of range: the model has {size} {name}s")
        return layers.to(self.mask.device), units.to(self.mask.device)

    def _put(self, layers, units, mul, add) -> "Intervention":
        layers, units = self._index(layers, units)
        shape = layers.shape
        self.mask[layers, units] = True
        self.mul[layers, units] = torch.as_tensor(mul, dtype=torch.float32, device=self.mul.device).expand(shape)
        self.add[layers, units] = torch.as_tensor(add, dtype=torch.float32, device=self.add.device).expand(shape)
        return self

    def set(self, layers, units, values) -> "Intervention":
        """Force neurons to `values`."""
        return self._put(layers, units, 0.0, values)

    def scale(self, layers, units, factors) -> "Intervention":
        return self._put(layers, units, factors, 0.0)

    def shift(self, layers, units, deltas) -> "Intervention":
        """Add `deltas` to neurons."""
        return self._put(layers, units, 1.0, deltas)

    def zero(self, layers, units) -> "Intervention":
        return self._put(layers, units, 0.0, 0.0)

    def clear(self) -> "Intervention":
        """Remove every override, in place."""
        self.mask.zero_()
        self.mul.fill_(1.0)
        self.add.zero_()
        return self

    def copy_(self, other: "Intervention") -> "Intervention":
        """Take another intervention's buffers in place (no recompilation for holders of these)."""
        if other.shape != self.shape:
            raise ValueError(f"intervention shape {other.shape} differs from {self.shape}")
        self.mask.copy_(other.mask)
        self.mul.copy_(other.mul)
        self.add.copy_(other.add)
        self.positions = other.positions
        return self

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        layers = self.mask.any(1).nonzero().flatten().tolist()
        return f"Intervention({len(self)} neurons in layers {layers}, positions={self.positions!r})"


def steered_tokens(positions: str, attention_mask: torch.Tensor, extends_cache: bool) -> torch.Tensor | None:
    """[B, T] bool of the positions to steer in one forward call; None means all of them."""
    if positions == "all":
        return None
    if positions == "prompt":
        return None if not extends_cache else torch.zeros_like(attention_mask, dtype=torch.bool)
    if positions == "generated":
        return None if extends_cache else torch.zeros_like(attention_mask, dtype=torch.bool)
    # "last": the last real token of each row, whatever the padding side
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * (t + 1)).argmax(1)  # [B]
    return t[None, :] == last[:, None]
