"""Interventions on neurons: dense per-layer override buffers and the reference way to apply them.

An `Intervention` holds three dense buffers per model, each [layers, width]:
`mask` (which neurons are overridden), `mul` and `add`. At a steered position every masked
neuron becomes `h * mul + add` (computed in fp32, cast back), which covers the four operations:

    set v    mul 0, add v        scale s  mul s, add 0
    add v    mul 1, add v        zero     mul 0, add 0

Buffers are updated in place, so a compiled graph or a patched model that holds them sees a new
expert set without being rebuilt. `positions` chooses where the override applies:
"all" tokens, the "last" real token of every forward call, the "prompt" (forward calls without
a KV cache: the prefill) or "generated" tokens (calls that extend a cache: decoding steps).

`intervene(model, iv)` applies it; on a model patched with `steer.patch` the fused op reads
the buffers, otherwise it applies them with forward pre-hooks on every down projection, the simplest
correct means: this is the oracle that the fused MLP path is tested against. A pre-hook on the
layer stack records, for each forward call, which positions are real tokens and whether a cache
is being extended. `override()` below is where a hook overwrites a neuron; the fused path does it
in `kernels/fused_mlp_ref.py` (CPU) and `kernels/fused_mlp_triton.py` (Triton).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters import NeuronSites

log = logging.getLogger(__name__)
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


def override(h: torch.Tensor, mask: torch.Tensor, mul: torch.Tensor, add: torch.Tensor,
             tokens: torch.Tensor | None) -> torch.Tensor:
    """Where `mask` [M] and `tokens` [B, T] (None: everywhere): h [B, T, M] -> h * mul + add, in fp32."""
    sel = mask if tokens is None else tokens[:, :, None] & mask  # [B, T, M] or [M]
    return torch.where(sel, (h.float() * mul + add).to(h.dtype), h)


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


def guard_hooks() -> None:
    """Make `torch.compile` guard on module hooks before steer adds any (called whenever it does).

    torch 2.13 skips those guards by default (`torch._dynamo.config.skip_nnmodule_hook_guards`),
    so a graph compiled before steer's hooks existed, or compiled for another copy of the same
    model class, silently runs WITHOUT them: steering or pooling would be ignored and nothing
    would say so. steer turns the guards on the first time it adds hooks, and if dynamo may
    already hold graphs compiled without them it drops those graphs once (`torch._dynamo.reset()`,
    logged): they recompile on their next call, with the guards. From then on adding or removing
    a hook recompiles (tests/test_intervention.py). Importing steer changes nothing.
    """
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
        log.info("torch.compile now guards module hooks (steer adds hooks); compiled graphs recompile once")


class _CallInfo:
    """Pre-hook on the layer stack that records each forward call's real-token mask and cache use."""

    def __init__(self, stack: nn.Module):
        guard_hooks()
        self.attention_mask: torch.Tensor | None = None  # [B, T] of the current call
        self.extends_cache = False
        self.handle = stack.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs["inputs_embeds"]
        batch, length = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(batch, length, dtype=torch.long, device=x.device)
        self.attention_mask = mask[:, -length:]  # a cache-extending call passes past + new columns
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 passes `cache=`
        self.extends_cache = cache is not None and cache.get_seq_length() > 0
        return None


class Steering:
    """Hooks that apply an `Intervention` to a model; `remove()` or leave the `with` block to undo."""

    def __init__(self, model: nn.Module, intervention: Intervention, neuron_module: str | None = None):
        self.sites = NeuronSites(model, neuron_module)
        if intervention.shape != (self.sites.n_layers, self.sites.width):
            raise ValueError(
                f"intervention is for {intervention.shape[0]} layers x {intervention.shape[1]} neurons; "
                f"the model has {self.sites.n_layers} x {self.sites.width}"
            )
        self.intervention = intervention
        self.patch = getattr(model, "_steer_patch", None)
        if self.patch is not None:  # a fused patch reads the buffers itself (steer.patch)
            self.patch.attach(intervention)
            self.handles = []
            return
        self.info = _CallInfo(self.sites.stack)
        self.handles = [self.info.handle] + [
            m.register_forward_pre_hook(self._hook(layer)) for layer, m in enumerate(self.sites.modules)
        ]

    def _hook(self, layer: int):
        iv = self.intervention

        def pre_hook(module, args):
            if not iv.mask[layer].any():
                return None
            mask = self.info.attention_mask
            tokens = steered_tokens(iv.positions, mask, self.info.extends_cache)
            h = self.sites.view(args[0], mask.shape[0])  # [B, T, M]
            out = override(h, iv.mask[layer], iv.mul[layer], iv.add[layer], tokens)
            return (out.view(args[0].shape),) + tuple(args[1:])

        return pre_hook

    def remove(self) -> None:
        if self.patch is not None and self.patch.intervention is self.intervention:
            self.patch.detach()
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "Steering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def intervene(model: nn.Module, intervention: Intervention, neuron_module: str | None = None) -> Steering:
    """Apply `intervention` to `model` until `.remove()` (or use it as a context manager)."""
    return Steering(model, intervention, neuron_module)
