"""The fused MLP neuron op as a Triton kernel, registered as `torch.ops.steer.fused_mlp`.

What it computes, its layout and precision: `fused_mlp.py`; semantics in plain torch:
`fused_mlp_ref.py`. Imported on first use of the Triton path (`steer.kernels.dispatch.triton_module`).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .fused_mlp_ref import ACTIVATIONS

_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
assert _ACT_CODES.keys() == ACTIVATIONS.keys()


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # silu, as torch: x / (1 + exp(-x))
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 1:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh): 0.5 x (1 + tanh(z)) == x * sigmoid(2 z), without cancellation
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x / (1.0 + tl.exp(-2.0 * z))
    else:  # relu; NaN stays NaN as in torch
        y = tl.where(x < 0.0, 0.0, x)
    return y


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    # fp32 -> DTYPE, round to nearest even. For bf16 the rounding is written out: Triton's
    # interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even, as this does).
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(v == v, bits, 0x7FC00000)  # NaN stays a quiet NaN
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def _fused_mlp_kernel(
    up_ptr, gate_ptr, h_ptr,  # [B, T, M] (h contiguous)
    mask_ptr, mul_ptr, add_ptr,  # [M], or [R, M] tables read at row rows[b] (PER_ROW)
    rows_ptr,  # [B] int64 (PER_ROW)
    steer_ptr, pool_ptr,  # [B, T] bool
    max_ptr, sum_ptr,  # [B, M] fp32
    pos_ptr, act_ptr,  # [B, M] fp32 (ACT_STATS)
    T, M,
    s_ub, s_ut, s_um,
    s_gb, s_gt, s_gm,
    s_sb, s_st,
    s_pb, s_pt,
    ACT: tl.constexpr, GATED: tl.constexpr, OVERRIDE: tl.constexpr,
    STEER_ALL: tl.constexpr, POOL: tl.constexpr, PER_ROW: tl.constexpr,
    ACT_SITE: tl.constexpr, ACT_STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    in_m = offs_m < M

    if OVERRIDE:
        table = offs_m
        if PER_ROW:  # this sentence's row of the [R, M] tables
            table = tl.load(rows_ptr + b).to(tl.int64) * M + offs_m
        expert = tl.load(mask_ptr + table, mask=in_m, other=0) != 0  # [BLOCK_M]
        mul = tl.load(mul_ptr + table, mask=in_m, other=1.0).to(tl.float32)
        add = tl.load(add_ptr + table, mask=in_m, other=0.0).to(tl.float32)
    if POOL:
        acc_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        acc_sum = tl.zeros([BLOCK_M], tl.float32)
    if ACT_STATS:
        acc_pos = tl.zeros([BLOCK_M], tl.float32)
        acc_act = tl.zeros([BLOCK_M], tl.float32)

    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        in_t = offs_t < T
        tile = in_t[:, None] & in_m[None, :]  # [BLOCK_T, BLOCK_M]

        x = tl.load(up_ptr + b * s_ub + offs_t[:, None] * s_ut + offs_m[None, :] * s_um,
                    mask=tile, other=0.0).to(tl.float32)
        if GATED:
            g = tl.load(gate_ptr + b * s_gb + offs_t[:, None] * s_gt + offs_m[None, :] * s_gm,
                        mask=tile, other=0.0).to(tl.float32)
            a = _activation(g, ACT)
        else:
            a = _activation(x, ACT)

        if OVERRIDE:
            if STEER_ALL:
                steered = expert[None, :]  # [1, BLOCK_M]
            else:
                tok = tl.load(steer_ptr + b * s_sb + offs_t * s_st, mask=in_t, other=0) != 0
                steered = tok[:, None] & expert[None, :]  # [BLOCK_T, BLOCK_M]
            # A GPU may contract this into one FMA (one rounding, not two): the same bits for
            # set / scale / add / zero, at most 1 ulp apart for other (mul, add) pairs.
            if ACT_SITE:
                a = tl.where(steered, a * mul[None, :] + add[None, :], a)
        if ACT_STATS:
            tok = tl.load(pool_ptr + b * s_pb + offs_t * s_pt, mask=in_t, other=0) != 0
            acc_pos += tl.sum(tl.where(tok[:, None] & (a > 0.0), 1.0, 0.0), axis=0)
            acc_act += tl.sum(tl.where(tok[:, None], a, 0.0), axis=0)
        if GATED:
            v = a * x
        else:
            v = a
        if OVERRIDE:
            if not ACT_SITE:
                v = tl.where(steered, v * mul[None, :] + add[None, :], v)

        h = _round_to(v, h_ptr.dtype.element_ty)
        tl.store(h_ptr + (b * T + offs_t[:, None]) * M + offs_m[None, :], h, mask=tile)

        if POOL:
            tok = tl.load(pool_ptr + b * s_pb + offs_t * s_pt, mask=in_t, other=0) != 0
            written = h.to(tl.float32)
            pooled_max = tl.max(tl.where(tok[:, None], written, float("-inf")), axis=0)
            acc_max = tl.maximum(acc_max, pooled_max)  # [BLOCK_M]
            acc_sum += tl.sum(tl.where(tok[:, None], written, 0.0), axis=0)

    if POOL:
        tl.store(max_ptr + b * M + offs_m, acc_max, mask=in_m)
        tl.store(sum_ptr + b * M + offs_m, acc_sum, mask=in_m)
    if ACT_STATS:
        tl.store(pos_ptr + b * M + offs_m, acc_pos, mask=in_m)
        tl.store(act_ptr + b * M + offs_m, acc_act, mask=in_m)


def _block_sizes(T: int, M: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_M), shrunk to short inputs (decoding: T = 1). On CPU (Triton's
    interpreter, tests only) blocks stay small enough that short test shapes still cover
    several position chunks and neuron blocks."""
    max_t, max_m = (32, 128) if device.type == "cuda" else (16, 128)
    return min(max_t, triton.next_power_of_2(max(T, 1))), min(max_m, triton.next_power_of_2(M))


