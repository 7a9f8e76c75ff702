"""How steering moves the embedding space: distances, retrieval, statistics and projections.

The measures are those of Sundar et al. (ACL 2025), "Steering into New Embedding Spaces",
computed before and after an intervention. Embeddings come as `dict[lang, Tensor[N, D]]` with
rows aligned across languages (row i of every language is a translation of one sentence), and
are cast to float64 here. Cosine distance is d = 1 - cos. Nothing is centred unless the caller
applies `center` (per-language mean-centring, which removes a language's constant offset).

Choices the paper leaves open, fixed here:
- the medoid of the space is the language mean embedding, among all languages', with the least
  summed cosine distance to the other means (first in dict order on a tie);
- retrieval ranks ties pessimistically: a candidate scoring as high as the correct one ranks
  ahead of it, so a collapsed space (all embeddings equal) scores top-1 = 0, not chance;
- ties are closeness within `TIE_TOL` (1e-6), not float equality: a recomputed similarity may
  differ by a few ulp between CPUs (BLAS rounding), and no rank or medoid may follow that;
- confidence intervals are percentile bootstraps over sentences (or over language pairs for
  the correlation), 95 % by default: scipy.stats.bootstrap(method="percentile") seeded with
  np.random.default_rng(seed).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from steer.experiments.figures import save_figure

Embs = dict[str, torch.Tensor]

# A language mean this much smaller than its sentences (e.g. after centring) counts as zero.
_ZERO_MEAN_REL = 1e-6
# Cosine similarities (and summed distances) closer than this are ties. Decisions on recomputed
# floats must not depend on BLAS rounding: one CPU's matrix product rounds two identical candidates
# a few ulp apart where another rounds them equal. 1e-6 sits far above float64 rounding of unit
# vectors (~1e-13) and at the precision of the float32 embeddings they come from (a few ulp of
# float32 move a cosine by ~1e-7), so recomputing or re-rounding the inputs never changes a rank.
TIE_TOL = 1e-6


def center(embs: Embs) -> Embs:
    """Subtract each language's mean embedding from its rows (float64)."""
    return {lang: e.double() - e.double().mean(0) for lang, e in embs.items()}


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) over the last dim, broadcast, float64 in [0, 2]; NaN for a zero vector."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return (1.0 - cos).clamp(0.0, 2.0)


def distance_report(embs: Embs, target: str | None = None) -> dict:
    """Distances between the languages of one embedding space.

    Returns a dict with
      pairwise[(a, b)]: d(mean_a, mean_b) for each unordered pair (a before b in dict order),
      mean_pairwise: their mean (the paper's "mean pairwise distance between languages"),
      sentence_pairwise[(a, b)]: mean over aligned rows i of d(a_i, b_i), and
      mean_sentence_pairwise: their mean,
      medoid: the language whose mean is the medoid (see the module docstring),
      to_medoid[lang]: d(mean_lang, mean_medoid),
      target, and when a target is given: to_target[lang] = d(mean_lang, mean_target) and
      sentence_to_target[lang] = mean over rows i of d(lang_i, target_i).
    Means that are numerically zero (centred embeddings) have no direction: the mean-level
    entries are then NaN (with a warning) and the medoid None; sentence-level ones stay.
    """
    langs = _check_aligned(embs)
    if target is not None and target not in embs:
        raise KeyError(f"target {target!r} is not one of the languages {langs}")
    data = {lang: embs[lang].double() for lang in langs}
    means = torch.stack([data[lang].mean(0) for lang in langs])  # [L, D]
    scale = torch.stack([data[lang].norm(dim=-1).mean() for lang in langs])  # [L]
    zero = means.norm(dim=-1) <= _ZERO_MEAN_REL * scale
    if zero.any():
        warnings.warn(
            "language means are numerically zero (centred embeddings?): "
            "mean-level distances are NaN",
            stacklevel=2,
        )
        means[zero] = math.nan
    dist = cosine_distance(means[:, None, :], means[None, :, :])  # [L, L]
    pairs = [(a, b) for i, a in enumerate(langs) for b in langs[i + 1 :]]
    pos = {lang: i for i, lang in enumerate(langs)}
    pairwise = {(a, b): float(dist[pos[a], pos[b]]) for a, b in pairs}
    sentence = {(a, b): float(cosine_distance(data[a], data[b]).mean()) for a, b in pairs}
    total = dist.sum(1)  # the medoid: least total distance; near-ties go to the first language
    medoid = None if zero.any() else langs[int((total <= total.min() + TIE_TOL).nonzero()[0])]
    report = {
        "pairwise": pairwise,
        "mean_pairwise": _mean(pairwise.values()),
        "sentence_pairwise": sentence,
        "mean_sentence_pairwise": _mean(sentence.values()),
        "medoid": medoid,
        "to_medoid": {
            lang: math.nan if medoid is None else float(dist[pos[lang], pos[medoid]])
            for lang in langs
        },
        "target": target,
    }
    if target is not None:
        report["to_target"] = {lang: float(dist[pos[lang], pos[target]]) for lang in langs}
        report["sentence_to_target"] = {
            lang: float(cosine_distance(data[lang], data[target]).mean()) for lang in langs
        }
    return report


