"""LAPE and DiffMean steer generation in vLLM as they do in steer's transformers path.

The methods study (`steer study --methods`, docs/methods/gemma-3-270m) chose, on dev, LAPE at
top_rate .05 (activation site) and DiffMean at layer 3, 2x the mean difference (residual site;
layer 8 for de). This script rebuilds those interventions from the same token statistics (Bible
discovery split, the study's 8 languages x 300 verses), saves them as files (`Intervention.save`),
and draws BOS-prompted samples (temperature 1, top-p .9, 32 new tokens, the study's settings)
with each, through steer's `generate` (transformers) and through vLLM with the plugin
(`steer_intervention`); py3langid names each sample's language. Reported: the share of samples
in the target language with its Wilson 95 % interval, per engine. Both engines run in this
process (vLLM's engine in-process), so it needs the vLLM environment (`make install-vllm`):

    python bench/vllm_methods.py [--n 80]

Writes bench/results/vllm_methods.{md,csv}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LANGS = ["en", "fr", "de", "es", "it", "pt", "ru", "zh"]
CHOSEN = {("lape", "fr"): {"top_rate": 0.05}, ("lape", "de"): {"top_rate": 0.05},
          ("diffmean", "fr"): {"layer": 3, "scale": 2.0}, ("diffmean", "de"): {"layer": 8, "scale": 2.0}}
STUDY = {("lape", "fr"): 554, ("lape", "de"): 576,  # the study's LAPE neurons and DiffMean strengths
         ("diffmean", "fr"): 205.21772495074822, ("diffmean", "de"): 409.90382528422583}
GEN = dict(max_new_tokens=32, temperature=1.0, top_p=0.9)


def study_intervention(stats, method: str, target: str, setting: dict):
    """(intervention, the study's full setting) that `steer study --methods` builds for `setting`
    ({"top_rate": r} for LAPE, {"layer": l, "scale": s} for DiffMean) from token statistics: its
    own `make_methods`, so the grid's rules (LAPE's neurons, DiffMean's strength) are the study's."""
    from types import SimpleNamespace

    from steer.experiments.study.methods import make_methods

    cfg = SimpleNamespace(lape_rates=[setting.get("top_rate")], diffmean_layers=[setting.get("layer")],
                          diffmean_scales=[setting.get("scale")])
    m = make_methods([method], cfg, None, {}, stats, "cpu")[method]
    full = next(g for g in m.grid(target) if all(g[k] == v for k, v in setting.items()))
    return m.build(target, full), full


def interventions(model, tok, out: Path, n_discovery: int) -> tuple[dict, list[dict]]:
    """The study's chosen LAPE and DiffMean interventions, saved under `out`; (paths, checks)."""
    import steer
    from steer.engine.collect import collect_token_stats

    corpus = steer.bible_corpus(LANGS, split="discovery", n_per_language=n_discovery)
    stats = collect_token_stats(model, tok, corpus, ("activation", "residual"), batch_size=32, progress=False)
    paths, checks = {}, []
    for (method, t), s in CHOSEN.items():
        iv, full = study_intervention(stats, method, t, s)
        paths[method, t] = str(iv.save(out / f"{method}-{t}.safetensors", model))
        checks.append({"method": method, "target": t, "setting": str(s),
                       "here": full["neurons" if method == "lape" else "strength"], "study": STUDY[method, t]})
    return paths, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=80, help="samples per method, target and engine")
    ap.add_argument("--n-discovery", type=int, default=300, help="verses per language for the token statistics")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    import steer
    from harness import Table, environment, finish, write_results
    from steer.engine.models import resolve
    from steer.experiments.language_sweep import identify_languages, wilson_interval

    env = environment("float32")
    model, tok = steer.load_model("gemma-3-270m", dtype="float32", device="cpu")
    work = Path(tempfile.mkdtemp(prefix="steer-vllm-methods-"))
    t0 = time.perf_counter()
    paths, checks = interventions(model, tok, work, args.n_discovery)
    print(f"interventions in {time.perf_counter() - t0:.0f} s: {checks}", flush=True)

    def row(engine, method, t, texts, seconds):
        langs = identify_languages(texts, LANGS)
        hits = sum(x == t for x in langs)
        lo, hi = wilson_interval(hits, len(langs))
        return {"engine": engine, "method": method, "target": t, "n": len(langs), "in target": hits,
                "fraction": hits / len(langs), "ci95_lo": lo, "ci95_hi": hi, "seconds": round(seconds, 1)}

    rows = []
    runs = [("unsteered", t, None) for t in ("fr", "de")] + [(m, t, p) for (m, t), p in paths.items()]
    for method, t, path in runs:  # transformers: steer's generate, the study's sampler
        iv = None if path is None else steer.Intervention.load(path, model)
        s = time.perf_counter()
        texts = steer.generate(model, tok, [""] * args.n, intervention=iv, do_sample=True, seed=0, batch_size=32, **GEN)
        rows.append(row("transformers (steer.generate)", method, t, texts, time.perf_counter() - s))
        print(rows[-1], flush=True)
    del model

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=resolve("gemma-3-270m"), dtype="float32", max_model_len=512, seed=0)
    bos = TokensPrompt(prompt_token_ids=[tok.bos_token_id])
    for method, t, path in runs:
        extra = None if path is None else {"steer_intervention": path}
        params = [SamplingParams(max_tokens=GEN["max_new_tokens"], temperature=GEN["temperature"], top_p=GEN["top_p"],
                                 seed=i, extra_args=extra) for i in range(args.n)]
        s = time.perf_counter()
        outs = llm.generate([bos] * args.n, params, use_tqdm=False)
        rows.append(row("vLLM + steer plugin", method, t, [o.outputs[0].text for o in outs], time.perf_counter() - s))
        print(rows[-1], flush=True)

    by = {(r["engine"].split()[0], r["method"], r["target"]): r for r in rows}
    agree = []
    for method, t, _ in runs:
        a, b = by["transformers", method, t], by["vLLM", method, t]
        agree.append({"method": method, "target": t, "transformers": f"{a['fraction']:.3f}",
                      "vLLM": f"{b['fraction']:.3f}",
                      "vLLM within transformers' CI": a["ci95_lo"] <= b["fraction"] <= a["ci95_hi"],
                      "transformers within vLLM's CI": b["ci95_lo"] <= a["fraction"] <= b["ci95_hi"]})
    tables = [Table("Share of BOS-prompted samples in the target language (py3langid), per engine", rows),
              Table("The two engines side by side", agree),
              Table("The rebuilt interventions against the study's (LAPE: neurons; DiffMean: strength)", checks)]
    notes = (f"Gemma-3-270M fp32, {args.n} samples per row, {GEN['max_new_tokens']} new tokens, temperature "
             f"{GEN['temperature']}, top-p {GEN['top_p']}; the samplers differ (steer's generate draws with one "
             "torch generator per batch, vLLM per request), so the two engines agree in distribution, not sample "
             "by sample.")
    write_results("vllm_methods", finish(env), tables, title="LAPE and DiffMean in vLLM and in transformers",
                  notes=notes)


if __name__ == "__main__":
    main()
