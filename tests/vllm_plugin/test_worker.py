"""The plugin's worker state without an engine: batch rows joining, leaving and moving as
vLLM's persistent batch reports them, the steered tokens of a step, and the override."""
import os

import pytest
import torch

if not os.environ.get("STEER_VLLM_TESTS"):
    pytest.importorskip("vllm")

import steer  # noqa: E402
from steer.kernels.fused_mlp_ref import ACTIVATIONS, apply_override  # noqa: E402
from steer.vllm.plugin import Worker  # noqa: E402
from steer.vllm.requests import Dims, SteerRequest  # noqa: E402

DIMS = Dims(2, 96, 64)


def configs(served):
    return [SteerRequest(str(served / "experts"), label, strength=s) for label in ("fr", "en") for s in (1.0, 2.0)]


def test_rows_that_leave_or_are_overwritten_free_their_sets(served):
    """condense() fills a hole by moving the last row into it (UNIDIRECTIONAL): the request
    that was there has left, so its set is free again; sets are reused by equal configs and
    never run out while the batch has at most `sets` rows."""
    x, y, z, u = configs(served)
    w = Worker(DIMS, sets=3, device="cpu")
    users = w.tables["neuron"].users
    w.add(0, x), w.add(1, y), w.add(2, None)
    assert users[:2] == [1, 1] and w.row_set == {0: ("neuron", 0), 1: ("neuron", 1)}
    w.move(2, 1, swap=False)  # row 1 (y) left; the unsteered row 2 now sits at 1
    assert w.row_set == {0: ("neuron", 0)} and users == [1, 0, 0]
    w.add(1, x)  # the same config shares set 0
    assert users == [2, 0, 0] and w.row_set == {0: ("neuron", 0), 1: ("neuron", 0)}
    w.move(0, 1, swap=True)
    assert w.row_set == {0: ("neuron", 0), 1: ("neuron", 0)} and users == [2, 0, 0]
    for step in range(10):  # many distinct configs over time, at most 3 rows at once
        w.remove(2)
        w.add(2, (z, u)[step % 2] if step % 3 else y)
        assert sum(users) == 3 and sorted(w.row_set) == [0, 1, 2]
    w.remove(0), w.remove(1), w.remove(2)
    assert users == [0, 0, 0] and w.row_set == {}


def test_a_rewritten_set_is_read_again(served, tmp_path):
    """A set's config is keyed by its file time too: a set rewritten on disk is read again."""
    import shutil

    d = tmp_path / "experts"
    shutil.copytree(served / "experts", d)
    w = Worker(DIMS, sets=2, device="cpu")
    request = SteerRequest(str(d), "fr")
    w.add(0, request)
    first = list(w.configs)
    os.utime(d / "experts.safetensors", (1, 1))
    w.add(1, request)  # row 0 still holds the old one
    assert len(w.configs) == 2 and list(w.configs)[0] == first[0] and list(w.configs)[1] == (request, 1.0)
    assert w.row_set == {0: ("neuron", 0), 1: ("neuron", 1)}


@pytest.mark.parametrize("positions, want", [
    ("all", [4, 5, 6, 7, 8, 9]), ("prompt", [4, 5, 6, 7]), ("generated", [8, 9]), ("last", [7, 8, 9])])
def test_steered_tokens_of_a_step(served, positions, want):
    """Row 1 holds tokens 4..9 of the flattened step, at positions 6..11 of a request whose
    prompt has 10 tokens; row 0 (tokens 0..3) is unsteered, row 2 (tokens 10..11) follows
    another set. Every layer's override equals the dense reference (`apply_override` with the
    sets' tables, a set index per token) bit for bit."""
    w = Worker(DIMS, sets=3, device="cpu")
    w.add(0, None)
    w.add(1, SteerRequest(str(served / "experts"), "fr", positions=positions))
    w.add(2, SteerRequest(str(served / "experts"), "en", strength=3.0))
    qsl, computed, prompt = torch.tensor([0, 4, 10, 12]), torch.tensor([0, 6, 20]), torch.tensor([4, 10, 5])
    w.prepare(qsl, computed, prompt)
    touched = set()
    sets = w.tables["neuron"].sets
    for layer in range(2):
        h = torch.randn(12, 96)
        before = h.clone()
        mask, mul, add = sets.table(layer)
        rows = torch.full((12,), sets.sets, dtype=torch.long)  # "no set"
        rows[want], rows[10:] = 0, 1
        expect = apply_override(h.clone().unsqueeze(1), mask, mul, add, None, rows).squeeze(1)
        w.override(h, torch.randn(12, 192), layer, "silu")
        assert torch.equal(h, expect)
        touched |= set((h != before).any(1).nonzero()[:, 0].tolist())
    assert sorted(touched) == want + [10, 11]  # exactly the steered tokens, over the layers


def test_a_step_without_steered_tokens_touches_nothing(served):
    w = Worker(DIMS, sets=2, device="cpu")
    w.add(0, SteerRequest(str(served / "experts"), "fr", positions="generated"))
    w.prepare(torch.tensor([0, 5]), torch.tensor([0]), torch.tensor([9]))  # a prefill chunk
    assert all(t.step is None for t in w.tables.values())
    h = torch.randn(5, 96)
    before = h.clone()
    w.override(h, torch.randn(5, 192), 0, "silu")
    assert torch.equal(h, before)


