"""The one backend protocol (`steer.engine.backends`): hooks and the fused patch, driven the same way,
give the neuron tensor, pooled responses and logits of the tests' own oracle in every family."""
import pytest
import torch

from steer.engine import backends, steering
from steer.core.adapters import NeuronLayout, base_inputs
from steer.core.intervention import Intervention
from tiny import FAMILIES, batch, tiny_model


class Capture:
    """What each second projection receives (the neuron tensor), as [B, T, M], per layer."""

    def __init__(self, model, batch_size):
        self.layout, self.seen = NeuronLayout(model), {}
        self.handles = [m.register_forward_pre_hook(self._hook(l, batch_size)) for l, m in enumerate(self.layout.modules)]

    def _hook(self, layer, b):
        def hook(module, args):
            self.seen[layer] = self.layout.view(args[0], b).detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def run(model, ids, mask):
    with torch.no_grad():
        return model(**base_inputs(model, ids, mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", steering.BACKENDS)
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

    backend, owned = steering.use(model, kind)
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
    with steering.intervene(model, iv):  # the verb users call: the same steering
        torch.testing.assert_close(run(model, ids, mask), steered, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model, ids, mask), plain)  # and nothing left behind


def test_one_backend_at_a_time_and_nested_interventions():
    model = tiny_model("llama")
    a = Intervention.for_model(model).set(0, [1], 3.0)
    b = Intervention.for_model(model).set(1, [2], -3.0)
    with steering.intervene(model, a) as outer:
        with pytest.raises(RuntimeError, match="hooks are active"):
            steering.use(model, "fused")
        with steering.intervene(model, b) as inner:  # the inner one replaces the outer one ...
            assert inner.backend is outer.backend and inner.backend.intervention is b
        assert outer.backend.intervention is a  # ... and gives it back
    assert backends.attached(model) is None


# --- "auto": the fused patch where it gives the hooks' bits, the hooks elsewhere ---------------------

TEXTS = ["the cat sat", "a dog", "le chat est là", "un chien", "das ist gut", "ein Hund bellt laut"]
#: fp32 families whose activation the fused op computes bit for bit (GPT-2's and BLOOM's own tanh-GELU
#: formulas are an fp32 ulp from torch's, so they keep the hooks)
EXACT_FP32 = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "xglm", "opt"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_takes_fused_only_where_responses_stay_bit_identical(family, dtype):
    from steer.core.corpus import Corpus
    from steer.engine.collect import collect
    from tiny import tiny_tokenizer

    model = tiny_model(family, dtype)
    want = "fused" if dtype == torch.float32 and family in EXACT_FP32 else "hooks"
    assert steering.choose(model) == want
    backend, owned = steering.use(model, "auto")
    assert owned and backend.kind == want
    backend.remove()
    assert backends.attached(model) is None
    corpus = Corpus(TEXTS, ["en", "en", "fr", "fr", "de", "de"])
    for pooling in ("max", "mean"):
        kw = dict(pooling=pooling, batch_size=4, progress=False, token_stats=("activation", "residual"))
        auto = collect(model, tiny_tokenizer(), corpus, backend="auto", **kw)
        hooks = collect(model, tiny_tokenizer(), corpus, backend="hooks", **kw)
        assert torch.equal(auto.values, hooks.values), (family, dtype, pooling)
        for key, t in auto.token_stats.tensors().items():
            assert torch.equal(t, hooks.token_stats.tensors()[key]), (family, dtype, pooling, key)


def test_auto_follows_what_is_attached_and_what_the_op_implements():
    model = tiny_model("llama")
    assert steering.choose(model, "hooks") == "hooks" and steering.choose(model, "fused") == "fused"
    with pytest.raises(ValueError, match=r"backend='cuda'; choose one of \('auto', 'hooks', 'fused'\)"):
        steering.choose(model, "cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        steering.use(model, "cuda")
    with steering.intervene(model, Intervention.for_model(model).set(0, [1], 3.0)) as s:
        assert steering.choose(model) == "hooks"  # an intervene's hooks: collection pools through them
        backend, owned = steering.use(model, "auto")
        assert backend is s.backend and not owned
    from steer.engine.patch import patch

    with patch(model) as p:
        assert steering.choose(model) == "fused" and steering.use(model, "auto") == (p, False)
    assert steering.choose(model, neuron_module=r"layers\.\d+\.mlp\.down_proj") == "hooks"
    mlp = model.model.layers[1].mlp
    for act, want in ((torch.nn.Tanh(), "hooks"), (torch.nn.GELU(approximate="tanh"), "fused")):  # not the op's
        original, mlp.act_fn = mlp.act_fn, act  # / torch's tanh GELU, which the op computes bit for bit
        try:
            assert steering.choose(model) == want, act
        finally:
            mlp.act_fn = original
    assert steering.choose(model) == "fused"
