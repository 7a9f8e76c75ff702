"""steer.core.metrics against scikit-learn / numpy, per neuron, float64, tolerance 1e-12."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from steer.core import metrics
from steer.core.metrics import auroc, average_precision, rank_neurons, score_splits

TOL = 1e-12
N, M, C = 150, 30, 6  # sentences, neurons, labels

# positive labels, negative labels (None = all others). The explicit ones cover both ways of
# counting negatives: directly when fewer than the excluded (e.g. ([0], [1])), else as all minus
# the excluded (e.g. ([0], [1, 2, 3])); and non-consecutive labels (non-contiguous columns).
SPLITS = [([0], None), ([5], None), ([0], [1]), ([0], [1, 2, 3]), ([1, 3], [0, 4]), ([2], [0, 5]),
          ([5], [0, 1, 2, 3, 4])]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_scores(kind: str, n: int = N, m: int = M, seed: int = 0) -> torch.Tensor:
    """[n, m] responses of one kind."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)  # [n, m]
    if kind == "ties":  # a handful of levels
        x = (x * 1.5).round() / 1.5
    elif kind == "relu":  # ReLU-like: many exact zeros, all-zero neurons and sentences
        x = (x - 0.5).relu()
        x[:, :4] = 0.0
        x[: n // 4, 4:10] = 0.0
    elif kind == "equal":  # every neuron constant
        x = torch.arange(m, dtype=torch.float64).expand(n, m).contiguous()
    elif kind == "float32":
        x = x.float()
    return x


def make_labels(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))  # [n]


def split_masks(labels: torch.Tensor, pos, neg) -> tuple[np.ndarray, np.ndarray]:
    y = labels.numpy()
    p = np.isin(y, pos)
    return p, (~p if neg is None else np.isin(y, neg))


