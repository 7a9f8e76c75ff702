"""Scoring synthetic responses: steer's batched exact AP/AUROC vs scikit-learn per neuron.

    pytest bench/test_bench_scoring.py --benchmark-only

Every case checks what it timed (outside the timed call): steer's scores equal scikit-learn's on a
sample of neurons (planted and not), scikit-learn's and today's Pool equal steer's on the subset.
"""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import todays_way
from steer.core.metrics import score_splits

N, LAYERS, WIDTH, LABELS = 400, 2, 1024, 8
SUBSET = 32  # neurons scikit-learn scores (compare per neuron: divide by SUBSET vs LAYERS * WIDTH)
SAMPLE = [0, 7, 8, 63, 64, 65, 500, 1023, 1024, 1500, 2047]  # checked against scikit-learn: planted (< 64) and not


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    label_ids = torch.arange(N) % LABELS
    x = torch.randn(N, LAYERS * WIDTH, generator=g)
    x[:, :64] += 2.0 * (label_ids[:, None] == (torch.arange(64) % LABELS)[None, :])
    return x, label_ids


@pytest.mark.benchmark(group="scoring-synthetic")
def test_steer_score_splits_all_neurons(benchmark, data):
    x, label_ids = data
    out = benchmark(score_splits, x, label_ids, [([c], None) for c in range(LABELS)])
    assert out["ap"].shape == out["auroc"].shape == (LABELS, LAYERS * WIDTH)
    assert out["n_pos"].tolist() == [N // LABELS] * LABELS and out["n_neg"].tolist() == [N - N // LABELS] * LABELS
    xn, ids = x.numpy(), label_ids.numpy()
    for c in range(LABELS):
        for j in SAMPLE:
            assert out["ap"][c, j].item() == pytest.approx(average_precision_score(ids == c, xn[:, j]), abs=1e-12)
            assert out["auroc"][c, j].item() == pytest.approx(roc_auc_score(ids == c, xn[:, j]), abs=1e-12)
    planted = torch.arange(64)
    assert (out["auroc"][planted % LABELS, planted] > 0.8).all()  # the planted signal is found (about 0.92)
    assert abs(out["auroc"][:, 64:].mean().item() - 0.5) < 0.01  # and noise is noise


@pytest.mark.benchmark(group="scoring-synthetic")
def test_sklearn_loop_subset(benchmark, data):
    """scikit-learn AP + AUROC, one neuron at a time, in this process (no Pool start-up)."""
    x, label_ids = data
    xn, ids = x[:, :SUBSET].numpy(), label_ids.numpy()

    def loop():
        return [[(average_precision_score(ids == c, xn[:, j]), roc_auc_score(ids == c, xn[:, j]))
                 for j in range(SUBSET)] for c in range(LABELS)]

    out = benchmark(loop)
    ref = score_splits(x[:, :SUBSET], label_ids, [([c], None) for c in range(LABELS)])
    assert len(out) == LABELS and all(len(row) == SUBSET for row in out)
    np.testing.assert_allclose([[p[0] for p in row] for row in out], ref["ap"].numpy(), atol=1e-12)
    np.testing.assert_allclose([[p[1] for p in row] for row in out], ref["auroc"].numpy(), atol=1e-12)


@pytest.mark.benchmark(group="scoring-synthetic")
def test_todays_way_pool_subset(benchmark, data):
    """Today's way as run.py times it: Pool(2) per label, map over units, plus numpy statistics."""
    x, label_ids = data
    xn = x.numpy()
    resp = {l: xn[:, l * WIDTH:(l + 1) * WIDTH] for l in range(LAYERS)}
    units = np.arange(SUBSET)
    scores, _ = benchmark.pedantic(todays_way.score, (resp, label_ids.numpy(), [str(c) for c in range(LABELS)]),
                                   {"units": units}, rounds=3, iterations=1)
    assert scores["ap"].shape == (LABELS, SUBSET)
    ref = score_splits(x[:, :SUBSET], label_ids, [([c], None) for c in range(LABELS)])
    for key, values in scores.items():  # AP/AUROC exactly; numpy's statistics accumulate in float32
        tol = dict(atol=1e-12) if key in ("ap", "auroc") else dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values, ref[key].numpy(), err_msg=key, **tol)
