"""The language-steering k sweep: the seed paper's generation experiment, and its figure.

`language_steering`: for each target language and k, `n_samples` continuations of a BOS prompt
with the language's top-k experts forced, the fraction that py3langid (restricted to the study's
languages) calls the target language, with a Wilson 95% interval; the perplexity of held-out
text of that language (Bible test verses) with the same steering at every position; and a
control that forces the same values on k random neurons, none of them among the language's
experts (the whole set; `steer.core.experts.random_control`), over several seeds (mean and sd).
`plot_language_steering` draws it. `steer generate --sweep` (`generate_cli`) runs it.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import scipy.stats
from torch import nn

from steer.core.artifacts import atomic_write_text
from steer.core.experts import random_control
from steer.core.intervention import POSITIONS
from steer.core.metrics import check_k
from steer.engine.backends import attached
from steer.engine.generation import generate, perplexity
from steer.experiments.figures import save_figure

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Statistics and language identification


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (no continuity correction; scipy's
    `binomtest(...).proportion_ci(method="wilson")`): (nan, nan) for n <= 0, ValueError for
    successes outside [0, n], and exactly 0 (1) at the lower (upper) end when none (all) succeed."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, {n}]")
    ci = scipy.stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    lo = 0.0 if successes == 0 else max(0.0, float(ci.low))  # exact ends, not rounding noise
    hi = 1.0 if successes == n else min(1.0, float(ci.high))
    return (lo, hi)


_IDENTIFIERS: dict[tuple[str, ...], object] = {}


def identify_languages(texts: Sequence[str], languages: Sequence[str]) -> list[str]:
    """py3langid's language of every text, restricted to `languages`; "" for an empty text.

    Uses its own `LanguageIdentifier` per language set (py3langid's module-level
    `set_languages` would change every other user's classifier).
    """
    key = tuple(sorted(languages))
    if key not in _IDENTIFIERS:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE)
        ident.set_languages(list(key))
        _IDENTIFIERS[key] = ident
    ident = _IDENTIFIERS[key]
    return [ident.classify(t)[0] if t.strip() else "" for t in texts]


# ---------------------------------------------------------------------------------------------
# The language-steering sweep


def _heldout(languages: Sequence[str], n: int, seed: int) -> tuple[dict[str, list[str]], dict]:
    from steer.core.packaged_corpora import bible_parallel

    par = bible_parallel(list(languages), split="test", n=n, seed=seed)
    return {lang: list(par.texts[lang]) for lang in languages}, par.description


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


def _fraction(langs: Sequence[str], lang: str) -> dict:
    """Hits of `lang` among the identified languages, their fraction and its Wilson 95% interval."""
    hits = sum(l == lang for l in langs)
    lo, hi = wilson_interval(hits, len(langs))
    return {"n": len(langs), "hits": hits, "fraction": hits / len(langs), "ci95": [lo, hi]}


@dataclass
class Probe:
    """Language steering in generation, for any intervention: BOS-prompted samples identified by
    language, and the perplexity of held-out text with the intervention forced at every position."""

    model: nn.Module
    tok: object
    classify: Callable[[Sequence[str], Sequence[str]], list[str]]
    study: list[str]
    heldout: dict[str, list[str]] | None
    gen: dict
    seed: int
    ppl_batch_size: int

    def sample(self, iv, n):
        """n BOS-prompted samples with `iv` forced (the same draws for every k): texts, languages, seconds."""
        t = time.perf_counter()
        texts = generate(self.model, self.tok, [""] * n, intervention=iv, seed=self.seed, **self.gen)
        langs = self.classify(texts, self.study)
        return texts, langs, time.perf_counter() - t

    def ppl(self, lang, iv):
        """Perplexity of `lang`'s held-out text with `iv` forced at every position (None without
        held-out text)."""
        if self.heldout is None:
            return None
        iv = None if iv is None else iv.with_positions("all")
        return perplexity(self.model, self.tok, self.heldout[lang], intervention=iv,
                          batch_size=self.ppl_batch_size)["ppl"]

    def outcome(self, lang: str, iv, n: int, base_ppl: float | None = None):
        """(row, texts, seconds): `lang`'s fraction of n samples with `iv` forced (Wilson CI), the
        languages identified, the held-out perplexity and its ratio to `base_ppl`."""
        texts, langs, secs = self.sample(iv, n)
        return outcome_row(lang, langs, self.ppl(lang, iv), base_ppl), texts, secs


def outcome_row(lang: str, langs: Sequence[str], ppl: float | None, base_ppl: float | None) -> dict:
    """One steering outcome: `lang`'s share of the identified `langs` (Wilson CI), the languages
    seen, the held-out perplexity and its ratio to the unsteered one."""
    return {**_fraction(langs, lang), "identified": dict(Counter(langs)), "ppl": ppl,
            "ppl_ratio": None if ppl is None or not base_ppl else ppl / base_ppl}


@dataclass
class _Sweep(Probe):
    """A probe with what every (language, k) of one sweep shares: the experts, positions, strength."""

    experts: object = None
    positions: str = "all"
    strength: float = 1.0

    def control(self, lang: str, k: int, random_seeds, n_random: int, random_ppl: bool) -> dict | None:
        """The random-neuron control of (lang, k): per seed, and mean and sd over seeds."""
        ctrl = []
        for rs in random_seeds:
            riv, _ = random_control(self.experts, lang, k, rs, positions=self.positions, strength=self.strength)
            rt, rl, _ = self.sample(riv, n_random)
            rp = self.ppl(lang, riv) if random_ppl else None
            ctrl.append({"seed": rs, **_fraction(rl, lang), "identified": dict(Counter(rl)), "ppl": rp})
        if not ctrl:
            return None
        fm, fs = _mean_sd([c["fraction"] for c in ctrl])
        pm, ps = (None, None) if self.heldout is None or not random_ppl else _mean_sd([c["ppl"] for c in ctrl])
        return {"fraction_mean": fm, "fraction_sd": fs, "ppl_mean": pm, "ppl_sd": ps, "seeds": ctrl}


def _check_sweep(experts, model, languages, ks, study, positions) -> list[int]:
    """Every argument checked before any sample is drawn; the k values, 0 (the reference) included."""
    missing = [l for l in languages if l not in experts.concepts]
    if missing:
        raise KeyError(f"no experts for {missing}; the set has {experts.concepts}")
    outside = [l for l in languages if l not in study]
    if outside:
        raise ValueError(f"target languages {outside} are not among the identified languages {study}")
    ks = sorted(set(check_k(k, allow_zero=True) for k in ks) | {0})  # k=0, the unsteered reference, always
    for lang in languages:  # before any sample is drawn
        experts.check_k(lang, ks[-1], allow_zero=True)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
    experts.check(model)
    return ks


def language_steering(model: nn.Module, tok, experts, languages: Sequence[str], ks: Sequence[int], *,
                      n_samples: int = 100, max_new_tokens: int = 48, temperature: float = 1.0,
                      top_p: float = 0.9, seed: int = 0, heldout: dict[str, list[str]] | int | None = 50,
                      study_languages: Sequence[str] | None = None, random_seeds: Sequence[int] = (0, 1, 2),
                      random_samples: int | None = None, positions: str = "all", strength: float = 1.0,
                      batch_size: int = 16, ppl_batch_size: int = 8, keep_samples: int = 5,
                      random_ppl: bool = True, checkpoint: str | Path | None = None,
                      classify: Callable[[Sequence[str], Sequence[str]], list[str]] | None = None,
                      log: Callable[[str], None] | None = None) -> dict:
    """The k sweep: target-language fraction of BOS-prompted samples and held-out perplexity.

    For each target language in `languages` and each k in `ks` (k=0: no steering, generated once
    and shared by all targets): `n_samples` sampled continuations of a BOS prompt (temperature,
    nucleus top_p, seeds fixed by `seed`, so every k draws the same random numbers) with the
    target's first k experts forced at `positions`; the fraction that `classify` (default
    py3langid restricted to `study_languages`, default the expert set's concepts) assigns to the
    target, with a Wilson 95% interval; the perplexity of held-out text of the target with the
    same experts forced at every position. Control, for every k > 0 and each of `random_seeds`:
    the same values on k random neurons, none of them among the language's experts (the whole
    set; `random_control`), `random_samples` samples each (default n_samples);
    mean and sd over seeds (with their perplexities unless `random_ppl` is False).

    checkpoint: a JSON file rewritten with the results so far after every (language, k).
    log: called with a line of progress after every (language, k) (default: the `steer` logger).
    heldout: {language: texts}, or an int n = that many Bible test verses per language
    (aligned across languages), or None (no perplexity).
    """
    classify = classify or identify_languages
    say = log or logger.info
    study = list(study_languages or experts.concepts)
    ks = _check_sweep(experts, model, languages, ks, study, positions)
    heldout_desc = None
    if isinstance(heldout, int):
        heldout, heldout_desc = _heldout(languages, heldout, seed)
    elif heldout is not None:
        heldout_desc = {"source": "given", "n": {l: len(heldout[l]) for l in languages}}
    n_random = n_samples if random_samples is None else random_samples
    gen = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
               batch_size=batch_size)
    start = time.perf_counter()
    sw = _Sweep(model, tok, classify, study, heldout, gen, seed, ppl_batch_size, experts, positions, strength)
    base_texts, base_langs, secs = sw.sample(None, n_samples)
    say(f"k=0 (no steering): {n_samples} samples in {secs:.0f} s; identified {dict(Counter(base_langs))}")
    base_ppl = {lang: sw.ppl(lang, None) for lang in languages}
    results: dict[str, list[dict]] = {}
    samples: dict[str, dict[str, list[str]]] = {}
    for lang in languages:
        rows = []
        samples[lang] = {}
        for k in ks:
            if k == 0:
                row = {"k": 0, **outcome_row(lang, base_langs, base_ppl[lang], base_ppl[lang]), "random": None}
                samples[lang]["0"] = base_texts[:keep_samples]
                rows.append(row)
                continue
            iv = experts.intervention(lang, k=k, positions=positions, strength=strength)
            outcome, texts, secs = sw.outcome(lang, iv, n_samples, base_ppl[lang])
            row = {"k": k, **outcome}
            samples[lang][str(k)] = texts[:keep_samples]
            row["random"] = sw.control(lang, k, random_seeds, n_random, random_ppl)
            rows.append(row)
            say(_progress(lang, row, _fraction(base_langs, lang)["fraction"], base_ppl[lang], secs, n_samples))
            if checkpoint is not None:
                atomic_write_text(checkpoint, json.dumps(
                    {"partial": True, "results": {**results, lang: rows}, "samples": samples}, ensure_ascii=False))
        results[lang] = rows
    settings = _settings(model, experts, languages, study, ks, n_samples, n_random, random_seeds, random_ppl,
                         max_new_tokens, temperature, top_p, seed, positions, strength, heldout_desc, classify)
    return {"settings": settings, "results": results, "samples": samples,
            "seconds": round(time.perf_counter() - start, 1)}


def _progress(lang: str, row: dict, base_fraction: float, base_ppl, secs: float, n_samples: int) -> str:
    """The progress line of one (language, k)."""
    k, p, rnd = row["k"], row["ppl"], row["random"]
    return (f"{lang} k={k}: {row['fraction']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] "
            f"(k=0: {base_fraction:.2f}); ppl {p if p is None else round(p, 1)}"
            f" (k=0: {base_ppl if p is None else round(base_ppl, 1)})"
            + ("" if rnd is None else f"; random {rnd['fraction_mean']:.2f}±{rnd['fraction_sd']:.2f}")
            + f"; {secs:.0f} s per {n_samples} samples")


def _settings(model, experts, languages, study, ks, n_samples, n_random, random_seeds, random_ppl,
              max_new_tokens, temperature, top_p, seed, positions, strength, heldout_desc, classify) -> dict:
    """The sweep's settings, as recorded in its results."""
    return {
        "model": getattr(model.config, "name_or_path", ""), "architecture": type(model).__name__,
        "patched": getattr(attached(model), "kind", None) == "fused",
        "languages": list(languages), "study_languages": study, "ks": ks, "n_samples": n_samples,
        "random_samples": n_random, "random_seeds": list(random_seeds), "random_ppl": random_ppl,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": None, "seed": seed, "prompt": "BOS only",
        "positions_generation": positions, "positions_perplexity": "all", "strength": strength,
        "experts": {"model": experts.meta.get("model"), "selection": experts.meta.get("selection"),
                    "corpus": experts.meta.get("corpus"), "concepts": experts.concepts},
        "heldout": heldout_desc,
        "classifier": "py3langid restricted to study_languages" if classify is identify_languages else "custom",
    }


