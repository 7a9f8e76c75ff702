"""The study's protocol: one function per stage, run in order by `run_study`.

discovery (experts on the discovery split) -> dev (the k sweep and `choose`) -> test (pre/post
on the test split) -> random control -> paraphrases -> UDHR -> optional descriptive k sweep on
test -> verdict and outputs. The stages share one `_Run`; each adds its part of the results dict.
Nothing of the test split or the UDHR is loaded before `choose` has returned (an eval corpus file
is read whole to cut dev from it, but its test rows are only taken in the test stage).

Corpora (`_discovery_corpus`, `_eval_split`): the Bible's splits, or the user's files
(`discovery_corpus`: labelled text, at most n_discovery per language; `eval_corpus`: aligned rows
cut into dev and test by `split_parallel`). The UDHR and the Bible paraphrases are extra
corpora of their own, run for the languages they have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from steer.core.adapters import NeuronLayout
from steer.core.corpus import load_corpus, parallel_from_file, sample_per_label, split_parallel
from steer.core.packaged_corpora import (
    BIBLE_PARAPHRASES,
    bible_corpus,
    bible_parallel,
    bible_paraphrases,
    udhr_parallel,
)
from steer.core.experts import RECIPES, ExpertSet, package_version, random_control, values_sha
from steer.core.intervention import Intervention
from steer.core.artifacts import atomic_write_text
from steer.core.runtime import dtype_name, environment, set_threads
from steer.core.token_stats import TokenStats
from steer.engine.collect import collect_token_stats
from steer.engine.models import cache_dir as _steer_cache_dir
from steer.engine.models import load_model
from steer.experiments import analysis as A
from steer.experiments.language_sweep import Probe, identify_languages, outcome_row
from steer.experiments.study.cache import Embedder
from steer.experiments.study.choice import choose, choose_setting
from steer.experiments.study.config import SCHEMA, StudyConfig, as_config
from steer.experiments.study.control import control_seed
from steer.experiments.study.curves import run_curves
from steer.experiments.study.measures import (
    both,
    control_summary,
    correlation,
    distances,
    paraphrase_entry,
    pre_post,
    seed_stats,
    setting_scores,
    stringify,
)
from steer.experiments.study.methods import TOKEN_METHODS, make_methods
from steer.experiments.study.report import write_outputs
from steer.experiments.study.verdict import verdict
from steer.find import find_experts

log = logging.getLogger(__name__)


def run_study(config) -> dict:
    """Run the study described by `config` (a `StudyConfig`, a dict or argparse namespace) and
    write report.md, results.json and figures to `config.out`. Returns the results dict."""
    cfg = as_config(config).validate()
    threads = torch.get_num_threads()
    set_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """What the stages of one run share; `experts`, `grid`, `layer` and `ks` are set on the way."""

    cfg: StudyConfig
    out: Path
    model: object
    tok: object
    embedder: Embedder
    stage: _Stages
    results: dict
    readout: int
    dev_layers: list[int]
    experts: ExpertSet | None = None
    grid: dict | None = None  # target -> the k values of the grid it has experts for
    layer: int | None = None  # the read-out layer chosen on dev
    ks: dict | None = None  # target -> the k chosen on dev
    token_stats: TokenStats | None = None  # LAPE / DiffMean sums of the discovery pass (methods beyond experts)
    paraphrases: tuple | None = None  # (paraphrase corpora, their unsteered embeddings), once loaded

    def expert_iv(self, t: str, k: int) -> Intervention:
        return self.experts.intervention(t, self.model, k=k)

    def side(self, t: str, iv: Intervention | None):
        """Which columns get `iv`: all (the paper's setting) or the target's (one-side variant)."""
        def iv_for(column: str):
            lang = column.split(":")[0]
            return iv if self.cfg.sides == "both" or lang == t else None
        return iv_for


def _run(cfg: StudyConfig) -> dict:
    if cfg.curves:
        return _run_curves(cfg)
    t_start = time.perf_counter()
    run = _start(cfg)
    stage_discovery(run)
    stage_dev(run)
    test, pre, post_by_target = stage_test(run)
    stage_control(run, test, pre, post_by_target)
    if cfg.paraphrases:
        stage_paraphrases(run)
    if cfg.udhr:
        stage_udhr(run)
    if cfg.test_k_sweep:
        stage_test_k_sweep(run, test, pre)
    if len(cfg.methods) > 1:
        stage_methods(run, _eval_split(cfg, "dev"), test, pre)
    return _finish(run, t_start)


def _start(cfg: StudyConfig) -> _Run:
    """Load the model, set up the embedder and the read-out layers; the results dict's header."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"schema": SCHEMA, "config": dataclasses.asdict(cfg), "environment": _environment(),
                     "corpora": {}}
    model_start = time.perf_counter()
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    cache = None
    if cfg.cache_dir is not None:
        cache = _steer_cache_dir() / "study" if cfg.cache_dir == "default" else Path(cfg.cache_dir)
    embedder = Embedder(model, tok, batch_size=cfg.batch_size, skip_bos=cfg.skip_bos, directory=cache,
                        progress=cfg.progress)
    stage = _Stages(embedder.stats)
    stage.rows.append({"stage": "load model", "seconds": round(time.perf_counter() - model_start, 1)})
    n_layers = embedder.n_layers
    readout = n_layers if cfg.layer is None else (cfg.layer if cfg.layer >= 0 else n_layers + 1 + cfg.layer)
    if not 0 <= readout <= n_layers:
        raise ValueError(f"layer {cfg.layer} out of range: hidden states 0..{n_layers}")
    all_layers = list(range(1, n_layers + 1))
    dev_layers = sorted(set(all_layers) | {readout}) if (cfg.layer_search or cfg.layer_profile) else [readout]
    _log_plan(cfg, _negatives(cfg))
    results["model"] = {"name": cfg.model, "dtype": dtype_name(next(model.parameters()).dtype), "architecture": type(model).__name__, "layers": n_layers,
                        "fingerprint": embedder.fingerprint,
                        "neurons": n_layers * NeuronLayout(model).width}
    return _Run(cfg, out, model, tok, embedder, stage, results, readout, dev_layers)


