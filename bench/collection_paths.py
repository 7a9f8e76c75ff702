"""Collection paths on Gemma-3-270M, side by side: bare forward, exact (hooks), exact (fused), stream.

    python bench/collection_paths.py [--n 24] [--repeats 3] [--threads 1]

bare forward: the base model over steer's batches (the same plan: 16 sentences and
`MAX_TOKENS` padded tokens at most, longest first), no hooks (the floor);
exact, hooks: `collect(backend="hooks")`, the reference pre-hooks; exact, fused: `collect(
backend="fused")`, the patched model's fused op (its PyTorch reference on CPU); stream, fused:
`collect_stream` (calibration on a quarter of the sentences, then histogram updates: the compiled
CPU update, and with "reference binning" the plain torch reference), whose batches
differ (calibration sample first, then the rest): `ratio_same_batches` compares it with the bare
forward over exactly its batches ("bare forward, stream's batches").
Results: bench/results/collection_paths.md/.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, compare, environment, finish, write_results  # noqa: E402

from steer import NeuronSites, bible_corpus, collect_stream, load_model
from steer import collect  # noqa: E402
from steer.engine.batching import MAX_TOKENS  # noqa: E402
from steer.kernels import histogram_cpu  # noqa: E402
from baselines import bare_forward, sorted_plan, stream_plan  # noqa: E402

LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]


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

    def stream(backend, reference_binning=False):
        def run():
            saved = histogram_cpu.MIN_RESPONSES
            if reference_binning:  # every update below the fast path's minimum: the reference
                histogram_cpu.MIN_RESPONSES = 1 << 62
            try:
                return collect_stream(model, tok, corpus, backend=backend, calibration=cal, **kw)
            finally:
                histogram_cpu.MIN_RESPONSES = saved
        return run

    result = compare({
        **bare,
        "exact, hooks": lambda: collect(model, tok, corpus, backend="hooks", **kw),
        "exact, fused": lambda: collect(model, tok, corpus, backend="fused", **kw),
        "stream, hooks": stream("hooks"),
        "stream, fused": stream("fused"),
        "stream, hooks, reference binning": stream("hooks", reference_binning=True),
        "stream, fused, reference binning": stream("fused", reference_binning=True),
    }, baseline="bare forward", repeats=args.repeats)
    same = result.variants["bare forward, stream's batches"].min
    rows = [{**r, "tokens": tokens, "tok_per_s_best": tokens / r["min_s"],
             "ratio_same_batches": r["min_s"] / same if r["variant"].startswith("stream") else ""}
            for r in result.rows()]
    n_neurons = NeuronSites(model).n_neurons
    write_results("collection_paths", finish(env), [Table(
        f"Collection paths, {len(corpus)} Bible verses, {n_neurons:,} neurons", rows)],
        title="Collection paths on Gemma-3-270M (fp32, CPU)")


if __name__ == "__main__":
    main()
