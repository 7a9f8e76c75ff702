"""Dose curves (`steer study --curves`): every method across its strengths, on the dev split only.

A methods study (`--methods`, one dev-chosen strength per method, measured on test) is extended
in its own folder: the curves run repeats its discovery (same corpus, seed and recipe: the same
experts and token statistics) and adds `results["curves"]`; the report gains its sections. Doses,
weakest first, per target (`doses`):

    experts   k in curve_k at 1x the experts' values, then the largest k at each curve_multiplier
    random    the same k and multipliers on random neurons (the control's first seed)
    lape      top_rate in curve_lape_rates (the neurons it selects)
    diffmean  scale in curve_scales at each layer of diffmean_layers (one curve per layer)

At each dose (`measure`; the unsteered model is dose 0):
    forcing       share of n_generate BOS-prompted samples py3langid assigns to the target among
                  the study's languages (temperature 1, top-p .9), Wilson 95 % CI
    repetition    seq-rep-4 of those samples (Welleck et al. 2020): 1 - distinct 4-grams / 4-grams
                  of a sample's token ids, averaged over samples of at least 4 tokens
    ppl ratio     perplexity of n_heldout dev sentences of the target, steered at every position,
                  over the unsteered one (the curves never read the test split)
    retrieval     mean top-1 of settings (a) and (b) on n_curve_dev dev verses of every language
                  (one intervened model embeds queries and candidates: the study's setting)
    perturbation  the relative norm of the change written into the residual stream
                  (`steer.experiments.perturbation`), on the same dev sentences as the perplexity

Every measure runs all doses of a method in one per-row batch (`over_doses`: each row carries its
dose's intervention, `InterventionSets`), not one pass per dose. Comparisons (`matched`): at
equal units (experts, random and LAPE, at 1x, interpolated in log neurons) and at equal
perturbation (every curve, interpolated in log relative norm), each only inside a curve's range.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from steer.core.intervention import Intervention
from steer.engine.embed import embed
from steer.engine.generation import generate_ids, perplexity
from steer.experiments.language_sweep import identify_languages, outcome_row
from steer.experiments.perturbation import perturbation
from steer.experiments.study.measures import setting_scores

MEASURES = ("fraction", "ppl_ratio", "repetition", "a", "b", "perturbation")


def doses(method, target: str, cfg) -> list[dict]:
    """The dose settings of one method and target, weakest first (see the module docstring)."""
    grid = method.grid(target)
    if method.name in ("experts", "random") and grid:
        return grid + [{**grid[-1], "multiplier": m} for m in cfg.curve_multipliers]
    if method.name == "diffmean":
        return sorted(grid, key=lambda s: (s["layer"], s["scale"]))
    return grid


def curve_of(method: str, setting: dict) -> str:
    """The curve a dose lies on: the method, and DiffMean's layer."""
    return f"diffmean L{setting['layer']}" if method == "diffmean" else method


def is_chosen(point: dict, chosen: dict, target: str) -> bool:
    """Whether a curve's point is the methods study's dev-chosen setting of its method (`chosen`:
    results["methods"]["chosen"]; at 1x)."""
    c = chosen.get(point["method"], {}).get(target)
    return c is not None and "multiplier" not in point["setting"] and all(
        point["setting"].get(k) == v for k, v in c.items() if k in ("k", "top_rate", "layer", "scale"))


def over_doses(call: Callable, items: Sequence, ivs: Sequence[Intervention | None], together: bool = True) -> list[list]:
    """`call(items, intervention)` (one result per item) for every dose's intervention, split per dose:
    in one call whose rows carry their dose's intervention (`together`: per-row sets), or one call
    per dose. Both give the same results (tested); together is the fast one."""
    if together:
        out = call([x for _ in ivs for x in items], [iv for iv in ivs for _ in items])
        return [list(out[d * len(items):(d + 1) * len(items)]) for d in range(len(ivs))]
    return [list(call(list(items), iv)) for iv in ivs]


