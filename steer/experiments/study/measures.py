"""Retrieval, distance and correlation summaries of embeddings, pre and post (JSON-able dicts).

Retrieval is top-1 cross-lingual retrieval of aligned sentences, on raw or per-language
mean-centred embeddings; distances are cosine on raw embeddings (`steer.experiments.analysis`); CIs are
bootstrap over sentences (paired for pre/post) or over language pairs (correlations).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from steer.experiments import analysis as A
from steer.experiments.study.config import StudyConfig


def _key(a: str, b: str, sep: str = "->") -> str:
    return f"{a}{sep}{b}"


def _represent(embs: dict[str, torch.Tensor], centred: bool) -> dict[str, torch.Tensor]:
    return A.center(embs) if centred else embs


def _hits(embs: dict[str, torch.Tensor], pairs) -> dict[tuple[str, str], torch.Tensor]:
    """Per ordered pair, [N] float64 of top-1 hits (1 if the translation ranks first)."""
    return {p: (r["rank"] == 1).double() for p, r in A.retrieval_matrix(embs, pairs).items()}


def setting_scores(embs: dict[str, torch.Tensor], target: str, centred: bool) -> dict[str, float]:
    """Mean top-1 over the pairs of settings (a) query = target and (b) neither is the target."""
    pa, pb = A.setting_pairs(list(embs), target)
    hits = _hits(_represent(embs, centred), pa + pb)
    a = float(torch.stack([hits[p] for p in pa]).mean())
    b = float(torch.stack([hits[p] for p in pb]).mean()) if pb else float("nan")
    return {"a": a, "b": b}


def criterion_value(scores: dict[str, float], criterion: str) -> float:
    if criterion == "a":
        return scores["a"]
    return (scores["a"] + scores["b"]) / 2 if not math.isnan(scores["b"]) else scores["a"]


def _ci(triple) -> list[float]:
    return [float(x) for x in triple]


def retrieval_block(pre: dict, post: dict, target: str, centred: bool, n_boot: int, seed: int) -> dict:
    """Top-1 pre/post for every ordered pair and for settings (a) and (b), with bootstrap CIs.

    CIs resample sentences (rows); a setting's value per row is its mean hit over the setting's
    pairs, so one resample draws the same verses for every pair and for pre and post (paired).
    """
    langs = list(pre)
    pairs = [(a, b) for a in langs for b in langs if a != b]
    hp, hq = _hits(_represent(pre, centred), pairs), _hits(_represent(post, centred), pairs)
    out = {"pairs": {}, "settings": {}, "by_language": {}}
    for p in pairs:
        out["pairs"][_key(*p)] = {
            "pre": _ci(A.bootstrap_ci(hp[p], n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(hq[p], n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(hp[p], hq[p], n_boot=n_boot, seed=seed)),
        }
    pa, pb = A.setting_pairs(langs, target)
    others = [l for l in langs if l != target]
    groups = {"a": pa, "b": pb,
              "a_reverse": [(b, a) for a, b in pa]}  # query another language, candidate the target
    for name, group in groups.items():
        if not group:
            continue
        vp = torch.stack([hp[p] for p in group]).mean(0)
        vq = torch.stack([hq[p] for p in group]).mean(0)
        out["settings"][name] = {
            "pairs": len(group),
            "pre": _ci(A.bootstrap_ci(vp, n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(vq, n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(vp, vq, n_boot=n_boot, seed=seed)),
        }
    for lang in others:  # as a query in setting (b): mean over the other non-target candidates
        group = [(lang, b) for b in others if b != lang]
        if not group:
            continue
        vp = torch.stack([hp[p] for p in group]).mean(0)
        vq = torch.stack([hq[p] for p in group]).mean(0)
        out["by_language"][lang] = {
            "pre": _ci(A.bootstrap_ci(vp, n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(vq, n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(vp, vq, n_boot=n_boot, seed=seed)),
        }
    return out


def distances(embs: dict, target: str | None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = A.distance_report({l: e.double() for l, e in embs.items()}, target)
    return stringify(rep)


def stringify(obj):
    """JSON-able copy: tuple keys "a|b", tensors/numpy to lists/floats, NaN/inf to None."""
    if isinstance(obj, dict):
        return {("|".join(k) if isinstance(k, tuple) else str(k)): stringify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [stringify(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return stringify(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return stringify(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def pre_post(pre: dict, post: dict, target: str, k: int, pre_correlation: dict, cfg) -> dict:
    """Retrieval, distances and correlations of one target's intervention against the unsteered
    embeddings (raw and centred); the unsteered correlations are computed once per corpus."""
    return {
        "k": k,
        "retrieval": {r: retrieval_block(pre, post, target, r == "centred", cfg.n_boot, cfg.seed)
                      for r in ("raw", "centred")},
        "distances": {"pre": distances(pre, target), "post": distances(post, target)},
        "correlation": {r: {"pre": pre_correlation[r], "post": correlation(post, r == "centred", cfg.n_boot, cfg.seed)}
                        for r in ("raw", "centred")},
    }


def correlation(embs: dict, centred: bool, n_boot: int, seed: int) -> dict:
    """Pearson r (bootstrap CI over language pairs) between top-1 of each ordered pair and the
    cosine distance of its two languages: language means (the paper's) and mean sentence-level."""
    langs = list(embs)
    pairs = [(a, b) for a in langs for b in langs if a != b]
    if len(pairs) < 3:
        return {}
    hits = _hits(_represent(embs, centred), pairs)
    rep = distances(embs, None)
    x = [float(hits[p].mean()) for p in pairs]
    out = {"n_pairs": len(pairs)}
    for name, table in (("mean_level", rep["pairwise"]), ("sentence_level", rep["sentence_pairwise"])):
        y = [table.get(f"{a}|{b}", table.get(f"{b}|{a}")) for a, b in pairs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out[name] = stringify(_ci(A.pearson_ci(x, y, n_boot=n_boot, seed=seed)))
            except ValueError:
                out[name] = None
    return out


def both(embs, t) -> dict:
    return {"raw": setting_scores(embs, t, False), "centred": setting_scores(embs, t, True)}


def control_summary(embs: dict, t: str) -> dict:
    """Setting means (raw and centred) and distances of one condition on the control subset."""
    rep = distances(embs, t)
    return {"retrieval": both(embs, t), "mean_pairwise": rep["mean_pairwise"],
            "mean_sentence_pairwise": rep["mean_sentence_pairwise"],
            "mean_to_target": float(np.mean([v for l, v in rep["to_target"].items() if l != t]))}


def seed_stats(seeds: list[dict]) -> dict:
    def ms(values):
        v = np.asarray(values, dtype=np.float64)
        return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]

    out = {"retrieval": {r: {s: ms([x["retrieval"][r][s] for x in seeds]) for s in ("a", "b")}
                         for r in ("raw", "centred")}}
    for key in ("mean_pairwise", "mean_sentence_pairwise", "mean_to_target"):
        out[key] = ms([x[key] for x in seeds])
    out["n_seeds"] = len(seeds)
    return out


def paraphrase_entry(base: dict, post: dict, q: str, c: str, cfg: StudyConfig) -> dict:
    out = {"columns": [q, c]}
    for rep in ("raw", "centred"):
        def rt(qe, ce):
            if rep == "centred":
                qe, ce = qe.double() - qe.double().mean(0), ce.double() - ce.double().mean(0)
            return (A.retrieval(qe, ce)["rank"] == 1).double()
        h_pre, h_post, h_mixed = rt(base[q], base[c]), rt(post[q], post[c]), rt(base[q], post[c])
        out[rep] = {
            "pre": _ci(A.bootstrap_ci(h_pre, n_boot=cfg.n_boot, seed=cfg.seed)),
            "post": _ci(A.bootstrap_ci(h_post, n_boot=cfg.n_boot, seed=cfg.seed)),
            "mixed": _ci(A.bootstrap_ci(h_mixed, n_boot=cfg.n_boot, seed=cfg.seed)),
            "delta_post": _ci(A.paired_bootstrap(h_pre, h_post, n_boot=cfg.n_boot, seed=cfg.seed)),
            "delta_mixed": _ci(A.paired_bootstrap(h_pre, h_mixed, n_boot=cfg.n_boot, seed=cfg.seed)),
        }
    return out
