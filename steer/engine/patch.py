"""The fused path: every MLP's neuron tensor produced by one op that also steers and pools.

`patch(model)` swaps modules, reversibly (`revert()`), so that each layer's neuron tensor comes
from `fused_mlp` (Triton on CUDA, plain traceable torch on CPU; kernels/, installed as steer.kernels): in one pass the
activation (`act(gate) * up`, or `act(pre)` for ungated MLPs), the expert override, and the
per-sentence pooling used by collection. No Python hooks run per layer, so `torch.compile`
traces the whole forward (`fullgraph=True`), and the expert buffers are read at run time.

    gated families (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3)  the MLP module -> `FusedGatedMLP`
    ungated families (GPT-2, BLOOM, XGLM, OPT)                  the activation -> `FusedActivation`

`FusedPatch` is one of the two backends of `steer.engine.backends` (the other: `HookBackend`): driven by
the same `Intervention` object, `intervene(model, iv)` on a patched model hands `iv`'s buffers to
the patch (it reads them, so in-place changes take effect without recompiling), and collection
asks it to pool. One pre-hook on the layer stack records each call's real-token mask and cache
use, exactly as for the hooks (`backends.CallInfo`).
"""
from __future__ import annotations

import torch
from torch import nn

from steer.engine.backends import Backend
from steer.core.deprecation import renamed_argument
from steer.kernels.dispatch import triton_module, use_triton
from steer.kernels.fused_mlp import fused_mlp
from steer.kernels.fused_mlp_ref import REDUCTION, pooled

#: activation module class name -> fused op activation
ACTS = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh", "BloomGelu": "gelu_tanh",
    "GELUActivation": "gelu", "GELU": "gelu",
    "ReLU": "relu",
}


def fused_act(module: nn.Module) -> str | None:
    """The fused op's activation for an activation module (None: the op has none): by class name,
    and torch's `nn.GELU` by its `approximate` too (its tanh form is another function)."""
    name = ACTS.get(type(module).__name__)
    if isinstance(module, nn.GELU) and module.approximate == "tanh":
        return "gelu_tanh"
    return name


class FusedPatch(Backend):
    """The fused backend: the swapped layers call `neurons`, which runs the fused op with the
    backend's intervention and pooling."""

    kind = "fused"

    def __init__(self, model: nn.Module, impl: str = "auto"):
        super().__init__(model)
        if use_triton(impl, self.layout.modules[0].weight):
            triton_module("fused_mlp_triton")  # import (and register the op) before any compile traces it
        self.impl = impl
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, original)
        self.acts: list[str] = []  # fused op activation of each layer
        try:
            for layer in range(self.layout.n_layers):
                self._swap(layer)
        except Exception:
            self.revert()
            raise

    def _swap(self, layer: int) -> None:
        a, parts = self.layout.adapter, self.layout.layer_parts(layer)
        act = fused_act(parts["act"])
        if act is None:
            raise ValueError(f"the fused op has no activation for {type(parts['act']).__name__}; use the reference hooks")
        root = self.model.get_submodule(f"{a.layers}.{layer}")
        if a.gate is not None or a.merged_gate_up:  # gated: the whole MLP module
            name = "mlp"
            new = FusedGatedMLP(root.mlp, self, layer, act, a.merged_gate_up)
        else:  # ungated: the activation, whose output is the neuron tensor
            parent_path, _, name = a.act.rpartition(".")
            root = root.get_submodule(parent_path) if parent_path else root
            new = FusedActivation(self, layer, act)
        self.swapped.append((root, name, getattr(root, name)))
        self.acts.append(act)
        setattr(root, name, new)

    def neurons(self, layer: int, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The fused op for one layer: up/gate [B, T, M] (or OPT's [B*T, M]) -> h, same shape."""
        batch = self.info.attention_mask.shape[0]
        shape = up.shape
        up = self.layout.view(up, batch)  # [B, T, M]
        gate = None if gate is None else self.layout.view(gate, batch)
        iv = self.intervention
        mlp_site = iv is not None and iv.site != "residual"
        override, rows, tokens = self.override(layer) if mlp_site else (None, None, None)
        out = fused_mlp(up, gate, act=self.acts[layer], override=override, steer_tokens=tokens,
                        pool_tokens=self.pool_tokens, override_rows=rows,
                        override_site=iv.site if mlp_site else "neuron", act_stats="act_pos" in self.stats,
                        reductions=(REDUCTION[self.pooling],), impl=self.impl)
        if self.pool_tokens is not None:
            self.pooled[:, layer] = pooled(self.pooling, self.pool_tokens, out.pool_max, out.pool_sum)
        if "act_pos" in self.stats:
            self.stats["act_pos"][:, layer], self.stats["act_sum"][:, layer] = out.act_pos, out.act_sum
        return out.h.view(shape)

    def revert(self) -> None:
        """Put the original modules back; the model is as before the patch."""
        for parent, name, original in reversed(self.swapped):
            setattr(parent, name, original)
        self.swapped = []
        super().remove()

    remove = revert

    def __enter__(self) -> "FusedPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


class FusedGatedMLP(nn.Module):
    """A gated MLP whose `act(gate) * up` (with override and pooling) is one fused op."""

    def __init__(self, mlp: nn.Module, patch: FusedPatch, layer: int, act: str, merged: bool):
        super().__init__()
        self.layer, self.act, self.merged = layer, act, merged
        # the original projections, under their own names: module paths and state_dict keys stay
        for name in ("gate_up_proj",) if merged else ("gate_proj", "up_proj"):
            setattr(self, name, getattr(mlp, name))
        self.down_proj = mlp.down_proj
        self._patch = [patch]  # in a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # Phi-3: [.., 2M], gate half first
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._patch[0].neurons(self.layer, up, gate))


class FusedActivation(nn.Module):
    """An ungated MLP's activation; its output (the neuron tensor) comes from the fused op."""

    def __init__(self, patch: FusedPatch, layer: int, act: str):
        super().__init__()
        self.layer, self.act = layer, act
        self._patch = [patch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._patch[0].neurons(self.layer, x, None)


def patch(model: nn.Module, impl: str = "auto", *, backend: str | None = None) -> FusedPatch:
    """Route every MLP of `model` through the fused op until `.revert()` (or the `with` block ends).

    impl: how the op runs: "auto" (Triton on CUDA, torch elsewhere), "torch", or "triton" (on CPU
    tensors only under TRITON_INTERPRET=1, for tests). `backend=` is its deprecated name.
    """
    return FusedPatch(model, renamed_argument("patch", "backend", backend, "impl", impl))
