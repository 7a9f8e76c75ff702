#!/usr/bin/env python
"""Benchmarks of steer against a bare forward pass and against today's way (bench/todays_way.py).

    python bench/run.py CASE [--quick]        CASE: collection, e2e, scoring, memory, all

Gemma-3-270M (real de-quantised weights, fp32, `load_model("gemma-3-270m")`) on Bible verses in
8 languages (en de fr es it pt ru zh, discovery split), batch size 16, the process's torch threads.
Results go to bench/results/<case>.md and .csv (overwritten), with the machine and load average.
Every compared figure is a ratio of variants timed side by side, round-robin, in one run.
See bench/README.md for what each case and ratio means.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import todays_way  # noqa: E402
from harness import RESULTS, Table, compare, environment, finish, load_average, write_results  # noqa: E402

MODEL = "gemma-3-270m"
LANGS = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]
BATCH = 16
OUT = RESULTS  # --quick writes to RESULTS / "quick" (git-ignored), never over the full results

# sentences (all languages together), repeats, neuron subset for scikit-learn extrapolation
FULL = dict(collect_n=256, collect_repeats=3, e2e_n=[1000, 2000], e2e_repeats=1, e2e_sk_neurons=2048,
            score_n=2000, score_shapes=[(18, 2048), (32, 14336)], score_repeats=2, score_sk_neurons=1024,
            memory_n=[250, 500, 1000, 2000])
QUICK = dict(collect_n=32, collect_repeats=2, e2e_n=[32], e2e_repeats=1, e2e_sk_neurons=256,
             score_n=400, score_shapes=[(18, 2048)], score_repeats=2, score_sk_neurons=256,
             memory_n=[16, 32])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Shared pieces

def load():
    from steer.engine.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(MODEL, dtype=torch.float32, device="cpu")
    log(f"loaded {MODEL} in {time.perf_counter() - t0:.1f} s (padding side {tok.padding_side})")
    return model, tok


def corpus(n: int):
    from steer.core.packaged_corpora import bible_corpus

    return bible_corpus(LANGS, split="discovery", n_per_language=max(1, n // len(LANGS)))


def warm_up(model, tok) -> None:
    """One small pass of every path, so that no timed variant pays first-call costs."""
    from steer.engine.collect import collect

    small = corpus(16)
    bare_forward(model, tok, small.texts, small.keys)
    collect(model, tok, small, batch_size=BATCH, progress=False)
    todays_way.collect(model, tok, small.texts, batch_size=BATCH)


def bare_forward(model, tok, texts, keys) -> dict:
    """The base model over steer's length-sorted batches, no hooks: the floor collection sits on."""
    from steer.core.adapters import base_inputs
    from steer.engine.batching import batches, pad, tokenize

    ids, _ = tokenize(tok, texts, keys, True, None)
    with torch.inference_mode():
        for rows in batches([len(t) for t in ids], BATCH):
            input_ids = pad([ids[i] for i in rows], tok.pad_token_id or 0, tok.padding_side)
            mask = pad([[1] * len(ids[i]) for i in rows], 0, tok.padding_side)
            model.base_model(**base_inputs(model, input_ids, mask))
    return {}


def padding(lengths: list[int], groups: list[list[int]]) -> dict:
    positions = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    real = sum(lengths)
    return {"batches": len(groups), "real_tokens": real, "positions": positions, "padding_fraction": 1 - real / positions}


def in_order(n: int) -> list[list[int]]:
    """Batches of today's way: corpus order."""
    return [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]


def subset(total: int, k: int) -> np.ndarray | None:
    """The first k flat neuron indices (None: all of them) for timing scikit-learn on a subset.

    Contiguous on purpose: today's way maps a Pool over the units of one layer at a time, and each
    map call has a fixed cost (worker round trips: ~0.15 s on this loaded machine). k neurons of
    one layer keep that cost at its share in a full run; k random neurons spread over every layer
    would pay it once per layer for a few neurons each and inflate the extrapolation.
    """
    if not k or k >= total:
        return None
    return np.arange(k)


