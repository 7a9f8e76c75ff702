"""Streaming per-label statistics of neuron responses, in fixed memory.

Instead of storing every sentence's response (sentences x neurons), a `StreamState` keeps, per
(label, neuron), a histogram of the pooled responses over fixed per-neuron bin edges plus a
float64 running sum: labels x neurons x bins int32 counts, whatever the corpus size. Edges are
set once by `calibrate_edges` on a calibration sample (quantiles, dense in the upper tail where
experts are decided) and stored in the state, so states built on other batches, checkpoints or
machines merge by plain addition (`merge`, `+=`), and refuse to merge when edges, labels or
settings differ. Neurons live on one flat axis (flat = layer * width + unit).

Because counts are kept per label, any positive / negative split is scored after one pass
(`StreamState.score`): AP and AUROC of the histogram (equal to scikit-learn's on the
bin-quantised responses) come with per-neuron certificates bounding their distance to the exact
scores on the raw responses. `shortlist` turns the certificates into the set of neurons that
could still be in the exact top-k, the only ones an exact second pass has to rescore.

Non-finite responses (NaN, +-inf) are counted in `nonfinite` and left out of every statistic.

Files (`save` / `load`): a steer.stream file (steer/core/artifacts.py: safetensors, format version,
sha256, written atomically) with the labels, settings and optional extra metadata (a
checkpoint's corpus position). A crash never leaves a half-written state in place of the
previous one; a corrupt, truncated or newer-format file is a clear error naming it, never
silently wrong counts. Files of format steer.stream/1 (before artifacts.py) are still read.
"""
import hashlib
import json
import math
import warnings
from typing import Sequence

import torch

from steer.core import artifacts
from steer.core.deprecation import renamed_argument
from steer.core.token_stats import PREFIX, TokenStats
from steer.kernels.histogram import histogram_update

KIND, VERSION = "stream", 2  # steer.stream files, format 2 (artifacts.py)
LEGACY_FORMAT = "steer.stream/1"  # before artifacts.py: still read, its own sha256 checked

# Quantile levels of the calibration edges. Half of the edges go to the top (1 - BODY_TOP) of
# the mass, spaced geometrically in the exceedance 1 - q from 1 - BODY_TOP down to TAIL_MIN;
# the other half go at equal mass over the body below.
# - Experts are decided in the upper tail: a label with prior pi puts an expert's positives in
#   the top ~pi of its responses (1/22 ~ 4.5% for 22 languages, 0.1-1% for a rare label), so the
#   top 15% covers every label from ~10% down to 0.1% with room to spare.
# - The AP certificate of a bin grows with (sentences in the bin) / (sentences above it);
#   geometric exceedances keep that ratio constant through the tail (at 64 bins each tail bin
#   holds ~17% as many sentences as lie above it), so labels of any prior are resolved alike.
#   Equal-mass bins would put a whole rare label into one or two bins; uniform bins in value (or
#   in a squashed space) leave the tail to one or two bins.
# - AUROC depends on the whole ranking: equal-mass body bins cap every body bin at 1/32 of the
#   body's sentences (at 64 bins), hence every term p_b n_b of the AUROC certificate.
# - TAIL_MIN = 0.1%: finer levels are not estimable from a calibration sample of a few thousand
#   sentences; the open top bin collects the rest.
BODY_TOP = 0.85
TAIL_MIN = 1e-3


def calibration_levels(bins: int = 64) -> torch.Tensor:
    """The bins - 1 quantile levels (float64, increasing) of `calibrate_edges` (see above)."""
    if bins < 4:
        raise ValueError(f"bins must be >= 4, got {bins}")
    n_edges = bins - 1
    n_tail = n_edges // 2
    n_body = n_edges - n_tail
    body = BODY_TOP * torch.arange(1, n_body + 1, dtype=torch.float64) / n_body  # ends at BODY_TOP
    steps = torch.arange(1, n_tail + 1, dtype=torch.float64) / n_tail
    tail = 1.0 - (1.0 - BODY_TOP) * (TAIL_MIN / (1.0 - BODY_TOP)) ** steps  # ends at 1 - TAIL_MIN
    return torch.cat([body, tail])