def compare_distances(pre: dict, post: dict) -> dict:
    """Pair two `distance_report`s: each number becomes {pre, post, delta = post - pre}.

    Nested dicts are paired key by key (same keys required); other values (medoid, target)
    become {pre, post}.
    """
    if isinstance(pre, dict):
        if not isinstance(post, dict) or pre.keys() != post.keys():
            raise ValueError("the two reports do not have the same entries")
        return {k: compare_distances(pre[k], post[k]) for k in pre}
    if isinstance(pre, float) and isinstance(post, float):
        return {"pre": pre, "post": post, "delta": post - pre}
    return {"pre": pre, "post": post}


def retrieval(queries: torch.Tensor, candidates: torch.Tensor) -> dict:
    """Retrieve, for each query i, among all candidates by cosine similarity; the match is i.

    Returns top1, top5, mrr (floats) and rank (LongTensor [N], 1 = best) per query, for
    bootstrapping. Ties rank pessimistically: rank = #{j : sim(q_i, c_j) >= sim(q_i, c_i) - TIE_TOL}
    (similarities within TIE_TOL are ties, so ranks do not depend on BLAS rounding).
    `queries` and `candidates` may come from different models (the paper's "mixed" control).
    """
    if queries.ndim != 2 or queries.shape != candidates.shape:
        raise ValueError(
            f"need two aligned [N, D] tensors, got {queries.shape} and {candidates.shape}"
        )
    return _retrieve(_unit(queries), _unit(candidates))


def retrieval_matrix(
    embs: Embs, pairs: Sequence[tuple[str, str]] | None = None
) -> dict[tuple[str, str], dict]:
    """`retrieval` for each (query language, candidate language) pair; default all ordered pairs."""
    langs = _check_aligned(embs)
    if pairs is None:
        pairs = [(a, b) for a in langs for b in langs if a != b]
    unit = {lang: _unit(embs[lang]) for lang in {x for pair in pairs for x in pair}}
    return {(a, b): _retrieve(unit[a], unit[b]) for a, b in pairs}


