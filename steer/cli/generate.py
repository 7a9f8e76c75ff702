"""`steer generate`: continuations with a concept's experts forced (single prompts) and the
language-steering sweep (`--sweep`, `language_sweep`). The steering overhead per generated token
is a benchmark: bench/generation_overhead.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steer.cli.options import add_machine, csv_list, machine
from steer.core.artifacts import atomic_write_text
from steer.core.intervention import POSITIONS
from steer.core.runtime import environment
from steer.engine.generation import generate
from steer.experiments.language_sweep import language_steering, plot_language_steering


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `steer generate` on an argparse subparsers object."""
    g = subparsers.add_parser(
        "generate", help="generate with experts forced (single prompts, --sweep)",
        description="Generate continuations with a concept's experts forced; --sweep runs the "
                    "language-steering k sweep.")
    g.add_argument("--model", default=None,
                   help="built-in name, local checkpoint or Hub id (default: the model recorded in --experts, "
                        "else gemma-3-270m)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable); none = BOS only")
    g.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    g.add_argument("--experts", default=None, help="expert-set directory (steer find-experts OUT/experts)")
    g.add_argument("--concept", default=None, help="concept whose experts are forced")
    g.add_argument("-k", "--k", type=int, default=None, help="number of experts forced (default: all in the set)")
    g.add_argument("--strength", type=float, default=1.0, help="multiply the forcing values (default 1)")
    g.add_argument("--positions", choices=POSITIONS, default="all", help="where to steer (default all)")
    g.add_argument("--backend", choices=["hooks", "fused"], default="hooks",
                   help="reference pre-hooks or the fused MLP op (steer.patch)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1, sweep 0.9)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--out", default=None, help="JSONL file (sweep: a JSON file, PNG beside it)")
    add_machine(g)
    s = g.add_argument_group("language-steering sweep (--sweep)")
    s.add_argument("--sweep", action="store_true", help="run the k sweep over --languages")
    s.add_argument("--languages", default="fr,de,es", help="target languages (default fr,de,es)")
    s.add_argument("--study-languages", default=None,
                   help="languages langid may answer (default: the expert set's concepts)")
    s.add_argument("--ks", default="0,10,50,200", help="k values (default 0,10,50,200)")
    s.add_argument("--n-samples", type=int, default=100, help="samples per (language, k) (default 100)")
    s.add_argument("--random-seeds", type=int, default=3, help="random-neuron control seeds (default 3)")
    s.add_argument("--random-samples", type=int, default=None, help="samples per control seed (default --n-samples)")
    s.add_argument("--heldout-n", type=int, default=50, help="Bible test verses per language for perplexity (0: none)")
    s.add_argument("--random-ppl", action=argparse.BooleanOptionalAction, default=True,
                   help="also the perplexity under each random-neuron control (default yes)")
    g.set_defaults(func=cmd_generate)
    return g


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    return prompts or [""]




def cmd_generate(args) -> None:
    """Run `steer generate`: the sweep or single prompts."""
    from steer.engine.models import load_model
    from steer.engine.patch import patch

    experts, out = _check_args(args)  # every option is checked before the model loads
    device, dtype = machine(args)
    args.model = args.model or (experts.meta.get("model") if experts else None) or "gemma-3-270m"
    model, tok = load_model(args.model, device=device, dtype=dtype)
    if args.sweep:
        if args.backend == "fused":
            patch(model)
        return _sweep(args, model, tok, experts, out)
    iv = None
    if experts is not None:
        iv = experts.intervention(args.concept, model, k=args.k, positions=args.positions, strength=args.strength)
    if args.backend == "fused":
        patch(model)
    _prompts_run(args, model, tok, iv, out)


def _check_args(args):
    """The expert set (or None) and the output file (or None), every option checked."""
    from steer.core.artifacts import writable_dir
    from steer.core.experts import ExpertSet, check_k

    if args.sweep and not args.experts:
        raise ValueError("--sweep needs --experts DIR")
    if args.concept is not None and not args.experts:
        raise ValueError("--concept needs --experts DIR")
    if args.k is not None:
        check_k(args.k, "-k")
    experts = ExpertSet.load(args.experts) if args.experts else None
    if experts is not None and not args.sweep:
        if args.concept is None:
            raise ValueError(f"--experts needs --concept (one of {experts.concepts})")
        if args.concept not in experts.concepts:
            raise ValueError(f"--concept {args.concept!r} is not in {args.experts} (its concepts: {experts.concepts})")
        if args.k is not None:
            experts.check_k(args.concept, args.k, "-k")
    out = Path(args.out or "runs/language_steering/language_steering.json") if args.sweep or args.out else None
    if out is not None:
        writable_dir(out.parent, "--out's folder")
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory; give a file name")
    return experts, out


def _sweep(args, model, tok, experts, out: Path) -> None:
    """`--sweep`: the language-steering k sweep, its JSON (checkpointed as it goes) and figure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    result = language_steering(
        model, tok, experts, csv_list(args.languages), [int(k) for k in csv_list(args.ks)],
        n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=0.9 if args.top_p is None else args.top_p, seed=args.seed,
        heldout=args.heldout_n or None, study_languages=csv_list(args.study_languages) or None,
        random_seeds=list(range(args.random_seeds)), random_samples=args.random_samples,
        positions=args.positions, strength=args.strength, batch_size=args.batch_size,
        random_ppl=args.random_ppl, checkpoint=partial)
    result["settings"]["command"] = " ".join(sys.argv)
    result["settings"]["machine"] = environment()
    atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False))
    partial.unlink(missing_ok=True)
    png = plot_language_steering(result, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")


def _prompts_run(args, model, tok, iv, out: Path | None) -> None:
    """Single prompts: `--n` continuations each, printed or written as JSONL rows."""
    prompts = _prompts(args)
    expanded = [p for p in prompts for _ in range(args.n)]
    texts = generate(model, tok, expanded, intervention=iv, max_new_tokens=args.max_new_tokens,
                     do_sample=args.sample, temperature=args.temperature,
                     top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, batch_size=args.batch_size)
    meta = {"model": args.model, "concept": args.concept, "k": None if iv is None else len(iv),
            "strength": args.strength, "positions": args.positions, "do_sample": args.sample, "seed": args.seed}
    rows = [{"prompt": p, "sample": i % args.n, "text": t, **meta} for i, (p, t) in enumerate(zip(expanded, texts))]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out}")
    else:
        for r in rows:
            print(f"--- {r['prompt']!r} #{r['sample']}\n{r['text']}")