def calibrate_edges(sample: torch.Tensor, bins: int = 64, *, chunk: int = 8192) -> torch.Tensor:
    """Inner bin edges [M, bins - 1] fp32 from a calibration sample [S, M] of pooled responses.

    Per neuron, the `calibration_levels(bins)` quantiles of its finite responses (linear
    interpolation, as numpy.percentile). Edges are non-decreasing. A repeated quantile (a point
    mass: ReLU zeros, a constant neuron) keeps its first edge v and moves the repeats to the next
    float above v, so the point mass gets a bin [v, next(v)) to itself (its tie is then scored
    exactly) and the repeats leave empty bins. A neuron without finite responses gets zeros.
    Runs in chunks of `chunk` neurons (a sorted copy [S, chunk] at a time).
    """
    if sample.dim() != 2:
        raise ValueError(f"sample must be [S, M], got {tuple(sample.shape)}")
    S, M = sample.shape
    levels = calibration_levels(bins).to(sample.device)  # [NE]
    edges = torch.empty(M, bins - 1, dtype=torch.float32, device=sample.device)
    for start in range(0, M, chunk):
        block = sample[:, start:start + chunk].t().to(torch.float32)  # [m, S]
        block = torch.where(torch.isfinite(block), block, math.nan)  # a contiguous copy
        ordered = torch.sort(block, dim=1).values  # [m, S], NaN last
        finite = (~torch.isnan(ordered)).sum(1, keepdim=True)  # [m, 1]
        pos = levels[None, :] * (finite - 1).clamp(min=0)  # [m, NE] 0-based rank
        below = pos.floor().long()
        lo = ordered.gather(1, below).double()
        hi = ordered.gather(1, pos.ceil().long()).double()
        q = torch.lerp(lo, hi, pos - below)  # [m, NE]
        q = torch.where(finite > 0, q, 0.0).float()
        q = torch.cummax(q, dim=1).values  # guard against rounding in the interpolation
        repeat = torch.zeros_like(q, dtype=torch.bool)
        repeat[:, 1:] = q[:, 1:] == q[:, :-1]
        q = torch.where(repeat, torch.nextafter(q, torch.full_like(q, math.inf)), q)
        edges[start:start + chunk] = q
    return edges


