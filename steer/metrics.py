"""Per-neuron AP, AUROC and response statistics, exact, as batched tensor ops.

Design: neurons are taken in chunks of columns of `scores` [N, M]. Each chunk is sorted ONCE
(every neuron's responses, ascending), which gives every sentence two integer ranks that no
split changes: `lo` = how many sentences respond strictly less, `hi` = how many respond less or
equal. A split (positive labels vs negative labels, the rest excluded) then only touches its
positives: sorting the positives' `lo` ranks ([chunk, P] instead of [chunk, N]) and two binary
searches give, for each positive, the positives strictly below it and tied with it; the
negatives below it follow by subtraction from `lo` / `hi` (minus the excluded sentences, counted
the same way, when negatives are an explicit subset). All one-vs-rest splits together therefore
cost about one more sort of the chunk, and nothing loops over neurons in Python.

Why exact: everything is integer counting except one division per term. For a positive of value
v, TP(v) = positives >= v and FP(v) = negatives >= v are the counts at the operating point
"predict positive when score >= v" (tied sentences share it), so
AP = (1/P) sum_{positives} TP/(TP+FP) is scikit-learn's non-interpolated AP, and
AUROC = sum_{positives} (2 * negatives_below + negatives_tied) / (2 P Nn) is scikit-learn's AUROC
(ties count 1/2), an exact integer ratio rounded once. Percentiles use numpy.percentile's linear
interpolation formula verbatim; means are float64 sums (one matmul for all splits).

Edge cases (DESIGN.md section 1): no positives -> AP, AUROC, on_* are NaN with a warning
(scikit-learn's AP returns 0.0 there: a deliberate difference); no negatives -> AP is 1.0, AUROC
and off_mean are NaN with a warning. Non-finite scores are rejected.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "average_precision", "auroc", "score_splits", "rank_neurons"]

# Default bound on neurons_per_chunk * N. The chunk's working set is about
# 3 float64/int32 copies of it (values, sorted values, ranks): ~400 MB at 2**24.
CHUNK_ELEMENTS = 1 << 22

_PERCENTILES = {"on_p50": 50, "on_p90": 90}

Split = tuple[Iterable[int], Iterable[int] | None]


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """AP of each column of `scores` [N, M] for binary `labels` [N]; float64 [M].

    scikit-learn's `average_precision_score` per column, except NaN (with a warning) when there
    is no positive. No negative gives 1.0.
    """
    return _score_splits(scores, _binary_label_ids(labels), [([1], [0])], None, ("ap",))["ap"][0]


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC of each column of `scores` [N, M] for binary `labels` [N]; float64 [M].

    scikit-learn's `roc_auc_score` per column (ties count 1/2); NaN with a warning when there is
    no positive or no negative.
    """
    return _score_splits(scores, _binary_label_ids(labels), [([1], [0])], None, ("auroc",))["auroc"][0]


def score_splits(
    scores: Tensor, label_ids: Tensor, splits: Sequence[Split], chunk: int | None = None
) -> dict[str, Tensor]:
    """Score every neuron for every positive/negative split of the labels.

    scores: [N, M] responses (any float dtype) of N sentences for M neurons.
    label_ids: [N] integer label of each sentence.
    splits: S pairs (positive_label_ids, negative_label_ids); negative None means every label
        not positive. Sentences whose label is in neither set are excluded from that split.
    chunk: neurons processed at once (default: CHUNK_ELEMENTS // N); results do not depend on it.

    Returns float64 [S, M] tensors "ap", "auroc", "on_mean", "on_p50", "on_p90" (statistics of
    the positives' responses; percentiles as numpy.percentile, linear), "off_mean" (mean of the
    negatives' responses), and int64 [S] "n_pos", "n_neg".
    """
    return _score_splits(scores, label_ids, splits, chunk, ("ap", "auroc", "stats"))


