"""Steered forward on a tiny random Gemma-3 model: no steering vs today's hook vs steer.intervene.

    pytest bench/test_bench_steering.py --benchmark-only

Every case checks what it timed (outside the timed call): the unsteered logits are the bare
model's, a steered forward gives the logits of a plain reference hook that writes the values
(and they differ from the bare ones), and once the steering is removed the model is bare again.
"""
import pytest
import torch

import todays_way
from steer.core.adapters import NeuronLayout, base_inputs
from steer.engine.backends import attached
from steer.engine.steering import intervene
from steer.core.intervention import Intervention
from tiny import batch, tiny_model

UNITS = torch.arange(0, 48, 4)  # 12 of the 48 neurons of every layer
VALUES = torch.linspace(-1, 1, len(UNITS))


def forward(model, kwargs):
    with torch.inference_mode():
        return model(**kwargs).logits


def reference(model, kwargs):
    """The steered logits by hand: a pre-hook on every down projection writes VALUES into UNITS at
    every position."""
    def write(module, args):
        h = args[0].clone()
        h[..., UNITS] = VALUES.to(h.dtype)
        return (h, *args[1:])

    handles = [m.register_forward_pre_hook(write) for m in NeuronLayout(model).modules]
    try:
        return forward(model, kwargs)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3")
    ids, mask = batch([30, 25, 12, 7] * 4)
    kwargs = base_inputs(model, ids, mask)
    bare, steered = forward(model, kwargs), reference(model, kwargs)
    assert not torch.allclose(bare, steered, atol=1e-3)  # the units matter: steering is visible
    assert torch.equal(forward(model, kwargs), bare)  # the reference left the model bare
    return model, kwargs, bare, steered


def assert_bare(model, kwargs, bare):
    """No hook, backend or patch left behind: the bare forward is bit for bit what it was."""
    assert attached(model) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(forward(model, kwargs), bare)


@pytest.mark.benchmark(group="steering-tiny")
def test_no_steering(benchmark, setup):
    model, kwargs, bare, _ = setup
    out = benchmark(forward, model, kwargs)
    assert torch.equal(out, bare)
    assert_bare(model, kwargs, bare)


@pytest.mark.benchmark(group="steering-tiny")
def test_todays_way_hooks(benchmark, setup):
    model, kwargs, bare, steered = setup
    layers = NeuronLayout(model).n_layers
    handles = todays_way.steer(model, {l: (UNITS, VALUES) for l in range(layers)})
    try:
        out = benchmark(forward, model, kwargs)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, steered)
    assert_bare(model, kwargs, bare)


@pytest.mark.benchmark(group="steering-tiny")
def test_steer_intervene(benchmark, setup):
    model, kwargs, bare, steered = setup
    iv = Intervention.for_model(model)
    for l in range(iv.shape[0]):
        iv.set(l, UNITS, VALUES)
    with intervene(model, iv):
        out = benchmark(forward, model, kwargs)
    torch.testing.assert_close(out, steered)
    assert_bare(model, kwargs, bare)