def _negatives(cfg: StudyConfig) -> list[str]:
    return [n for n in cfg.negatives if n not in cfg.targets]


def stage_discovery(run: _Run) -> None:
    """1. Experts of every target on the discovery split (the other targets + negatives as negatives);
    with LAPE or DiffMean among the methods, their token statistics over every language's discovery
    text (a second pass, so the experts and their cached embeddings stay those of an experts-only run)."""
    cfg, results = run.cfg, run.results
    with run.stage("discovery"):
        disc_langs = list(dict.fromkeys(cfg.targets + _negatives(cfg)))
        corpus = _discovery_corpus(cfg, disc_langs)
        results["corpora"]["discovery"] = _corpus_entry(corpus)
        k_max = max(cfg.k_grid + (cfg.curve_k if cfg.curves else []))
        found = find_experts(run.model, run.tok, corpus, mode="exact", k=k_max, recipe=cfg.recipe, targets=cfg.targets,
                             negatives=disc_langs, pooling=cfg.pooling, batch_size=cfg.batch_size,
                             progress=cfg.progress)
        scores, run.experts = found.scores, found.experts
        run.embedder.stats["computed_tokens"] += scores.settings.get("tokens", 0)
        run.embedder.stats["computed_sentences"] += len(corpus)
        results["experts"] = _experts_summary(run.experts, scores, cfg, scores.splits)
        kinds = tuple(TOKEN_METHODS[m] for m in cfg.methods if m in TOKEN_METHODS)
        if kinds:
            every = _discovery_corpus(cfg, cfg.discovery_languages())
            results["corpora"]["token_statistics"] = _corpus_entry(every)
            run.token_stats = collect_token_stats(run.model, run.tok, every, kinds, batch_size=cfg.batch_size,
                                                  progress=cfg.progress)
    k_avail = {t: len(run.experts.experts[t]["layer"]) for t in cfg.targets}
    run.grid = {t: [k for k in cfg.k_grid if k <= k_avail[t]] or [k_avail[t]] for t in cfg.targets}