def sklearn_scores(x: torch.Tensor, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column AP and AUROC of positives p vs negatives q, others dropped: two [m]."""
    xd = x.double().numpy()[p | q]
    y = p[p | q]
    ap = [average_precision_score(y, xd[:, j]) for j in range(xd.shape[1])]
    au = [roc_auc_score(y, xd[:, j]) for j in range(xd.shape[1])]
    return np.array(ap), np.array(au)


def assert_close(actual: torch.Tensor, expected) -> None:
    assert actual.dtype == torch.float64
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64), rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["random", "ties", "relu", "float32"])
def test_score_splits_match_sklearn_and_numpy(kind):
    x, labels = make_scores(kind), make_labels()
    out = score_splits(x, labels, SPLITS, chunk=16)
    xd = x.double().numpy()
    for s, (pos, neg) in enumerate(SPLITS):
        p, q = split_masks(labels, pos, neg)
        ap, au = sklearn_scores(x, p, q)
        assert_close(out["ap"][s], ap)
        assert_close(out["auroc"][s], au)
        assert_close(out["on_mean"][s], xd[p].mean(0))
        assert_close(out["off_mean"][s], xd[q].mean(0))
        assert_close(out["on_p50"][s], np.percentile(xd[p], 50, axis=0))
        assert_close(out["on_p90"][s], np.percentile(xd[p], 90, axis=0))
        assert out["n_pos"][s] == p.sum() and out["n_neg"][s] == q.sum()
    assert out["n_pos"].dtype == out["n_neg"].dtype == torch.int64
    assert all(out[k].shape == (len(SPLITS), M) for k in out if k not in ("n_pos", "n_neg"))


@pytest.mark.parametrize("kind", ["random", "ties", "relu", "equal", "float32"])
def test_binary_wrappers_match_sklearn(kind):
    x, labels = make_scores(kind), make_labels() == 2
    p = labels.numpy()
    ap, au = sklearn_scores(x, p, ~p)
    assert_close(average_precision(x, labels), ap)
    assert_close(auroc(x, labels), au)
    assert_close(average_precision(x, labels.long()), ap)  # 0/1 labels


def test_all_equal_scores():
    x, labels = make_scores("equal"), make_labels() == 0
    prevalence = labels.double().mean().item()
    assert_close(average_precision(x, labels), np.full(M, prevalence))  # one operating point
    assert_close(auroc(x, labels), np.full(M, 0.5))


@pytest.mark.parametrize("where", ["top", "bottom", "tied"])
def test_exactly_one_positive(where):
    x = make_scores("ties")
    labels = torch.zeros(N, dtype=torch.bool)
    col = x[:, 7]
    labels[{"top": col.argmax(), "bottom": col.argmin(), "tied": 3}[where]] = True
    ap, au = sklearn_scores(x, labels.numpy(), ~labels.numpy())
    assert_close(average_precision(x, labels), ap)
    assert_close(auroc(x, labels), au)
    out = score_splits(x, labels.long(), [([1], None)])
    assert_close(out["on_p50"][0], x[labels].squeeze(0))
    assert_close(out["on_p90"][0], x[labels].squeeze(0))


def test_single_sentence():
    x = torch.tensor([[0.5, -1.0, 0.0]])  # [1, 3]
    assert_close(average_precision(x, torch.tensor([True])), [1.0, 1.0, 1.0])
    with pytest.warns(RuntimeWarning, match="no positive"):
        assert average_precision(x, torch.tensor([False])).isnan().all()
    with pytest.warns(RuntimeWarning, match="no negative"):
        assert auroc(x, torch.tensor([True])).isnan().all()


def test_no_positives_is_nan_with_warning():
    x = make_scores("random")
    labels = torch.zeros(N, dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="no positive"):  # scikit-learn would return 0.0
        assert average_precision(x, labels).isnan().all()
    with pytest.warns(RuntimeWarning, match="no positive"):
        assert auroc(x, labels).isnan().all()
    with pytest.warns(RuntimeWarning, match="split 1: no positive"):
        out = score_splits(x, make_labels(), [([0], None), ([C + 3], None)])  # label C+3 is absent
    for key in ("ap", "auroc", "on_mean", "on_p50", "on_p90"):
        assert out[key][1].isnan().all() and not out[key][0].isnan().any()
    assert not out["off_mean"][1].isnan().any() and out["n_pos"][1] == 0


def test_no_negatives_ap_is_one_auroc_nan():
    x, labels = make_scores("relu"), torch.ones(N, dtype=torch.bool)
    assert_close(average_precision(x, labels), np.ones(M))
    assert_close(average_precision(x, labels), [average_precision_score(labels, x[:, j]) for j in range(M)])
    with pytest.warns(RuntimeWarning, match="no negative"):
        assert auroc(x, labels).isnan().all()
    with pytest.warns(RuntimeWarning, match="no negative"):
        out = score_splits(x, make_labels(), [(range(C), None)])
    assert_close(out["ap"][0], np.ones(M))
    assert out["auroc"].isnan().all() and out["off_mean"].isnan().all()


@pytest.mark.parametrize("split", [([0], [1]), ([0], [1, 2, 3]), ([1, 3], [0, 4]), ([2], [0, 5])])
def test_excluded_sentences_do_not_count(split):
    x, labels = make_scores("ties"), make_labels()
    out = score_splits(x, labels, [split])
    excluded = ~np.isin(labels.numpy(), split[0] + split[1])
    x2 = x.clone()
    x2[torch.from_numpy(excluded)] = torch.randn(int(excluded.sum()), M, dtype=torch.float64) * 10
    out2 = score_splits(x2, labels, [split])
    for key in ("ap", "auroc", "on_mean", "on_p50", "on_p90", "off_mean"):
        assert torch.equal(out[key], out2[key])


def test_results_do_not_depend_on_chunk_size():
    x, labels = make_scores("relu"), make_labels()
    ref = score_splits(x, labels, SPLITS)
    for chunk in (1, 7, M - 1):
        out = score_splits(x, labels, SPLITS, chunk=chunk)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_wrappers_agree_with_score_splits():
    x, labels = make_scores("ties"), make_labels()
    out = score_splits(x, labels, [([2], None)])
    assert torch.equal(average_precision(x, labels == 2), out["ap"][0])
    assert torch.equal(auroc(x, labels == 2), out["auroc"][0])


def test_invalid_input():
    x, labels = make_scores("random"), make_labels()
    with pytest.raises(ValueError, match="both positive and negative"):
        score_splits(x, labels, [([0, 1], [1, 2])])
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        score_splits(x, labels, [([0], None)])
    with pytest.raises(ValueError, match="bool or 0/1"):
        average_precision(make_scores("random"), labels)


def test_rank_neurons_tie_break():
    nan = float("nan")
    primary = torch.tensor([1.0, 2.0, 2.0, 2.0, nan, 0.5, 2.0])
    secondary = torch.tensor([0.0, 1.0, 3.0, 3.0, 9.0, 0.0, nan])
    # equal primary -> larger secondary first (NaN last) -> lower index first; NaN primary last
    assert rank_neurons(primary, secondary, 7).tolist() == [2, 3, 1, 6, 0, 5, 4]
    assert rank_neurons(primary, secondary, 3).tolist() == [2, 3, 1]
    assert rank_neurons(primary, secondary, 7, largest=False).tolist() == [5, 0, 1, 2, 3, 6, 4]
    assert rank_neurons(primary, secondary, 7).dtype == torch.int64


def test_rank_neurons_matches_python_sort():
    g = torch.Generator().manual_seed(0)
    primary = torch.randint(0, 4, (500,), generator=g).double() / 4  # many ties, like AP = 1.0
    secondary = torch.randint(0, 3, (500,), generator=g).float()
    expected = sorted(range(500), key=lambda i: (-primary[i].item(), -secondary[i].item(), i))
    assert rank_neurons(primary, secondary, 100).tolist() == expected[:100]
    expected = sorted(range(500), key=lambda i: (primary[i].item(), secondary[i].item(), i))
    assert rank_neurons(primary, secondary, 100, largest=False).tolist() == expected[:100]


def test_torch_path_matches_numpy_path(monkeypatch):
    """The torch.sort / cummax path (taken on GPUs) gives the same bits as numpy's on CPU."""
    x, labels = make_scores("relu"), make_labels()
    ref = score_splits(x, labels, SPLITS)
    monkeypatch.setattr(metrics, "_NUMPY_ON_CPU", False)
    out = score_splits(x, labels, SPLITS)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
