"""The compiled CPU histogram update (steer.kernels.histogram_cpu) against the reference: equal
counts exactly on random and adversarial tiles, the Triton kernel (interpreter) on one case, the
dispatcher's choice and the fallback when Inductor cannot compile. Every case shares one
(neurons, edges) shape, so the loop compiles once per session."""
import math

import pytest
import torch

from steer.kernels import histogram_cpu
from steer.kernels.histogram import histogram_update
from steer.kernels.histogram_ref import histogram_update_ref

C, M, NB = 3, 37, 8  # one compiled shape for the whole file


def _edges(g, dup=True):
    edges = torch.sort(torch.randn(M, NB - 1, generator=g), dim=1).values
    if dup:
        edges[:, 2] = edges[:, 1]  # duplicate edges: an empty bin between them
        edges[: M // 2, -1] = edges[: M // 2, -2]
        edges[-1] = 0.5  # all edges equal
    return edges.contiguous()


def _both(x, labels, edges, start=None):
    """(reference counts, fast counts) after one update of the same starting counts."""
    start = torch.zeros(C, M, NB, dtype=torch.int32) if start is None else start
    ref, fast = start.clone(), start.clone()
    histogram_update_ref(ref, x, labels, edges)
    histogram_cpu.histogram_update_cpu(fast, x, labels, edges, min_responses=0, compile_after=0)
    return ref, fast


@pytest.mark.parametrize("B,seed,threads", [  # a full tile, a padded one, several tiles
    (16, 0, 4), (21, 1, 4), (5, 2, 1), (40, 3, 4), (40, 9, 1)])
def test_random_tiles_equal_reference(B, seed, threads, monkeypatch):
    monkeypatch.setattr(histogram_cpu, "MAX_SCATTER_THREADS", threads)  # 1: the serial scatter
    g = torch.Generator().manual_seed(seed)
    edges = _edges(g)
    x = torch.randn(B, M, generator=g) * 1.5
    labels = torch.randint(0, C, (B,), generator=g)
    start = torch.randint(0, 5, (C, M, NB), generator=g, dtype=torch.int32)  # accumulates
    ref, fast = _both(x, labels, edges, start)
    assert torch.equal(fast, ref)
    assert int((fast - start).sum()) == B * M


def test_adversarial_tiles_equal_reference():
    g = torch.Generator().manual_seed(4)
    edges = _edges(g)
    B = 24
    x = torch.randn(B, M, generator=g)
    on_edge = torch.rand(B, M, generator=g) < 0.5  # exactly on an edge, duplicates included
    pick = edges[torch.arange(M), torch.randint(0, NB - 1, (M,), generator=g)]
    x = torch.where(on_edge, pick, x)
    x[1] = torch.nextafter(edges[:, 1], torch.tensor(-math.inf))  # just below an edge
    x[2] = torch.nextafter(edges[:, 1], torch.tensor(math.inf))  # just above
    x[3] = edges[:, 0]  # the lowest edge: bin 1
    x[4] = edges[:, -1]  # the highest: the open top bin
    x[5] = 7.0  # an all-equal row
    x[6, :8] = torch.tensor([math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, -0.0, 3e-45])
    x[7] = math.nan  # a row of NaN
    x[:, 10] = 0.25  # an all-equal column
    tiny = 1.401298464324817e-45  # the smallest subnormal: flush-to-zero would mis-bin these
    edges[11] = torch.tensor([-1.0, -2 * tiny, -0.0, tiny, 2 * tiny, 1e-40, 1.0])
    x[:, 11] = torch.tensor([0.0, -0.0, tiny, -tiny, 2 * tiny, 3 * tiny, 1e-40, 9e-41] * 3)
    labels = torch.tensor([0, 1, 2] * 8)
    ref, fast = _both(x, labels, edges)
    assert torch.equal(fast, ref)
    assert int(fast.sum()) == int(torch.isfinite(x).sum())


def test_one_label_and_empty_tile():
    g = torch.Generator().manual_seed(5)
    edges = _edges(g, dup=False)
    x = torch.randn(16, M, generator=g)
    ref, fast = _both(x, torch.full((16,), 2), edges)  # every row the same label
    assert torch.equal(fast, ref) and int(fast[:2].sum()) == 0
    ref, fast = _both(torch.empty(0, M), torch.empty(0, dtype=torch.int64), edges)
    assert int(fast.abs().sum()) == 0


def test_triton_kernel_equals_fast_path():
    g = torch.Generator().manual_seed(6)
    edges = _edges(g)
    x = torch.randn(21, M, generator=g)
    x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    x[1] = edges[:, 1]
    labels = torch.randint(0, C, (21,), generator=g)
    tri, fast = (torch.zeros(C, M, NB, dtype=torch.int32) for _ in range(2))
    histogram_update(tri, x, labels, edges, impl="triton")
    histogram_cpu.histogram_update_cpu(fast, x, labels, edges, min_responses=0, compile_after=0)
    assert torch.equal(tri, fast)


def test_dispatcher_auto_takes_the_fast_path_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr("steer.kernels.histogram.histogram_update_cpu",
                        lambda *a: calls.append(a) or histogram_update_ref(*a))
    counts = torch.zeros(C, M, NB, dtype=torch.int32)
    edges = _edges(torch.Generator().manual_seed(7))
    histogram_update(counts, torch.zeros(2, M), torch.tensor([0, 1]), edges)  # auto
    histogram_update(counts, torch.zeros(2, M), torch.tensor([0, 1]), edges, impl="torch")
    assert len(calls) == 1


def test_falls_back_to_reference_when_compiling_fails(monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(histogram_cpu, "_compiled", None)
    monkeypatch.setattr(histogram_cpu, "_compiled_tile", broken)
    g = torch.Generator().manual_seed(8)
    edges = _edges(g)
    x = torch.randn(20, M, generator=g)
    labels = torch.randint(0, C, (20,), generator=g)
    with pytest.warns(RuntimeWarning, match="reference"):
        ref, fast = _both(x, labels, edges)
    assert torch.equal(fast, ref)
    assert histogram_cpu._compiled is False


def test_compiles_only_after_compile_after_responses(monkeypatch):
    monkeypatch.setattr(histogram_cpu, "_compiled", None)
    monkeypatch.setattr(histogram_cpu, "_seen", 0)
    g = torch.Generator().manual_seed(10)
    edges = _edges(g)
    x = torch.randn(16, M, generator=g)
    labels = torch.randint(0, C, (16,), generator=g)
    counts = torch.zeros(C, M, NB, dtype=torch.int32)
    for _ in range(2):  # 2 x 592 responses: the reference, counted, not compiled yet
        histogram_cpu.histogram_update_cpu(counts, x, labels, edges, min_responses=0,
                                           compile_after=1000)
    assert histogram_cpu._compiled is None and histogram_cpu._seen == 2 * 16 * M
    histogram_cpu.histogram_update_cpu(counts, x, labels, edges, min_responses=0,
                                       compile_after=1000)
    assert histogram_cpu._compiled not in (None, False)  # compiled on the third
    ref = torch.zeros_like(counts)
    for _ in range(3):
        histogram_update_ref(ref, x, labels, edges)
    assert torch.equal(counts, ref)
