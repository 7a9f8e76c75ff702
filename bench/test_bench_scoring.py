"""Scoring synthetic responses: steer's batched exact AP/AUROC vs scikit-learn per neuron.

    pytest bench/test_bench_scoring.py --benchmark-only
"""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import todays_way
from steer.core.metrics import score_splits

N, LAYERS, WIDTH, LABELS = 400, 2, 1024, 8
SUBSET = 32  # neurons scikit-learn scores (compare per neuron: divide by SUBSET vs LAYERS * WIDTH)


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
    assert out["ap"].shape == (LABELS, LAYERS * WIDTH)


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
    np.testing.assert_allclose([[p[0] for p in row] for row in out], ref["ap"].numpy(), atol=1e-12)


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
