"""Streaming histogram update of pooled neuron responses (Triton).

`counts[label, neuron, bin] += 1` for a tile x [B, M] of pooled responses, with per-neuron fixed
edges: the fixed-size state of `steer.stream` (labels x neurons x bins int32 counts, merged by
addition). Semantics, spelled out in plain torch: `histogram_ref.histogram_update_ref`.

Layout: one program per (block of BLOCK_M neurons, block of BLOCK_B sentences). A program loads
its [BLOCK_B, BLOCK_M] tile once, finds every bin by comparing the tile against the neuron's
NB - 1 edges one edge at a time (bin = number of edges <= x; no sorting and no search, so
duplicate edges and values exactly on an edge need no special case) and adds ones into counts
with relaxed int32 atomics, masked to in-range, finite responses. Offsets are int64, so counts
may exceed 2^31 elements. Integer counts make the result independent of the order in which the
atomics land: the kernel equals the reference exactly.

Exposed as `torch.ops.steer.histogram_update` via `torch.library.triton_op` + `wrap_triton`
(Inductor can trace into it on CUDA); `histogram_update` dispatches CUDA tensors to it and
everything else to the reference.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .histogram_ref import check_update, histogram_update_ref


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


def histogram_update(
    counts: torch.Tensor,  # [C, M, NB] int32, updated in place
    x: torch.Tensor,  # [B, M] pooled responses (cast to fp32)
    label_ids: torch.Tensor,  # [B] integer label ids in [0, C)
    edges: torch.Tensor,  # [M, NB - 1] fp32, non-decreasing per neuron
    *,
    backend: str = "auto",
) -> None:
    """counts[label_ids[b], m, bin] += 1 for every finite x[b, m], bin = #edges[m] <= x[b, m].
    Semantics: `histogram_update_ref`. Label ids are checked (out-of-range ids would write out of
    bounds in the kernel; on CUDA the check costs one synchronisation).

    backend: "auto" (CUDA tensors -> Triton op, others -> reference), "torch" (reference),
    "triton" (Triton op on any device; on CPU only under TRITON_INTERPRET=1, for tests).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    x, label_ids, edges = check_update(counts, x, label_ids, edges)
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        histogram_update_ref(counts, x, label_ids, edges)
    else:
        histogram_update_op(counts, x, label_ids, edges)
