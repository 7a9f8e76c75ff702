"""The reference intervention: the down projection receives exactly the forced values, nothing else."""
import os
import subprocess
import sys

import pytest
import torch

from steer.core.adapters import NeuronLayout, base_inputs
from steer.engine.steering import intervene
from steer.core.intervention import Intervention
from tiny import FAMILIES, batch, tiny_model


def down_inputs(model, ids, mask, steering=None):
    """What every down projection receives (hooks registered after the steering hooks run after them)."""
    layout = NeuronLayout(model)
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, l=l: seen.__setitem__(l, layout.view(a[0], ids.shape[0]).clone()))
               for l, m in enumerate(layout.modules)]
    with torch.no_grad():
        model.base_model(**base_inputs(model, ids, mask))
    for h in handles:
        h.remove()
    return seen


def logits(model, ids, mask):
    with torch.no_grad():
        return model(**base_inputs(model, ids, mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_values_reach_the_down_projection(family):
    model = tiny_model(family)
    ids, mask = batch([5, 3, 4], pad_left=True)
    before = down_inputs(model, ids, mask)
    iv = Intervention.for_model(model)
    units = torch.tensor([0, 7, 11])
    iv.set(0, units, torch.tensor([3.0, -2.0, 0.5]))
    iv.scale(1, [2], 10.0).zero(1, [5]).shift(1, [6], 1.5)
    with intervene(model, iv):
        after = down_inputs(model, ids, mask)
    # layer 0: forced where chosen, bit-identical elsewhere
    expected = before[0].clone()
    expected[:, :, units] = torch.tensor([3.0, -2.0, 0.5])
    assert torch.equal(after[0], expected)
    # layer 1 (its input moved with layer 0): each operation applied to what it would otherwise see
    with intervene(model, Intervention.for_model(model).set(0, units, torch.tensor([3.0, -2.0, 0.5]))):
        base1 = down_inputs(model, ids, mask)[1]
    exp1 = base1.clone()
    exp1[:, :, 2] = base1[:, :, 2] * 10.0
    exp1[:, :, 5] = 0.0
    exp1[:, :, 6] = base1[:, :, 6] + 1.5
    assert torch.equal(after[1], exp1)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_is_noop_and_remove_restores(family):
    model = tiny_model(family)
    ids, mask = batch([4, 2, 3])
    ref = logits(model, ids, mask)
    with intervene(model, Intervention.for_model(model)):
        assert torch.equal(logits(model, ids, mask), ref)
    handle = intervene(model, Intervention.for_model(model).set(1, [0, 1, 2], 5.0))
    assert not torch.allclose(logits(model, ids, mask), ref)
    handle.remove()
    assert torch.equal(logits(model, ids, mask), ref)


@pytest.mark.parametrize("pad_left", [False, True])
def test_last_token_positions(pad_left):
    model = tiny_model("llama")
    ids, mask = batch([5, 2, 4], pad_left=pad_left)
    before = down_inputs(model, ids, mask)
    iv = Intervention.for_model(model, positions="last").set(0, [3], 9.0)
    with intervene(model, iv):
        after = down_inputs(model, ids, mask)
    changed = (after[0] != before[0]).any(-1)  # [B, T]
    last = torch.tensor([4, 1, 3]) if not pad_left else torch.tensor([4, 4, 4])
    expected = torch.zeros_like(changed)
    expected[torch.arange(3), last] = True
    assert torch.equal(changed, expected)
    assert (after[0][expected][:, 3] == 9.0).all()


def test_buffers_change_in_place_while_applied():
    model = tiny_model("qwen2")
    ids, mask = batch([4, 3])
    iv = Intervention.for_model(model)
    with intervene(model, iv):
        ref = logits(model, ids, mask)
        iv.set(0, [1, 2], 4.0)
        moved = logits(model, ids, mask)
        iv.clear()
        assert torch.equal(logits(model, ids, mask), ref)
    assert not torch.equal(moved, ref)


def test_bad_indices_and_shapes_are_clear_errors():
    model = tiny_model("llama")
    iv = Intervention.for_model(model)
    with pytest.raises(IndexError, match="unit index 48 out of range: the model has 48 units"):
        iv.set(0, [48], 1.0)
    with pytest.raises(IndexError, match="layer index 2 out of range"):
        iv.set(2, [0], 1.0)
    with pytest.raises(ValueError, match="positions="):
        Intervention(2, 48, positions="first")
    with pytest.raises(ValueError, match="the model has 2 x 48"):
        intervene(model, Intervention(3, 48))


def test_compiled_model_sees_hooks_added_after_compiling_and_on_another_copy():
    """torch 2.13 skips guards on module hooks by default: a graph compiled before the steering
    hooks existed (or for an unsteered copy of the same class) would run without them, silently.
    steer turns those guards on when it first adds hooks, dropping graphs compiled without them
    (`guard_hooks`), so hooks added or removed after compiling count. The flag starts as torch
    leaves it in a fresh process. backend="eager": the guards are dynamo's, no code generated."""
    import copy

    torch._dynamo.reset()
    torch._dynamo.config.skip_nnmodule_hook_guards = True  # torch's default: as in a fresh process
    model = tiny_model("llama")
    ids, mask = batch([5, 3])
    iv = Intervention.for_model(model).set(0, [0, 1, 2], 5.0)
    compiled = torch.compile(model, backend="eager")
    plain = logits(compiled, ids, mask)  # compiled before any hook exists
    torch.testing.assert_close(plain, logits(model, ids, mask))
    with intervene(model, iv):  # hooks added after compiling
        steered = logits(model, ids, mask)
        assert not torch.allclose(steered, plain)
        torch.testing.assert_close(logits(compiled, ids, mask), steered)
    torch.testing.assert_close(logits(compiled, ids, mask), plain)  # and removed again
    hooked_copy = copy.deepcopy(model)  # a second instance of the class, compiled after the first
    with intervene(hooked_copy, iv):
        torch.testing.assert_close(logits(torch.compile(hooked_copy, backend="eager"), ids, mask), steered)
    torch._dynamo.reset()


def test_importing_steer_changes_no_process_state():
    """No environment variable, matplotlib backend, logging set-up or torch setting changes on
    import (nor does Triton or dynamo get imported, which would set TORCHINDUCTOR_CACHE_DIR)."""
    code = ("import logging, os, sys, matplotlib, torch\n"
            "env, backend, threads = dict(os.environ), matplotlib.get_backend(), torch.get_num_threads()\n"
            "handlers = list(logging.getLogger().handlers)\n"
            "import steer\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
            "assert matplotlib.get_backend() == backend and torch.get_num_threads() == threads\n"
            "assert logging.getLogger().handlers == handlers and not logging.getLogger('steer').handlers\n"
            "assert 'triton' not in sys.modules and 'torch._dynamo' not in sys.modules and 'vllm' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items()
                                                                       if k != "TORCHINDUCTOR_CACHE_DIR"})
