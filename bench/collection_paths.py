"""Collection paths on Gemma-3-270M, side by side: bare forward, exact (hooks), exact (fused), stream.

    python bench/collection_paths.py [--n 24] [--repeats 3] [--threads 1]

bare forward: the base model over steer's batches (the same plan: 16 sentences and
`MAX_TOKENS` padded tokens at most, longest first), no hooks (the floor);
exact, hooks: `collect(backend="hooks")`, the reference pre-hooks; exact, fused: `collect(
backend="fused")`, the patched model's fused op (its PyTorch reference on CPU); stream, fused:
`collect_stream` (calibration on a quarter of the sentences, then histogram updates: the compiled
CPU update), whose batches differ (calibration sample first, then the rest):
`speed_vs_bare_same_batches` is the bare forward's time over exactly its batches ("bare
forward, stream's batches") divided by the variant's (1: as fast as the bare forward). "before":
the same with the path as it was before issue 19 (`previous_path`: masked pooling, both poolings
in the fused op, reference binning), timed in the same run.

Per-part profile: every collection variant also reports where its time went (seconds per run,
median over repeats): `pooling_s` (the per-sentence max / mean of each layer's neurons, and
token statistics where asked for, in the hooks or in the fused op), `binning_s` (histogram updates), `state_s` (the rest of
`StreamState.update`: sums, label counts, min / max), `calibration_s` (`calibrate_edges`),
`batching_s` (tokenizing and padding) and `forward_s`, the rest: the model's forward and the
Python around it. Each part is timed by wrapping the function that does it (exclusive time:
a part called inside another counts once, for itself), which costs microseconds a batch.
Results: bench/results/collection_paths.md/.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, compare, environment, finish, write_results  # noqa: E402

from steer import NeuronLayout, bible_corpus, collect_stream, load_model
from steer import collect  # noqa: E402
from steer.core import stream as stream_module  # noqa: E402
from steer.engine import backends, batching  # noqa: E402
from steer.engine import collect as collect_module  # noqa: E402
from steer.kernels import fused_mlp as fused_mlp_module  # noqa: E402
from steer.kernels import fused_mlp_ref  # noqa: E402
from steer.engine.batching import MAX_TOKENS  # noqa: E402
from steer.kernels import histogram_cpu  # noqa: E402
from baselines import bare_forward, sorted_plan, stream_plan  # noqa: E402

LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]
PARTS = {  # part: the (owner, attribute) functions that do it, as the collection code calls them
    "pooling_s": [(backends, "pool"), (backends, "pool_sum"), (backends, "activation_stats"),
                  (fused_mlp_ref, "pool_max"), (fused_mlp_ref, "pool_sum"),
                  (fused_mlp_ref, "activation_stats"), (fused_mlp_ref, "pool_mean")],
    "binning_s": [(stream_module, "histogram_update")],
    "state_s": [(stream_module.StreamState, "update")],
    "calibration_s": [(stream_module, "calibrate_edges")],
    "batching_s": [(batching, "tokenize"), (collect_module, "tokenize"), (collect_module, "pad_batch"),
                   (collect_module, "pad")],
}


class Profile:
    """Exclusive seconds per part while `active()`: the functions of PARTS wrapped with timers."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [part, start, seconds of nested parts]

    def _wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if self.stack and self.stack[-1][0] == part:  # pool -> pool_max: counted once
                return fn(*args, **kwargs)
            frame = [part, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                total = time.perf_counter() - frame[1]
                self.seconds[part] += total - frame[2]
                if self.stack:
                    self.stack[-1][2] += total
        return timed

    @contextlib.contextmanager
    def active(self):
        saved = [(owner, name, getattr(owner, name)) for fns in PARTS.values() for owner, name in fns]
        try:
            for part, fns in PARTS.items():
                for owner, name in fns:
                    setattr(owner, name, self._wrap(part, getattr(owner, name)))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


def profiled(run):
    """A variant returning its per-part seconds (forward_s: the rest of its wall time)."""
    def variant():
        prof = Profile()
        t0 = time.perf_counter()
        with prof.active():
            run()
        wall = time.perf_counter() - t0
        parts = {part: prof.seconds.get(part, 0.0) for part in PARTS}
        return {"seconds": wall, "forward_s": wall - sum(parts.values()), **parts}
    return variant


@contextlib.contextmanager
def previous_path():
    """The collection path before issue 19's changes, for before / after in one run: pooling by
    the masked [B, T, M] form only, the fused op computing both poolings, reference binning."""
    saved = (histogram_cpu.MIN_RESPONSES, fused_mlp_ref.token_core, fused_mlp_module.fused_mlp_ref)
    ref = fused_mlp_module.fused_mlp_ref
    histogram_cpu.MIN_RESPONSES = 1 << 62  # every update below the fast path's minimum
    fused_mlp_ref.token_core = lambda tokens: None
    fused_mlp_module.fused_mlp_ref = lambda *a, **k: ref(*a, **{**k, "reductions": fused_mlp_ref.REDUCTIONS})
    try:
        yield
    finally:
        histogram_cpu.MIN_RESPONSES, fused_mlp_ref.token_core, fused_mlp_module.fused_mlp_ref = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="verses per language")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--histogram-compile-after", type=int, default=0,
                   help="responses through the reference binning before the compiled CPU update compiles "
                        "(steer's default ~1.3e8; 0: at once, so the short timed runs measure it)")
    args = p.parse_args(argv)
    histogram_cpu.COMPILE_AFTER = args.histogram_compile_after
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("float32")
    model, tok = load_model("gemma-3-270m", dtype="float32", device="cpu")
    corpus = bible_corpus(LANGUAGES, split="discovery", n_per_language=args.n)
    plan = sorted_plan(tok, corpus, 16, MAX_TOKENS)
    tokens = sum(len(ids) for batch in plan for ids in batch)
    kw = dict(batch_size=16, max_tokens=MAX_TOKENS, progress=False)

    cal = len(corpus) // 4
    bare = {"bare forward": bare_forward(model, tok, plan),
            "bare forward, stream's batches": bare_forward(model, tok, stream_plan(tok, corpus, cal, 16, MAX_TOKENS))}

    def stream(backend, before=False):
        def run():
            with previous_path() if before else contextlib.nullcontext():
                return collect_stream(model, tok, corpus, backend=backend, calibration=cal, **kw)
        return profiled(run)

    result = compare({
        **bare,
        "exact, hooks": profiled(lambda: collect(model, tok, corpus, backend="hooks", **kw)),
        "exact, fused": profiled(lambda: collect(model, tok, corpus, backend="fused", **kw)),
        "stream, hooks": stream("hooks"),
        "stream, fused": stream("fused"),
        "stream, hooks, before": stream("hooks", before=True),
        "stream, fused, before": stream("fused", before=True),
    }, baseline="bare forward", repeats=args.repeats)
    same = result.variants["bare forward, stream's batches"].min
    rows = [{**r, "tokens": tokens, "tok_per_s_best": tokens / r["min_s"],
             "speed_vs_bare_same_batches": same / r["min_s"] if r["variant"].startswith("stream") else ""}
            for r in result.rows()]
    n_neurons = NeuronLayout(model).n_neurons
    write_results("collection_paths", finish(env), [Table(
        f"Collection paths, {len(corpus)} Bible verses, {n_neurons:,} neurons", rows)],
        title="Collection paths on Gemma-3-270M (fp32, CPU)")


if __name__ == "__main__":
    main()