def seq_rep(ids: Sequence[int], n: int = 4) -> float | None:
    """1 - distinct n-grams / n-grams of one sample's token ids (None below n tokens)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


class Sweep:
    """The measures of a list of doses (interventions; None = unsteered) on one target's dev data."""

    def __init__(self, model, tok, cfg, layer: int, dev_texts: dict[str, list[str]], heldout: list[str],
                 together: bool = True, sample: bool = True):
        self.model, self.tok, self.cfg, self.layer = model, tok, cfg, layer
        self.dev, self.heldout, self.together, self.sample = dev_texts, heldout, together, sample

    def generations(self, ivs) -> list[list[list[int]]]:
        cfg = self.cfg

        def call(prompts, iv):
            return generate_ids(self.model, self.tok, prompts, intervention=iv, max_new_tokens=cfg.gen_tokens,
                                do_sample=self.sample, temperature=1.0, top_p=0.9, seed=cfg.seed,
                                batch_size=cfg.batch_size)
        return over_doses(call, [""] * cfg.n_generate, ivs, self.together)

    def embeddings(self, ivs) -> list[dict[str, torch.Tensor]]:
        langs = list(self.dev)
        texts = [t for l in langs for t in self.dev[l]]
        n = len(self.dev[langs[0]])

        def call(items, iv):
            return embed(self.model, self.tok, items, layers=[self.layer], batch_size=self.cfg.batch_size,
                         skip_bos=self.cfg.skip_bos, progress=False, intervention=iv)[self.layer]
        per_dose = over_doses(call, texts, ivs, self.together)
        return [{l: torch.stack(e[j * n:(j + 1) * n]) for j, l in enumerate(langs)} for e in per_dose]

    def nll(self, ivs) -> list[float]:
        """Each dose's mean negative log-likelihood of the held-out sentences (steered at every position)."""
        return self._token_means(lambda items, iv: perplexity(
            self.model, self.tok, items, intervention=iv, batch_size=self.cfg.batch_size, per_text=True),
            Intervention.every_position(ivs), "nll_sums")

    def perturbations(self, ivs) -> list[float]:
        """Each dose's perturbation size on the held-out sentences (`steer.experiments.perturbation`)."""
        return self._token_means(lambda items, iv: perturbation(
            self.model, self.tok, items, iv, batch_size=self.cfg.batch_size), ivs, "sums")

    def _token_means(self, measure, ivs, key: str) -> list[float]:
        """Per dose, the token-weighted mean of a per-text measure (`measure(texts, intervention)`
        -> {key: per-text sums, "counts": per-text tokens}) over the held-out sentences."""
        def call(items, iv):
            r = measure(items, iv)
            return list(zip(r[key], r["counts"]))
        return [sum(s for s, _ in d) / sum(c for _, c in d) for d in over_doses(call, self.heldout, ivs, self.together)]

    def measure(self, target: str, ivs, base: dict | None = None) -> list[dict]:
        """The measures of every dose (see the module docstring); `base`: the unsteered row
        (its nll, for the ratio)."""
        cfg = self.cfg
        gens = self.generations(ivs)
        nll = self.nll(ivs)
        embs = self.embeddings(ivs)
        size = self.perturbations(ivs)
        rows = []
        for g, l, e, p in zip(gens, nll, embs, size):
            texts = [self.tok.decode(r, skip_special_tokens=True) for r in g]
            langs = identify_languages(texts, cfg.languages)
            rep = [x for x in (seq_rep(r) for r in g) if x is not None]
            row = outcome_row(target, langs, math.exp(l), base["ppl"] if base else None)
            rows.append({**row, "nll": l, "repetition": float(np.mean(rep)) if rep else None,
                         **setting_scores(e, target, cfg.center), "perturbation": p, "samples": texts[:2]})
        return rows


def matched(points: list[dict], x: str, levels: Sequence[float], measures=MEASURES) -> list[dict | None]:
    """`measures` of a curve (its `points`, each with `x`) at each level of `x`, by linear
    interpolation in log x between the two nearest points (sorted by x; the perplexity ratio in log
    too: it spans orders of magnitude); None outside the curve's range."""
    pts = sorted((p for p in points if p.get(x) and p[x] > 0), key=lambda p: p[x])
    out: list[dict | None] = []
    for level in levels:
        if not pts or not pts[0][x] <= level <= pts[-1][x]:
            out.append(None)
            continue
        lx = [math.log(p[x]) for p in pts]
        row = {x: level}
        for m in measures:
            ys = [p.get(m) for p in pts]
            if any(y is None for y in ys):
                row[m] = None
            elif m == "ppl_ratio":
                row[m] = math.exp(float(np.interp(math.log(level), lx, [math.log(y) for y in ys])))
            else:
                row[m] = float(np.interp(math.log(level), lx, ys))
        out.append(row)
    return out


def levels(values: Sequence[float]) -> list[float]:
    """The levels 1, 2, 3, 5, 7 x 10^e (..., 0.05, 0.07, 0.1, 0.2, ...) inside the range of the
    positive `values`: where the curves are compared at matched perturbation."""
    values = [v for v in values if v and v > 0]
    if not values:
        return []
    lo, hi = min(values), max(values)
    return [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 3, 5, 7) if lo <= m * 10.0 ** e <= hi]


def pareto(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both forcing (higher) and ppl ratio (lower)."""
    keep = []
    for i, p in enumerate(points):
        if not any(q["fraction"] >= p["fraction"] and q["ppl_ratio"] <= p["ppl_ratio"]
                   and (q["fraction"] > p["fraction"] or q["ppl_ratio"] < p["ppl_ratio"])
                   for j, q in enumerate(points) if j != i):
            keep.append(i)
    return keep


def run_curves(run, methods: dict, dev, together: bool = True) -> dict:
    """The curves of every method and target (results["curves"]'s "targets")."""
    cfg = run.cfg
    sub = {l: list(dev.texts[l][: cfg.n_curve_dev]) for l in dev.languages}
    out: dict = {}
    for t in cfg.targets:
        sweep = Sweep(run.model, run.tok, cfg, run.layer, sub, list(dev.texts[t][-cfg.n_heldout:]), together)
        base = sweep.measure(t, [None])[0]
        base["ppl_ratio"] = 1.0
        entry: dict = {"base": base, "curves": {}}
        for name, method in tqdm(methods.items(), desc=f"curves {t}", disable=not cfg.progress):
            settings = doses(method, t, cfg)
            if not settings:
                continue
            ivs = [method.build(t, s) for s in settings]
            for s, iv, row in zip(settings, ivs, sweep.measure(t, ivs, base)):
                entry["curves"].setdefault(curve_of(name, s), []).append(
                    {"method": name, "setting": s, "units": len(iv) if iv.site != "residual" else None, **row})
        out[t] = entry
    return out