def extrapolate(timing: dict) -> tuple[float, str]:
    """Scoring seconds for all neurons from a subset: per-neuron time scaled, Pool start-up once."""
    scored, total = timing["neurons_scored"], timing["neurons_total"]
    if scored == total:
        return timing["score_s"], ""
    per_neuron = max(timing["score_s"] - timing["pool_s"], 0.0)
    return (timing["pool_s"] + per_neuron * total / scored,
            f"EXTRAPOLATED from {scored:,} neurons (first of layer 0) to {total:,}")


ENV_NOTE = ("Timed on a shared machine: compare ratios within a table, not seconds across runs. "
            "Load averages at start and end are in the Environment block.")


# --------------------------------------------------------------------------------------------
# Cases

def case_collection(model, tok, cfg) -> None:
    from steer.engine.batching import batches, tokenize
    from steer.engine.collect import collect

    env = environment("float32")
    c = corpus(cfg["collect_n"])
    ids, _ = tokenize(tok, c.texts, c.keys, True, None)
    lengths = [len(t) for t in ids]
    n_tokens = sum(lengths)
    log(f"collection: {len(c)} sentences, {n_tokens:,} tokens, batch {BATCH}, {cfg['collect_repeats']} repeats")
    variants = {
        "bare forward (base model, sorted, no hooks)": lambda: bare_forward(model, tok, c.texts, c.keys),
        "steer.collect (exact)": lambda: collect(model, tok, c, batch_size=BATCH, progress=False) and {},
        "today's way (full LM, corpus order, hooks)": lambda: todays_way.collect(model, tok, c.texts, BATCH)[1],
    }
    result = compare(variants, baseline=next(iter(variants)), repeats=cfg["collect_repeats"], warmup=0, log=log)
    rows = result.rows(sentences=len(c), tokens=n_tokens)
    for row in rows:
        row["tok_per_s_best"] = n_tokens / row["min_s"]
        row["tok_per_s_median"] = n_tokens / row["median_s"]
    cols = ["variant", "sentences", "tokens", "repeats", "min_s", "median_s", "tok_per_s_best", "tok_per_s_median",
            "ratio_min", "ratio_median", "tokenize_s", "forward_s", "lm_head_s", "hook_s"]
    big = corpus(2000)  # padding of the 2,000-verse corpus as well: tokenizer only, cheap
    big_lengths = [len(t) for t in tokenize(tok, big.texts, big.keys, True, None)[0]]
    pad_rows = []
    for n, ls in ((len(c), lengths), (len(big), big_lengths)):
        pad_rows += [{"N": n, "batching": "corpus order (today's way)", **padding(ls, in_order(len(ls)))},
                     {"N": n, "batching": "length-sorted (steer)", **padding(ls, batches(ls, BATCH))}]
    for name, v in result.variants.items():
        log(f"  {name}: best {n_tokens / v.min:.0f} tok/s, x{result.ratio(name):.2f} the bare forward's time")
    write_results("collection", finish(env), out_dir=OUT, tables=[
        Table("Collection throughput (tokens/s over real tokens)", rows, cols,
              note="ratio = variant seconds / bare forward seconds (min over repeats, and median). "
                   "For today's way, tokenize_s / forward_s / hook_s split its time (median over repeats); "
                   "forward_s includes the padded positions and the LM head (lm_head_s, part of forward_s)."),
        Table(f"Padding in batches of {BATCH}", pad_rows),
    ], title=f"Collection: {MODEL}, fp32, {len(c)} Bible verses in {len(LANGS)} languages", notes=ENV_NOTE)


