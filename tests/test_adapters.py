"""Adapters yield the true neuron tensor, with a [batch, pos, neuron] layout, in all twelve families."""
import pytest
import torch
import torch.nn.functional as F

from steer.core.adapters import ADAPTERS, NeuronLayout, base_inputs
from tiny import ACT, FAMILIES, batch, tiny_model


def capture(model, layout, ids, mask):
    """Neuron tensor of every layer ([B, T, M]) and the MLP input of every layer."""
    neurons, inputs, handles = {}, {}, []
    for l, m in enumerate(layout.modules):
        parts = layout.layer_parts(l)
        handles.append(m.register_forward_pre_hook(lambda mod, a, l=l: neurons.__setitem__(l, layout.view(a[0], ids.shape[0]))))
        handles.append(parts["up"].register_forward_pre_hook(lambda mod, a, l=l: inputs.__setitem__(l, a[0])))
    with torch.no_grad():
        model.base_model(**base_inputs(model, ids, mask))
    for h in handles:
        h.remove()
    return neurons, inputs


def linear(module, x):
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return x @ module.weight + module.bias
    return F.linear(x, module.weight, module.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_tensor_is_the_hand_computed_value(family):
    model = tiny_model(family)
    layout = NeuronLayout(model)
    assert layout.n_layers == 2 and layout.width == (128 if family == "bloom" else 48)
    ids, mask = batch([5, 3, 4, 1, 5, 2, 3])
    neurons, inputs = capture(model, layout, ids, mask)
    for l in range(layout.n_layers):
        parts = layout.layer_parts(l)
        x = inputs[l]
        if ADAPTERS[model.config.model_type].merged_gate_up:
            gate, up = linear(parts["up"], x).chunk(2, dim=-1)
            expected = ACT[family](gate) * up
        elif parts["gate"] is not None:
            expected = ACT[family](linear(parts["gate"], x)) * linear(parts["up"], x)
        else:
            expected = ACT[family](linear(parts["up"], x))
        expected = expected.view(7, 5, -1)
        assert neurons[l].shape == (7, 5, layout.width)
        torch.testing.assert_close(neurons[l], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("lengths", [[4], [5, 3, 4, 1, 5, 2, 3]])
def test_layout_matches_each_sentence_alone(family, pad_left, lengths):
    model = tiny_model(family)
    layout = NeuronLayout(model)
    ids, mask = batch(lengths, pad_left=pad_left)
    neurons, _ = capture(model, layout, ids, mask)
    for b, n in enumerate(lengths):
        real = mask[b].bool()
        alone, _ = capture(model, layout, ids[b : b + 1, real], mask[b : b + 1, real])
        for l in range(layout.n_layers):
            torch.testing.assert_close(neurons[l][b, real], alone[l][0], rtol=1e-4, atol=1e-5)


def test_unknown_architecture_names_what_to_pass():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="neuron_module="):
        NeuronLayout(model)


def test_generic_fallback_by_module_pattern():
    model = tiny_model("llama")
    declared = NeuronLayout(model)
    model.config.model_type = "mystery"
    generic = NeuronLayout(model, neuron_module=r"layers\.\d+\.mlp\.down_proj$")
    assert generic.names == declared.names and generic.width == declared.width
    with pytest.raises(ValueError, match="matches no module"):
        NeuronLayout(model, neuron_module=r"nothing_like_this")