def test_activation_and_residual_sites_in_one_step(tmp_path):
    """Rows of three sites in one step: the activation site's pairs hold (act(gate) overridden)
    x up and the residual site's tokens the overridden stream h + r (stored as h, with r = 0),
    each equal to a dense reference; every other value is left bit for bit."""
    act = steer.Intervention(2, 96, site="activation").set(0, [1, 7], [2.0, -3.0]).scale(1, [3], 0.5)
    resid = steer.Intervention(2, 64, site="residual").shift(1, [0, 5], [1.5, 2.5]).set(0, [9], 4.0)
    act.save(tmp_path / "act.safetensors"), resid.save(tmp_path / "resid.safetensors")
    w = Worker(DIMS, sets=3, device="cpu")
    w.add(0, SteerRequest.parse({"steer_intervention": str(tmp_path / "act.safetensors")}))
    w.add(1, None)
    w.add(2, SteerRequest.parse({"steer_intervention": str(tmp_path / "resid.safetensors"),
                                 "steer_positions": "last"}))
    qsl, computed, prompt = torch.tensor([0, 3, 5, 9]), torch.tensor([0, 0, 4]), torch.tensor([3, 2, 8])
    w.prepare(qsl, computed, prompt)  # row 2: positions 4..7 of a prompt of 8 tokens: "last" is token 8
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        gate_up = torch.randn(9, 192, generator=g)
        h = ACTIVATIONS["gelu_tanh"](gate_up[:, :96]) * gate_up[:, 96:]
        want = h.clone()
        a = ACTIVATIONS["gelu_tanh"](gate_up[:3, :96])
        m = act.mask[layer]
        want[:3, m] = (apply_override(a.unsqueeze(0), m, act.mul[layer], act.add[layer])[0] * gate_up[:3, 96:])[:, m]
        w.override(h, gate_up, layer, "gelu_tanh")
        assert torch.equal(h, want)
        hs, r = torch.randn(9, 64, generator=g), torch.randn(9, 64, generator=g)
        want_h, want_r = hs.clone(), r.clone()
        stream = hs[8] + r[8]
        want_h[8] = apply_override(stream.view(1, 1, -1), resid.mask[layer], resid.mul[layer], resid.add[layer]).view(-1)
        want_r[8] = 0
        w.residual(hs, r, layer)
        assert torch.equal(hs, want_h) and torch.equal(r, want_r)


def test_engines_that_cannot_steer_refuse_steering_requests(served):
    """`refusal` names why an engine cannot steer (other architectures, parallelism, speculative
    decoding, quantization, GPU builds); `validate` then refuses every steering request and lets
    the others through."""
    from types import SimpleNamespace as NS

    from steer.vllm import plugin

    def config(tp=1, pp=1, spec=None, quant=None, v2=False):
        return NS(parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=pp), speculative_config=spec,
                  model_config=NS(quantization=quant), use_v2_model_runner=v2)

    assert plugin.refusal("Gemma3ForCausalLM", config()) is None
    assert plugin.refusal("LlamaForCausalLM", config()) is None
    for why, args in (("Qwen2ForCausalLM is not supported", ("Qwen2ForCausalLM", config())),
                      ("tensor or pipeline parallelism", ("LlamaForCausalLM", config(tp=2))),
                      ("speculative decoding", ("LlamaForCausalLM", config(spec=object()))),
                      ("unquantized", ("LlamaForCausalLM", config(quant="awq"))),
                      ("CPU build", ("LlamaForCausalLM", config(v2=True)))):
        assert why in plugin.refusal(*args)
    steering = NS(extra_args={"steer_experts": str(served / "experts"), "steer_label": "fr"})
    saved = dict(plugin._FRONT)
    try:
        plugin._FRONT.update(dims=DIMS, refusal=plugin.refusal("Qwen2ForCausalLM", config()))
        with pytest.raises(ValueError, match="steer: Qwen2ForCausalLM is not supported"):
            plugin.validate(steering)
        plugin.validate(NS(extra_args=None))  # not steering: through
        plugin._FRONT.update(refusal=None)
        plugin.validate(steering)
        with pytest.raises(ValueError, match="the served model has 2 x 64"):
            plugin._FRONT.update(dims=Dims(2, 64, 64))
            plugin.validate(steering)
    finally:
        plugin._FRONT.clear()
        plugin._FRONT.update(saved)


def test_cache_salt_names_the_steering_and_its_files(served, tmp_path):
    """The prefix-cache salt: none without steer keys; another config, another file version or
    (positions other than all) another request gives another salt."""
    import shutil

    from steer.vllm.plugin import cache_salt

    f = tmp_path / "lape.safetensors"
    shutil.copy(served / "lape.safetensors", f)
    iv = {"steer_intervention": str(f)}
    assert cache_salt(None, "r1") is None and cache_salt({"temperature": 0}, "r1") is None
    first = cache_salt(iv, "r1")
    assert first == cache_salt(iv, "r2") != cache_salt({"steer_experts": str(served / "experts"), "steer_label": "fr"}, "r1")
    assert cache_salt({**iv, "steer_positions": "last"}, "r1") != cache_salt({**iv, "steer_positions": "last"}, "r2")
    os.utime(f, ns=(1, 1))
    assert cache_salt(iv, "r1") != first