def case_e2e(model, tok, cfg, sizes=None) -> None:
    from steer.core.adapters import NeuronLayout
    from steer.engine.collect import collect

    env = environment("float32")
    n_neurons = NeuronLayout(model).n_neurons
    rows, checks = [], []
    for n in sizes or cfg["e2e_n"]:
        c = corpus(n)
        label_ids = c.label_ids.numpy()
        units = subset(n_neurons, cfg["e2e_sk_neurons"])
        kept = {}
        log(f"e2e N={len(c)}: steer vs today's way, {cfg['e2e_repeats']} repeat(s)")

        def steer_way():
            t0 = time.perf_counter()
            r = collect(model, tok, c, batch_size=BATCH, progress=False)
            t1 = time.perf_counter()
            kept["steer"] = (r, r.score())
            return {"collect_s": t1 - t0, "score_s": time.perf_counter() - t1}

        def today():
            t0 = time.perf_counter()
            resp, timing = todays_way.collect(model, tok, c.texts, BATCH)
            t1 = time.perf_counter()
            scores, st = todays_way.score(resp, label_ids, c.label_names, units=units)
            kept["today"] = (resp, scores)
            score_s, note = extrapolate(st)
            out = {"collect_s": t1 - t0, "forward_s": timing["forward_s"], "lm_head_s": timing["lm_head_s"],
                   "hook_s": timing["hook_s"],
                   "tokenize_s": timing["tokenize_s"], "score_s": score_s, "score_measured_s": st["score_s"],
                   "seconds": t1 - t0 + score_s}
            if note:
                out["note"] = note
            return out

        result = compare({"today's way": today, "steer": steer_way}, baseline="today's way",
                         repeats=cfg["e2e_repeats"], warmup=0, log=log)
        rows += result.rows(N=len(c))
        # honesty check: same responses, same scores (up to fp32 batch noise and the ties it breaks)
        r, s = kept["steer"]
        resp, sk = kept["today"]
        today_values = np.stack([resp[l] for l in sorted(resp)], 1)  # [N, L, M]
        cols = np.arange(n_neurons) if units is None else units
        checks.append({"N": len(c), "max_abs_response": float(r.values.abs().max()),
                       "max_abs_response_diff": float(np.abs(today_values - r.values.numpy()).max()),
                       "max_abs_ap_diff": float(np.abs(sk["ap"] - s.stats["ap"].reshape(len(c.label_names), -1).numpy()[:, cols]).max()),
                       "max_abs_auroc_diff": float(np.abs(sk["auroc"] - s.stats["auroc"].reshape(len(c.label_names), -1).numpy()[:, cols]).max()),
                       "neurons_compared": len(cols)})
        log(f"  steer is {1 / result.ratio('steer'):.1f}x faster (min), check {checks[-1]}")
        del kept
    cols = ["N", "variant", "repeats", "min_s", "median_s", "ratio_min", "ratio_median", "collect_s", "forward_s",
            "lm_head_s", "hook_s", "tokenize_s", "score_s", "score_measured_s", "note"]
    write_results("e2e", finish(env), out_dir=OUT, tables=[
        Table("End to end: collect + score all 36,864 neurons, 8 labels one-vs-rest", rows, cols,
              note="ratio = variant seconds / today's way seconds (below 1: faster). Today's way scores AP "
                   "and AUROC with scikit-learn per neuron in a 2-process Pool plus numpy forcing statistics; "
                   "rows marked EXTRAPOLATED timed scikit-learn on the first neurons of layer 0 (one Pool.map "
                   "per label, as in a full run) and scaled the per-neuron time linearly to all neurons (Pool "
                   "start-up counted once); score_measured_s is "
                   "the time actually measured. steer's score_s is Responses.score() (AP, AUROC, "
                   "on_mean/p50/p90, off_mean for every neuron)."),
        Table("Same results (today's way vs steer)", checks,
              note="Responses differ only by fp32 noise from different batch make-up; AP/AUROC differences "
                   "come from exact ties that this noise breaks differently."),
    ], title=f"End to end: {MODEL}, fp32, Bible verses in {len(LANGS)} languages", notes=ENV_NOTE)


