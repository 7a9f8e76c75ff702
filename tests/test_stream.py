"""Streaming statistics: the histogram kernel against its reference, histogram scores against
scikit-learn, the certificates and the short-list against exact scores, merge / save / load."""
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, roc_auc_score

from steer.kernels.histogram import histogram_update
from steer.kernels.histogram_ref import histogram_update_ref
from steer.core.stream import StreamState, calibrate_edges, calibration_levels, shortlist


def _state(x, labels, edges, num_labels, settings=None):
    state = StreamState(torch.as_tensor(edges, dtype=torch.float32),
                        [f"l{c}" for c in range(num_labels)], settings)
    state.update(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels))
    return state


def _bins(x, edges):
    """Bin index of every response: the number of the neuron's edges <= x. [S, M]"""
    x = torch.as_tensor(x, dtype=torch.float32).t().contiguous()
    edges = torch.as_tensor(edges, dtype=torch.float32)
    return torch.searchsorted(edges, x, right=True).t().numpy()


def _exact(x, y, metric):
    """Per-column scikit-learn metric of responses x [S, M] for labels y [S] (bool)."""
    return np.array([metric(y, x[:, m]) for m in range(x.shape[1])])


def _score(state, positive, negative=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {k: v.numpy() for k, v in state.score(positive, negative).items()}


# --- histogram kernel -------------------------------------------------------------------------

def test_reference_bins_by_hand():
    edges = torch.tensor([[0.0, 1.0, 1.0, 2.0]])  # NB = 5, a duplicate edge: bin 2 is empty
    x = torch.tensor([-5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 9.0, math.nan, math.inf, -math.inf])[:, None]
    counts = torch.zeros(2, 1, 5, dtype=torch.int32)
    histogram_update_ref(counts, x, torch.zeros(10, dtype=torch.int64), edges)
    assert counts[0, 0].tolist() == [1, 2, 0, 2, 2]
    assert counts[1].sum() == 0


@pytest.mark.parametrize("C,M,B,NB,seed", [(3, 37, 21, 9, 0), (1, 5, 3, 2, 1), (4, 67, 17, 16, 2)])
def test_triton_kernel_equals_reference(C, M, B, NB, seed):
    g = torch.Generator().manual_seed(seed)
    edges = torch.sort(torch.randn(M, NB - 1, generator=g), dim=1).values  # [M, NB - 1]
    if NB > 3:
        edges[:, 2] = edges[:, 1]  # duplicate edges
        edges[: M // 2, -1] = edges[: M // 2, -2]
    x = torch.randn(B, M, generator=g) * 1.5  # [B, M]
    on_edge = torch.rand(B, M, generator=g) < 0.25  # values exactly on an edge
    x = torch.where(on_edge, edges[torch.arange(M), torch.randint(0, NB - 1, (M,), generator=g)], x)
    x[0, : min(M, 4)] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])[: min(M, 4)]
    x[-1, -1] = math.inf
    labels = torch.randint(0, C, (B,), generator=g)
    start = torch.randint(0, 5, (C, M, NB), generator=g, dtype=torch.int32)  # accumulates
    ref, tri = start.clone(), start.clone()
    histogram_update(ref, x, labels, edges, impl="torch")
    histogram_update(tri, x, labels, edges, impl="triton")
    assert torch.equal(tri, ref)
    assert int((ref - start).sum()) == int(torch.isfinite(x).sum())


def test_histogram_update_checks_arguments():
    counts = torch.zeros(2, 3, 4, dtype=torch.int32)
    edges = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="label ids"):
        histogram_update(counts, torch.zeros(2, 3), torch.tensor([0, 2]), edges)
    with pytest.raises(ValueError, match="edges"):
        histogram_update(counts, torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="impl"):
        histogram_update(counts, torch.zeros(2, 3), torch.tensor([0, 1]), edges, impl="cuda")


def test_state_update_triton_equals_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(19, 40, generator=g)
    x[3, 7] = math.nan
    labels = torch.randint(0, 3, (19,), generator=g)
    edges = calibrate_edges(torch.randn(200, 40, generator=g), bins=8)
    states = []
    for impl in ("torch", "triton"):
        state = StreamState(edges, ["a", "b", "c"])
        state.update(x, labels, impl=impl)
        states.append(state)
    assert torch.equal(states[0].counts, states[1].counts)
    assert states[0].nonfinite[7] == 1


# --- histogram scores == scikit-learn on the bin-quantised responses ------------------------

