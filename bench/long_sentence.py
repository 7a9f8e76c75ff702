"""One 20,000-token sentence among short ones (issue 17): batches bounded by tokens, or not.

    python bench/long_sentence.py [--long 20000] [--short 200] [--layers 1] [--cap-gib 8] [--limit-s 60] [--repeats 2]

A random model built from bench/configs/gemma-3-270m.json with fewer layers (`--layers`, one
full-attention block by default; the character tokenizer of tests/tiny.py, so the vocabulary
is cut to 300) collects (`steer.collect`, exact mode, hooks) a corpus of `--short` short
sentences plus one of `--long` characters (= tokens, + BOS). Three plans:
- budget off, 16 sentences a batch (before issue 17): the long sentence pads its batch of 16,
  which runs first (longest first);
- budget off, 1 sentence a batch (the issue's work-around, `--batch-size 1`);
- budget on (max_tokens=MAX_TOKENS, 16 sentences a batch): the long sentence runs alone.
Each runs in its own process, watched: stopped when its resident memory passes `--cap-gib` or
its time `--limit-s` (tokens done at that point are reported: the first batch holds the long
sentence). Peak memory is the process's VmHWM. Results: bench/results/long_sentence.md/.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from harness import Table, environment, finish, write_results  # noqa: E402
from steer.engine.batching import MAX_TOKENS, batches  # noqa: E402

PLANS = {  # name: (batch_size, max_tokens)
    "budget off, 16 a batch (before)": (16, None),
    "budget off, 1 a batch (work-around)": (1, None),
    f"budget on, 16 a batch, max_tokens={MAX_TOKENS}": (16, MAX_TOKENS),
}


def corpus(n_short: int, long: int):
    from steer import Corpus

    rng = random.Random(0)
    words = "in the beginning god created heaven and earth light was good day night".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(n_short)]
    texts.insert(n_short // 2, "".join(rng.choice("abcdefgh ") for _ in range(long)))
    return Corpus(texts, [["a", "b"][i % 2] for i in range(len(texts))])


def model(layers: int):
    import transformers as T

    cfg = json.loads((HERE / "configs" / "gemma-3-270m.json").read_text())
    kinds = cfg["layer_types"]
    cfg.update(num_hidden_layers=layers, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               unk_token_id=3, layer_types=(["full_attention"] if layers == 1 else kinds[-layers:]))
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(T.Gemma3TextConfig(**cfg), attn_implementation="sdpa").eval()


def child(args) -> None:
    """Run one plan; print a JSON line per batch (tokens done) and one at the end."""
    from steer.core.adapters import NeuronLayout
    from steer.engine.collect import pooled_batches
    from tiny import tiny_tokenizer

    torch.set_num_threads(args.threads)
    batch_size, max_tokens = PLANS[args.child]
    m, tok, c = model(args.layers), tiny_tokenizer(), corpus(args.short, args.long)
    print(json.dumps({"ready": True}), flush=True)
    layout, done = NeuronLayout(m), 0
    start = time.perf_counter()
    for rows, _ in pooled_batches(m, tok, c.texts, c.keys, layout, batch_size=batch_size, max_tokens=max_tokens,
                                  progress=False):
        done += len(rows)
        print(json.dumps({"sentences": done, "seconds": time.perf_counter() - start}), flush=True)
    print(json.dumps({"finished": True, "seconds": time.perf_counter() - start,
                      "peak_gib": rss_gib(os.getpid(), "VmHWM")}), flush=True)


def rss_gib(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def watch(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--long", str(args.long), "--short", str(args.short),
           "--layers", str(args.layers), "--threads", str(args.threads)]
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: list[dict] = []

    def read() -> None:
        for x in proc.stdout:
            if x.strip():
                lines.append(json.loads(x))

    reader = threading.Thread(target=read)
    reader.start()
    peak, why, t0, stopped = 0.0, "finished", None, 0.0
    while proc.poll() is None:
        if t0 is None and lines:
            t0 = time.perf_counter()  # model built: the collection starts
        peak = max(peak, rss_gib(proc.pid, "VmRSS"))
        if peak > args.cap_gib:
            why = f"stopped: memory over {args.cap_gib:g} GiB"
        elif t0 is not None and time.perf_counter() - t0 > args.limit_s:
            why = f"stopped: over {args.limit_s:g} s"
        else:
            time.sleep(0.05)
            continue
        stopped = time.perf_counter() - t0 if t0 is not None else 0.0
        peak = max(peak, rss_gib(proc.pid, "VmHWM"))
        proc.kill()
        break
    proc.wait()
    reader.join()
    finished = next((x["seconds"] for x in lines if x.get("finished")), None)
    peak = max([peak] + [x["peak_gib"] for x in lines if x.get("finished")])
    if why == "finished" and finished is None:
        err.seek(0)
        last = [x for x in err.read().splitlines() if x.strip()][-1:] or [""]
        why = f"failed (exit {proc.returncode}): {last[0][:160]}"
    err.close()
    done = [x for x in lines if "sentences" in x]
    first = done[0]["seconds"] if done else None
    return {"outcome": why, "seconds": finished if finished is not None else stopped if why.startswith("stopped")
            else float("nan"), "first_batch_s": first if first is not None else "",
            "other_batches_s": finished - first if finished is not None and first is not None else "",
            "sentences_done": done[-1]["sentences"] if done else 0, "peak_rss_gib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", type=int, default=20_000, help="characters (= tokens) of the long sentence")
    p.add_argument("--short", type=int, default=200, help="short sentences")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=8.0, help="stop a run whose memory passes this")
    p.add_argument("--limit-s", type=float, default=60.0, help="stop a run that takes longer")
    p.add_argument("--repeats", type=int, default=2, help="runs of each plan that finishes (the fastest shown)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    from tiny import tiny_tokenizer

    env = environment("float32")
    env["threads"] = args.threads
    c = corpus(args.short, args.long)
    lengths = [len(t) for t in tiny_tokenizer()(c.texts)["input_ids"]]
    rows, runs = [], {name: [] for name in PLANS}
    for r in range(args.repeats):  # round-robin; a plan stopped or failed once is not run again
        for name in list(PLANS)[r % len(PLANS):] + list(PLANS)[:r % len(PLANS)]:
            if runs[name] and runs[name][0]["outcome"] != "finished":
                continue
            print(f"[{r + 1}/{args.repeats}] {name} ...", flush=True)
            run = watch(name, args)
            print(f"  {run['outcome']} in {run['seconds']:.1f} s, {run['sentences_done']} of {len(lengths)} "
                  f"sentences, peak {run['peak_rss_gib']:.2f} GiB", flush=True)
            runs[name].append(run)
    for name, (batch_size, max_tokens) in PLANS.items():
        plan = batches(lengths, batch_size, max_tokens)
        positions = [len(r) * max(lengths[i] for i in r) for r in plan]
        best = min(runs[name], key=lambda x: x["seconds"])
        rows.append({"plan": name, "batches": len(plan), "first_batch_sentences": len(plan[0]),
                     "first_batch_padded_tokens": positions[0], "padded_tokens": sum(positions),
                     "real_tokens": sum(lengths), "runs": len(runs[name]), **best,
                     "seconds_all": " ".join(f"{x['seconds']:.1f}" for x in runs[name]),
                     "tok_per_s": sum(lengths) / best["seconds"] if best["outcome"] == "finished" else ""})
    cfg = (f"Gemma-3-270M config, {args.layers} layer(s), vocab 300 (character tokenizer), random weights, "
           f"sdpa attention, fp32, {args.threads} thread(s)")
    write_results("long_sentence", finish(env), [Table(
        f"{args.short} short sentences + one of {args.long:,} characters ({max(lengths):,} tokens with BOS)", rows,
        note="collect's batches (pooled_batches, hooks), each run in a watched process, round-robin; the "
             "fastest run shown (seconds_all: every run). seconds = the collection (model built before; "
             "first_batch_s: its first batch, the long sentence's; other_batches_s: the rest), stopped at "
             f"{args.cap_gib:g} GiB or {args.limit_s:g} s; sentences_done = sentences of the batches finished "
             "(the first batch holds the long sentence); peak_rss_gib = the process's peak resident memory "
             "(model, tokenizer and Python included).")],
        title="A 20,000-token sentence among short ones: batches bounded by tokens (issue 17)",
        notes=cfg)


if __name__ == "__main__":
    main()
