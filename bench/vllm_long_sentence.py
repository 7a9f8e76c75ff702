"""One 20,000-token sentence among short ones, collected inside vLLM: chunked by the engine,
pooled as one forward pools it, in bounded memory.

    python bench/vllm_long_sentence.py [--long 20000] [--short 200] [--chunk 2048]

The model and corpus of bench/long_sentence.py (Gemma-3-270M's config cut to one full-attention
layer, random weights, the character tokenizer: characters = tokens). vLLM (`steer.find_experts`
on an engine, exact mode, max pooling) prefills the long sentence in steps of `--chunk` tokens
(max_num_batched_tokens); steer's transformers path runs it in one forward (it runs alone: the
token budget). Reports the largest difference of the pooled responses (the long sentence's and
the others'), and the peak resident memory (VmHWM) of the engine's processes with and without
the long sentence. Runs in an environment with vLLM; writes bench/results/vllm_long_sentence.{md,csv}.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def descendants_peak_gib(pid: int) -> float:
    """The largest VmHWM among the processes below `pid` (vLLM's engine core and worker)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    from long_sentence import rss_gib

    todo, peak = list(children.get(pid, [])), 0.0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        peak = max(peak, rss_gib(p, "VmHWM"))
    return peak


def child(args) -> None:
    from vllm import LLM

    import steer
    from long_sentence import corpus

    data = corpus(args.short, args.long if args.with_long else 0)
    if not args.with_long:  # the short sentences only
        data = steer.Corpus([t for t in data.texts if t], [data.label_names[i] for i, t in zip(data.label_ids, data.texts) if t])
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.long + 8, seed=0,
              max_num_batched_tokens=args.chunk, enable_chunked_prefill=True)
    t = time.perf_counter()
    found = steer.find_experts(llm, None, data, k=5, mode="exact", progress=False)
    seconds = time.perf_counter() - t
    found.responses.save(Path(args.out) / "responses.safetensors")
    Path(args.out, "run.json").write_text(json.dumps({"seconds": seconds, "tokens": found.settings["tokens"],
                                                      "peak_gib": descendants_peak_gib(os.getpid())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", type=int, default=20000)
    ap.add_argument("--short", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=2048, help="vLLM's max_num_batched_tokens")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--with-long", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    import steer
    from harness import RESULTS, Table, environment, finish, write_results
    from long_sentence import corpus, model
    from steer.core.scores import Responses
    from tiny import tiny_tokenizer

    env = environment("float32")
    torch.set_num_threads(args.threads)
    m, tok = model(1), tiny_tokenizer()
    data = corpus(args.short, args.long)
    long_row = max(range(len(data)), key=lambda i: len(data.texts[i]))
    t = time.perf_counter()
    want = steer.find_experts(m, tok, data, k=5, mode="exact", progress=False).responses
    tf_seconds = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(Path(d) / "model")
        tok.save_pretrained(Path(d) / "model")
        runs = {}
        for with_long in (False, True):
            out = Path(d) / ("long" if with_long else "short")
            out.mkdir()
            cmd = [sys.executable, __file__, "--child", "--model", str(Path(d) / "model"), "--out", str(out),
                   "--long", str(args.long), "--short", str(args.short), "--chunk", str(args.chunk)]
            env_vars = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
            subprocess.run(cmd + (["--with-long"] if with_long else []), env=env_vars, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[with_long] = json.loads((out / "run.json").read_text())
        got = Responses.load(Path(d) / "long" / "responses.safetensors")
    diff = (got.values - want.values).abs()
    steps = -(-(args.long + 1) // args.chunk)
    rows.append({"check": "the long sentence's pooled response, largest |vLLM - transformers|",
                 "value": f"{float(diff[long_row].max()):.3g}",
                 "detail": f"{args.long + 1:,} tokens: {steps} prefill steps of at most {args.chunk} tokens in vLLM, "
                           "one forward in transformers"})
    rows.append({"check": "the short sentences' pooled responses, largest |vLLM - transformers|",
                 "value": f"{float(diff[[i for i in range(len(data)) if i != long_row]].max()):.3g}",
                 "detail": f"{args.short} sentences; responses up to {float(want.values.abs().max()):.3g}"})
    for with_long, run in runs.items():
        rows.append({"check": f"vLLM engine, peak resident memory of its processes, {'with' if with_long else 'without'} "
                              "the long sentence", "value": f"{run['peak_gib']:.2f} GiB",
                     "detail": f"{run['tokens']:,} tokens in {run['seconds']:.1f} s (find_experts, exact)"})
    rows.append({"check": "transformers (steer's collection; the long sentence alone in its batch)",
                 "value": f"{tf_seconds:.1f} s", "detail": f"{args.threads} threads"})
    note = ("Gemma-3-270M's config cut to one full-attention layer, random weights, vocabulary 300 (characters), "
            "fp32, max pooling, special tokens skipped. vLLM: eager, both cores, KV cache 2 GiB "
            "(VLLM_CPU_KVCACHE_SPACE), max_model_len = the long sentence + 8.")
    write_results("vllm_long_sentence", finish(env), [Table("A 20,000-token sentence in vLLM", rows, note=note)],
                  title="A 20,000-token sentence collected inside vLLM: chunked, pooled as one forward, bounded memory",
                  out_dir=RESULTS)
    print((RESULTS / "vllm_long_sentence.md").read_text())


if __name__ == "__main__":
    main()