def stage_dev(run: _Run) -> None:
    """2. The k sweep on dev (and the layer profile), from which `choose` makes every choice."""
    cfg, embedder, readout, dev_layers = run.cfg, run.embedder, run.readout, run.dev_layers
    with run.stage("dev sweep"):
        dev = _eval_split(cfg, "dev")
        run.results["corpora"]["dev"] = _corpus_entry(dev)
        primary_centred = cfg.center
        base = embedder.parallel(dev, dev_layers)
        records = []
        for t in cfg.targets:
            for l in dev_layers:
                records.append({"split": "dev", "target": t, "k": 0, "layer": l,
                                **setting_scores(base[l], t, primary_centred)})
        conditions = [(t, k) for t in cfg.targets for k in run.grid[t]]
        for t, k in tqdm(conditions, desc="dev conditions", disable=not cfg.progress):
            post = embedder.parallel(dev, dev_layers, run.side(t, run.expert_iv(t, k)), keep=False)
            for l in dev_layers:
                records.append({"split": "dev", "target": t, "k": k, "layer": l,
                                **setting_scores(post[l], t, primary_centred)})
            r = next(x for x in reversed(records) if x["layer"] == readout and x["k"] == k and x["target"] == t)
            tqdm.write(f"dev {t} k={k}: setting (a) {r['a']:.3f}, (b) {r['b']:.3f} at layer {r['layer']}")
        chosen = choose(records, cfg.targets, cfg.criterion, cfg.layer_search, readout)
    run.layer, run.ks = chosen["layer"], chosen["k"]
    run.results["dev"] = {"records": stringify(records), "chosen": chosen, "readout_default": readout,
                          "representation": "centred" if primary_centred else "raw"}
    log.info("chosen on dev: layer %s, k %s", run.layer, run.ks)


def stage_test(run: _Run):
    """3. The test split with the chosen k: pre/post retrieval, distances, correlations, projections.

    Returns the test corpus, its unsteered embeddings and the steered ones per target.
    """
    cfg, embedder, layer, ks = run.cfg, run.embedder, run.layer, run.ks
    test_results: dict = {}
    with run.stage("test"):
        test = _eval_split(cfg, "test")
        run.results["corpora"]["test"] = _corpus_entry(test)
        pre = embedder.parallel(test, [layer])[layer]
        test_results["pre"] = {"distances": distances(pre, None),
                               "correlation": {r: correlation(pre, r == "centred", cfg.n_boot, cfg.seed)
                                               for r in ("raw", "centred")}}
        post_by_target = {}
        for t in cfg.targets:
            post = embedder.parallel(test, [layer], run.side(t, run.expert_iv(t, ks[t])))[layer]
            post_by_target[t] = post
            test_results[t] = pre_post(pre, post, t, ks[t], test_results["pre"]["correlation"], cfg)
        for t in cfg.targets:
            path = run.out / f"projection_{t}.png"
            A.plot_projection(pre, post_by_target[t], path)
    run.results["test"] = test_results
    return test, pre, post_by_target


