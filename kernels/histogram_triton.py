"""The streaming histogram update as a Triton kernel, registered as
`torch.ops.steer.histogram_update`.

What it computes and its layout: `histogram.py`; semantics in plain torch: `histogram_ref.py`.
Imported on first use of the Triton path (`steer.kernels.dispatch.triton_module`).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _histogram_kernel(
    counts_ptr,  # [C, M, NB] int32
    x_ptr,  # [B, M] fp32, contiguous
    label_ptr,  # [B] int64
    edges_ptr,  # [M, NB - 1] fp32, contiguous
    B, M, NB,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    offs_b = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # [BLOCK_B]
    in_m = offs_m < M
    in_b = offs_b < B
    tile = in_b[:, None] & in_m[None, :]  # [BLOCK_B, BLOCK_M]

    x = tl.load(x_ptr + offs_b[:, None] * M + offs_m[None, :], mask=tile, other=0.0)
    bins = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.int64)  # number of edges <= x
    for e in range(0, NB - 1):
        edge = tl.load(edges_ptr + offs_m * (NB - 1) + e, mask=in_m, other=0.0)  # [BLOCK_M]
        bins += (x >= edge[None, :]).to(tl.int64)

    label = tl.load(label_ptr + offs_b, mask=in_b, other=0)  # [BLOCK_B] int64
    finite = tl.abs(x) < float("inf")  # False for NaN and +-inf
    idx = (label[:, None] * M + offs_m[None, :]) * NB + bins  # [BLOCK_B, BLOCK_M]
    ones = tl.full([BLOCK_B, BLOCK_M], 1, tl.int32)
    tl.atomic_add(counts_ptr + idx, ones, mask=tile & finite, sem="relaxed")


def _block_sizes(B: int, M: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_M). On CPU (Triton's interpreter, tests only) blocks stay small enough that
    short test shapes still cover several blocks in both directions."""
    if device.type == "cuda":
        return 16, 128
    return min(8, triton.next_power_of_2(max(B, 1))), min(32, triton.next_power_of_2(max(M, 1)))


@triton_op("steer::histogram_update", mutates_args={"counts"})
def histogram_update_op(
    counts: torch.Tensor, x: torch.Tensor, label_ids: torch.Tensor, edges: torch.Tensor
) -> None:
    """The Triton op: counts [C, M, NB] int32 += histogram of x [B, M] (contiguous fp32) by
    label_ids [B] int64 over edges [M, NB - 1] (contiguous fp32)."""
    B, M = x.shape
    NB = counts.shape[2]
    if B * M == 0:
        return
    block_b, block_m = _block_sizes(B, M, x.device)
    wrap_triton(_histogram_kernel)[(triton.cdiv(M, block_m), triton.cdiv(B, block_b))](
        counts, x, label_ids, edges, B, M, NB, BLOCK_B=block_b, BLOCK_M=block_m,
    )


@histogram_update_op.register_fake
def _histogram_update_fake(counts, x, label_ids, edges):
    """Nothing to allocate: the op only mutates counts."""
    return None
