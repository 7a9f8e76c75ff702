"""Per-neuron AP, AUROC and response statistics, exact, as batched tensor ops.

Design: neurons are taken in chunks of columns of `scores` [N, M] (`chunk` neurons at a time,
so extra memory stays bounded, about 70 bytes per chunk element and worker: on CPU up to
MAX_WORKERS chunks run side by side, one per torch thread). Each chunk is sorted ONCE,
every neuron's responses ascending, and no split is ever sorted over all N again: the sort gives
each response a key, lo * 2**32 + hi, with lo / hi = how many of that neuron's responses are
< / <= it. Keys are ordered like the responses and equal exactly for ties, and lo / hi are the
counts the metrics need. A split (positive labels vs negative labels, the rest excluded) then
only touches its P positives: their keys sorted per neuron ([chunk, P]) give each positive the
positives below it (runs of equal keys), and the negatives below it follow by subtraction
(negatives = all - positives - excluded; the excluded, or the negatives when they are the
smaller set, are counted by binary search). Sentences are grouped by label first, so a split's
positives are usually one slice of columns. All one-vs-rest splits together cost about one more
sort of the chunk, and nothing loops over neurons in Python.

Why exact: everything is integer counting, then one division per term. For a positive of value
v, TP(v) = positives >= v and FP(v) = negatives >= v are the counts at the operating point
"predict positive when score >= v", shared by tied sentences, so
AP = (1/P) sum_{positives} TP/(TP+FP) is scikit-learn's non-interpolated AP, and
AUROC = sum_{positives} (negatives < v + negatives <= v) / (2 P Nn) is scikit-learn's AUROC
(ties count 1/2), an integer ratio rounded once. Percentiles use numpy.percentile's linear
interpolation formula verbatim; means are float64 sums in a fixed order, so no result depends
on the chunk size.

Edge cases: no positives -> AP, AUROC, on_* are NaN with a warning
(scikit-learn's AP returns 0.0 there: a deliberate difference); no negatives -> AP is 1.0, AUROC
and off_mean are NaN with a warning. Non-finite scores are rejected.
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "average_precision", "auroc", "score_splits", "rank_neurons", "check_k"]

# Default bound on neurons_per_chunk * N: ~70 MB of working set. Larger chunks are no faster on
# CPU (cache); on a GPU, or when N is large (fewer neurons per chunk), pass a larger `chunk`.
CHUNK_ELEMENTS = 1 << 20

# Chunks scored side by side on CPU (each holds its own working set, see CHUNK_ELEMENTS)
MAX_WORKERS = 4

_PERCENTILES = {"on_p50": 50, "on_p90": 90}

# Row sorts and running maxima go through numpy on CPU (several times faster there than torch's);
# tests switch this off to run the torch path that other devices take.
_NUMPY_ON_CPU = True

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
    scores: Tensor, label_ids: Tensor, splits: Sequence[Split], chunk: int | None = None, *,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Score every neuron for every positive/negative split of the labels.

    scores: [N, M] responses (any float dtype) of N sentences for M neurons.
    label_ids: [N] integer label of each sentence.
    splits: S pairs (positive_label_ids, negative_label_ids); negative None means every label
        not positive. Sentences whose label is in neither set are excluded from that split.
    chunk: neurons processed at once (default: CHUNK_ELEMENTS // N); results do not depend on it.
    names: one name per split (its label), used by warnings and errors ("label 'fr': no
        positive sentences"); default "split <index>".

    Returns float64 [S, M] tensors "ap", "auroc", "on_mean", "on_p50", "on_p90" (statistics of
    the positives' responses; percentiles as numpy.percentile, linear), "off_mean" (mean of the
    negatives' responses), and int64 [S] "n_pos", "n_neg".
    """
    return _score_splits(scores, label_ids, splits, chunk, ("ap", "auroc", "stats"), names)