def stage_control(run: _Run, test, pre: dict, post_by_target: dict) -> None:
    """The random-neuron control on a fixed subset of the test verses (same k, same values)."""
    cfg, layer, device = run.cfg, run.layer, NeuronLayout(run.model).device
    with run.stage("random control"):
        rng = np.random.default_rng(cfg.seed)
        rows = sorted(rng.choice(len(test), size=min(cfg.n_control, len(test)), replace=False).tolist())
        sub = _subset(test, rows)
        control: dict = {"rows": len(rows), "row_seed": cfg.seed, "layers": cfg.control_layers}
        idx = torch.tensor(rows)
        pre_sub = {l: e[idx] for l, e in pre.items()}
        for t in cfg.targets:
            k = run.ks[t]
            post_sub = {l: e[idx] for l, e in post_by_target[t].items()}
            entry = {"k": k, "experts_values_sha": values_sha(run.experts.experts[t]["value"][:k]),
                     "pre": control_summary(pre_sub, t), "experts": control_summary(post_sub, t), "seeds": []}
            for i in tqdm(range(cfg.control_seeds), desc=f"control {t}", disable=not cfg.progress):
                iv, info = random_control(run.experts, t, k, control_seed(cfg.seed, t, i), layers=cfg.control_layers)
                iv = iv.to(device)
                rnd = run.embedder.parallel(sub, [layer], run.side(t, iv), keep=False)[layer]
                entry["seeds"].append({**info, **control_summary(rnd, t)})
            entry["random"] = seed_stats(entry["seeds"])
            control[t] = entry
    run.results["control"] = control


def stage_paraphrases(run: _Run) -> None:
    """Paraphrase retrieval (the paper's Table 3): two Bible versions of one language, pre/post/mixed."""
    cfg, layer = run.cfg, run.layer
    with run.stage("paraphrases"):
        para: dict = {}
        langs = [l for l in BIBLE_PARAPHRASES if l in cfg.languages]
        if len(langs) < len(BIBLE_PARAPHRASES):
            log.info("paraphrases: %s not among the languages, skipped",
                     ", ".join(l for l in BIBLE_PARAPHRASES if l not in langs))
        if not langs:
            return
        pars = {l: bible_paraphrases(l, split="test", n=cfg.n_paraphrase, seed=cfg.seed) for l in langs}
        run.results["corpora"]["paraphrases"] = {l: _corpus_entry(p) for l, p in pars.items()}
        run.paraphrases = pars, {l: run.embedder.parallel(p, [layer])[layer] for l, p in pars.items()}
        for t in cfg.targets:
            para[t] = paraphrase_retrieval(run, t, run.expert_iv(t, run.ks[t]))
        run.results["paraphrases"] = para


def paraphrase_retrieval(run: _Run, t: str, iv: Intervention) -> dict:
    """Paraphrase retrieval of every paraphrase language with `iv` (target t's intervention)."""
    pars, base = run.paraphrases
    out = {}
    for l, p in pars.items():
        q_col, c_col = p.languages
        post = run.embedder.parallel(p, [run.layer], run.side(t, iv))[run.layer]
        out[l] = paraphrase_entry(base[l], post, q_col, c_col, run.cfg)
    return out


def stage_methods(run: _Run, dev, test, pre: dict) -> None:
    """The methods compared (`methods.py`): each one's strength chosen on dev (read-out layer of
    the experts' choice), then the test retrieval, distances and paraphrases, and language steering
    in generation, at that strength. The experts' dev records are the k sweep's."""
    cfg, layer = run.cfg, run.layer
    methods = make_methods(cfg.methods, cfg, run.experts, run.grid, run.token_stats, NeuronLayout(run.model).device)
    out: dict = {"names": list(methods), "sites": {m: x.site for m, x in methods.items()}, "dev": {},
                 "chosen": {}, "test": {}, "paraphrases": {}}
    with run.stage("methods: dev"):
        base = run.embedder.parallel(dev, [layer])[layer]
        out["dev_pre"] = {t: setting_scores(base, t, cfg.center) for t in cfg.targets}
        for name, method in methods.items():
            out["dev"][name] = {t: _method_dev(run, method, t, dev) for t in cfg.targets}
            out["chosen"][name] = {t: choose_setting(r, cfg.criterion)["setting"] if r else None  # None: empty grid
                                   for t, r in out["dev"][name].items()}
    with run.stage("methods: test"):
        for name, method in methods.items():
            out["test"][name], out["paraphrases"][name] = {}, {}
            for t in cfg.targets:
                setting = out["chosen"][name][t]
                if setting is None:
                    continue
                iv = method.build(t, setting)
                post = run.embedder.parallel(test, [layer], run.side(t, iv))[layer]
                out["test"][name][t] = {"setting": setting, "units": len(iv),
                                        **pre_post(pre, post, t, setting.get("k"), run.results["test"]["pre"]["correlation"], cfg)}
                if run.paraphrases is not None:
                    out["paraphrases"][name][t] = paraphrase_retrieval(run, t, iv)
    with run.stage("methods: generation"):
        out["generation"] = _method_generation(run, methods, out["chosen"], test)
    run.results["methods"] = out