@triton_op("steer::fused_mlp", mutates_args=())
def fused_mlp_op(
    up: torch.Tensor,
    gate: Optional[torch.Tensor],
    act: str,
    mask: Optional[torch.Tensor],
    mul: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    steer_tokens: Optional[torch.Tensor],
    pool_tokens: Optional[torch.Tensor],
    override_rows: Optional[torch.Tensor],
    act_site: bool,
    act_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton op. Outputs not asked for (pooling without pool_tokens, activation statistics
    without act_stats) come back empty ([0]): an op's outputs cannot be None. Absent tensors
    reach the kernel as `up` plus a constexpr flag."""
    B, T, M = up.shape
    h = torch.empty((B, T, M), dtype=up.dtype, device=up.device)  # [B, T, M]
    pool_max, pool_sum, act_pos, act_sum = _outputs(up, pool_tokens is not None, act_stats, torch.empty)
    if B * M == 0:
        return h, pool_max, pool_sum, act_pos, act_sum

    g = gate if gate is not None else up
    steer = steer_tokens if steer_tokens is not None else up
    pool = pool_tokens if pool_tokens is not None else up
    has_override = mask is not None
    if has_override:
        mask, mul, add = mask.contiguous(), mul.contiguous(), add.contiguous()  # [M] or [R, M]
    rows = override_rows if override_rows is not None else up
    block_t, block_m = _block_sizes(T, M, up.device)
    wrap_triton(_fused_mlp_kernel)[(B, triton.cdiv(M, block_m))](
        up, g, h,
        mask if has_override else up, mul if has_override else up, add if has_override else up,
        rows if has_override else up,
        steer, pool,
        pool_max, pool_sum,
        act_pos if act_stats else pool_max, act_sum if act_stats else pool_max,
        T, M,
        up.stride(0), up.stride(1), up.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        steer.stride(0), steer.stride(1),
        pool.stride(0), pool.stride(1),
        ACT=_ACT_CODES[act], GATED=gate is not None, OVERRIDE=has_override,
        STEER_ALL=steer_tokens is None, POOL=pool_tokens is not None,
        PER_ROW=has_override and override_rows is not None,
        ACT_SITE=act_site, ACT_STATS=act_stats,
        BLOCK_T=block_t, BLOCK_M=block_m,
    )
    return h, pool_max, pool_sum, act_pos, act_sum


def _outputs(up: torch.Tensor, pooled: bool, act_stats: bool, new) -> list[torch.Tensor]:
    """pool_max, pool_sum, act_pos, act_sum: [B, M] fp32 where asked for, else [0]."""
    B, _, M = up.shape
    return [new((B, M) if wanted else (0,), dtype=torch.float32, device=up.device)
            for wanted in (pooled, pooled, act_stats, act_stats)]


@fused_mlp_op.register_fake
def _fused_mlp_fake(up, gate, act, mask, mul, add, steer_tokens, pool_tokens, override_rows, act_site,
                    act_stats):
    """Shapes and dtypes only (triton_op's default fake runs the launcher, which Triton's
    interpreter cannot do on fake tensors)."""
    return (up.new_empty(up.shape), *_outputs(up, pool_tokens is not None, act_stats, torch.empty))
