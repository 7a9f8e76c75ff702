"""Expert discovery inside vLLM: prompt tokens/s of vLLM's bare prefill, of vLLM with steer's
statistics (`steer.find_experts` on the engine: exact mode, every neuron pooled inside the
forward), and of steer's transformers collection, on the `make run` corpus (Gemma-3-270M fp32,
8 languages x 500 Bible verses, 127,843 tokens).

    python bench/vllm_discovery.py [--modes eager,compiled] [--rounds 2] [--n 500]

Runs in an environment with vLLM (`make install-vllm`). Each vLLM engine runs in its own process
with both cores (VLLM_CPU_OMP_THREADS_BIND=0-1); inside it the bare prefill and the statistics
alternate (`--rounds`, each keeps its best time), on the same token ids (steer's tokenization),
every prompt a request of max_tokens=1. The bare prefill is `LLM.generate` with all prompts at
once (what a user of vLLM runs); the statistics time is the collection pass of `find_experts`
(the scoring that follows is the same in both engines, timed apart). The transformers row is
steer's exact collection (`find_experts`, backend auto) in another process, `--threads` threads.
Writes bench/results/vllm_discovery.{md,csv}.
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


LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]  # `steer find-experts`' default


def corpus(n: int):
    from steer.core.packaged_corpora import bible_corpus

    return bible_corpus(LANGUAGES, split="discovery", n_per_language=n, seed=0)


def warm_up(model, tok, data) -> None:
    """One short find_experts (64 sentences of every label) before timing."""
    import steer

    rows = range(0, len(data), max(1, len(data) // 64))
    steer.find_experts(model, tok, steer.Corpus([data.texts[i] for i in rows],
                                                [data.label_names[data.label_ids[i]] for i in rows]),
                       k=5, mode="exact", progress=False)


def child(args) -> None:
    """One engine: warm-up, then `rounds` x (bare prefill, statistics), best times, the experts."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import steer
    from steer.engine.batching import tokenize

    t = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.mode == "eager", max_model_len=512, seed=0)
    start = time.perf_counter() - t
    data = corpus(args.n)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids, _ = tokenize(tok, data.texts, data.keys)
    prompts = [TokensPrompt(prompt_token_ids=i) for i in ids]
    tokens = sum(map(len, ids))
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    llm.generate(prompts[:64], params, use_tqdm=False)  # warm-up
    warm_up(llm, tok, data)
    best = {"bare": float("inf"), "statistics": float("inf"), "scoring": float("inf")}
    for _ in range(args.rounds):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best["bare"] = min(best["bare"], time.perf_counter() - t)
        t = time.perf_counter()
        found = steer.find_experts(llm, tok, data, k=100, mode="exact", progress=False)
        total = time.perf_counter() - t
        best["statistics"] = min(best["statistics"], found.settings["seconds"])
        best["scoring"] = min(best["scoring"], total - found.settings["seconds"])
    assert found.settings["tokens"] == tokens
    experts = {c: found.experts.experts[c]["unit"].tolist() for c in found.experts.concepts}
    Path(args.out).write_text(json.dumps({"start": start, "seconds": best, "tokens": tokens, "experts": experts}))


def engine(args, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.bind, "VLLM_CPU_KVCACHE_SPACE": "2"}
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model", args.model, "--n", str(args.n),
               "--rounds", str(args.rounds), "--out", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def transformers(args, out: Path) -> None:
    """steer's exact collection on the same corpus, in this (fresh) process."""
    import torch

    import steer

    torch.set_num_threads(args.threads)
    model, tok = steer.load_model(args.model, dtype="float32", device="cpu")
    data = corpus(args.n)
    warm_up(model, tok, data)
    t = time.perf_counter()
    found = steer.find_experts(model, tok, data, k=100, mode="exact", progress=False)
    total = time.perf_counter() - t
    experts = {c: found.experts.experts[c]["unit"].tolist() for c in found.experts.concepts}
    out.write_text(json.dumps({"seconds": found.settings["seconds"], "scoring": total - found.settings["seconds"],
                               "tokens": found.settings["tokens"], "backend": found.settings["backend"],
                               "experts": experts}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: steer's converted Gemma-3-270M)")
    ap.add_argument("--n", type=int, default=500, help="Bible verses per language (default 500: `make run`'s)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of bare prefill and statistics (best kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers run")
    ap.add_argument("--bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of the engines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--transformers", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.transformers:
        return transformers(args, Path(args.out))

    from harness import RESULTS, Table, environment, finish, write_results
    from steer.engine.models import resolve

    args.model = args.model or resolve("gemma-3-270m")
    env = environment("float32")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tf.json"
        subprocess.run([sys.executable, __file__, "--transformers", "--model", args.model, "--n", str(args.n),
                        "--threads", str(args.threads), "--out", str(out)], check=True)
        tf = json.loads(out.read_text())
    tf_rate = tf["tokens"] / tf["seconds"]
    rows = []
    for mode in args.modes.split(","):
        run = engine(args, mode)
        bare = run["tokens"] / run["seconds"]["bare"]
        stats = run["tokens"] / run["seconds"]["statistics"]
        same = all(run["experts"][c] == tf["experts"][c] for c in tf["experts"])
        rows += [
            {"mode": mode, "run": "vLLM bare prefill", "tok/s": bare, "vs bare": 1.0, "vs transformers": bare / tf_rate,
             "engine start s": run["start"]},
            {"mode": mode, "run": "vLLM + steer's statistics", "tok/s": stats, "vs bare": stats / bare,
             "vs transformers": stats / tf_rate, "scoring s": run["seconds"]["scoring"],
             "experts as transformers'": "yes" if same else "differ"},
        ]
    rows.append({"mode": "-", "run": f"steer transformers collection ({tf['backend']})", "tok/s": tf_rate,
                 "vs transformers": 1.0, "scoring s": tf["scoring"]})
    note = (f"The `make run` corpus: 8 languages x {args.n} Bible verses, {tf['tokens']:,} tokens with BOS, "
            "Gemma-3-270M fp32. tok/s = prompt tokens / seconds of the pass (best of "
            f"{args.rounds} alternating runs in one engine); 'vs bare' = tok/s / the bare prefill's in the same engine. "
            f"vLLM engines use both cores (VLLM_CPU_OMP_THREADS_BIND={args.bind}); the transformers row "
            f"{args.threads} threads, another process. 'scoring s': AP/AUROC of every neuron and the selection "
            "(k = 100), after the pass, the same code in both engines. 'experts as transformers'': the 100 "
            "experts of every label equal, in order.")
    write_results("vllm_discovery", finish(env), [Table("Prompt tokens/s", rows, note=note)],
                  title="Expert discovery inside vLLM (steer's plugin) vs vLLM's bare prefill and steer's transformers path",
                  out_dir=RESULTS)
    print((RESULTS / "vllm_discovery.md").read_text())


if __name__ == "__main__":
    main()
