"""A dose curve's measures, all doses in one per-row batch vs one pass per dose.

    python bench/dose_sweep.py                 # Gemma-3-270M fp32 -> results/dose_sweep.md/.csv
    python bench/dose_sweep.py --quick         # tiny random model: a dry run (results/quick/)

The curves of `steer study --curves` (steer/experiments/study/curves.py) measure every dose of a
method: sampled generation (BOS prompts), perplexity and perturbation size on dev sentences, and
dev embeddings of every language. `Sweep(together=True)` runs each measure once with every row
carrying its dose's intervention (per-row sets); `together=False` runs it once per dose, today's
way. The doses here are `--doses` neuron interventions of growing size (k = 50 x 2^i seeded random
neurons forced to seeded values): what the time depends on is the batch plan, not which neurons.
Timed interleaved (harness.compare); ratio = together / dose by dose. Bible dev verses of 8
languages (the study's), `--n` samples and sentences, `--tokens` new tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from harness import RESULTS, Table, bench_model, compare, environment, finish, write_results  # noqa: E402

LANGS = ["en", "fr", "de", "es", "it", "pt", "ru", "zh"]


def doses(model, n: int, seed: int = 0):
    from steer.core.adapters import NeuronLayout
    from steer.core.intervention import Intervention

    layout = NeuronLayout(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = min(50 * 2 ** i, layout.n_neurons)
        flat = torch.randperm(layout.n_neurons, generator=g)[:k]
        values = torch.randn(k, generator=g)
        out.append(Intervention(layout.n_layers, layout.width).set(flat // layout.width, flat % layout.width, values))
    return out


def texts(quick: bool, n: int) -> dict[str, list[str]]:
    if quick:
        return {l: [f"{l} sentence number {i} " * (1 + i % 3) for i in range(n)] for l in LANGS[:3]}
    from steer.core.packaged_corpora import bible_parallel

    par = bible_parallel(LANGS, split="dev", n=n, seed=0)
    return {l: list(par.texts[l]) for l in LANGS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--doses", type=int, default=4, help="doses in the curve (default 4)")
    p.add_argument("--n", type=int, default=24, help="samples, dev sentences and verses per language (default 24)")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per sample (default 24)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny random model (tests/tiny.py): a dry run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from steer.experiments.study.curves import Sweep

    model, tok, label = bench_model(args.model, args.quick)
    env = environment("float32")
    env.update(model=label, doses=args.doses, n=args.n, new_tokens=args.tokens, batch_size=args.batch_size)
    ivs = doses(model, args.doses)
    dev = texts(args.quick, args.n)
    cfg = SimpleNamespace(gen_tokens=args.tokens, n_generate=args.n, seed=0, batch_size=args.batch_size,
                          skip_bos=True, center=False, languages=list(dev))
    layer = model.config.num_hidden_layers
    sweeps = {how: Sweep(model, tok, cfg, layer, dev, dev[next(iter(dev))], together=how == "one batch")
              for how in ("one batch", "dose by dose")}
    tables = []
    for measure in ("generations", "nll", "perturbations", "embeddings"):
        result = compare({how: (lambda s=s: getattr(s, measure)(ivs)) for how, s in sweeps.items()},
                         baseline="dose by dose", repeats=args.repeats, warmup=0)
        tables.append(Table(f"{measure}: {args.doses} doses", result.rows(measure=measure)))
    md, _ = write_results("dose_sweep", finish(env), tables, title="A dose curve in one per-row batch vs dose by dose",
                          out_dir=RESULTS / "quick" if args.quick else RESULTS)
    print(md.read_text())


if __name__ == "__main__":
    main()
