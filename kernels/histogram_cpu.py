"""The streaming histogram update on CPU: one compiled loop instead of a binary search per response.

Same semantics as `histogram_ref.histogram_update_ref` (bin = number of the neuron's edges <= x,
NaN and +-inf not binned), equal counts exactly. The reference spends most of its time in
`torch.searchsorted`: a data-dependent binary search per response, ~6 unpredictable branches.
Here the tile is transposed to [M, B] (a neuron's B responses side by side) and the bin is
counted branch-free, as in the Triton kernel: bins = sum_j (x >= edge_j) over the NB - 1 edges,
unrolled, accumulated in int32. A compare-sum needs no sorting, so duplicate edges and values
exactly on an edge need no special case, and NaN compares false everywhere. `torch.compile`
(Inductor's C++ backend, which keeps IEEE NaN and subnormal semantics) fuses that, the flat index
into counts and the finite mask into one vectorised loop that loads each neuron's edges once per
tile (SIMD over the B responses). A 1-D `scatter_add_` (lighter than `index_add_`) then adds the
finite mask (0 for NaN / inf: those land nowhere) into counts, one slice of neurons per thread
(`torch.get_num_threads()`, at most 4; torch ops release the GIL; each slice serial, so repeated
indices add up): neurons own disjoint counts, so no two threads add into the same element. The
scatter is the larger part: on a tile of 16 rows over 8 labels nearly every response touches a
new cache line of counts (memory-bound; 2 threads take ~30% off it, not half).

The loop is compiled once per (neurons, edges) shape: rows go in tiles of `TILE_ROWS`, the last
one padded with NaN rows (not counted). Compiling costs seconds (~6 s on a 2-core EPYC with a
warm Inductor cache), ~2.4e8 responses' worth of the ~25 ns it saves each: so, as in ski rental,
the process runs the reference until it has spent about as long in it (`COMPILE_AFTER`
responses, ~6 s), then compiles; short runs never pay for a compile, long ones at most ~2x the
compile-once optimum on the histogram. Updates under `MIN_RESPONSES` responses always take the
reference. Where Inductor cannot compile (no C++ compiler), the first failure warns once and the
reference is used from then on. Measured: bench/histogram_update.py.
"""
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from .histogram_ref import histogram_update_ref

TILE_ROWS = 16  # rows per compiled tile (steer's batch size); a shorter last tile is padded
MIN_RESPONSES = 1 << 16  # smaller updates take the reference
COMPILE_AFTER = 1 << 27  # responses through the reference (~6 s at ~42 ns) before compiling

MAX_SCATTER_THREADS = 4
_compiled = None  # the compiled tile function, False once compiling failed
_seen = 0  # responses of updates of at least MIN_RESPONSES, this process
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool) of the scatter


def _tile_index(xt: torch.Tensor, label_ids: torch.Tensor, edges: torch.Tensor, nb: int):
    """Flat indices into counts.view(-1) [M, T] int64 and the finite mask [M, T] int32 of a tile
    xt [M, T] fp32 (contiguous) with label_ids [T] int64 over edges [M, nb - 1]."""
    m = edges.shape[0]
    bins = (xt >= edges[:, 0:1]).to(torch.int32)  # [M, T] number of edges <= x
    for j in range(1, edges.shape[1]):
        bins = bins + (xt >= edges[:, j:j + 1]).to(torch.int32)
    idx = bins.to(torch.int64) + label_ids[None, :] * (m * nb) + torch.arange(m)[:, None] * nb
    return idx, torch.isfinite(xt).to(torch.int32)


def _compiled_tile():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_tile_index, dynamic=False)
    return _compiled


def histogram_update_cpu(
    counts: torch.Tensor,  # [C, M, NB] int32, updated in place
    x: torch.Tensor,  # [B, M] fp32 pooled responses, contiguous
    label_ids: torch.Tensor,  # [B] int64 in [0, C)
    edges: torch.Tensor,  # [M, NB - 1] fp32, non-decreasing per neuron, contiguous
    *,
    min_responses: int | None = None,  # default MIN_RESPONSES, read at the call
    compile_after: int | None = None,  # default COMPILE_AFTER (0: compile at once)
) -> None:
    """counts[label_ids[b], m, bin] += 1 for every finite x[b, m] (inputs as `check_update`
    returns them), by the compiled loop of the module docstring. Updates under `min_responses`
    responses, those before `compile_after` responses have gone through the reference in this
    process, and every update once compiling failed take `histogram_update_ref`."""
    global _compiled, _seen
    min_responses = MIN_RESPONSES if min_responses is None else min_responses
    compile_after = COMPILE_AFTER if compile_after is None else compile_after
    B, M = x.shape
    if B * M < min_responses or _compiled is False or (_compiled is None and _seen < compile_after):
        _seen += B * M if B * M >= min_responses else 0
        return histogram_update_ref(counts, x, label_ids, edges)
    nb = counts.shape[2]
    flat = counts.view(-1)
    for start in range(0, B, TILE_ROWS):
        rows = x[start:start + TILE_ROWS]
        labels = label_ids[start:start + TILE_ROWS]
        if rows.shape[0] == TILE_ROWS:
            xt = rows.t().contiguous()  # [M, T]
        else:  # the last, short tile: padded with NaN rows (not counted), label 0
            xt = torch.full((M, TILE_ROWS), float("nan"), dtype=torch.float32)
            xt[:, :rows.shape[0]] = rows.t()
            labels = torch.cat([labels, labels.new_zeros(TILE_ROWS - rows.shape[0])])
        try:
            idx, ones = _compiled_tile()(xt, labels, edges, nb)
        except Exception as e:  # Inductor unavailable here: the reference from now on
            _compiled = False
            warnings.warn(f"steer: the compiled CPU histogram update is unavailable ({e!r:.200}); "
                          "using the plain torch reference", RuntimeWarning, stacklevel=2)
            return histogram_update_ref(counts, x[start:], label_ids[start:], edges)
        _scatter(flat, idx, ones)


def _scatter(flat: torch.Tensor, idx: torch.Tensor, ones: torch.Tensor) -> None:
    """flat[idx] += ones, idx and ones [M, T]: a serial 1-D scatter_add_ (repeats add up) per
    slice of neurons, the slices on parallel threads."""
    global _pool
    n = min(torch.get_num_threads(), MAX_SCATTER_THREADS)
    if n <= 1:
        flat.scatter_add_(0, idx.view(-1), ones.view(-1))
        return
    if _pool is None or _pool[0] != n:
        _pool = (n, ThreadPoolExecutor(n, thread_name_prefix="steer-histogram"))
    step = -(-idx.shape[0] // n)
    jobs = [_pool[1].submit(flat.scatter_add_, 0, idx[s:s + step].view(-1),
                            ones[s:s + step].view(-1)) for s in range(0, idx.shape[0], step)]
    for job in jobs:
        job.result()
