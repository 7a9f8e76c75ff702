"""Fused MLP neuron op: activation, expert override and sentence pooling in one pass (Triton).

The neuron tensor (the input of an MLP's down projection) is produced anyway by the forward.
This kernel reads `gate` / `up` once and, in the same pass, computes `act(gate) * up` (or
`act(up)` for ungated MLPs), applies the masked override of the experts (`value * mul + add` at
steered positions, on the neuron or on the activation before `* up`), writes `h` for the down
projection and reduces each sentence's values over its real tokens into `pool_max` / `pool_sum`
[B, M] (and, for LAPE, the count of positive activations and their sum: `act_pos` / `act_sum`). It moves the same bytes as a plain
`act(gate) * up` (read gate and up, write h), so steering and response collection cost no extra
pass over the neuron tensor: no hooks, no host copies, no [B, T, M] temporaries.
`fused_mlp_ref.py` holds the semantics in plain torch.

Layout: one program per (sentence, block of BLOCK_M neurons); it walks the positions in chunks
of BLOCK_T, so the pooled accumulators stay in registers and need no atomics. Inputs are read
through their strides (e.g. the two halves of Phi-3's merged gate_up output).

Precision: inputs are upcast to fp32; activation, override and pooling run in fp32; `h` is
rounded once to the input dtype (round to nearest even), and pooling sees `h` as written.
pool_max is exact; pool_sum differs from torch's by summation order only (a few fp32 ulp).

The kernel (`fused_mlp_triton.py`) is exposed as `torch.ops.steer.fused_mlp` via
`torch.library.triton_op` + `wrap_triton`, so Inductor traces into it on CUDA; `fused_mlp` here
dispatches by `steer.kernels.dispatch.use_triton` (CUDA tensors to Triton, others to the reference).
"""
import torch

from .dispatch import triton_module, use_triton
from .fused_mlp_ref import REDUCTIONS, FusedOut, check_options, fused_mlp_ref


def fused_mlp(
    up: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    act: str,
    override: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    steer_tokens: torch.Tensor | None = None,
    pool_tokens: torch.Tensor | None = None,
    override_rows: torch.Tensor | None = None,
    override_site: str = "neuron",
    act_stats: bool = False,
    reductions: tuple[str, ...] = REDUCTIONS,
    impl: str = "auto",
) -> FusedOut:
    """`FusedOut`: the neuron tensor h [B, T, M] with the override applied (to the neuron or the
    activation: `override_site`), pool_max / pool_sum [B, M] fp32 over pool_tokens (those `reductions`
    names: the Triton kernel computes both in registers, the CPU reference only those) and, with
    act_stats, act_pos / act_sum [B, M] fp32 (None where not asked for). override: [M] buffers
    for every row, or [R, M] tables with override_rows [B] (per-row steering: the kernel reads
    row b's table row). Semantics: `fused_mlp_ref`.

    impl: "auto" (CUDA tensors -> Triton op, others -> reference), "torch" (reference),
    "triton" (Triton op on any device; on CPU only under TRITON_INTERPRET=1, for tests).
    """
    triton = use_triton(impl, up)
    check_options(act, override_site, act_stats, pool_tokens, reductions)
    if up.dim() != 3 or (gate is not None and (gate.shape != up.shape or gate.dtype != up.dtype)):
        raise ValueError("up must be [B, T, M], and gate (if given) of the same shape and dtype")
    if not triton:
        return fused_mlp_ref(up, gate, act=act, override=override, steer_tokens=steer_tokens,
                             pool_tokens=pool_tokens, override_rows=override_rows,
                             override_site=override_site, act_stats=act_stats, reductions=reductions)
    mask, mul, add = override if override is not None else (None, None, None)
    op = triton_module("fused_mlp_triton").fused_mlp_op
    h, pool_max, pool_sum, act_pos, act_sum = op(up, gate, act, mask, mul, add, steer_tokens, pool_tokens,
                                                 override_rows, override_site == "activation", act_stats)
    if pool_tokens is None:
        return FusedOut(h, None, None, None, None)
    return FusedOut(h, pool_max if "max" in reductions else None, pool_sum if "sum" in reductions else None,
                    *((act_pos, act_sum) if act_stats else (None, None)))
