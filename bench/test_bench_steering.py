"""Steered forward on a tiny random Gemma-3 model: no steering vs today's hook vs steer.intervene.

    pytest bench/test_bench_steering.py --benchmark-only
"""
import pytest
import torch

import todays_way
from steer.core.adapters import NeuronSites, base_inputs
from steer.engine.backends import intervene
from steer.core.intervention import Intervention
from tiny import batch, tiny_model

UNITS = torch.arange(0, 48, 4)  # 12 of the 48 neurons of every layer
VALUES = torch.linspace(-1, 1, len(UNITS))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3")
    ids, mask = batch([30, 25, 12, 7] * 4)
    return model, base_inputs(model, ids, mask)


def forward(model, kwargs):
    with torch.inference_mode():
        return model(**kwargs).logits


@pytest.mark.benchmark(group="steering-tiny")
def test_no_steering(benchmark, setup):
    model, kwargs = setup
    benchmark(forward, model, kwargs)


@pytest.mark.benchmark(group="steering-tiny")
def test_todays_way_hooks(benchmark, setup):
    model, kwargs = setup
    layers = NeuronSites(model).n_layers
    handles = todays_way.steer(model, {l: (UNITS, VALUES) for l in range(layers)})
    try:
        benchmark(forward, model, kwargs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.benchmark(group="steering-tiny")
def test_steer_intervene(benchmark, setup):
    model, kwargs = setup
    iv = Intervention.for_model(model)
    for l in range(iv.shape[0]):
        iv.set(l, UNITS, VALUES)
    with intervene(model, iv):
        benchmark(forward, model, kwargs)