def rank_neurons(primary: Tensor, secondary: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices [k] (int64) of the top-k neurons of a flat neuron axis, deterministically.

    Order: `primary` (descending if `largest`, else ascending), then `secondary` (same
    direction), then index ascending. NaN ranks last in either key. With flat index =
    layer * width + unit, index order is (layer, unit) order.
    """
    if primary.ndim != 1 or primary.shape != secondary.shape:
        raise ValueError(f"primary and secondary must be 1-D of equal length, got {primary.shape}, {secondary.shape}")
    if not 0 <= k <= primary.numel():
        raise ValueError(f"k={k} out of range for {primary.numel()} neurons")
    order = torch.arange(primary.numel(), device=primary.device)  # [F], index ascending
    for key in (secondary, primary):  # stable sorts: the last key sorted is the primary one
        key = key.to(torch.float64)[order]
        # ascending sort puts NaN last; negate to sort descending with NaN still last
        order = order[(-key if largest else key).sort(stable=True).indices]
    return order[:k]


def _binary_label_ids(labels: Tensor) -> Tensor:
    if labels.dtype != torch.bool and not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be bool or 0/1")
    return labels.to(torch.int64)


def _score_splits(
    scores: Tensor, label_ids: Tensor, splits: Sequence[Split], chunk: int | None, metrics: tuple[str, ...]
) -> dict[str, Tensor]:
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float [N, M] tensor, got {scores.dtype} {tuple(scores.shape)}")
    n, m_total = scores.shape
    if label_ids.shape != (n,) or label_ids.is_floating_point():
        raise ValueError(f"label_ids must be an integer [{n}] tensor, got {label_ids.dtype} {tuple(label_ids.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    scores = scores.detach()
    dev = scores.device
    f64 = dict(dtype=torch.float64, device=dev)

    pos_mask, neg_mask = _split_masks(label_ids.to(dev), splits)  # [S, N] bool each
    n_pos, n_neg = pos_mask.sum(1), neg_mask.sum(1)  # [S] int64
    _warn_empty(n_pos.tolist(), n_neg.tolist(), metrics)
    plans = [_plan(p, q) for p, q in zip(pos_mask, neg_mask)]

    keys = [k for k in metrics if k != "stats"] + (["on_mean", *_PERCENTILES, "off_mean"] if "stats" in metrics else [])
    out = {k: torch.full((len(splits), m_total), float("nan"), **f64) for k in keys}
    if "stats" in metrics:
        members = torch.cat([pos_mask, neg_mask]).T.to(**f64)  # [N, 2S] 0/1: positives, negatives
        counts = torch.cat([n_pos, n_neg]).to(**f64)  # [2S]; 0 makes the mean NaN

    step = chunk or max(1, CHUNK_ELEMENTS // max(n, 1))
    for j0 in range(0, m_total, step):
        x = scores[:, j0 : j0 + step].T.contiguous().to(torch.float64)  # [m, N]
        cols = slice(j0, j0 + x.shape[0])
        if "stats" in metrics:
            means = (x @ members / counts).T  # [2S, m]
            out["on_mean"][:, cols], out["off_mean"][:, cols] = means.split(len(splits))
        ch = _Chunk.build(x)
        del x
        for s, plan in enumerate(plans):
            if n_pos[s]:
                for key, value in _score_chunk(ch, plan, int(n_pos[s]), int(n_neg[s]), metrics).items():
                    out[key][s, cols] = value
    out["n_pos"], out["n_neg"] = n_pos, n_neg
    return out


class _Chunk(NamedTuple):
    """A chunk of m neurons after its one sort: what every split is scored from.

    Responses are grouped into tie groups (runs of equal values in a neuron's sorted row), with
    ids increasing along the rows, rows concatenated: comparing two sentences' group ids compares
    their responses, equal ids mean a tie.
    """

    xs: Tensor  # [m * N] float64, each neuron's responses ascending, rows concatenated
    gid: Tensor  # [m, N] int64, in sentence order: each response's tie-group id
    start: Tensor  # [G + 1] int64, where group g starts in xs; start[G] = m * N
    row0: Tensor  # [m, 1] int64, where each neuron's row starts in xs

    @staticmethod
    def build(x: Tensor) -> _Chunk:  # x: [m, N] float64
        m, n = x.shape
        xs, order = _sort_rows(x, return_order=True)  # [m, N] each
        if not (xs[:, 0].isfinite() & xs[:, -1].isfinite()).all():  # NaN sorts last, -inf first
            raise ValueError("scores contain NaN or inf")
        starts = torch.ones_like(xs, dtype=torch.bool)  # [m, N] True where a tie group starts
        torch.ne(xs[:, 1:], xs[:, :-1], out=starts[:, 1:])
        gid_sorted = starts.view(-1).cumsum(0) - 1  # [m * N]
        start = torch.cat([starts.view(-1).nonzero().squeeze(1), torch.tensor([m * n], device=x.device)])
        gid = torch.empty_like(order).scatter_(1, order, gid_sorted.view(m, n))
        row0 = torch.arange(0, m * n, n, device=x.device).unsqueeze(1)
        return _Chunk(xs.view(-1), gid, start, row0)


def _score_chunk(ch: _Chunk, plan: tuple[Tensor, Tensor, bool], p: int, nn: int, metrics: tuple[str, ...]) -> dict[str, Tensor]:
    """One split's scores [m] for one chunk; p > 0 positives, nn negatives."""
    pos_idx, count_idx, count_is_neg = plan
    g = _sort_rows(ch.gid[:, pos_idx])  # [m, P] positives' groups, ascending = by response
    lo = ch.start[g] - ch.row0  # [m, P] responses below each positive
    pos_lt = torch.searchsorted(g, g, side="left")  # [m, P] positives below each positive
    if count_is_neg:  # [m, P] negatives below / at or below each positive, counted directly
        neg_lt, neg_le = _members_below(ch, count_idx, g)
        neg_pairs = (neg_lt + neg_le).sum(1)  # [m]
    else:  # negatives = all - positives - excluded (count_idx, often empty)
        neg_lt = lo - pos_lt
        # summed over the positives, (positives < v) + (positives <= v) is P^2 whatever the ties
        neg_pairs = (lo + ch.start[g + 1] - ch.row0).sum(1) - p * p  # [m]
        if count_idx.numel():
            exc_lt, exc_le = _members_below(ch, count_idx, g)
            neg_lt = neg_lt - exc_lt
            neg_pairs -= (exc_lt + exc_le).sum(1)
    res = {}
    if "ap" in metrics:
        tp = p - pos_lt  # [m, P] positives predicted positive at each positive's response
        res["ap"] = (tp / (tp + nn - neg_lt).double()).sum(1) / p  # mean of TP / (TP + FP)
    if "auroc" in metrics and nn:
        res["auroc"] = neg_pairs.double() / (2 * p * nn)  # exact integers, one rounding
    if "stats" in metrics:
        for key, q in _PERCENTILES.items():
            res[key] = _percentile_sorted(ch, g, q)
    return res


def _split_masks(label_ids: Tensor, splits: Sequence[Split]) -> tuple[Tensor, Tensor]:
    """[S, N] bool masks of each split's positive and negative sentences."""
    pos, neg = [], []
    for s, (pos_labels, neg_labels) in enumerate(splits):
        pos_labels = torch.as_tensor(list(pos_labels), dtype=torch.int64, device=label_ids.device)
        p = torch.isin(label_ids, pos_labels)  # [N]
        if neg_labels is None:
            q = ~p
        else:
            neg_labels = torch.as_tensor(list(neg_labels), dtype=torch.int64, device=label_ids.device)
            if torch.isin(neg_labels, pos_labels).any():
                raise ValueError(f"split {s}: a label is both positive and negative")
            q = torch.isin(label_ids, neg_labels)
        pos.append(p)
        neg.append(q)
    empty = torch.zeros(0, label_ids.numel(), dtype=torch.bool, device=label_ids.device)
    return (torch.stack(pos), torch.stack(neg)) if splits else (empty, empty)


def _plan(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Rows of one split's positives and the cheaper way to count its negatives.

    Returns (positive rows, rows to count, True if those rows are the negatives themselves,
    False if they are the excluded sentences, to subtract from everyone-but-positives).
    """
    excluded = ~(pos | neg)  # [N]
    count_is_neg = int(neg.sum()) < int(excluded.sum())
    return pos.nonzero().squeeze(1), (neg if count_is_neg else excluded).nonzero().squeeze(1), count_is_neg


def _members_below(ch: _Chunk, idx: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Sentences of the set `idx` [K] with response < and <= each query group g [m, P]: 2x int64 [m, P]."""
    member_g = _sort_rows(ch.gid[:, idx])  # [m, K]
    return torch.searchsorted(member_g, g, side="left"), torch.searchsorted(member_g, g, side="right")


def _percentile_sorted(ch: _Chunk, g: Tensor, q: float) -> Tensor:
    """q-th percentile [m] of the positives' responses, numpy.percentile(method="linear") exactly.

    g: [m, P] positives' groups ascending, so ch.xs[ch.start[g[i, k]]] is neuron i's k-th
    smallest positive response.
    """
    p = g.shape[1]
    virtual = (p - 1) * (q / 100)  # numpy: (n - 1) * quantile, float64
    below = int(virtual // 1)
    above = min(below + 1, p - 1)
    t = virtual - below
    a = ch.xs[ch.start[g[:, below]]]  # [m]
    b = ch.xs[ch.start[g[:, above]]]  # [m]
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t  # numpy's _lerp


def _sort_rows(a: Tensor, return_order: bool = False):
    """Sort each row of a [m, K] ascending: values, or (values, order) if return_order.

    On CPU through numpy, whose vectorised (AVX-512 / AVX2) sorts are several times faster
    than torch's there; elsewhere torch.sort.
    """
    if a.device.type != "cpu":
        res = a.sort(dim=1)
        return tuple(res) if return_order else res.values
    if not return_order:
        return torch.from_numpy(np.sort(a.numpy(), axis=1))
    order = torch.from_numpy(np.argsort(a.numpy(), axis=1))
    return a.gather(1, order), order


def _warn_empty(n_pos: list[int], n_neg: list[int], metrics: tuple[str, ...]) -> None:
    for s, (p, nn) in enumerate(zip(n_pos, n_neg)):
        if p == 0:
            undefined = [k for k in ("ap", "auroc") if k in metrics] + (["on_*"] if "stats" in metrics else [])
            warnings.warn(f"split {s}: no positive sentences; {', '.join(undefined)} set to NaN", RuntimeWarning, stacklevel=4)
        elif nn == 0 and ("auroc" in metrics or "stats" in metrics):
            undefined = (["auroc"] if "auroc" in metrics else []) + (["off_mean"] if "stats" in metrics else [])
            warnings.warn(f"split {s}: no negative sentences; {', '.join(undefined)} set to NaN", RuntimeWarning, stacklevel=4)
