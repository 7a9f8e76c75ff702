"""Expert discovery inside vLLM agrees with steer's transformers path on a real model: Gemma-3-270M
fp32, 8 languages x `--n` Bible verses (discovery split), exact mode with LAPE and DiffMean token
statistics, and vLLM's stream mode (calibration, histograms, refine).

    python bench/vllm_agreement.py [--n 100]

Runs in an environment with vLLM (`make install-vllm`). Reports the largest difference of the
pooled responses (max pooling) and of the token statistics, how many neurons' AP / AUROC moved
and whether each moved score sits at a near-tie of the transformers responses (two responses
within the responses' difference), which experts differ and why, and whether stream mode's
certificates hold and its refined experts equal exact mode's. Writes
bench/results/vllm_agreement.{md,csv}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "ru", "zh"]
KINDS = ("activation", "residual")


def corpus(n: int):
    from steer.core.packaged_corpora import bible_corpus

    return bible_corpus(LANGUAGES, split="discovery", n_per_language=n, seed=0)


def vllm_child(args) -> None:
    """The engine's exact responses (with token statistics) and its stream-mode result, into --out."""
    from vllm import LLM

    import steer

    out = Path(args.out)
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    data = corpus(args.n)
    found = steer.find_experts(llm, None, data, k=100, mode="exact", progress=False, token_stats=KINDS)
    found.responses.save(out / "vllm.safetensors")
    found.experts.save(out / "vllm-experts")
    stream = steer.find_experts(llm, None, data, k=100, mode="stream", progress=False)
    stream.state.save(out / "vllm-state.safetensors")
    stream.experts.save(out / "vllm-stream-experts")


