"""The one backend protocol (`steer.engine.backends`): hooks and the fused patch, driven the same way,
give the neuron tensor, pooled responses and logits of the tests' own oracle in every family."""
import pytest
import torch

from steer.engine import backends
from steer.core.adapters import NeuronSites, base_inputs
from steer.core.intervention import Intervention
from tiny import FAMILIES, batch, tiny_model


class Capture:
    """What each second projection receives (the neuron tensor), as [B, T, M], per layer."""

    def __init__(self, model, batch_size):
        self.sites, self.seen = NeuronSites(model), {}
        self.handles = [m.register_forward_pre_hook(self._hook(l, batch_size)) for l, m in enumerate(self.sites.modules)]

    def _hook(self, layer, b):
        def hook(module, args):
            self.seen[layer] = self.sites.view(args[0], b).detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def run(model, ids, mask):
    with torch.no_grad():
        return model(**base_inputs(model, ids, mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", backends.BACKENDS)
def test_both_backends_equal_the_oracle(family, kind):
    model = tiny_model(family)
    ids, mask = batch([5, 2, 4], pad_left=family in ("llama", "gpt2"))
    real = mask.bool()
    raw_capture = Capture(model, len(ids))
    plain = run(model, ids, mask)
    raw_capture.remove()
    raw = raw_capture.seen  # the unsteered neurons, layer by layer
    # the last layer only, so the neurons before the override are the unsteered model's
    iv = Intervention.for_model(model, positions="last").set(1, [1, 5], torch.tensor([2.0, -1.0])).scale(1, [3], 4.0)

    backend, owned = backends.use(model, kind)
    assert owned and backends.attached(model) is backend
    backend.steer(iv)
    pooled = backend.start_pooling(real, "max")
    capture = Capture(model, len(ids))  # after the backend: sees what the down projection gets
    steered = run(model, ids, mask)
    capture.remove()
    backend.stop_pooling()
    backend.remove()
    assert backends.attached(model) is None

    # the oracle, written here: the last real token of each row takes the forced values
    last = torch.zeros_like(real)
    for r in range(len(ids)):
        last[r, real[r].nonzero().max()] = True
    for layer in range(2):
        want = raw[layer].clone()
        sel = last[:, :, None] & iv.mask[layer]
        want[sel] = (want * iv.mul[layer] + iv.add[layer])[sel]  # set: mul 0, add v; scale: mul s
        got = capture.seen[layer]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        hand_max = torch.stack([want[r][real[r]].max(0).values for r in range(len(ids))])
        torch.testing.assert_close(pooled[:, layer], hand_max, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(steered, plain)
    with backends.intervene(model, iv):  # the verb users call: the same steering
        torch.testing.assert_close(run(model, ids, mask), steered, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model, ids, mask), plain)  # and nothing left behind


def test_one_backend_at_a_time_and_nested_interventions():
    model = tiny_model("llama")
    a = Intervention.for_model(model).set(0, [1], 3.0)
    b = Intervention.for_model(model).set(1, [2], -3.0)
    with backends.intervene(model, a) as outer:
        with pytest.raises(RuntimeError, match="hooks are active"):
            backends.use(model, "fused")
        with backends.intervene(model, b) as inner:  # the inner one replaces the outer one ...
            assert inner.backend is outer.backend and inner.backend.intervention is b
        assert outer.backend.intervention is a  # ... and gives it back
    assert backends.attached(model) is None
