"""The fused path in every family: same logits as Hugging Face, same steering as the reference
hooks, same pooled responses as exact collection; reversible; compiles without graph breaks."""
import pytest
import torch

from steer.core.adapters import base_inputs
from steer.engine.collect import collect
from steer.core.corpus import Corpus
from steer.core.adapters import NeuronLayout
from steer.engine.backends import attached
from steer.engine.steering import intervene
from steer.core.intervention import Intervention
from steer.engine.patch import FusedActivation, FusedGatedMLP, patch
from tiny import FAMILIES, batch, tiny_model, tiny_tokenizer

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def logits(model, ids, mask):
    with torch.no_grad():
        return model(**base_inputs(model, ids, mask)).logits.float()


def experts(model, positions="all"):
    iv = Intervention.for_model(model, positions=positions)
    return iv.set(0, [1, 5, 9], torch.tensor([2.0, -1.0, 0.5])).scale(1, [3], 4.0).zero(1, [7])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_equals_unpatched_and_reverts(family, dtype):
    model = tiny_model(family, dtype)
    ids, mask = batch([5, 3, 4], pad_left=True)
    ref = logits(model, ids, mask)
    with patch(model) as p:
        swapped = [type(getattr(parent, name)) for parent, name, _ in p.swapped]
        assert set(swapped) <= {FusedGatedMLP, FusedActivation} and len(swapped) == 2
        torch.testing.assert_close(logits(model, ids, mask), ref, **TOL[dtype])
    assert not any(isinstance(m, (FusedGatedMLP, FusedActivation)) for m in model.modules())
    assert attached(model) is None
    assert torch.equal(logits(model, ids, mask), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "last"])
def test_fused_steering_matches_reference_hooks(family, positions):
    model = tiny_model(family)
    ids, mask = batch([5, 2, 4], pad_left=family == "llama")
    with intervene(model, experts(model, positions)):
        ref = logits(model, ids, mask)
    with patch(model):
        with intervene(model, experts(model, positions)) as s:
            assert s.backend.kind == "fused" and not s.owned  # the patch reads the buffers, no hooks
            assert not any(m._forward_pre_hooks for m in NeuronLayout(model).modules)
            got = logits(model, ids, mask)
        unsteered = logits(model, ids, mask)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    assert not torch.allclose(unsteered, ref)


TEXTS = ["the cat sat", "a dog", "le chat est là", "un chien", "das ist gut", "ein Hund bellt laut"]


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_fused_collection_equals_exact_collection(family, pooling):
    model = tiny_model(family)
    corpus = Corpus(TEXTS, ["en", "en", "fr", "fr", "de", "de"])
    kw = dict(pooling=pooling, batch_size=4, progress=False)
    ref = collect(model, tiny_tokenizer(), corpus, backend="hooks", **kw)
    got = collect(model, tiny_tokenizer(), corpus, backend="fused", **kw)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-6)
    assert attached(model) is None  # patched for the call only


def test_triton_path_in_a_patched_model_under_the_interpreter():
    model = tiny_model("llama")
    ids, mask = batch([5, 3], pad_left=False)
    with intervene(model, experts(model)):
        ref = logits(model, ids, mask)
    with patch(model, impl="triton"):
        with intervene(model, experts(model)):
            got = logits(model, ids, mask)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    corpus = Corpus(TEXTS[:4], ["en", "en", "fr", "fr"])
    exact = collect(model, tiny_tokenizer(), corpus, progress=False)
    with patch(model, impl="triton"):
        fused = collect(model, tiny_tokenizer(), corpus, backend="fused", progress=False)
    torch.testing.assert_close(fused.values, exact.values, rtol=1e-5, atol=1e-6)


def test_compiled_patched_model_fullgraph_and_in_place_expert_changes():
    torch._dynamo.reset()
    model = tiny_model("qwen2")
    ids, mask = batch([5, 5])
    iv = Intervention.for_model(model).set(0, [2, 4], 3.0)
    compiles = []

    def counting(gm, inputs):
        compiles.append(gm)
        return gm.forward

    with patch(model), intervene(model, iv):
        eager = logits(model, ids, mask)
        fn = torch.compile(lambda i, m: model(input_ids=i, attention_mask=m).logits, backend=counting, fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(fn(ids, mask), eager, rtol=1e-5, atol=1e-5)
            iv.clear().set(1, [0, 1, 2], -2.0)  # a new expert set, in place
            eager2 = logits(model, ids, mask)
            torch.testing.assert_close(fn(ids, mask), eager2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager, eager2)
    assert len(compiles) == 1  # the new experts took effect without recompiling


def test_double_patch_and_hook_conflicts_are_clear_errors():
    model = tiny_model("llama")
    with patch(model):
        with pytest.raises(RuntimeError, match="already patched"):
            patch(model)
    corpus = Corpus(TEXTS[:2], ["en", "fr"])
    with intervene(model, experts(model)):
        with pytest.raises(RuntimeError, match="hooks are active"):
            collect(model, tiny_tokenizer(), corpus, backend="fused", progress=False)


def test_torch_gelu_maps_by_its_approximation():
    """nn.GELU is one class for two functions: the fused op takes the tanh form where it is asked."""
    from torch import nn

    from steer.engine.patch import fused_act

    assert fused_act(nn.GELU()) == "gelu" and fused_act(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert fused_act(nn.SiLU()) == "silu" and fused_act(nn.Tanh()) is None