def _method_dev(run: _Run, method, t: str, dev) -> list[dict]:
    """Dev records of one method and target, one per setting of its grid (weakest first)."""
    cfg, layer = run.cfg, run.layer
    if method.name == "experts":  # the k sweep already ran
        return [{"split": "dev", "setting": {"k": r["k"]}, "a": r["a"], "b": r["b"]}
                for r in run.results["dev"]["records"] if r["target"] == t and r["layer"] == layer and r["k"] > 0]
    records = []
    for setting in tqdm(method.grid(t), desc=f"dev {method.name} {t}", disable=not cfg.progress):
        post = run.embedder.parallel(dev, [layer], run.side(t, method.build(t, setting)), keep=False)[layer]
        records.append({"split": "dev", "setting": setting, **setting_scores(post, t, cfg.center)})
    return records


def _method_generation(run: _Run, methods: dict, chosen: dict, test) -> dict:
    """Language steering in generation: per target, the unsteered model and every method at its
    dev-chosen strength (fraction of BOS-prompted samples in the target language, held-out
    perplexity on the target's test sentences)."""
    cfg = run.cfg
    probe = Probe(run.model, run.tok, identify_languages, list(cfg.languages),
                  {t: test.texts[t][: cfg.n_heldout] for t in cfg.targets},
                  dict(max_new_tokens=cfg.gen_tokens, do_sample=True, temperature=1.0, top_p=0.9,
                       batch_size=cfg.batch_size), cfg.seed, 8)
    out: dict = {"settings": {"n_samples": cfg.n_generate, "max_new_tokens": cfg.gen_tokens, "temperature": 1.0,
                              "top_p": 0.9, "n_heldout": cfg.n_heldout, "classifier": "py3langid",
                              "languages": list(cfg.languages)}, "base": {}}
    _, base_langs, _ = probe.sample(None, cfg.n_generate)  # the same draws for every target
    for t in cfg.targets:
        out["base"][t] = outcome_row(t, base_langs, probe.ppl(t, None), None)
    for name, method in methods.items():
        out[name] = {}
        for t in (t for t in cfg.targets if chosen[name][t] is not None):
            row, texts, _ = probe.outcome(t, method.build(t, chosen[name][t]), cfg.n_generate, out["base"][t]["ppl"])
            out[name][t] = {**row, "samples": texts[:3]}
    return out


#: the configuration a curves run must share with the methods study it extends (same experts,
#: statistics, dev split and read-out)
SHARED = ("model", "targets", "languages", "negatives", "recipe", "pooling", "n_discovery", "n_dev", "seed",
          "layer", "layer_search", "criterion", "center", "sides", "control_layers", "skip_bos", "methods",
          "diffmean_layers", "eval_corpus", "discovery_corpus")