def near_tie(values, positive, tol: float) -> bool:
    """A positive sentence's response within `tol` of another's (the forwards' rounding may swap
    them or split their tie, which moves AP / AUROC by a step)."""
    order = values.argsort()
    v, p = values[order], positive[order]
    return bool((((v[1:] - v[:-1]).abs() <= tol) & (p[1:] | p[:-1])).any())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: steer's converted Gemma-3-270M)")
    ap.add_argument("--n", type=int, default=100, help="Bible verses per language (default 100)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of the engine")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return vllm_child(args)

    import torch

    import steer
    from harness import RESULTS, Table, environment, finish, write_results
    from steer.core.scores import Responses
    from steer.engine.models import resolve

    args.model = args.model or resolve("gemma-3-270m")
    env = environment("float32")
    torch.set_num_threads(args.threads)
    model, tok = steer.load_model(args.model, dtype="float32", device="cpu")
    data = corpus(args.n)
    want = steer.find_experts(model, tok, data, k=100, mode="exact", progress=False, token_stats=KINDS)
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--n", str(args.n), "--out", d]
        subprocess.run(cmd, env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.bind, "VLLM_CPU_KVCACHE_SPACE": "2"},
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = Responses.load(Path(d) / "vllm.safetensors")
        experts = steer.ExpertSet.load(Path(d) / "vllm-experts", model)  # the fingerprint check
        stream_experts = steer.ExpertSet.load(Path(d) / "vllm-stream-experts")
        state = steer.StreamState.load(Path(d) / "vllm-state.safetensors")
    w, g = want.responses, got
    diff = (g.values - w.values).abs()
    tol = float(diff.max())
    rows = [{"check": "pooled responses (max), largest |vLLM - transformers|", "value": f"{tol:.3g}",
             "detail": f"responses up to {float(w.values.abs().max()):.3g}; median difference {float(diff.median()):.2g}"}]
    for name, t in want.token_stats.tensors().items():
        o = got.token_stats.tensors()[name]
        if t.dtype == torch.int64:
            d = (o - t).abs()
            rows.append({"check": f"token statistic {name}", "value": "equal" if torch.equal(o, t) else
                         f"{int((d > 0).sum())} of {t.numel():,} counts differ",
                         "detail": "tokens per label" if name == "tokens" else
                         f"by at most {int(d.max())} of {int(t.max()):,} (activations within rounding of 0 change sign)"})
        else:
            rows.append({"check": f"token statistic {name}, largest |difference| / largest |sum|",
                         "value": f"{float((o - t).abs().max() / t.abs().max()):.2g}",
                         "detail": f"largest |difference| {float((o - t).abs().max()):.3g} of sums up to "
                                   f"{float(t.abs().max()):.3g} (float64 sums over tokens)"})
    ws, gs = w.score(), g.score()
    values = w.values.flatten(1)
    per_neuron = diff.flatten(1).amax(0)  # each neuron's largest |vLLM - transformers| response difference
    moved = ties = 0
    largest = 0.0
    for i, split in enumerate(ws.splits):
        positive = torch.isin(w.label_ids, torch.tensor(split.label_ids(w.label_names)[0]))
        for score in ("ap", "auroc"):
            gap = (gs.stats[score][i] - ws.stats[score][i]).abs().flatten()
            largest = max(largest, float(gap.max()))
            for n in (gap > 1e-6).nonzero()[:, 0].tolist():
                moved += 1
                ties += near_tie(values[:, n], positive, 2 * float(per_neuron[n]))
    rows.append({"check": "AP / AUROC moved by > 1e-6 (splits x neurons x 2 scores)", "value": f"{moved:,}",
                 "detail": f"of {2 * values.shape[1] * len(ws.splits):,}; by at most {largest:.2g}; {ties:,} of them "
                           "at a near-tie: a positive sentence's response within 2x that neuron's largest "
                           "vLLM-transformers difference of another's"})
    differ = {}
    for label in want.experts.concepts:
        e, f = want.experts.experts[label], experts.experts[label]
        a, b = list(zip(e["layer"].tolist(), e["unit"].tolist())), list(zip(f["layer"].tolist(), f["unit"].tolist()))
        if a != b:
            swapped = [j for j in range(len(a)) if a[j] != b[j]]
            differ[label] = {"only transformers": sorted(set(a) - set(b)), "only vLLM": sorted(set(b) - set(a)),
                             "places in another order": swapped,
                             "largest AP gap there": round(float((e["score"][swapped] - f["score"][swapped]).abs().max()), 7)}
    rows.append({"check": "expert sets (k = 100 per label, in order)", "value": "equal" if not differ else
                 f"{len(differ)} labels differ", "detail": json.dumps(differ) if differ else "8 labels"})
    hist = steer.score_state(state)
    exact = g.score()
    held = all(bool(((hist.stats[s][i] - exact.stats[s][i]).abs() <= hist.stats[f"{s}_bound"][i] + 1e-6).all())
               for i in range(len(hist.splits)) for s in ("ap", "auroc"))
    rows.append({"check": "vLLM stream mode: every histogram score within its certificate of the exact one",
                 "value": "yes" if held else "no", "detail": f"{state.edges.shape[1] + 1} bins"})
    same = all(stream_experts.experts[c]["unit"].tolist() == experts.experts[c]["unit"].tolist() and
               stream_experts.experts[c]["layer"].tolist() == experts.experts[c]["layer"].tolist()
               for c in experts.concepts)
    rows.append({"check": "vLLM stream mode's refined experts = vLLM exact mode's", "value": "yes" if same else "no",
                 "detail": ""})
    note = (f"Gemma-3-270M fp32, {len(data):,} Bible verses (8 languages x {args.n}, discovery split), max pooling, "
            "k = 100 by AP. transformers: steer's exact collection, "
            f"{args.threads} threads; vLLM: `steer.find_experts` on an engine with steer's plugin (eager, both cores).")
    write_results("vllm_agreement", finish(env), [Table("vLLM vs transformers", rows, note=note)],
                  title="Expert discovery inside vLLM agrees with steer's transformers path (Gemma-3-270M)",
                  out_dir=RESULTS)
    print((RESULTS / "vllm_agreement.md").read_text())


if __name__ == "__main__":
    main()
