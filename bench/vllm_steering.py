"""Steering inside vLLM: output tokens/s of stock vLLM, the plugin idle, every request steered by
one set, K = 8 and 64 distinct sets in one batch, every request steered at the activation site
(LAPE) or at the residual site (DiffMean), and a batch mixing the three sites with unsteered
requests; and the same batch through steer's transformers `generate`. Gemma-3-270M, fp32,
greedy, fixed output length (ignore_eos).

    python bench/vllm_steering.py [--requests 128] [--tokens 32] [--modes eager,compiled]

Runs in an environment with vLLM (`make install-vllm`). Each engine runs in its own process
(the plugin patches vLLM for the whole process; VLLM_PLUGINS="" gives stock vLLM), using both
cores (VLLM_CPU_OMP_THREADS_BIND=0-1). Inside an engine the scenarios run round-robin
(`--rounds`, 3) and each keeps its best time; ratios are to stock vLLM in the same mode. The steering is found
once from UDHR (8 languages x 50 paragraphs; kept in steer's cache): the expert set (the K sets
are its 8 labels x 8 strengths), LAPE's fr neurons (top_rate .05, activated) and DiffMean's fr
direction (the middle layer, 2x the mean difference), the last two as `Intervention` files.
Writes bench/results/vllm_steering.{md,csv}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LANGS = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]
STRENGTHS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0]


def udhr():
    """The UDHR paragraphs of LANGS as a labelled corpus (language by language)."""
    import steer

    texts = steer.udhr_parallel(LANGS).texts
    return steer.Corpus([t for lang in LANGS for t in texts[lang]], [lang for lang in LANGS for _ in texts[lang]])


def prompts(n: int) -> list[str]:
    texts = udhr().texts
    return [" ".join(t.split()[:12]) for t in (texts * (n // len(texts) + 1))[:n]]


def scenarios(steering: str, n: int) -> dict[str, list[dict | None]]:
    """Each scenario's requests; `steering`: the folder `prepare` wrote."""
    experts = os.path.join(steering, "experts")

    def cfg(i: int, distinct: int) -> dict:
        j = i % distinct
        return {"steer_experts": experts, "steer_label": LANGS[j % 8], "steer_strength": STRENGTHS[j // 8 % 8]}

    lape, diffmean = ({"steer_intervention": os.path.join(steering, f"{m}.safetensors")} for m in ("lape", "diffmean"))
    mixed = [cfg(0, 1), lape, diffmean, None]
    return {"idle": [None] * n, "one set": [cfg(0, 1)] * n,
            "K=8": [cfg(i, 8) for i in range(n)], "K=64": [cfg(i, 64) for i in range(n)],
            "LAPE (activation site)": [lape] * n, "DiffMean (residual site)": [diffmean] * n,
            "mixed sites (neuron, activation, residual, none)": [mixed[i % 4] for i in range(n)]}


def child(args) -> None:
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.mode == "eager", max_model_len=512, seed=0)
    start = time.perf_counter() - t
    texts = prompts(args.requests)
    runs = scenarios(args.steering, args.requests)
    if not args.plugin:
        runs = {"idle": runs["idle"]}

    def go(extras):
        ps = [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, extra_args=e) for e in extras]
        t = time.perf_counter()
        outs = llm.generate(texts[:len(ps)], ps, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs), outs

    go(runs["idle"][:8])  # warm-up
    best, tokens, first = {}, {}, {}
    for _ in range(args.rounds):
        for name, extras in runs.items():
            s, n, outs = go(extras)
            best[name] = min(best.get(name, float("inf")), s)
            tokens[name] = n
            first[name] = [list(o.outputs[0].token_ids[:4]) for o in outs[:4]]
    Path(args.out).write_text(json.dumps({"start": start, "seconds": best, "tokens": tokens, "first": first}))


