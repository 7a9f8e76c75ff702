"""Per-row steering: a batch of 64 rows with K distinct expert sets vs one Intervention vs none.

    python bench/per_row.py --threads 1              # Gemma-3-270M fp32 -> results/per_row.md/.csv
    python bench/per_row.py --quick                  # tiny random model: a dry run (results/quick/)

The model is patched (`steer.patch`, the fused backend: the path that compiles). Each set forces
`--k` random neurons (seeded, all layers) to random values; the 64 sets live in one
`InterventionSets` (as a server would hold them) and row i takes set i % K. Variants,
timed interleaved by harness.compare within each (mode, eager/compiled) table:

    unsteered   no intervention
    single      today's path: one `Intervention` for every row (set 0)
    K=1/8/64    the InterventionSets with K distinct sets among the rows

Modes: "forward" (one forward of 64 rows x `--tokens` random tokens, no cache, the last
position's logits only) and "generate"
(greedy decoding of `--new-tokens` tokens from 64 prompts of 8 random tokens, a DynamicCache,
a plain loop over the model's forward so eager and compiled run the same steps). Compiled:
`torch.compile(model.forward, dynamic=True)` (Inductor), warm-up rounds untimed; the graphs are
compiled once per variant kind (single / sets / none): K only changes the rows, which never
recompiles (tests/test_per_row.py). Ratios: to "single" (the issue's target:
K=64 within 5%) and, in `vs_unsteered`, to "unsteered".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from harness import RESULTS, Table, bench_model, compare, environment, finish, write_results  # noqa: E402

ROWS = 64
KS = (1, 8, 64)


def random_sets(model, n: int, k: int, seed: int = 0):
    """n Interventions of k random neurons each, forced to N(0, 2^2) values."""
    from steer.core.intervention import Intervention

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        iv = Intervention.for_model(model)
        layers, width = iv.shape
        flat = torch.randperm(layers * width, generator=g)[:k]
        out.append(iv.set(flat // width, flat % width, torch.randn(k, generator=g) * 2.0))
    return out


def measure(model, *, tokens: int = 32, new_tokens: int = 16, k: int = 50, repeats: int = 3, warmup: int = 1,
            compiled: bool = True, log=print, eager: bool = True, backend: str = "inductor") -> list[Table]:
    """Tables of the variants (eager and/or compiled x forward, generate) on `model`'s device; on
    CUDA each timed call ends with torch.cuda.synchronize(). `backend`: torch.compile's."""
    from transformers import DynamicCache

    from steer.core.intervention import InterventionSets
    from steer.engine.steering import intervene
    from steer.engine.patch import patch

    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    fwd_ids = torch.randint(3, vocab, (ROWS, tokens), generator=g).to(device)  # the same ids on every device
    gen_ids = torch.randint(3, vocab, (ROWS, 8), generator=g).to(device)
    ivs = random_sets(model, max(KS), k)
    sets = InterventionSets.of(ivs)  # one object of fixed capacity: K picks how many of its sets a batch uses
    rows = {K: sets.rows([i % K for i in range(ROWS)]) for K in KS}

    def steering(variant):
        if variant == "unsteered":
            return torch.no_grad()
        if variant == "single":
            return intervene(model, ivs[0])
        K = int(variant[2:])
        return intervene(model, sets, rows=rows[K])

    def forward_run(fn):
        mask = torch.ones_like(fwd_ids)
        fn(input_ids=fwd_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # not 262k x 64 x 32 logits

    def generate_run(fn):
        mask = torch.ones_like(gen_ids)
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(1) - 1)
        logits = fn(input_ids=gen_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1).logits
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask, pos = torch.cat([mask, torch.ones_like(nxt)], 1), pos[:, -1:] + 1
            logits = fn(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits

    variants = ["unsteered", "single", *(f"K={K}" for K in KS)]
    tables = []
    with patch(model), torch.inference_mode():
        fns = {"eager": model.forward} if eager else {}
        if compiled:
            for key in ("recompile_limit", "cache_size_limit"):  # 9 graphs of one function: over the default 8
                if hasattr(torch._dynamo.config, key):
                    setattr(torch._dynamo.config, key, 64)
            fns["compiled"] = torch.compile(model.forward, dynamic=True, backend=backend)
        for how, fn in fns.items():
            for mode, run in (("forward", forward_run), ("generate", generate_run)):
                def timed(v, run=run, fn=fn):
                    with steering(v):
                        run(fn)
                    if device.type == "cuda":  # the time of the work, not of its launch
                        torch.cuda.synchronize(device)

                result = compare({v: (lambda v=v: timed(v)) for v in variants}, baseline="single",
                                 repeats=repeats, warmup=warmup, log=log)
                base = result.variants["unsteered"].median
                table_rows = [{**row, "vs_unsteered": result.variants[row["variant"]].median / base}
                              for row in result.rows(mode=mode, how=how)]
                shape = (f"{ROWS} rows x {tokens} tokens" if mode == "forward"
                         else f"{ROWS} prompts of 8 tokens, {new_tokens} new tokens")
                tables.append(Table(f"{mode}, {how}: {shape}, {k} neurons per set", table_rows))
    return tables


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="a load_model name (default gemma-3-270m)")
    p.add_argument("--tokens", type=int, default=32, help="forward: tokens per row (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="generate: new tokens (default 16)")
    p.add_argument("-k", "--k", type=int, default=50, help="neurons per set (default 50)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny random model (tests/tiny.py): a dry run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, args.model = bench_model(args.model, args.quick, args.device)
    if args.quick:
        args.tokens, args.new_tokens, args.repeats, args.k = 8, 3, 1, 5
    env = environment("float32")
    env.update(model=args.model, rows=ROWS, ks=list(KS), neurons_per_set=args.k, tokens=args.tokens,
               new_tokens=args.new_tokens, repeats=args.repeats, backend="fused (steer.patch)")
    tables = measure(model, tokens=args.tokens, new_tokens=args.new_tokens, k=args.k, repeats=args.repeats,
                     compiled=not args.no_compile)
    finish(env)
    title = f"Per-row steering: {args.model}, fp32, {args.device}{' (--quick: not a measurement)' * args.quick}"
    md, cs = write_results("per_row", env, tables, title=title, out_dir=RESULTS / "quick" if args.quick else RESULTS,
                           notes="Medians and mins over interleaved repeats (harness.compare); ratio_* to 'single' "
                                 "(one Intervention for all rows), vs_unsteered: median / the unsteered median.")
    print(f"wrote {md} and {cs}")


if __name__ == "__main__":
    main()