def rank_neurons(primary: Tensor, secondary: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices [k] (int64) of the top-k neurons of a flat neuron axis, deterministically.

    Order: `primary` (descending if `largest`, else ascending), then `secondary` (same
    direction), then index ascending. NaN ranks last in either key. With flat index =
    layer * width + unit, index order is (layer, unit) order.
    """
    if primary.ndim != 1 or primary.shape != secondary.shape:
        raise ValueError(f"primary, secondary must be 1-D of one length: {primary.shape}, {secondary.shape}")
    if not 0 <= k <= primary.numel():
        raise ValueError(f"k={k} out of range for {primary.numel()} neurons")
    order = torch.arange(primary.numel(), device=primary.device)  # [F], index ascending
    for key in (secondary, primary):  # stable sorts: the last key sorted is the primary one
        key = key.to(torch.float64)[order]
        # ascending sort puts NaN last; negate to sort descending with NaN still last
        order = order[(-key if largest else key).sort(stable=True).indices]
    return order[:k]


def check_k(k, name: str = "k", *, allow_zero: bool = False, available: int | None = None,
            where: str = "the model has {n} neurons") -> int:
    """`k` as an int, or a one-line ValueError naming `name` and the value.

    k must be an integer >= 1 (>= 0 with allow_zero, e.g. bottom_k or the sweep's unsteered k=0)
    and, given `available`, at most that many: `where` says what holds them ("{n}" becomes
    the count, e.g. "the set holds {n} experts for 'fr'"). Needs no model: the CLI calls it
    on its arguments before loading one, then again with `available` once the model is known.
    """
    low = 0 if allow_zero else 1
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"{name}={k!r}: must be an integer >= {low}")
    if k < low:
        raise ValueError(f"{name}={k}: must be an integer >= {low}"
                         + ("" if allow_zero else " (the number of experts)"))
    if available is not None and k > available:
        raise ValueError(f"{name}={k} but " + where.replace("{n}", f"{available:,}"))
    return int(k)


def _binary_label_ids(labels: Tensor) -> Tensor:
    if labels.dtype != torch.bool and not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be bool or 0/1")
    return labels.to(torch.int64)


def _score_splits(
    scores: Tensor, label_ids: Tensor, splits: Sequence[Split], chunk: int | None, metrics: tuple[str, ...],
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    if names is not None and len(names) != len(splits):
        raise ValueError(f"{len(names)} names for {len(splits)} splits")
    where = [f"label {n!r}" for n in names] if names is not None else [f"split {s}" for s in range(len(splits))]
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float [N, M] tensor, got {scores.dtype} {tuple(scores.shape)}")
    n, m_total = scores.shape
    if n == 0:
        raise ValueError("scores must hold at least one sentence")
    if label_ids.shape != (n,) or label_ids.is_floating_point():
        raise ValueError(f"label_ids must be an integer [{n}] tensor, got {label_ids.dtype} {list(label_ids.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if (label_ids < 0).any():
        raise ValueError("label_ids must be >= 0")
    scores = scores.detach()
    dev = scores.device
    f64 = dict(dtype=torch.float64, device=dev)
    # sentences grouped by label (no result depends on their order): a split's positives are
    # then one slice of columns whenever its labels are consecutive, e.g. one-vs-rest
    label_ids = label_ids.to(dev, torch.int64)
    by_label = torch.argsort(label_ids, stable=True)  # [N]
    label_ids = label_ids[by_label]

    pos_lab, neg_lab = _label_masks(label_ids, splits, where)  # [S, C] bool each
    pos_mask, neg_mask = pos_lab[:, label_ids], neg_lab[:, label_ids]  # [S, N] bool each
    n_pos, n_neg = pos_mask.sum(1), neg_mask.sum(1)  # [S] int64
    _warn_empty(n_pos.tolist(), n_neg.tolist(), metrics, where)
    plans = [_plan(p, q) for p, q in zip(pos_mask, neg_mask)]

    keys = [k for k in ("ap", "auroc") if k in metrics]
    keys += ["on_mean", *_PERCENTILES, "off_mean"] if "stats" in metrics else []
    out = {k: torch.full((len(splits), m_total), float("nan"), **f64) for k in keys}

    step = chunk or max(1, CHUNK_ELEMENTS // n)

    def score_columns(j0: int) -> None:  # one chunk of neurons into its own columns of `out`
        x = scores[:, j0 : j0 + step][by_label].to(torch.float64)  # [N, m]
        cols = slice(j0, j0 + x.shape[1])
        if "stats" in metrics:
            # per-label sums, added in a fixed order (sentences, then labels): the same bits
            # whatever the chunk size, which a matmul does not guarantee
            sums = torch.zeros(pos_lab.shape[1], x.shape[1], **f64).index_add_(0, label_ids, x)  # [C, m]
            on, off = torch.zeros(2, len(splits), x.shape[1], **f64)  # [S, m] each
            for c, label_sum in enumerate(sums):
                on += pos_lab[:, c, None] * label_sum
                off += neg_lab[:, c, None] * label_sum
            out["on_mean"][:, cols], out["off_mean"][:, cols] = on / n_pos[:, None], off / n_neg[:, None]
        ch = _Chunk.build(x.T.contiguous())
        del x
        for s, plan in enumerate(plans):
            if n_pos[s]:
                for key, value in _score_chunk(ch, plan, int(n_pos[s]), int(n_neg[s]), metrics).items():
                    out[key][s, cols] = value

    starts = range(0, m_total, step)
    # on CPU, chunks run side by side on torch's threads: numpy's sorts and scans are single-threaded
    # and release the GIL (2 threads: 3.8 s -> 2.5 s for 36,864 neurons x 2,000 sentences x 8 labels)
    workers = min(len(starts), torch.get_num_threads(), MAX_WORKERS) if dev.type == "cpu" else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(score_columns, starts))  # list(): re-raise a chunk's error here
    else:
        for j0 in starts:
            score_columns(j0)
    out["n_pos"], out["n_neg"] = n_pos, n_neg
    return out


_TWO32 = 1 << 32


class _Chunk(NamedTuple):
    """A chunk of m neurons after its one sort: what every split is scored from."""

    xs: Tensor  # [m, N] float64, each neuron's responses ascending
    # [m, N] int64, sentence order: lo * 2**32 + hi, where lo / hi = how many of the neuron's
    # responses are < / <= this one. Ordered like the responses, equal exactly for ties.
    key: Tensor

    @staticmethod
    def build(x: Tensor) -> _Chunk:  # x: [m, N] float64
        xs, order = _sort_rows(x, return_order=True)  # [m, N] each
        if not (xs[:, 0].isfinite() & xs[:, -1].isfinite()).all():  # NaN sorts last, -inf first
            raise ValueError("scores contain NaN or inf")
        lo = _run_start(xs)  # [m, N]
        hi = xs.shape[1] - _run_start(xs.flip(1)).flip(1)  # [m, N] run end + 1
        key = hi.add_(lo, alpha=_TWO32)  # [m, N] in sorted order
        return _Chunk(xs, torch.empty_like(order).scatter_(1, order, key))


def _score_chunk(
    ch: _Chunk, plan: tuple[Columns, Columns, bool], p: int, nn: int, metrics: tuple[str, ...]
) -> dict[str, Tensor]:
    """One split's scores [m] for one chunk; p > 0 positives, nn negatives."""
    pos_cols, count_cols, count_is_neg = plan
    k = _sort_rows(_select(ch.key, pos_cols))  # [m, P] positives' keys, ascending
    lo = k >> 32  # [m, P] responses below each positive (k // _TWO32)
    pos_lt = _run_start(k)  # [m, P] positives below each positive
    if count_is_neg:  # [m, P] negatives below / at or below each positive, counted directly
        neg_lt, neg_le = _members_below(ch, count_cols, k)
        neg_pairs = (neg_lt + neg_le).sum(1)  # [m]
    else:  # negatives = all - positives - excluded (count_cols, often none)
        neg_lt = lo - pos_lt
        # summed over the positives, (positives < v) + (positives <= v) is P^2 whatever the ties
        neg_pairs = (lo + (k & (_TWO32 - 1))).sum(1) - p * p  # [m], lo + hi per positive
        if p + nn < ch.key.shape[1]:  # some sentences are excluded
            exc_lt, exc_le = _members_below(ch, count_cols, k)
            neg_lt = neg_lt - exc_lt
            neg_pairs -= (exc_lt + exc_le).sum(1)
    res = {}
    if "ap" in metrics:
        tp = (p - pos_lt).double()  # [m, P] positives predicted positive at each positive's response
        res["ap"] = (tp / (tp + (nn - neg_lt))).sum(1) / p  # mean of precision = TP / (TP + FP)
    if "auroc" in metrics and nn:
        res["auroc"] = neg_pairs.double() / (2 * p * nn)  # exact integers, one rounding
    if "stats" in metrics:
        for key, q in _PERCENTILES.items():
            res[key] = _percentile_sorted(ch.xs, lo, q)
    return res


def _run_start(a: Tensor) -> Tensor:
    """For rows a [m, K] holding runs of equal values: where each entry's run starts, int64 [m, K].

    In ascending rows that is how many entries of the row are smaller.
    """
    starts = torch.ones_like(a, dtype=torch.bool)  # [m, K] first entry of a run
    torch.ne(a[:, 1:], a[:, :-1], out=starts[:, 1:])
    start_or_0 = torch.where(starts, torch.arange(a.shape[1], device=a.device), 0)  # [m, K]
    if a.device.type == "cpu" and _NUMPY_ON_CPU:  # ~2.5x torch's cummax, which adds indices
        return torch.from_numpy(np.maximum.accumulate(start_or_0.numpy(), axis=1))
    return start_or_0.cummax(1).values


def _label_masks(label_ids: Tensor, splits: Sequence[Split], where: Sequence[str]) -> tuple[Tensor, Tensor]:
    """[S, C] bool: which labels are each split's positives, and its negatives (`where`: each
    split's name in errors)."""
    pos_ids = [torch.as_tensor(list(p), dtype=torch.int64) for p, _ in splits]
    neg_ids = [None if q is None else torch.as_tensor(list(q), dtype=torch.int64) for _, q in splits]
    mentioned = [int(i.max()) for i in pos_ids + neg_ids if i is not None and i.numel()]
    c = 1 + max([int(label_ids.max()), *mentioned])  # number of labels
    pos = torch.zeros(len(splits), c, dtype=torch.bool)
    neg = torch.zeros(len(splits), c, dtype=torch.bool)
    for s, (p, q) in enumerate(zip(pos_ids, neg_ids)):
        if (p < 0).any() or (q is not None and (q < 0).any()):
            raise ValueError(f"{where[s]}: label ids must be >= 0")
        pos[s, p] = True
        if q is None:
            neg[s] = ~pos[s]
        else:
            neg[s, q] = True
            if (pos[s] & neg[s]).any():
                raise ValueError(f"{where[s]}: a label is both positive and negative")
    return pos.to(label_ids.device), neg.to(label_ids.device)


Columns = slice | Tensor  # sentence columns: a slice when contiguous, else int64 indices


def _plan(pos: Tensor, neg: Tensor) -> tuple[Columns, Columns, bool]:
    """Columns of one split's positives [N] and the cheaper way to count its negatives [N].

    Returns (positive columns, columns to count, True if those are the negatives themselves,
    False if they are the excluded sentences, to subtract from everyone-but-positives).
    """
    excluded = ~(pos | neg)  # [N]
    count_is_neg = int(neg.sum()) < int(excluded.sum())
    return _columns(pos), _columns(neg if count_is_neg else excluded), count_is_neg


def _columns(mask: Tensor) -> Columns:
    idx = mask.nonzero().squeeze(1)  # [K]
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _select(a: Tensor, cols: Columns) -> Tensor:
    """a[:, cols] for a [m, N]: [m, K]."""
    return a[:, cols] if isinstance(cols, slice) else a.index_select(1, cols)


def _members_below(ch: _Chunk, cols: Columns, k: Tensor) -> tuple[Tensor, Tensor]:
    """Sentences in `cols` with response < and <= each query key k [m, P]: 2x int64 [m, P]."""
    member_k = _sort_rows(_select(ch.key, cols))  # [m, K]
    return torch.searchsorted(member_k, k, side="left"), torch.searchsorted(member_k, k, side="right")


def _percentile_sorted(xs: Tensor, lo: Tensor, q: float) -> Tensor:
    """q-th percentile [m] of the positives' responses, numpy.percentile(method="linear") exactly.

    xs: [m, N] sorted responses; lo: [m, P] positives' ranks ascending, so xs[i, lo[i, j]] is
    neuron i's j-th smallest positive response.
    """
    p = lo.shape[1]
    virtual = (p - 1) * (q / 100)  # numpy: (n - 1) * quantile, float64
    below = int(virtual // 1)
    above = min(below + 1, p - 1)
    t = virtual - below
    a, b = xs.gather(1, lo[:, [below, above]]).unbind(1)  # [m] each
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t  # numpy's _lerp


def _sort_rows(a: Tensor, return_order: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sort each row of a [m, K] ascending: values, or (values, order) if return_order."""
    if a.device.type != "cpu" or not _NUMPY_ON_CPU:
        res = a.sort(dim=1)
        return tuple(res) if return_order else res.values
    # numpy's vectorised (AVX-512 / AVX2) sorts; a second, value-only sort is cheaper than
    # gathering the values through the order
    values = torch.from_numpy(np.sort(a.numpy(), axis=1))
    return (values, torch.from_numpy(np.argsort(a.numpy(), axis=1))) if return_order else values


def _warn_empty(n_pos: list[int], n_neg: list[int], metrics: tuple[str, ...], where: Sequence[str]) -> None:
    stats = "stats" in metrics
    for s, (p, nn) in enumerate(zip(n_pos, n_neg)):
        if p == 0:
            undefined = [k for k in ("ap", "auroc") if k in metrics] + (["on_*"] if stats else [])
            what = "positive"
        elif nn == 0 and ("auroc" in metrics or stats):
            undefined = (["auroc"] if "auroc" in metrics else []) + (["off_mean"] if stats else [])
            what = "negative"
        else:
            continue
        msg = f"{where[s]}: no {what} sentences; {', '.join(undefined)} set to NaN"
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
