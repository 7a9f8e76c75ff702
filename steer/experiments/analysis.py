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
  the correlation), 95 % by default, with a seeded generator.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.stats
import torch

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
    """(stat(values), lo, hi): percentile bootstrap CI, resampling the N values.

    `stat` reduces the last dim: it is called on [N] and on [batch, N] resamples.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    boots = _resample(lambda idx: stat(v[idx]), len(v), n_boot, seed)
    return (float(stat(v)), *_percentiles(boots, level))


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
    `rank == 1` before and after)."""
    pre = torch.as_tensor(pre_values, dtype=torch.float64)
    post = torch.as_tensor(post_values, dtype=torch.float64)
    if pre.shape != post.shape or pre.ndim != 1:
        raise ValueError(f"need two aligned 1-D value lists, got {pre.shape}, {post.shape}")
    boots = _resample(lambda idx: stat(post[idx]) - stat(pre[idx]), len(pre), n_boot, seed)
    return (float(stat(post) - stat(pre)), *_percentiles(boots, level))


def pearson_ci(
    x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(r, lo, hi): Pearson r (scipy.stats.pearsonr) with a percentile bootstrap CI over the
    (x, y) pairs, e.g. retrieval accuracy vs distance over language pairs (the paper's
    Table 2). Resamples whose x or y is constant have no r and are left out."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or len(xs) < 3:
        raise ValueError("need two aligned 1-D sequences of at least 3 values")
    r = float(scipy.stats.pearsonr(xs, ys).statistic)
    idx = np.random.default_rng(seed).integers(0, len(xs), size=(n_boot, len(xs)))
    bx = xs[idx] - xs[idx].mean(1, keepdims=True)  # [n_boot, n]
    by = ys[idx] - ys[idx].mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (bx * by).sum(1) / np.sqrt((bx**2).sum(1) * (by**2).sum(1))
    boots = np.clip(boots[np.isfinite(boots)], -1.0, 1.0)
    return (r, *_percentiles(torch.from_numpy(boots), level))


def project_2d(embs: Embs, n_iter: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA of all languages' rows jointly to 2-D: dict lang -> [N_lang, 2] float64.

    The stack is centred by its global mean (language offsets stay visible) and projected on
    its two leading principal axes, signed so each axis's largest loading is positive. The
    axes come from seeded randomized subspace iteration (Halko et al. 2011; scikit-learn's PCA
    solver for large data): a block of 12 directions, `n_iter` power steps, then
    torch.linalg.svd of the small projected block. Exact when the stack has rank <= 12; else
    the error shrinks like (s_13 / s_2) ** (2 n_iter + 1) in the singular values s. A full SVD
    of 20k sentences x 4096 dims takes minutes on a CPU; this takes seconds.
    """
    langs = list(embs)
    stack = torch.cat([embs[lang].double() for lang in langs])  # [sum N, D]
    stack = stack - stack.mean(0)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(stack.shape[1], min(12, *stack.shape), generator=gen, dtype=torch.float64)
    basis = torch.linalg.qr(stack @ probe).Q  # [sum N, block] orthonormal
    for _ in range(n_iter):
        basis = torch.linalg.qr(stack @ (stack.T @ basis)).Q
    _, _, vh = torch.linalg.svd(basis.T @ stack, full_matrices=False)  # [block, D]
    axes = vh[:2]  # [2, D]
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
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
    return path


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


def _resample(fn, n: int, n_boot: int, seed: int, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """fn over n_boot resamples (indices drawn with replacement), in memory-bounded chunks."""
    gen = torch.Generator().manual_seed(seed)
    step = max(1, chunk_elems // n)
    return torch.cat([
        fn(torch.randint(0, n, (min(step, n_boot - s), n), generator=gen))  # [step, n] indices
        for s in range(0, n_boot, step)
    ])


def _percentiles(boots: torch.Tensor, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo, hi = torch.quantile(boots.double(), q).tolist()
    return lo, hi