def methods_study(cfg: StudyConfig) -> dict:
    """The results.json of the methods study in `cfg.out` that a curves run extends (checked
    before the model loads: present, a methods study, the same `SHARED` configuration)."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        raise ValueError(f"--curves extends a methods study: no {path} (run `steer study --methods ...` "
                         f"with --out {cfg.out} first)")
    base = json.loads(path.read_text())
    if "methods" not in base:
        raise ValueError(f"{path} is not a methods study (no methods section): run it with --methods")
    differ = [k for k in SHARED if base["config"].get(k) != stringify(getattr(cfg, k))]
    if differ:
        raise ValueError(f"{path} was run with other {', '.join(differ)}: "
                         + "; ".join(f"{k} {base['config'].get(k)!r} there, {getattr(cfg, k)!r} here" for k in differ))
    return base


def _run_curves(cfg: StudyConfig) -> dict:
    """Discovery as the methods study in `cfg.out` ran it, then every method's dose curve on dev
    (`curves.py`); results["curves"] is added to that study's results.json and the report re-rendered."""
    t_start = time.perf_counter()
    base = methods_study(cfg)
    run = _start(cfg)
    if not NeuronLayout(run.model).same_weights(base["model"]):  # (records of older steer: the legacy hash)
        raise ValueError(f"{cfg.out}/results.json is of model weights {base['model']['fingerprint']}, "
                         f"this model's are {run.results['model']['fingerprint']}")
    stage_discovery(run)
    run.layer = base["dev"]["chosen"]["layer"]
    grid_cfg = dataclasses.replace(cfg, lape_rates=cfg.curve_lape_rates, diffmean_scales=cfg.curve_scales)
    held = {t: len(run.experts.experts[t]["layer"]) for t in cfg.targets}
    k_grid = {t: [k for k in cfg.curve_k if k <= held[t]] for t in cfg.targets}
    methods = make_methods(cfg.methods, grid_cfg, run.experts, k_grid, run.token_stats, NeuronLayout(run.model).device)
    with run.stage("curves"):
        targets = run_curves(run, methods, _eval_split(cfg, "dev"))
    keys = ("curve_k", "curve_multipliers", "curve_lape_rates", "curve_scales", "n_curve_dev", "n_generate",
            "gen_tokens", "n_heldout", "batch_size", "diffmean_layers", "threads", "dtype")
    base["curves"] = stringify({
        "config": {k: getattr(cfg, k) for k in keys}, "engine": "transformers (steer's generate, embed, perplexity)",
        "readout_layer": run.layer, "environment": _environment(), "targets": targets,
        "stages": run.stage.rows, "seconds": round(time.perf_counter() - t_start, 1)})
    atomic_write_text(Path(cfg.out) / "results.json", json.dumps(base, indent=1, ensure_ascii=False, allow_nan=False))
    write_outputs(base, run.out)
    return base


def stage_udhr(run: _Run) -> None:
    """The same distances and retrieval on the aligned UDHR paragraphs (languages it has)."""
    cfg, layer, ks = run.cfg, run.layer, run.ks
    with run.stage("udhr"):
        try:
            udhr_langs = [l for l in cfg.languages if l in set(udhr_parallel().languages)]
        except Exception as e:  # pragma: no cover - fixture missing
            udhr_langs = []
            warnings.warn(f"UDHR unavailable: {e}")
        if len(udhr_langs) < len(cfg.languages):
            log.info("udhr: %s not in the UDHR, skipped%s", ", ".join(l for l in cfg.languages if l not in udhr_langs),
                     "" if len(udhr_langs) >= 3 else f" (the UDHR stage needs 3 languages; it has {len(udhr_langs)})")
        u_results: dict = {}
        if len(udhr_langs) >= 3:
            udhr = udhr_parallel(udhr_langs)
            run.results["corpora"]["udhr"] = _corpus_entry(udhr)
            u_pre = run.embedder.parallel(udhr, [layer])[layer]
            u_results["pre"] = {"distances": distances(u_pre, None),
                                "correlation": {r: correlation(u_pre, r == "centred", cfg.n_boot, cfg.seed)
                                                for r in ("raw", "centred")}}
            for t in cfg.targets:
                if t not in udhr_langs:
                    continue
                u_post = run.embedder.parallel(udhr, [layer], run.side(t, run.expert_iv(t, ks[t])))[layer]
                u_results[t] = pre_post(u_pre, u_post, t, ks[t], u_results["pre"]["correlation"], cfg)
        run.results["udhr"] = u_results


