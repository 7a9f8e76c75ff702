"""The streaming histogram update on CPU, per part: the reference against the compiled fast path.

    python bench/histogram_update.py [--repeats 30] [--threads 2] [--labels 8]

One tile as `collect_stream` hands it to `StreamState.update` on Gemma-3-270M: 16 sentences x
36,864 neurons (18 layers x 2,048), 64 bins (63 edges from `calibrate_edges`, dense in the upper
tail), fp32 responses, counts for 8 labels. Variants, timed interleaved (harness.compare):
the reference (`histogram_update_ref`: searchsorted + index_add_) and its two parts; the fast
path (`histogram_update_cpu`: compiled compare-sum loop + scatter_add_ split by neuron over
threads), its compiled loop and its scatter alone; alternatives measured while choosing (the
scatter on one thread; the scatter inside the compiled graph, `index_put_(accumulate=True)`:
Inductor's atomic adds); and the whole `StreamState.update` (histogram + sums, label counts,
min / max) on both paths. Times are
ns per response (tile time / 589,824). Both paths' counts are checked equal first.
Results: bench/results/histogram_update.md/.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, compare, environment, finish, write_results  # noqa: E402

from steer.kernels import histogram_cpu  # noqa: E402
from steer.kernels.histogram_ref import histogram_update_ref  # noqa: E402
from steer.core.stream import StreamState, calibrate_edges  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--neurons", type=int, default=36864)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("float32")
    B, M, C, NB = args.rows, args.neurons, args.labels, 64
    g = torch.Generator().manual_seed(0)

    def responses(n):  # GELU-like: a point mass near 0, a long upper tail
        z = torch.randn(n, M, generator=g) * (0.5 + torch.rand(M, generator=g))
        return torch.nn.functional.gelu(z)

    edges = calibrate_edges(responses(1024), bins=NB)  # [M, 63]
    x = responses(B)
    labels = torch.randint(0, C, (B,), generator=g)
    ref, fast = (torch.zeros(C, M, NB, dtype=torch.int32) for _ in range(2))
    histogram_update_ref(ref, x, labels, edges)
    t0 = time.perf_counter()
    histogram_cpu.histogram_update_cpu(fast, x, labels, edges, compile_after=0)  # compiles
    compile_s = time.perf_counter() - t0
    if not torch.equal(ref, fast):
        raise SystemExit("fast path counts differ from the reference")

    xt = x.t().contiguous()
    tile = histogram_cpu._compiled_tile()
    idx, ones = tile(xt, labels, edges, NB)
    flat = fast.view(-1)

    def in_graph(counts, xt, label_ids, edges):
        i, v = histogram_cpu._tile_index(xt, label_ids, edges, counts.shape[2])
        counts.view(-1).index_put_((i.view(-1),), v.view(-1), accumulate=True)

    atomic = torch.compile(in_graph, dynamic=False)
    atomic(fast, xt, labels, edges)

    state = {b: StreamState(edges, [f"l{c}" for c in range(C)]) for b in ("auto", "torch")}
    ref_idx = torch.searchsorted(edges, xt, right=True)
    ref_idx += (labels * (M * NB))[None, :] + torch.arange(0, M * NB, NB)[:, None]
    ref_idx = ref_idx.view(-1)
    ref_ones = torch.ones(1, dtype=torch.int32).expand(ref_idx.numel())

    def threads(n):
        def run():
            old, histogram_cpu.MAX_SCATTER_THREADS = histogram_cpu.MAX_SCATTER_THREADS, n
            try:
                histogram_cpu._scatter(flat, idx, ones)
            finally:
                histogram_cpu.MAX_SCATTER_THREADS = old
        return run

    variants = {
        "reference: searchsorted + index_add_": lambda: histogram_update_ref(ref, x, labels, edges),
        "reference, part: searchsorted": lambda: torch.searchsorted(edges, xt, right=True),
        "reference, part: index_add_": lambda: flat.index_add_(0, ref_idx, ref_ones),
        "fast: compiled compare-sum + threaded scatter_add_": lambda: histogram_cpu.histogram_update_cpu(
            fast, x, labels, edges),
        "fast, part: compiled bin + index loop": lambda: tile(xt, labels, edges, NB),
        "fast, part: scatter_add_ on threads": threads(histogram_cpu.MAX_SCATTER_THREADS),
        "both, part: transpose to [M, B]": lambda: x.t().contiguous(),
        "alternative: scatter_add_ on one thread": threads(1),
        "alternative: scatter in the compiled graph (atomics)": lambda: atomic(fast, xt, labels, edges),
        "StreamState.update, auto (fast)": lambda: state["auto"].update(x, labels),
        "StreamState.update, torch (reference)": lambda: state["torch"].update(x, labels, impl="torch"),
    }
    result = compare(variants, baseline="reference: searchsorted + index_add_",
                     repeats=args.repeats, log=None)
    n = B * M
    base = result.variants["reference: searchsorted + index_add_"].min
    rows = [{"variant": r["variant"], "repeats": r["repeats"],
             "ns_per_response_min": r["min_s"] / n * 1e9,
             "ns_per_response_median": r["median_s"] / n * 1e9,
             "speedup_vs_reference": base / r["min_s"]} for r in result.rows()]
    write_results("histogram_update", finish(env), [Table(
        f"Histogram update, tile {B} x {M:,} responses, {NB} bins, {C} labels", rows,
        note=f"Counts of both paths equal. First call (Inductor compile, or its cache): "
             f"{compile_s:.1f} s.")],
        title="Streaming histogram update on CPU (fp32)")


if __name__ == "__main__":
    main()