def synthetic(n: int, layers: int, width: int, n_labels: int = 8, seed: int = 0):
    """Responses [n, layers * width] fp32, label ids [n]: Gaussian noise, a tenth of the neurons
    shifted up for one label each (so the scores are not all 0.5)."""
    g = torch.Generator().manual_seed(seed)
    m = layers * width
    label_ids = torch.arange(n) % n_labels
    x = torch.randn(n, m, generator=g)
    cols = torch.randperm(m, generator=g)[: m // 10]
    lab = torch.randint(n_labels, (len(cols),), generator=g)
    x[:, cols] += 2.0 * (label_ids[:, None] == lab[None, :])
    return x, label_ids


def histogram_state(x, label_ids, names, layers: int, width: int):
    """The streaming state of responses x [N, L*M]: edges from the first 1,000 sentences, then
    every sentence counted in batches of 16, as collect_stream does (not timed: it runs during
    the collection pass)."""
    from steer.core.stream import StreamState, calibrate_edges

    state = StreamState(calibrate_edges(x[:1000]), names, {"layers": layers, "width": width})
    for i in range(0, len(x), BATCH):
        state.update(x[i:i + BATCH], label_ids[i:i + BATCH])
    return state


def case_scoring(cfg) -> None:
    from steer import score_state
    from steer.core.scores import shortlist_scores
    from steer.core.metrics import score_splits

    env = environment("float32")
    rows = []
    n = cfg["score_n"]
    for layers, width in cfg["score_shapes"]:
        m = layers * width
        log(f"scoring: N={n}, {m:,} neurons ({layers} x {width}), 8 labels")
        x, label_ids = synthetic(n, layers, width)
        names = [f"c{i}" for i in range(8)]
        splits = [([i], None) for i in range(8)]
        xn = x.numpy()
        resp = {l: xn[:, l * width:(l + 1) * width] for l in range(layers)}  # views, as ml-selfcond's dict
        units = subset(m, cfg["score_sk_neurons"])

        def sk(auroc):
            def run():
                _, st = todays_way.score(resp, label_ids.numpy(), names, auroc=auroc, units=units)
                seconds, note = extrapolate(st)
                return {"seconds": seconds, "score_measured_s": st["score_s"], "note": note}

            return run

        state = histogram_state(x, label_ids, names, layers, width)

        def refined():  # what refine computes once its second pass holds the short-list's responses
            keep, _ = shortlist_scores(score_state(state), k=100)
            score_splits(x[:, keep], label_ids, splits)
            return {"note": f"short-list of {keep.numel():,} neurons"}

        variants = {
            "sklearn AP+AUROC per neuron, Pool(2)": sk(True),
            "sklearn AP per neuron, Pool(2) (ml-selfcond)": sk(False),
            "steer score_splits (AP, AUROC, stats)": lambda: score_splits(x, label_ids, splits) and {},
            "steer score_state: histogram scores + certificates": lambda: score_state(state) and {},
            "steer stream: histogram + exact top-100 short-list": refined,
        }
        result = compare(variants, baseline=next(iter(variants)), repeats=cfg["score_repeats"], warmup=0, log=log)
        rows += result.rows(N=n, neurons=m, labels=8)
        steer_name = "steer score_splits (AP, AUROC, stats)"
        log(f"  steer: {result.variants[steer_name].min:.1f} s, {1 / result.ratio(steer_name):.0f}x faster than sklearn AP+AUROC")
        del x, xn, resp, state
    cols = ["N", "neurons", "labels", "variant", "repeats", "min_s", "median_s", "ratio_min", "ratio_median",
            "score_measured_s", "note"]
    write_results("scoring", finish(env), out_dir=OUT, tables=[
        Table("Scoring alone (synthetic responses)", rows, cols,
              note="ratio = variant seconds / sklearn AP+AUROC seconds. Every variant also computes the "
                   "forcing statistics (on_mean/p50/p90, off_mean). sklearn rows are EXTRAPOLATED from the "
                   "first neurons of layer 0, scaled linearly (score_measured_s is what was measured). "
                   "score_state scores every neuron from the streaming histograms (64 bins, built during "
                   "collection, not timed) with certified bounds; 'stream' adds the exact scores of the "
                   "short-list that could hold the exact top-100 by AP of each label (refine's scoring "
                   "step; its second forward pass over the corpus is not in this time)."),
    ], title="Scoring: per-neuron AP/AUROC, 8 labels one-vs-rest", notes=ENV_NOTE)


def _memory_child(method: str, n: int) -> None:
    """Run in a fresh process: load, collect N sentences, print the memory figures as JSON."""
    import psutil

    from steer.core.adapters import NeuronLayout
    from steer.engine.collect import collect

    model, tok = load()
    c = corpus(n)
    proc = psutil.Process()
    rss_load = proc.memory_info().rss
    peak = [rss_load]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if method == "steer":
        out = collect(model, tok, c, batch_size=BATCH, progress=False)
    else:
        out = todays_way.collect(model, tok, c.texts, BATCH)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    mib = 2**20
    print(json.dumps({"method": method, "N": len(c), "rss_after_load_mib": rss_load / mib,
                      "peak_during_collection_mib": peak[0] / mib, "growth_mib": (peak[0] - rss_load) / mib,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "response_table_mib": len(c) * NeuronLayout(model).n_neurons * 4 / mib, "seconds": seconds}))
    del out


def case_memory(cfg, sizes=None) -> None:
    env = environment("float32")
    rows = []
    methods = ["steer", "today"]
    for k, n in enumerate(sizes or cfg["memory_n"]):
        for method in methods[k % 2:] + methods[: k % 2]:  # alternate which runs first
            log(f"memory: {method} N={n} in a fresh process")
            p = subprocess.run([sys.executable, __file__, "_memory_child", method, str(n), str(torch.get_num_threads())],
                               capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"memory child failed:\n{p.stderr[-3000:]}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["method"] = "steer.collect (exact)" if method == "steer" else "today's way"
            rows.append(row)
            log(f"  peak {row['peak_during_collection_mib']:.0f} MiB (+{row['growth_mib']:.0f} over the loaded "
                f"model), ru_maxrss {row['ru_maxrss_mib']:.0f} MiB, {row['seconds']:.0f} s")
    write_results("memory", finish(env), out_dir=OUT, tables=[
        Table("Peak resident memory of collection vs N (each run a fresh process)", rows,
              note="peak_during_collection: RSS sampled every 10 ms during collection; growth: peak minus RSS "
                   "after loading the model and corpus; ru_maxrss: the process's high-water mark, loading "
                   "included; response_table: N x 36,864 fp32, what any exact method must hold. Today's way "
                   "also holds the batch's logits ([16, T, 262,144] fp32)."),
    ], title=f"Memory: {MODEL}, fp32, batch {BATCH}", notes=ENV_NOTE)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        torch.set_num_threads(int(sys.argv[4]))
        return _memory_child(sys.argv[2], int(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", nargs="?", default="all", choices=["collection", "e2e", "scoring", "memory", "all"])
    p.add_argument("--quick", action="store_true", help="small N, few repeats: a couple of minutes, for development")
    p.add_argument("--sizes", default=None, help="e2e / memory: comma-separated N, overriding the defaults")
    p.add_argument("--repeats", type=int, default=None, help="override the repeats of every case")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every variant (default: torch's own; 1 is steadier on a loaded machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    global OUT
    OUT = RESULTS / "quick" if args.quick else RESULTS
    if args.repeats:
        cfg.update({k: args.repeats for k in cfg if k.endswith("_repeats")})
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    log(f"bench {args.case}{' --quick' if args.quick else ''}: load {load_average()}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    cases = ["collection", "e2e", "scoring", "memory"] if args.case == "all" else [args.case]
    if {"collection", "e2e"} & set(cases):
        model, tok = load()
        warm_up(model, tok)
    for case in cases:
        start = time.perf_counter()
        if case == "collection":
            case_collection(model, tok, cfg)
        elif case == "e2e":
            case_e2e(model, tok, cfg, sizes)
        elif case == "scoring":
            case_scoring(cfg)
        else:
            case_memory(cfg, sizes)
        log(f"{case} done in {time.perf_counter() - start:.0f} s -> {OUT / case}.md")
    log(f"all done in {time.perf_counter() - t0:.0f} s, load {load_average()}")


if __name__ == "__main__":
    main()
