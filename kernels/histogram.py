"""Streaming histogram update of pooled neuron responses (Triton).

`counts[label, neuron, bin] += 1` for a tile x [B, M] of pooled responses, with per-neuron fixed
edges: the fixed-size state of `steer.core.stream` (labels x neurons x bins int32 counts, merged by
addition). Semantics, spelled out in plain torch: `histogram_ref.histogram_update_ref`.

Layout: one program per (block of BLOCK_M neurons, block of BLOCK_B sentences). A program loads
its [BLOCK_B, BLOCK_M] tile once, finds every bin by comparing the tile against the neuron's
NB - 1 edges one edge at a time (bin = number of edges <= x; no sorting and no search, so
duplicate edges and values exactly on an edge need no special case) and adds ones into counts
with relaxed int32 atomics, masked to in-range, finite responses. Offsets are int64, so counts
may exceed 2^31 elements. Integer counts make the result independent of the order in which the
atomics land: the kernel equals the reference exactly.

The kernel (`histogram_triton.py`) is exposed as `torch.ops.steer.histogram_update` via
`torch.library.triton_op` + `wrap_triton` (Inductor can trace into it on CUDA);
`histogram_update` here dispatches by `steer.kernels.dispatch.use_triton`; CPU tensors under impl
"auto" take the compiled CPU loop of `histogram_cpu.py` (same counts as the reference).
"""
import torch

from .dispatch import triton_module, use_triton
from .histogram_cpu import histogram_update_cpu
from .histogram_ref import check_update, histogram_update_ref


def histogram_update(
    counts: torch.Tensor,  # [C, M, NB] int32, updated in place
    x: torch.Tensor,  # [B, M] pooled responses (cast to fp32)
    label_ids: torch.Tensor,  # [B] integer label ids in [0, C)
    edges: torch.Tensor,  # [M, NB - 1] fp32, non-decreasing per neuron
    *,
    impl: str = "auto",
) -> None:
    """counts[label_ids[b], m, bin] += 1 for every finite x[b, m], bin = #edges[m] <= x[b, m].
    Semantics: `histogram_update_ref`. Label ids are checked (out-of-range ids would write out of
    bounds in the kernel; on CUDA the check costs one synchronisation).

    impl: "auto" (CUDA tensors -> Triton op, CPU tensors -> `histogram_update_cpu`, others
    -> reference), "torch" (reference),
    "triton" (Triton op on any device; on CPU only under TRITON_INTERPRET=1, for tests).
    """
    triton = use_triton(impl, x)
    x, label_ids, edges = check_update(counts, x, label_ids, edges)
    if triton:
        triton_module("histogram_triton").histogram_update_op(counts, x, label_ids, edges)
    elif impl == "auto" and x.device.type == "cpu":
        histogram_update_cpu(counts, x, label_ids, edges)
    else:
        histogram_update_ref(counts, x, label_ids, edges)