def stage_test_k_sweep(run: _Run, test, pre: dict) -> None:
    """Every k of the grid on test: descriptive, never used for a choice."""
    layer = run.layer
    with run.stage("test k sweep"):
        sweep = []
        for t in run.cfg.targets:
            sweep.append({"target": t, "k": 0, **both(pre, t)})
            for k in run.grid[t]:
                post = run.embedder.parallel(test, [layer], run.side(t, run.expert_iv(t, k)), keep=False)[layer]
                sweep.append({"target": t, "k": k, **both(post, t)})
        run.results["test_k_sweep"] = sweep


def _finish(run: _Run, t_start: float) -> dict:
    """Stage times, the verdict; results.json, report.md and figures written to `cfg.out`."""
    results, out, cfg = run.results, run.out, run.cfg
    results["stages"] = run.stage.rows
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    cache = run.embedder.directory
    results["embedding_cache"] = str(cache) if cache else None
    gen = cfg.generation_results or (str(out / "generation.json") if (out / "generation.json").exists() else None)
    results["generation_results"] = gen
    results["verdict"] = verdict(results)
    results = stringify(results)
    write_outputs(results, out)
    _log_stage_table(results["stages"], results["total_seconds"])
    return results


# ---------------------------------------------------------------------------------------------
# Helpers

class _Stages:
    """`with stage(name):` times a stage and counts what the embedder computed in it (`rows`)."""

    def __init__(self, embedder_stats: Counter):
        self.stats, self.rows, self._embedder_stats = embedder_stats, [], embedder_stats

    @contextlib.contextmanager
    def __call__(self, name: str):
        before = Counter(self.stats)
        start = time.perf_counter()
        log.info("== stage %s ==", name)
        yield
        sec = time.perf_counter() - start
        d = Counter(self.stats)
        d.subtract(before)
        row = {"stage": name, "seconds": round(sec, 1), "computed_sentences": d["computed_sentences"],
               "computed_tokens": d["computed_tokens"], "cached_sentences": d["cached_sentences"],
               "tokens_per_s": round(d["computed_tokens"] / sec, 1) if sec > 0 and d["computed_tokens"] else None}
        self.rows.append(row)
        log.info("== stage %s: %.1f s, %s sentences (%s tokens) embedded, %s from cache ==", name, sec,
                 row["computed_sentences"], row["computed_tokens"], row["cached_sentences"])


def _environment() -> dict:
    import matplotlib
    import scipy

    env = {**environment(), "numpy": np.__version__, "scipy": scipy.__version__,
           "matplotlib": matplotlib.__version__, "steer": package_version()}
    try:
        here = Path(__file__).resolve().parent
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout
        env["git_dirty"] = bool(dirty.strip())
    except Exception:
        env["git_commit"] = None
    return env


def _discovery_corpus(cfg: StudyConfig, languages: list[str]):
    """Labelled discovery text of `languages`: the Bible's discovery split or the user's file."""
    if cfg.discovery_corpus is None:
        return bible_corpus(languages, split="discovery", n_per_language=cfg.n_discovery, seed=cfg.seed)
    return sample_per_label(load_corpus(cfg.discovery_corpus), languages, cfg.n_discovery, cfg.seed)