def setting_pairs(
    langs: Sequence[str], target: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The paper's two retrieval settings: (a) the target language as the query, every other
    language as candidates; (b) ordered pairs of languages that are both not the target."""
    if target not in langs:
        raise KeyError(f"target {target!r} is not one of {list(langs)}")
    others = [lang for lang in langs if lang != target]
    return [(target, b) for b in others], [(a, b) for a in others for b in others if a != b]


def mean(values: torch.Tensor) -> torch.Tensor:
    """Default bootstrap statistic: the mean over the last dim."""
    return values.mean(-1)


def bootstrap_ci(
    values,
    stat: Callable[[torch.Tensor], torch.Tensor] = mean,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(stat(values), lo, hi): percentile bootstrap CI, resampling the N values
    (scipy.stats.bootstrap, method="percentile", seeded with np.random.default_rng(seed)).

    `stat` reduces the last dim: it is called on [N] and on [batch, N] resamples (torch tensors).
    """
    v = torch.as_tensor(values, dtype=torch.float64).cpu()
    lo, hi = _bootstrap((v.numpy(),), stat, n_boot, seed, level)
    return (float(stat(v)), lo, hi)


def paired_bootstrap(
    pre_values,
    post_values,
    stat: Callable[[torch.Tensor], torch.Tensor] = mean,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(delta, lo, hi): change stat(post) - stat(pre) with a CI from resampling sentences,
    the same resampled sentences on both sides (values aligned by sentence, e.g. per-query
    `rank == 1` before and after; scipy.stats.bootstrap with paired=True)."""
    pre = torch.as_tensor(pre_values, dtype=torch.float64).cpu()
    post = torch.as_tensor(post_values, dtype=torch.float64).cpu()
    if pre.shape != post.shape or pre.ndim != 1:
        raise ValueError(f"need two aligned 1-D value lists, got {pre.shape}, {post.shape}")
    lo, hi = _bootstrap((pre.numpy(), post.numpy()), lambda a, b: stat(b) - stat(a), n_boot, seed, level)
    return (float(stat(post) - stat(pre)), lo, hi)


def pearson_ci(
    x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(r, lo, hi): Pearson r (scipy.stats.pearsonr) with a percentile bootstrap CI over the
    (x, y) pairs (scipy.stats.bootstrap, paired), e.g. retrieval accuracy vs distance over
    language pairs (the paper's Table 2). Resamples whose x or y is constant have no r (NaN):
    they are left out of the percentiles (scipy.stats.quantile with nan_policy="omit")."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or len(xs) < 3:
        raise ValueError("need two aligned 1-D sequences of at least 3 values")
    r = float(scipy.stats.pearsonr(xs, ys).statistic)

    def pearson(bx, by, axis=-1):  # [batch, n] resamples -> [batch]; NaN for a constant side
        bx = bx - bx.mean(axis, keepdims=True)
        by = by - by.mean(axis, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.clip((bx * by).sum(axis) / np.sqrt((bx**2).sum(axis) * (by**2).sum(axis)), -1.0, 1.0)

    with warnings.catch_warnings():  # scipy warns when a resample's r is NaN; handled below
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        res = _bootstrap_result((xs, ys), pearson, n_boot, seed, level)
    lo, hi = res.confidence_interval
    if not (np.isfinite(lo) and np.isfinite(hi)):  # the same percentiles, without the NaN resamples
        alpha = (1.0 - level) / 2.0
        lo, hi = scipy.stats.quantile(res.bootstrap_distribution, np.array([alpha, 1.0 - alpha]),
                                      nan_policy="omit")
    return (r, float(lo), float(hi))


def project_2d(embs: Embs, n_iter: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA of all languages' rows jointly to 2-D: dict lang -> [N_lang, 2] float64.

    The stack is centred by its global mean (language offsets stay visible) and projected on
    its two leading principal axes, each signed so that its largest-|loading| component (over
    the D dims) is positive. The axes come from torch.pca_lowrank (randomized subspace
    iteration, Halko et al. 2011) with a block of 12 directions and `n_iter` power steps,
    seeded with `seed` in a forked RNG (the caller's torch RNG is untouched): exact when the
    stack has rank <= 12, else the error shrinks like (s_13 / s_2) ** (2 n_iter + 1) in the
    singular values s. A full SVD of 20k sentences x 4096 dims takes minutes on a CPU; this
    takes seconds.
    """
    langs = list(embs)
    stack = torch.cat([embs[lang].double() for lang in langs])  # [sum N, D]
    stack = stack - stack.mean(0)
    with torch.random.fork_rng(devices=[stack.device] if stack.is_cuda else []):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(stack, q=min(12, *stack.shape), center=False, niter=n_iter)
    axes = v[:, :2].T  # [2, D]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # [2, 1]
    coords = stack @ (axes * sign).T  # [sum N, 2]
    return dict(zip(langs, coords.split([len(embs[lang]) for lang in langs])))


def plot_projection(pre: Embs, post: Embs, path: str | Path) -> Path:
    """Save a PNG with the 2-D projections of `pre` (left) and `post` (right), each space
    projected on its own principal axes; each language's mean is labelled."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # renders with Agg; no pyplot global state

    if pre.keys() != post.keys():
        raise ValueError("pre and post must hold the same languages")
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = colormaps["tab10" if len(pre) <= 10 else "tab20"]
    colors = {lang: cmap(i % cmap.N) for i, lang in enumerate(pre)}
    for ax, embs, title in zip(axes, (pre, post), ("pre", "post")):
        for lang, xy in project_2d(embs).items():
            color = colors[lang]
            xy = xy.numpy()
            ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.35, color=color, label=lang)
            mx, my = xy.mean(0).tolist()
            ax.scatter([mx], [my], s=60, color=color, edgecolors="black", marker="o")
            ax.annotate(lang, (mx, my), fontsize=9, weight="bold")
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8)
    return save_figure(fig, path)


def _check_aligned(embs: Embs) -> list[str]:
    langs = list(embs)
    if len(langs) < 2:
        raise ValueError("need at least two languages")
    shapes = {tuple(e.shape) for e in embs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"embeddings must be aligned [N, D] tensors, got shapes {shapes}")
    return langs


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _unit(e: torch.Tensor) -> torch.Tensor:
    e = e.double()
    return e / e.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _retrieve(q: torch.Tensor, c: torch.Tensor, chunk: int = 1024) -> dict:
    ranks = []
    for start in range(0, len(q), chunk):  # bounds memory at chunk x N similarities
        sim = q[start : start + chunk] @ c.T  # [chunk, N]
        own = sim.diagonal(offset=start)[:, None]  # [chunk, 1]: similarity of the match
        ranks.append((sim >= own - TIE_TOL).sum(1))
    rank = torch.cat(ranks)  # [N]
    return {
        "top1": float((rank == 1).double().mean()),
        "top5": float((rank <= 5).double().mean()),
        "mrr": float((1.0 / rank.double()).mean()),
        "rank": rank,
    }


# Resamples per batch: bounds the [batch, N] index and value arrays at ~4M elements.
_BOOT_ELEMS = 1 << 22


def _bootstrap_result(samples, statistic, n_boot: int, seed: int, level: float):
    """scipy.stats.bootstrap over aligned 1-D numpy samples (paired when several), percentile
    method, vectorized over the last axis, seeded with np.random.default_rng(seed)."""
    return scipy.stats.bootstrap(
        samples, statistic, n_resamples=n_boot, batch=max(1, _BOOT_ELEMS // len(samples[0])),
        vectorized=True, paired=len(samples) > 1, axis=-1, confidence_level=level,
        method="percentile", rng=np.random.default_rng(seed))


def _bootstrap(samples, stat, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """(lo, hi) of `_bootstrap_result` for a torch statistic of the samples' last dim."""

    def statistic(*arrays, axis=-1):
        return stat(*(torch.from_numpy(np.moveaxis(a, axis, -1)) for a in arrays)).numpy()

    lo, hi = _bootstrap_result(samples, statistic, n_boot, seed, level).confidence_interval
    return float(lo), float(hi)