def engine(args, mode: str, plugin: bool, steering: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.bind, "VLLM_CPU_KVCACHE_SPACE": "2"}
        if not plugin:
            env["VLLM_PLUGINS"] = ""
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model", args.model, "--steering", steering,
               "--requests", str(args.requests), "--tokens", str(args.tokens), "--rounds", str(args.rounds),
               "--out", str(out)]
        cmd += ["--plugin"] if plugin else []
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def transformers_generate(args, steering: str) -> float:
    """steer's `generate` on the same prompts, every request steered by the one set (seconds)."""
    import torch

    import steer

    torch.set_num_threads(args.threads)
    model, tok = steer.load_model(args.model, dtype="float32", device="cpu")
    iv = steer.ExpertSet.load(os.path.join(steering, "experts")).intervention("en", model)
    texts = prompts(args.requests)
    steer.generate(model, tok, texts[:8], intervention=iv, max_new_tokens=4)  # warm-up
    t = time.perf_counter()
    steer.generate(model, tok, texts, intervention=iv, max_new_tokens=args.tokens, batch_size=args.requests)
    return time.perf_counter() - t


def prepare(model_path: str, out: Path, threads: int) -> str:
    """`out`/experts (k = 100), `out`/lape.safetensors and `out`/diffmean.safetensors, found in
    one pass over UDHR (see the module docstring)."""
    import torch

    import steer
    from vllm_methods import study_intervention

    torch.set_num_threads(threads)
    model, tok = steer.load_model(model_path, dtype="float32", device="cpu")
    found = steer.find_experts(model, tok, udhr(), k=100, progress=False, token_stats=("activation", "residual"))
    out.mkdir(parents=True, exist_ok=True)
    for method, setting in (("lape", {"top_rate": 0.05}),
                            ("diffmean", {"layer": model.config.num_hidden_layers // 2, "scale": 2.0})):
        study_intervention(found.token_stats, method, "fr", setting)[0].save(out / f"{method}.safetensors", model)
    found.experts.save(out / "experts")  # last: its presence marks the folder complete
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: steer's converted Gemma-3-270M)")
    ap.add_argument("--steering", default=None, help="a folder `prepare` wrote (default: found once, cached)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin runs of the scenarios in each engine (best kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers run")
    ap.add_argument("--bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of the engines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plugin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from harness import RESULTS, Table, environment, finish, write_results
    from steer.engine.models import cache_dir, resolve

    args.model = args.model or resolve("gemma-3-270m")
    env = environment("float32")
    cached = cache_dir() / "bench" / "vllm-steering"  # found once per machine
    steering = args.steering or (str(cached) if (cached / "experts" / "experts.json").exists() else
                                 prepare(args.model, cached, args.threads))
    rows = []
    for mode in args.modes.split(","):
        stock = engine(args, mode, False, steering)
        plug = engine(args, mode, True, steering)
        base = stock["tokens"]["idle"] / stock["seconds"]["idle"]
        rows.append({"mode": mode, "run": "stock vLLM", "tok/s": base, "vs stock": 1.0,
                     "engine start s": stock["start"]})
        idle = plug["tokens"]["idle"] / plug["seconds"]["idle"]
        for name, s in plug["seconds"].items():
            rate = plug["tokens"][name] / s
            rows.append({"mode": mode, "run": f"plugin, {name}", "tok/s": rate, "vs stock": rate / base,
                         "vs idle": rate / idle, "engine start s": plug["start"] if name == "idle" else ""})
        assert plug["first"]["idle"] == stock["first"]["idle"], "the idle plugin changed greedy tokens"
    seconds = transformers_generate(args, steering)
    tf_rate = args.requests * args.tokens / seconds
    stock_rates = {r["mode"]: r["tok/s"] for r in rows if r["run"] == "stock vLLM"}
    for mode, rate in stock_rates.items():
        rows.append({"mode": mode, "run": "steer generate (transformers), one set", "tok/s": tf_rate,
                     "vs stock": tf_rate / rate})
    note = (f"{args.requests} requests x {args.tokens} greedy tokens (ignore_eos), Gemma-3-270M fp32. "
            f"tok/s = output tokens / seconds of the whole batch, best of {args.rounds} round-robin runs in one "
            "engine; 'vs stock' = tok/s / stock vLLM's in the same mode (another process); 'vs idle' = tok/s / "
            "the idle plugin's in the same engine. Engines use both cores (VLLM_CPU_OMP_THREADS_BIND="
            f"{args.bind}). The transformers row: steer's `generate`, one batch, {args.threads} threads, every "
            "request steered by one set.")
    write_results("vllm_steering", finish(env), [Table("Output tokens/s", rows, note=note)],
                  title="Steering inside vLLM (steer's plugin) vs stock vLLM", out_dir=RESULTS)
    print((RESULTS / "vllm_steering.md").read_text())


if __name__ == "__main__":
    main()
