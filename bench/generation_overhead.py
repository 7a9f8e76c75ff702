"""Steering overhead per generated token through the library's generation path (`generate_ids`).

    python bench/generation_overhead.py --experts runs/language_steering/discovery/experts --concept fr \\
        -k 50 --threads 1 --repeats 5                    # -> results/generation_overhead.md/.csv
    python bench/generation_overhead.py --quick          # tiny random model: a dry run (results/quick/)

Greedy decoding of exactly `--new-tokens` tokens (min = max new tokens) from the prompt "The",
at batch sizes 1 and 8, KV cache, eager, through `steer.engine.generation.generate_ids` (left
padding, steering attached per call) on four configurations of one model, timed interleaved by
harness.compare within each batch size:

    hooks, off   the unpatched model, no steering (the baseline)
    hooks, on    the unpatched model, steering by reference pre-hooks
    fused, off   the model patched with `steer.patch` (a copy sharing its weights), no steering
    fused, on    the patched model, steering in the fused op

`s_per_token` / `ms_per_step` are a call's median seconds / the new tokens (prefill included, as a
user pays it); `ms_per_step_min` from the min; ratios are to "hooks, off". `new_tokens` is the
shortest continuation generated (always `--new-tokens`). The steered neurons are the first k
experts of `--concept` in `--experts`, or without it every third of layer 0's first 100 neurons
(34) forced to 2.0 (as
`gpu_bench.py steering`, which times `model.generate` with steering attached for the whole call,
also compiled, on random-weight models; this script times the library's own generation path).
docs/language_steering/overhead.json is an earlier run of this measurement (then
`steer generate --overhead`).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from harness import RESULTS, Table, bench_model, compare, environment, finish, write_results  # noqa: E402

CONFIGS = ("hooks, off", "hooks, on", "fused, off", "fused, on")
BASELINE = "hooks, off"


def share_weights(model):
    """A copy of `model` whose parameters are the same tensors (modules, hooks and buffers are its own)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def measure(model, tok, intervention, *, batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 32,
            repeats: int = 5, warmup: int = 1, prompt: str = "The", log=print) -> list[Table]:
    """One table per batch size: every configuration of CONFIGS timed by harness.compare, with
    seconds per generated token and ratios to "hooks, off". `model` is left unpatched and unsteered."""
    from steer.engine.generation import generate_ids
    from steer.engine.patch import patch

    fused = share_weights(model)
    fp = patch(fused)
    models = {"hooks": model, "fused": fused}
    tables = []
    try:
        for b in batch_sizes:
            prompts = [prompt] * b

            def run(config, prompts=prompts, b=b):
                backend, state = config.split(", ")
                ids = generate_ids(models[backend], tok, prompts, intervention=intervention if state == "on" else None,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=b)
                return {"new_tokens": min(len(r) for r in ids)}

            result = compare({c: (lambda c=c: run(c)) for c in CONFIGS}, baseline=BASELINE, repeats=repeats,
                             warmup=warmup, log=log)
            rows = []
            for row in result.rows(batch=b):
                v = result.variants[row["variant"]]
                rows.append({**row, "s_per_token": v.median / new_tokens, "ms_per_step": 1e3 * v.median / new_tokens,
                             "ms_per_step_min": 1e3 * v.min / new_tokens})
            tables.append(Table(f"Batch {b}: greedy, {new_tokens} new tokens, {len(intervention)} neurons steered "
                                f"(positions {intervention.positions})", rows))
    finally:
        fp.revert()
    return tables


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="a load_model name (default gemma-3-270m)")
    p.add_argument("--experts", default=None, help="expert-set directory (default: 34 neurons of layer 0)")
    p.add_argument("--concept", default=None, help="with --experts: the concept whose experts are forced")
    p.add_argument("-k", "--k", type=int, default=None, help="with --experts: experts forced (default all)")
    p.add_argument("--positions", default="all")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny random model (tests/tiny.py): a dry run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, args.model = bench_model(args.model, args.quick)
    if args.quick:
        args.new_tokens, args.repeats, args.batch_sizes = min(args.new_tokens, 8), min(args.repeats, 2), "1,2"
    from steer.core.intervention import Intervention

    if args.experts:
        from steer.core.experts import ExpertSet

        experts = ExpertSet.load(args.experts)
        if args.concept not in experts.concepts:
            raise SystemExit(f"--concept must be one of {experts.concepts}")
        iv = experts.intervention(args.concept, model, k=args.k, positions=args.positions)
        what = f"the first {len(iv)} experts of {args.concept!r} ({args.experts})"
    else:
        iv = Intervention.for_model(model, positions=args.positions)
        iv.set(0, list(range(0, min(100, iv.shape[1]), 3)), 2.0)
        what = f"{len(iv)} neurons of layer 0 forced to 2.0"
    env = environment("float32")
    env.update(model=args.model, steered=what, new_tokens=args.new_tokens, repeats=args.repeats)
    tables = measure(model, tok, iv, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                     new_tokens=args.new_tokens, repeats=args.repeats)
    finish(env)
    title = f"Steering overhead per generated token: {args.model}, fp32, CPU{' (--quick: not a measurement)' * args.quick}"
    md, cs = write_results("generation_overhead", env, tables, title=title, out_dir=RESULTS / "quick" if args.quick else RESULTS,
                           notes="Medians and mins over interleaved repeats (harness.compare); ratios to "
                                 "'hooks, off', the unpatched model without steering.")
    print(f"wrote {md} and {cs}")


if __name__ == "__main__":
    main()