def _eval_split(cfg: StudyConfig, split: str):
    """The dev or test split in `cfg.languages`: the Bible's, or the eval corpus file's rows."""
    n = cfg.n_dev if split == "dev" else cfg.n_test
    if cfg.eval_corpus is None:
        return bible_parallel(cfg.languages, split=split, n=n, seed=cfg.seed)
    dev, test = split_parallel(parallel_from_file(cfg.eval_corpus), cfg.n_dev, cfg.n_test, cfg.seed)
    par = dev if split == "dev" else test
    if len(par) < n:
        log.info("%s: %s rows of %s (n_%s=%s)", split, len(par), cfg.eval_corpus, split, n)
    return par.select(cfg.languages)


def _corpus_entry(obj) -> dict:
    return {"hash": obj.hash(), "n": len(obj), "description": stringify(obj.description)}


def _subset(par, rows: list[int]):
    from steer.core.corpus import Parallel

    return Parallel({c: [t[i] for i in rows] for c, t in par.texts.items()}, [par.keys[i] for i in rows],
                    {**par.description, "subset_rows": len(rows)})


def _experts_summary(experts: ExpertSet, scores, cfg: StudyConfig, splits) -> dict:
    out = {"recipe": cfg.recipe, "by": RECIPES[cfg.recipe][0], "value": RECIPES[cfg.recipe][1],
           "min_auroc": RECIPES[cfg.recipe][2], "pooling": cfg.pooling,
           "splits": [s.to_json() for s in splits], "targets": {}}
    sets = {}
    for t in cfg.targets:
        e = experts.experts[t]
        i = scores.index(t)
        n_pass = int((scores.stats["auroc"][i] > 0.5).sum())
        rows = [[int(l), int(u), float(v), float(s), float(o)] for l, u, v, s, o in
                zip(e["layer"], e["unit"], e["value"], e["score"], e["other"])]
        sets[t] = {(r[0], r[1]) for r in rows}
        out["targets"][t] = {
            "n_selected": len(rows), "n_auroc_above_half": n_pass,
            "n_pos": int(scores.n_pos[i]), "n_neg": int(scores.n_neg[i]),
            "columns": ["layer", "unit", "value", "score", "other_score"], "neurons": rows,
            "layer_histogram": dict(sorted(Counter(r[0] for r in rows).items())),
        }
    out["overlap"] = {f"{a}|{b}": len(sets[a] & sets[b]) for i, a in enumerate(cfg.targets)
                      for b in cfg.targets[i + 1:]}
    return out


def _log_plan(cfg: StudyConfig, negatives: list[str]) -> None:
    """What the run will push through the model, in sentences per stage (before caching)."""
    n_lang, n_t = len(cfg.languages), len(cfg.targets)
    n_k = len(cfg.k_grid)
    plan = {
        "discovery": (n_t + len(negatives)) * cfg.n_discovery,
        "dev sweep": (1 + n_t * n_k) * cfg.n_dev * n_lang,
        "test": (1 + n_t) * cfg.n_test * n_lang,
        "random control": n_t * cfg.control_seeds * cfg.n_control * n_lang,
        "paraphrases": (1 + n_t) * cfg.n_paraphrase * 2 * 4 if cfg.paraphrases else 0,
        "udhr": (1 + n_t) * 50 * n_lang if cfg.udhr else 0,
        "test k sweep": n_t * n_k * cfg.n_test * n_lang if cfg.test_k_sweep else 0,
    }
    log.info("plan (sentences through the model, before caching): %s; total %s",
             ", ".join(f"{k} {v:,}" for k, v in plan.items() if v), f"{sum(plan.values()):,}")


def _log_stage_table(stages: list[dict], total: float) -> None:
    lines = ["stage times:"]
    for s in stages:
        tok = s.get("computed_tokens")
        extra = f"  {tok} tokens, {s.get('tokens_per_s')} tok/s" if tok else ""
        lines.append(f"  {s['stage']:<16} {s['seconds']:>8.1f} s{extra}")
    lines.append(f"  {'total':<16} {total:>8.1f} s")
    log.info("\n".join(lines))