def plot_language_steering(result: dict, path) -> Path:
    """Target-language fraction (Wilson 95% CI) and held-out perplexity against k, per language.

    Random-neuron control: fraction mean ± sd over seeds (clipped to [0, 1]); perplexity as the
    geometric mean over seeds with the seeds' min-max range (a log axis: mean ± sd would cross 0).
    """
    from matplotlib.figure import Figure  # renders with Agg; no pyplot global state

    langs = list(result["results"])
    fig = Figure(figsize=(3.6 * len(langs), 6.6))
    axes = fig.subplots(2, len(langs), squeeze=False, sharex="col")
    for j, lang in enumerate(langs):
        rows = result["results"][lang]
        ks = [r["k"] for r in rows]
        xs = [max(k, 0.5) for k in ks]  # log axis: k=0 drawn at 0.5
        ax = axes[0, j]
        f = [r["fraction"] for r in rows]
        lo = [r["fraction"] - r["ci95"][0] for r in rows]
        hi = [r["ci95"][1] - r["fraction"] for r in rows]
        ax.errorbar(xs, f, yerr=[lo, hi], marker="o", capsize=3, label="experts (Wilson 95% CI)")
        rnd = [(x, r["random"]) for x, r in zip(xs, rows) if r["random"]]
        if rnd:
            m = [r["fraction_mean"] for _, r in rnd]
            sd = [r["fraction_sd"] for _, r in rnd]
            ax.errorbar([x for x, _ in rnd], m, yerr=[[min(a, b) for a, b in zip(sd, m)], [min(a, 1 - b) for a, b in zip(sd, m)]],
                        marker="s", ls="--", capsize=3, color="gray", label="random neurons (mean ± sd)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"target {lang}")
        if j == 0:
            ax.set_ylabel("fraction identified as target")
        ax = axes[1, j]
        if all(r["ppl"] is not None for r in rows):
            ax.plot(xs, [r["ppl"] for r in rows], marker="o", label="experts")
            seeds = [(x, [s["ppl"] for s in r["seeds"]]) for x, r in rnd]
            if seeds and all(p is not None for _, ps in seeds for p in ps):
                gm = [math.exp(sum(map(math.log, ps)) / len(ps)) for _, ps in seeds]
                ax.errorbar([x for x, _ in seeds], gm, yerr=[[g - min(ps) for g, (_, ps) in zip(gm, seeds)],
                                                            [max(ps) - g for g, (_, ps) in zip(gm, seeds)]],
                            marker="s", ls="--", capsize=3, color="gray", label="random (geo. mean, min-max)")
            ax.set_yscale("log")
        if j == 0:
            ax.set_ylabel("held-out perplexity of the target language")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (experts forced; 0 = none)")
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    labels = [l for ax in axes[:, 0] for l in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    s = result.get("settings", {})
    fig.suptitle(f"{s.get('model', '')}: BOS-prompted samples (n={s.get('n_samples')}, T={s.get('temperature')}, "
                 f"top-p={s.get('top_p')}, {s.get('max_new_tokens')} new tokens), py3langid", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path)
