"""Renamed public names keep working, with a DeprecationWarning that names the new one."""
import pytest
import torch

import steer
from steer.core import adapters
from steer.core.stream import StreamState, calibrate_edges
from tiny import tiny_model


def test_neuron_sites_is_neuron_layout():
    with pytest.warns(DeprecationWarning, match="renamed NeuronLayout"):
        assert steer.NeuronSites is steer.NeuronLayout
    with pytest.warns(DeprecationWarning, match="renamed NeuronLayout"):
        assert adapters.NeuronSites is adapters.NeuronLayout
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        steer.NoSuchName


def test_backend_keyword_of_the_kernels_is_impl():
    model = tiny_model("llama")
    with pytest.warns(DeprecationWarning, match="`backend=` is renamed `impl=`"):
        p = steer.patch(model, backend="torch")
    assert p.impl == "torch"
    p.revert()
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])
    old, new = (StreamState(calibrate_edges(x, bins=4), ["a", "b"]) for _ in range(2))
    with pytest.warns(DeprecationWarning, match="`backend=` is renamed `impl=`"):
        old.update(x, labels, backend="torch")
    new.update(x, labels, impl="torch")
    assert torch.equal(old.counts, new.counts)