def _scenario(name, rng):
    """(x [S, M], labels [S], edges [M, NB - 1]) for a named scenario, 3 labels."""
    S, M = 120, 6
    labels = rng.integers(0, 3, S)
    if name == "random":
        x = rng.normal(size=(S, M)) + (labels == 0)[:, None] * rng.uniform(0, 2, M)
        edges = calibrate_edges(torch.as_tensor(x, dtype=torch.float32), bins=16)
    elif name == "ties":  # few distinct values, many ties inside and across bins
        x = rng.integers(0, 5, size=(S, M)).astype(float) + (labels == 0)[:, None]
        edges = np.tile(np.array([0.5, 1.5, 1.5, 3.0, 4.5]), (M, 1))
    elif name == "all_equal":
        x = np.full((S, M), 2.0)
        edges = np.tile(np.array([1.0, 2.0, 3.0]), (M, 1))
    elif name == "rare":  # 1 or 2 positives, sitting anywhere
        labels = np.full(S, 1)
        labels[: S // 2] = 2
        labels[S // 2 + rng.choice(S // 2, rng.integers(1, 3), replace=False)] = 0
        x = rng.normal(size=(S, M))
        edges = calibrate_edges(torch.as_tensor(x, dtype=torch.float32), bins=8)
    elif name == "pure_positive_bin":  # the top bin holds positives only
        x = rng.normal(size=(S, M))
        x[labels == 0] += 3.0 * (rng.uniform(size=((labels == 0).sum(), 1)) < 0.5)
        edges = np.tile(np.array([-1.0, 0.0, 1.0, 2.5]), (M, 1))
    return x, labels, np.asarray(edges, dtype=np.float32)


@pytest.mark.parametrize("name", ["random", "ties", "all_equal", "rare", "pure_positive_bin"])
def test_histogram_scores_equal_sklearn_on_quantised(name):
    rng = np.random.default_rng(4)
    x, labels, edges = _scenario(name, rng)
    state = _state(x, labels, edges, 3)
    q = _bins(x, edges).astype(float)  # the bin-quantised score
    for positive, negative in ([0], None), ([0, 1], None), ([0], [2]):
        rows = np.isin(labels, positive + (negative or [c for c in range(3) if c not in positive]))
        y = np.isin(labels[rows], positive)
        got = _score(state, positive, negative)
        ap, auroc = _exact(q[rows], y, average_precision_score), _exact(q[rows], y, roc_auc_score)
        np.testing.assert_allclose(got["ap"], ap, atol=1e-12)
        np.testing.assert_allclose(got["auroc"], auroc, atol=1e-12)
        assert (got["n_pos"] == y.sum()).all() and (got["n_neg"] == (~y).sum()).all()


# --- certificates -----------------------------------------------------------------------------

MODES = ["pos_top", "pos_bottom", "pos_tied_top", "random"]


def _adversarial(rng, y, M, NB, mode):
    """Responses [S, M] with edges 1 .. NB - 1 (bin b holds [b, b + 1)): per neuron, random
    skewed positive / negative bin masses, arranged inside each bin by `mode`."""
    S = len(y)
    x = np.empty((S, M))
    for m in range(M):
        wp, wn = rng.dirichlet(np.full(NB, 0.3)), rng.dirichlet(np.full(NB, 0.3))
        b = np.where(y, rng.choice(NB, S, p=wp), rng.choice(NB, S, p=wn))
        u = rng.uniform(size=S)
        mode_m = mode if mode != "mixed" else MODES[m % len(MODES)]
        offset = {
            "pos_top": np.where(y, 0.5 + 0.4 * u, 0.1 + 0.4 * u),
            "pos_bottom": np.where(y, 0.1 + 0.4 * u, 0.5 + 0.4 * u),
            "pos_tied_top": np.where(y, 0.9, 0.1 + 0.4 * u),
            "random": 0.99 * u,
        }[mode_m]
        x[:, m] = b + offset
    return x.astype(np.float32)


def _design_ap_bound(state, positive):
    """The textbook per-bin AP certificate (sum_b (p_b / P) min(1, ...)), computed independently (bins from the top)."""
    negative = [c for c in range(len(state.label_names)) if c not in positive]
    p = state.counts[positive].sum(0).double().flip(-1)
    n = state.counts[negative].sum(0).double().flip(-1)
    d = (p + n).cumsum(-1)
    above = d - p - n
    term = torch.clamp((p + n - 1) / (above + n + 1), max=1.0)
    return ((p / p.sum(-1, keepdim=True)) * torch.where(p > 0, term, 0.0)).sum(-1).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_certificates_hold(mode):
    rng = np.random.default_rng(5)
    S, M, NB = 150, 24, 6
    labels = rng.integers(0, 3, S)
    y = labels == 0
    x = _adversarial(rng, y, M, NB, mode)
    edges = np.tile(np.arange(1, NB, dtype=np.float32), (M, 1))
    state = _state(x, labels, edges, 3)
    got = _score(state, [0])
    ap, auroc = _exact(x, y, average_precision_score), _exact(x, y, roc_auc_score)
    assert (np.abs(ap - got["ap"]) <= got["ap_bound"] + 1e-12).all()
    assert (np.abs(auroc - got["auroc"]) <= got["auroc_bound"] + 1e-12).all()
    assert (got["ap_bound"] <= _design_ap_bound(state, [0]) + 1e-12).all()
    if mode == "pos_top":  # every pair inside a bin ranks the positive first: AUROC bound attained
        np.testing.assert_allclose(auroc - got["auroc"], got["auroc_bound"], atol=1e-12)
    if mode == "pos_tied_top":  # every positive gets the highest precision its bin allows
        assert np.isclose(ap - got["ap"], got["ap_bound"], atol=1e-12).any()


def test_certificates_on_random_calibrated_data():
    rng = np.random.default_rng(6)
    S, M = 300, 30
    labels = rng.integers(0, 4, S)
    x = rng.gamma(1.0, size=(S, M)) + np.outer(labels == 1, rng.uniform(0, 3, M))
    edges = calibrate_edges(torch.as_tensor(x[:100], dtype=torch.float32), bins=8)
    state = _state(x, labels, edges, 4)
    got = _score(state, [1])
    y = labels == 1
    ap, auroc = _exact(x, y, average_precision_score), _exact(x, y, roc_auc_score)
    assert (np.abs(ap - got["ap"]) <= got["ap_bound"] + 1e-12).all()
    assert (np.abs(auroc - got["auroc"]) <= got["auroc_bound"] + 1e-12).all()


def test_ap_exact_when_positive_bins_hold_one_value():
    rng = np.random.default_rng(7)
    S, M, NB = 200, 12, 8
    labels = rng.integers(0, 3, S)
    y = labels == 0
    x = _adversarial(rng, y, M, NB, "random")
    bins = np.floor(x)
    holds_pos = np.zeros((NB, M), bool)
    for m in range(M):
        holds_pos[bins[y, m].astype(int), m] = True
    one_value = holds_pos[bins.astype(int), np.arange(M)]  # [S, M] rows in a positive-holding bin
    x = np.where(one_value, bins + 0.5, x).astype(np.float32)  # one distinct value in such bins
    edges = np.tile(np.arange(1, NB, dtype=np.float32), (M, 1))
    got = _score(_state(x, labels, edges, 3), [0])
    np.testing.assert_allclose(got["ap"], _exact(x, y, average_precision_score), atol=1e-12)


def test_perfect_expert_certificate_reaches_one():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 20, 1000)
    x = rng.normal(size=(1000, 2)).astype(np.float32)
    x[labels == 2] += 10.0  # positives (~5%) above every negative: exact AP 1
    edges = calibrate_edges(torch.as_tensor(x), bins=16).numpy()
    edges[1] = np.sort(np.r_[edges[1, :-1], 5.0])  # neuron 1: an edge in the gap
    got = _score(_state(x, labels, edges, 20), [2])
    assert got["ap"][0] < 1 and got["ap_bound"][0] > 0  # the gap's bin mixes both labels
    # the upper side of the certificate is attained (here it is the larger side)
    np.testing.assert_allclose(got["ap"] + got["ap_bound"], 1.0, atol=1e-12)
    assert got["ap"][1] == 1.0 and got["ap_bound"][1] == 0.0  # certified exact


# --- short-list -------------------------------------------------------------------------------

def test_shortlist_contains_exact_top_k():
    rng = np.random.default_rng(9)
    S, M, NB = 160, 64, 5
    labels = rng.integers(0, 3, S)
    y = labels == 0
    x = _adversarial(rng, y, M, NB, "mixed")
    x[:, 40:48] = x[:, 32:40]  # exact ties between neurons
    edges = np.tile(np.arange(1, NB, dtype=np.float32), (M, 1))
    got = {k: torch.from_numpy(v) for k, v in _score(_state(x, labels, edges, 3), [0]).items()}
    ap, auroc = _exact(x, y, average_precision_score), _exact(x, y, roc_auc_score)
    for k in (1, 3, 10, 30):
        top = set(np.flatnonzero(ap >= np.sort(ap)[::-1][k - 1]).tolist())
        assert top <= set(shortlist(got["ap"], got["ap_bound"], k).tolist())
        bottom = set(np.flatnonzero(auroc <= np.sort(auroc)[k - 1]).tolist())
        assert bottom <= set(shortlist(got["auroc"], got["auroc_bound"], k, largest=False).tolist())
    assert len(shortlist(got["ap"], got["ap_bound"], 1)) < M  # the bounds do prune


def test_shortlist_threshold_is_kth_lower_bound():
    score = torch.tensor([0.9, 0.8, 0.5, math.nan, 0.1], dtype=torch.float64)
    bound = torch.tensor([0.5, 0.0, 0.29, 0.0, 0.05], dtype=torch.float64)
    # exact A = 0.4, B = 0.8, C = 0.79 is allowed: C is in the exact top 2 and must be kept,
    # although 0.5 + 0.29 < 0.8 - 0 ("2nd best score minus its bound")
    assert shortlist(score, bound, 2).tolist() == [0, 1, 2]
    assert shortlist(score, bound, 1).tolist() == [0, 1]
    assert shortlist(score, bound, 10).tolist() == [0, 1, 2, 4]  # every non-NaN neuron
    assert shortlist(score, torch.zeros(5, dtype=torch.float64), 1, largest=False).tolist() == [4]


# --- state: merge, save / load, means and percentiles -----------------------------------------

def _data(seed=10, S=90, M=33, C=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, M, generator=g) + torch.rand(M, generator=g)  # [S, M]
    x[5, 3] = math.nan
    x[7, 3] = math.inf
    labels = torch.randint(0, C, (S,), generator=g)
    return x, labels, calibrate_edges(x, bins=12)


def test_merge_of_halves_equals_one_pass():
    x, labels, edges = _data()
    whole = StreamState(edges, list("abcd"), {"pooling": "max"})
    for start in range(0, 90, 16):
        whole.update(x[start:start + 16], labels[start:start + 16])
    first, second = StreamState(edges, list("abcd"), {"pooling": "max"}), \
        StreamState(edges, list("abcd"), {"pooling": "max"})
    first.update(x[:45], labels[:45])
    second.update(x[45:], labels[45:])
    first += second
    assert torch.equal(first.counts, whole.counts)
    assert torch.equal(first.n, whole.n) and torch.equal(first.nonfinite, whole.nonfinite)
    assert torch.equal(first.lo, whole.lo) and torch.equal(first.hi, whole.hi)
    torch.testing.assert_close(first.sums, whole.sums, rtol=1e-14, atol=1e-12)
    assert whole.nonfinite[3] == 2 and int(whole.n.sum()) == 90


def test_merge_refuses_other_edges_labels_settings():
    _, _, edges = _data()
    state = StreamState(edges, list("abcd"), {"pooling": "max"})
    other_edges = edges.clone()
    other_edges[0, 0] -= 1.0
    for other in (StreamState(other_edges, list("abcd"), {"pooling": "max"}),
                  StreamState(edges, list("abce"), {"pooling": "max"}),
                  StreamState(edges, list("abcd"), {"pooling": "mean"})):
        with pytest.raises(ValueError, match="cannot merge"):
            state.merge(other)


def test_save_load_round_trip(tmp_path):
    x, labels, edges = _data()
    settings = {"pooling": "max", "bins": 12, "fingerprint": "abc123", "layers": [0, 1]}
    state = _state(x, labels, edges, 4, settings)
    state.save(str(tmp_path / "state.safetensors"))
    loaded = StreamState.load(str(tmp_path / "state.safetensors"))
    for key in ("edges", "counts", "sums", "n", "nonfinite", "lo", "hi"):
        assert torch.equal(getattr(loaded, key), getattr(state, key)), key
    assert loaded.label_names == state.label_names and loaded.settings == settings
    assert loaded.nbytes == state.nbytes
    loaded.merge(state)  # same edges, labels and settings after the round trip
    save_file({"edges": edges}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a steer.stream"):
        StreamState.load(str(tmp_path / "other.safetensors"))


def test_nbytes():
    state = StreamState(torch.zeros(10, 7), list("abc"))
    assert state.nbytes == 3 * 10 * 8 * 4 + 3 * 10 * 8 + 3 * 8 + 10 * 8 + 10 * 7 * 4 + 2 * 10 * 4


def test_means_and_percentiles():
    x, labels, edges = _data(S=200)
    state = _state(x, labels, edges, 4)
    got = _score(state, [1, 2])
    xs, pos = x.double().numpy(), np.isin(labels.numpy(), [1, 2])
    finite = np.isfinite(xs)
    ends = np.concatenate([state.lo.double().numpy()[:, None], edges.double().numpy(),
                           state.hi.double().numpy()[:, None]], 1)  # [M, NB + 1] bin ends
    for m in range(x.shape[1]):
        on, off = xs[pos & finite[:, m], m], xs[~pos & finite[:, m], m]
        np.testing.assert_allclose(got["on_mean"][m], on.mean(), rtol=1e-12)
        np.testing.assert_allclose(got["off_mean"][m], off.mean(), rtol=1e-12)
        s = np.sort(on)
        for q, key in ((50, "on_p50"), (90, "on_p90")):
            r = q / 100 * (len(s) - 1)
            b_lo, b_hi = _bins(s[[math.floor(r), math.ceil(r)], None].repeat(x.shape[1], 1),
                               edges)[:, m]
            low, high = ends[m, b_lo], ends[m, b_hi + 1]  # bins of the interpolated order stats
            assert low <= got[key][m] <= high
            assert abs(got[key][m] - np.percentile(on, q)) <= high - low


def test_no_positives_and_no_negatives():
    x, labels, edges = _data()
    labels = labels % 2  # labels 2 and 3 are empty
    state = _state(x, labels, edges, 4)
    with pytest.warns(UserWarning, match="no positive"):
        got = state.score([2])
    assert torch.isnan(got["ap"]).all() and torch.isnan(got["auroc"]).all()
    assert torch.isnan(got["on_p50"]).all() and (got["n_pos"] == 0).all()
    with pytest.warns(UserWarning, match="no negative"):
        got = state.score([0], [3])
    assert (got["ap"] == 1.0).all() and (got["ap_bound"] == 0.0).all()
    assert torch.isnan(got["auroc"]).all()
    with pytest.raises(ValueError, match="disjoint"):
        state.score([0], [0, 1])


# --- calibration ------------------------------------------------------------------------------

def test_calibration_levels_dense_in_the_tail():
    levels = calibration_levels(64)
    assert levels.shape == (63,) and (levels.diff() > 0).all()
    assert int((levels > 0.85).sum()) == 31 and int((levels >= 0.85).sum()) == 32
    assert abs(float(levels[-1]) - 0.999) < 1e-12


def test_calibrate_edges():
    g = torch.Generator().manual_seed(11)
    S = 2000
    normal = torch.randn(S, generator=g)
    relu = torch.relu(torch.randn(S, generator=g) - 0.5)  # ~70% exact zeros
    constant = torch.full((S,), 3.0)
    nan = torch.full((S,), math.nan)
    dirty = torch.randn(S, generator=g)
    dirty[:50] = math.nan
    dirty[50:60] = math.inf
    sample = torch.stack([normal, relu, constant, nan, dirty], 1)  # [S, 5]
    edges = calibrate_edges(sample, bins=16)
    assert edges.shape == (5, 15) and edges.dtype == torch.float32
    assert torch.isfinite(edges).all() and (edges.diff(dim=1) >= 0).all()
    assert torch.equal(edges, calibrate_edges(sample, bins=16, chunk=2))
    levels = calibration_levels(16).numpy()
    np.testing.assert_allclose(edges[0].numpy(), np.quantile(normal.numpy(), levels), rtol=1e-5)
    np.testing.assert_allclose(edges[4].numpy(), np.quantile(dirty[60:].numpy(), levels), rtol=1e-5)
    tiny = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert edges[3, 0] == 0 and (edges[3] <= tiny).all()  # no finite responses: a point mass at 0
    # point masses get a bin of their own
    state = _state(sample, torch.zeros(S, dtype=torch.int64), edges, 1)
    zero_bin = int(torch.searchsorted(edges[1], torch.tensor(0.0), right=True))
    assert int(state.counts[0, 1, zero_bin]) == int((relu == 0).sum())
    assert int(state.counts[0, 2].max()) == S


def test_update_with_an_overflowing_sum_counts_nothing_as_nonfinite():
    x = torch.tensor([[3e38, -1.0], [3e38, 2.0], [3e38, 4.0]])  # finite, but the sum is inf
    assert not math.isfinite(float(x.sum()))
    state = StreamState(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), ["a", "b"])
    state.update(x, torch.tensor([0, 0, 1]))
    assert state.nonfinite.tolist() == [0, 0]
    assert state.lo.tolist() == [pytest.approx(3e38), -1.0]
    assert state.hi.tolist() == [pytest.approx(3e38), 4.0]
    assert state.sums[:, 1].tolist() == [1.0, 4.0] and state.sums[0, 0] == pytest.approx(6e38)
    assert state.counts.sum().item() == 6