def _histogram_scores(p: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """AP, AUROC and their certificates from positive / negative counts p, n [m, NB] (float64,
    bins in ascending order of response).

    With bins ordered from the highest responses down, P = sum p_b, N = sum n_b,
    TP_b = sum_{c<=b} p_c, D_b = sum_{c<=b} (p_c + n_c), A_b = TP_b - p_b, D-_b = D_b - p_b - n_b:
      AP_hist    = sum_b (p_b / P) H_b, H_b = TP_b / D_b (scikit-learn's AP of the quantised score)
      AUROC_hist = sum_b p_b (negatives below b + n_b / 2) / (P N)

    AP certificate. Responses in higher bins are strictly larger, so in the exact AP each
    positive of bin b gets the precision (A_b + i) / (D-_b + i + j) at its threshold, for some
    1 <= i <= p_b positives and 0 <= j <= n_b negatives of bin b at or above it (ties included).
    That is at most U_b = (A_b + p_b) / (D-_b + p_b) (positives tied above the bin's negatives)
    and at least L_b = (A_b + 1) / (D-_b + n_b + 1). Bins are independent, so
      -sum_b p_b (H_b - L_b) <= P (AP_exact - AP_hist) <= sum_b p_b (U_b - H_b),
    and ap_bound = max of the two sums / P. The upper end is attained (in every bin, positives
    tied above its negatives), so an AP underestimated by the histogram is bounded tightly;
    the lower end is looser (the exact minimum is sum_k (A_b + k) / (D-_b + n_b + k)). It is
    never larger than the textbook per-bin bound sum_b (p_b / P) min(1, (p_b + n_b - 1) / (D-_b + n_b + 1)),
    which charges up to p_b / P for a bin of positives only; here such a bin adds 0 when only
    positives lie above it, so a perfect expert's bound comes from its one mixed bin alone.
    AUROC certificate (attained when a bin's positives all lie above or all below its
    negatives): auroc_bound = sum_b p_b n_b / (2 P N).
    P = 0 gives NaN everywhere; N = 0 gives AP 1, bound 0, AUROC and its bound NaN.
    """
    # bins stay ascending: "bins c <= b" from the top are suffix sums, total - prefix sum + own
    P, N = p.sum(-1, keepdim=True), n.sum(-1, keepdim=True)  # [m, 1]
    t = p + n
    tp = P - p.cumsum(-1) + p  # TP_b
    above = (P + N) - t.cumsum(-1)  # D-_b (D_b = above + t)
    has = p > 0  # where D_b > 0, so the divisions below are defined
    h = torch.where(has, tp / (above + t), 0.0)
    u = torch.where(has, tp / (above + p), 0.0)
    low = torch.where(has, (tp - p + 1) / (above + n + 1), 0.0)
    P, N = P.squeeze(-1), N.squeeze(-1)  # [m]
    ap = (p * h).sum(-1) / P
    ap_bound = torch.maximum((p * (u - h)).sum(-1), (p * (h - low)).sum(-1)) / P
    neg_below = n.cumsum(-1) - n  # [m, NB]
    auroc = (p * (neg_below + 0.5 * n)).sum(-1) / (P * N)
    auroc_bound = (p * n).sum(-1) / (2 * P * N)
    return {"ap": ap, "auroc": auroc, "ap_bound": ap_bound, "auroc_bound": auroc_bound}


def _percentile(
    p: torch.Tensor,  # [m, NB] float64 counts, bins ascending
    lower: torch.Tensor,  # [m, NB] float64 lower end of each bin
    upper: torch.Tensor,  # [m, NB] float64 upper end of each bin
    q: float,
) -> torch.Tensor:
    """q-th quantile (0 <= q <= 1) of the binned values, [m] float64 (NaN without values).

    numpy.percentile's linear rank r = q (P - 1) is read off the histogram with the p_b values of
    a bin spread evenly over it (the k-th, 0-based, at lower + (k + 1/2) / p_b of its width):
    rank r lies in the bin b with cum_{b-1} <= r + 1/2 <= cum_b, at fraction
    (r + 1/2 - cum_{b-1}) / p_b of it. The result lies between the lower end of the bin of the
    order statistic floor(r) and the upper end of the bin of ceil(r), the two that numpy
    interpolates (one bin, unless r falls between two order statistics in different bins).
    """
    P = p.sum(-1)  # [m]
    cum = p.cumsum(-1)  # [m, NB]
    target = (q * (P - 1) + 0.5)[:, None]  # [m, 1]
    b = torch.searchsorted(cum, target).clamp(max=p.shape[1] - 1)  # [m, 1] first cum_b >= target
    count = p.gather(1, b)
    frac = (target - (cum.gather(1, b) - count)) / count
    lo, hi = lower.gather(1, b), upper.gather(1, b)
    value = (lo + frac * (hi - lo)).squeeze(1)
    return torch.where(P > 0, value, math.nan)


class StreamState:
    """Fixed-size per-label statistics of M neurons' pooled responses (see the module docstring).

    edges      [M, NB - 1] fp32   inner bin edges (bin = number of edges <= response)
    counts     [C, M, NB]  int32  finite responses per (label, neuron, bin)
    sums       [C, M]      f64    running sums of finite responses
    n          [C]         int64  sentences per label
    nonfinite  [M]         int64  NaN / inf responses seen (never binned, never summed)
    lo, hi     [M]         fp32   smallest / largest finite response seen (close the end bins)
    label_names: C distinct names; settings: JSON-able dict (pooling, bins, model fingerprint...).
    Tensors live on the device of `edges`.
    """

    def __init__(self, edges: torch.Tensor, label_names: Sequence[str],
                 settings: dict | None = None):
        if edges.dim() != 2 or edges.shape[1] < 1:
            raise ValueError(f"edges must be [M, NB - 1] with NB >= 2, got {tuple(edges.shape)}")
        edges = edges.to(torch.float32).contiguous()
        if not torch.isfinite(edges).all() or (edges[:, 1:] < edges[:, :-1]).any():
            raise ValueError("edges must be finite and non-decreasing per neuron")
        names = [str(name) for name in label_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"label_names must be distinct and non-empty, got {names}")
        self.edges = edges  # [M, NB - 1]
        self.label_names = names
        self.settings = json.loads(json.dumps(settings or {}))  # a JSON round trip: comparable
        M, NB, C, dev = edges.shape[0], edges.shape[1] + 1, len(names), edges.device
        self.counts = torch.zeros(C, M, NB, dtype=torch.int32, device=dev)  # [C, M, NB]
        self.sums = torch.zeros(C, M, dtype=torch.float64, device=dev)  # [C, M]
        self.n = torch.zeros(C, dtype=torch.int64, device=dev)  # [C]
        self.nonfinite = torch.zeros(M, dtype=torch.int64, device=dev)  # [M]
        self.lo = torch.full((M,), math.inf, dtype=torch.float32, device=dev)  # [M]
        self.hi = torch.full((M,), -math.inf, dtype=torch.float32, device=dev)  # [M]
        # LAPE / DiffMean token sums collected in the same pass (settings["token_stats"]: kinds)
        kinds, s = self.settings.get("token_stats"), self.settings
        self.token_stats = TokenStats(names, kinds, s["layers"], s["width"], s["hidden"], dev) if kinds else None

    @classmethod
    def from_sample(cls, sample: torch.Tensor, label_ids: torch.Tensor, bins: int, label_names: Sequence[str],
                    settings: dict, token_stats: TokenStats | None = None) -> "StreamState":
        """The state of a calibration sample [S, M] with label ids [S]: edges from the sample
        (`calibrate_edges`), which it then counts, with the sample's token sums."""
        state = cls(calibrate_edges(sample, bins), label_names, settings)
        state.update(sample, label_ids)
        if token_stats is not None:
            state.token_stats.merge(token_stats)
        return state

    def _tensors(self) -> dict[str, torch.Tensor]:
        extra = {} if self.token_stats is None else self.token_stats.stored()
        return {"edges": self.edges, "counts": self.counts, "sums": self.sums, "n": self.n,
                "nonfinite": self.nonfinite, "lo": self.lo, "hi": self.hi, **extra}

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def update(self, x: torch.Tensor, label_ids: torch.Tensor, *, impl: str = "auto",
               backend: str | None = None) -> None:
        """Add a tile of pooled responses x [B, M] with label ids [B] (impl: see
        `steer.kernels.histogram.histogram_update`; `backend` is its deprecated name)."""
        impl = renamed_argument("StreamState.update", "backend", backend, "impl", impl)
        x = x.to(device=self.edges.device, dtype=torch.float32)  # [B, M]
        label_ids = label_ids.to(device=self.edges.device, dtype=torch.int64)  # [B]
        histogram_update(self.counts, x, label_ids, self.edges, impl=impl)  # checks shapes
        if x.shape[0] == 0:
            return
        self.n += torch.bincount(label_ids, minlength=len(self.label_names))
        # the usual case, all finite, needs no masking. A finite sum means every x is finite (one
        # NaN or inf makes it NaN or inf); a sum that overflows takes the masked path, also exact.
        # 10x cheaper than isfinite(x).all() (and amin + amax than aminmax over dim 0) on CPU.
        if math.isfinite(float(x.sum())):
            self.sums.index_add_(0, label_ids, x.double())
            lo, hi = x.amin(0), x.amax(0)
        else:
            finite = torch.isfinite(x)  # [B, M]
            self.sums.index_add_(0, label_ids, torch.where(finite, x, 0.0).double())
            self.nonfinite += (~finite).sum(0)
            lo = torch.where(finite, x, math.inf).amin(0)
            hi = torch.where(finite, x, -math.inf).amax(0)
        torch.minimum(self.lo, lo, out=self.lo)
        torch.maximum(self.hi, hi, out=self.hi)

    def merge(self, other: "StreamState") -> "StreamState":
        """Add `other` into this state (in place) and return it. Both must share edges (exactly),
        label names and settings: otherwise ValueError."""
        if self.label_names != other.label_names:
            raise ValueError(f"cannot merge states with other labels: {self.label_names} vs "
                             f"{other.label_names}")
        if self.settings != other.settings:
            raise ValueError(f"cannot merge states with other settings: {self.settings} vs "
                             f"{other.settings}")
        if self.edges.shape != other.edges.shape or not torch.equal(
                self.edges, other.edges.to(self.edges.device)):
            raise ValueError("cannot merge states with other bin edges (calibrate once, then "
                             "share the edges)")
        dev = self.edges.device
        self.counts += other.counts.to(dev)
        self.sums += other.sums.to(dev)
        self.n += other.n.to(dev)
        self.nonfinite += other.nonfinite.to(dev)
        self.lo = torch.minimum(self.lo, other.lo.to(dev))
        self.hi = torch.maximum(self.hi, other.hi.to(dev))
        if self.token_stats is not None:
            self.token_stats.merge(other.token_stats)
        return self

    __iadd__ = merge

    def digest(self) -> str:
        """sha256 of every tensor's shape, dtype and bytes (the check of steer.stream/1 files;
        newer files carry artifacts.py's digest)."""
        h = hashlib.sha256()
        for key, t in self._tensors().items():
            t = t.detach().contiguous().cpu()
            h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        return h.hexdigest()

    def save(self, path, extra: dict | None = None) -> None:
        """Write the state atomically as a steer.stream file (steer/core/artifacts.py); label names,
        settings and `extra` (JSON-able) go to its metadata, under its sha256."""
        meta = {"label_names": self.label_names, "settings": self.settings, "extra": extra or {}}
        artifacts.save(path, self._tensors(), meta, kind=KIND, version=VERSION)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", *,
             with_extra: bool = False, neurons: int | None = None):
        """Read a state written by `save` onto `device` (with `with_extra`: (state, extra)).

        A file that is not a state, is corrupt or truncated, was written by a newer steer, or
        (given `neurons`) holds another number of neurons raises ValueError naming it."""
        head = artifacts.header(path)
        if head.get("format") == LEGACY_FORMAT:
            tensors = artifacts.read_tensors(path)
            try:
                meta = {key: json.loads(head[key]) for key in ("label_names", "settings")}
                meta["extra"] = json.loads(head.get("extra", "{}"))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path} is corrupt: unreadable metadata ({e!r})") from None
        else:
            tensors, meta = artifacts.load(path, kind=KIND, version=VERSION)[:2]
        artifacts.check_shapes(path, tensors, {"edges": (neurons, None)})
        try:
            state = cls(tensors["edges"], meta["label_names"], meta["settings"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid stream state: {e}") from None
        if state.token_stats is not None:
            try:
                state.token_stats.load_(tensors)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            state.token_stats.to_(device)
        for key, empty in state._tensors().items():
            if key.startswith(PREFIX):  # loaded above
                continue
            stored = tensors.get(key)
            if stored is None or stored.shape != empty.shape or stored.dtype != empty.dtype:
                got = "missing" if stored is None else f"{tuple(stored.shape)} {stored.dtype}"
                raise ValueError(f"{path}: {key} is {got}, expected {tuple(empty.shape)} {empty.dtype}")
            setattr(state, key, stored.to(device))
        if head.get("format") == LEGACY_FORMAT and "sha256" in head and state.digest() != head["sha256"]:
            raise ValueError(f"{path} is corrupt: its tensors or metadata do not match the sha256 "
                             "stored with them")
        return (state, meta.get("extra") or {}) if with_extra else state

    def score(self, positive: Sequence[int], negative: Sequence[int] | None = None, *,
              chunk: int = 2048) -> dict[str, torch.Tensor]:
        """Scores of every neuron for `positive` label ids vs `negative` ones (None: all others).

        Returns [M] tensors: float64 `ap`, `auroc` (histogram versions, see `_histogram_scores`),
        `ap_bound`, `auroc_bound` (|exact - hist| <= bound, exact = scikit-learn on the raw finite
        responses), `on_mean`, `off_mean`, `on_p50`, `on_p90` (percentiles interpolated within
        bins), and int64 `n_pos`, `n_neg` (finite responses counted). Edge cases:
        no positives -> AP NaN (scikit-learn says 0.0) and AUROC NaN, with a warning; no
        negatives -> AP 1.0, AUROC NaN, with a warning. Runs over `chunk` neurons at a time (small
        chunks stay in the CPU's cache: 2048 was ~3x faster than 65536 here).
        """
        C = len(self.label_names)
        positive = [int(c) for c in positive]
        negative = [c for c in range(C) if c not in positive] if negative is None else \
            [int(c) for c in negative]
        ids = positive + negative
        if not positive or len(set(ids)) != len(ids) or not all(0 <= c < C for c in ids):
            raise ValueError(f"positive ({positive}) must be non-empty and disjoint from negative "
                             f"({negative}), both distinct label ids in [0, {C})")
        pos = torch.tensor(positive, dtype=torch.int64, device=self.edges.device)
        neg = torch.tensor(negative, dtype=torch.int64, device=self.edges.device)
        M = self.edges.shape[0]
        out: dict[str, list[torch.Tensor]] = {}
        for start in range(0, M, chunk):
            sl = slice(start, start + chunk)
            p = self.counts[:, sl].index_select(0, pos).sum(0, dtype=torch.int64)  # [m, NB]
            n = self.counts[:, sl].index_select(0, neg).sum(0, dtype=torch.int64)  # [m, NB]
            P, N = p.sum(-1), n.sum(-1)  # [m]
            p, n = p.double(), n.double()
            edges = self.edges[sl].double()  # [m, NB - 1]
            lower = torch.cat([self.lo[sl, None].double(), edges], 1)  # [m, NB]
            upper = torch.cat([edges, self.hi[sl, None].double()], 1)  # [m, NB]
            part = _histogram_scores(p, n)
            part["on_mean"] = self.sums[:, sl].index_select(0, pos).sum(0) / P
            part["off_mean"] = self.sums[:, sl].index_select(0, neg).sum(0) / N
            part["on_p50"] = _percentile(p, lower, upper, 0.5)
            part["on_p90"] = _percentile(p, lower, upper, 0.9)
            part["n_pos"], part["n_neg"] = P, N
            for key, value in part.items():
                out.setdefault(key, []).append(value)
        result = {key: torch.cat(parts) for key, parts in out.items()}
        # neurons whose every response was non-finite are reported by the caller, not here
        seen = (result["n_pos"] + result["n_neg"]) > 0
        if ((result["n_pos"] == 0) & seen).any():
            warnings.warn(f"{int(((result['n_pos'] == 0) & seen).sum())} neurons have no positive "
                          "responses: their AP and AUROC are NaN (scikit-learn would give AP 0.0)")
        if ((result["n_neg"] == 0) & seen).any():
            warnings.warn(f"{int(((result['n_neg'] == 0) & seen).sum())} neurons have no negative "
                          "responses: their AUROC is NaN and their AP 1.0")
        return result


def shortlist(score: torch.Tensor, bound: torch.Tensor, k: int, *, largest: bool = True,
              tol: float = 1e-9) -> torch.Tensor:
    """Indices (ascending, int64) of every neuron that could be in the EXACT top-k (bottom-k with
    largest=False) given histogram scores [M] and certificates [M] (|exact - score| <= bound).

    Each neuron's exact score lies in [score - bound, score + bound]. Let T be the k-th largest
    lower bound score - bound: k neurons are guaranteed an exact score >= T, so the k-th largest
    exact score is >= T, and a neuron of the exact top-k (whatever the tie-breaking) has
    exact >= T, hence score + bound >= T. Keeping every neuron with score + bound >= T (ties
    included) is therefore safe, and nothing outside can enter the exact top-k.
    The tempting rule "the k-th best histogram score minus its bound" is not a valid threshold:
    with k = 2 and (score, bound) = A (0.9, 0.5), B (0.8, 0), C (0.5, 0.29), it gives
    T = 0.8 - 0 and drops C, yet exact scores A = 0.4, B = 0.8, C = 0.79 put C in the top 2;
    the k-th largest lower bound is 0.4 and keeps C.
    Bottom-k: the same on the negated scores (T = k-th smallest score + bound, keep
    score - bound <= T). NaN scores (or bounds) are never kept and never set T. `tol` absorbs
    float64 rounding of the histogram sums (an exact AP of 1 may come out as 1 - 2e-16).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = score.double() if largest else -score.double()  # [M]
    b = bound.double()  # [M]
    valid = ~(torch.isnan(s) | torch.isnan(b))
    lower = (s - b)[valid]
    if lower.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=score.device)
    threshold = torch.topk(lower, min(k, lower.numel())).values[-1]
    return torch.nonzero(valid & (s + b >= threshold - tol)).squeeze(1)
