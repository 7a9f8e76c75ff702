"""Saved interventions (`Intervention.save` / `load` / `read_meta`): a steer.intervention file
(steer/core/artifacts.py) round-trips every site bit for bit, steers as the original did, and is
refused when it is not one, is corrupt, or does not fit the model; other weights warn."""
import warnings

import pytest
import torch

from steer.core import artifacts
from steer.core.adapters import NeuronLayout, base_inputs
from steer.core.diffmean import diffmean_intervention
from steer.core.experts import ExpertSet
from steer.core.intervention import Intervention
from steer.core.lape import LapeNeurons, lape_intervention
from steer.engine.steering import intervene
from tiny import tiny_model

FAMILY = "llama"  # gated: the activation site differs from the neuron site


@pytest.fixture(scope="module")
def model():
    return tiny_model(FAMILY)


def hand_made(model):
    iv = Intervention.for_model(model, positions="last")
    iv.set(0, [0, 7, 11], torch.tensor([3.0, -2.0, 0.5])).scale(1, [2], 10.0).zero(1, [5]).shift(1, [6], 1.5)
    return iv


def lape(model):
    layout = NeuronLayout(model)
    found = LapeNeurons(["fr", "de"], {"fr": (torch.tensor([0, 0, 1]), torch.tensor([3, 9, 4])),
                                       "de": (torch.tensor([1, 1]), torch.tensor([4, 20]))}, {})
    mean = torch.randn(2, layout.n_layers, layout.width, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    return lape_intervention(found, mean, activate="fr", deactivate=["de"], positions="generated")


def diffmean(model):
    layout = NeuronLayout(model)
    dirs = torch.randn(layout.n_layers, layout.hidden, generator=torch.Generator().manual_seed(4))
    return diffmean_intervention(dirs / dirs.norm(dim=1, keepdim=True), 0, 3.5)


MAKERS = {"neuron": hand_made, "activation": lape, "residual": diffmean}


def logits(model, iv=None):
    ids = torch.tensor([[1, 5, 9, 14, 7, 3], [1, 8, 8, 2, 6, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if iv is None:
            return model(**base_inputs(model, ids, mask)).logits
        with intervene(model, iv):
            return model(**base_inputs(model, ids, mask)).logits


@pytest.mark.parametrize("site", list(MAKERS))
@pytest.mark.parametrize("with_model", [False, True])
def test_round_trip_is_bit_equal_and_steers_alike(model, site, with_model, tmp_path):
    iv = MAKERS[site](model)
    assert iv.site == site and len(iv) > 0
    path = iv.save(tmp_path / "iv.safetensors", model if with_model else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no warning
        back = Intervention.load(path, model if with_model else None)
    assert (back.site, back.positions, back.shape) == (iv.site, iv.positions, iv.shape)
    for name, dtype in (("mask", torch.bool), ("mul", torch.float32), ("add", torch.float32)):
        assert getattr(back, name).dtype == dtype
        assert torch.equal(getattr(back, name), getattr(iv, name)), name
    meta = Intervention.read_meta(path)
    assert (meta["site"], meta["positions"], meta["shape"]) == (site, iv.positions, list(iv.shape))
    if with_model:
        layout = NeuronLayout(model)
        assert meta["model"] == model.config.name_or_path
        assert (meta["fingerprint"], meta["dtype"], meta["signature"]) == (
            layout.fingerprint(), layout.dtype, layout.signature())
    else:
        assert "fingerprint" not in meta and "model" not in meta
    # the same steering: positions "all" so that every intervention acts in this one forward call
    iv_all, back_all = iv.with_positions("all"), back.with_positions("all")
    want = logits(model, iv_all)
    assert not torch.equal(want, logits(model))  # it steers
    assert torch.equal(logits(model, back_all), want)


def test_any_suffix_and_positions_kept(model, tmp_path):
    for positions in ("all", "last", "prompt", "generated"):
        iv = hand_made(model).with_positions(positions)
        path = iv.save(tmp_path / f"{positions}.steer")
        assert Intervention.load(path).positions == positions


def test_load_goes_to_the_device_asked(model, tmp_path):
    path = hand_made(model).save(tmp_path / "iv.safetensors")
    assert Intervention.load(path).device == torch.device("cpu")
    assert Intervention.load(path, model).device == NeuronLayout(model).device
    assert Intervention.load(path, device="cpu").device == torch.device("cpu")


def test_an_expert_set_file_is_refused(tmp_path):
    fields = {"layer": torch.tensor([0]), "unit": torch.tensor([1]), "value": torch.tensor([1.0]),
              "score": torch.tensor([0.9]), "other": torch.tensor([0.8]), "sign": torch.tensor([1], dtype=torch.int8)}
    d = ExpertSet({"x": fields}, {"layers": 2, "width": 48}).save(tmp_path / "set")
    for load in (Intervention.load, Intervention.read_meta):
        with pytest.raises(ValueError, match=r"experts\.safetensors is not a steer\.intervention file"):
            load(d / "experts.safetensors")


def test_a_flipped_byte_is_refused(model, tmp_path):
    path = hand_made(model).save(tmp_path / "iv.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensors
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt"):
        Intervention.load(bad)
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt"):
        Intervention.read_meta(bad)
    bad.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt"):
        Intervention.load(bad)


def test_a_shape_that_does_not_fit_the_model_is_refused(model, tmp_path):
    layout = NeuronLayout(model)
    # neuron width on a residual-site file: the model's hidden size is other
    iv = Intervention(layout.n_layers, layout.width, site="residual").shift(0, [1], 2.0)
    path = iv.save(tmp_path / "wide.safetensors")
    assert Intervention.load(path).shape == (layout.n_layers, layout.width)  # without a model: fine
    with pytest.raises(ValueError, match=rf"wide\.safetensors: .* {layout.width} units at the residual.*"
                                         rf"this model has {layout.n_layers} x {layout.hidden} there"):
        Intervention.load(path, model)
    # another number of layers
    path = Intervention(layout.n_layers + 1, layout.width).save(tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"deep\.safetensors: the intervention is 3 layers"):
        Intervention.load(path, model)
    # saving against a model it does not fit
    with pytest.raises(ValueError, match="this model has"):
        iv.save(tmp_path / "no.safetensors", model)
    assert not (tmp_path / "no.safetensors").exists()


def write(path, meta, shape=(2, 48), mask_dtype=torch.bool):
    tensors = {"mask": torch.zeros(shape, dtype=mask_dtype), "mul": torch.ones(shape), "add": torch.zeros(shape)}
    return artifacts.save(path, tensors, meta, kind="intervention", version=1)


@pytest.mark.parametrize("meta, message", [
    ({"site": "attention", "positions": "all", "shape": [2, 48]}, r"site 'attention' is not one of"),
    ({"positions": "all", "shape": [2, 48]}, r"site None is not one of"),
    ({"site": "neuron", "positions": "first", "shape": [2, 48]}, r"positions 'first' is not one of"),
    ({"site": "neuron", "positions": "all", "shape": [2, 47]}, r"mask is \(2, 48\), expected \(2, 47\)"),
    ({"site": "neuron", "positions": "all", "shape": "2x48"}, r"shape '2x48' is not \[layers, width\]"),
])
def test_bad_meta_is_refused(tmp_path, meta, message):
    path = write(tmp_path / "odd.safetensors", meta)
    for load in (Intervention.load, Intervention.read_meta):
        with pytest.raises(ValueError, match=r"odd\.safetensors.*" + message):
            load(path)


def test_wrong_buffer_dtype_and_newer_format_are_refused(tmp_path):
    meta = {"site": "neuron", "positions": "all", "shape": [2, 48]}
    path = write(tmp_path / "u8.safetensors", meta, mask_dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"u8\.safetensors: mask is torch\.uint8, expected torch\.bool"):
        Intervention.load(path)
    t = {"mask": torch.zeros(2, 48, dtype=torch.bool), "mul": torch.ones(2, 48), "add": torch.zeros(2, 48)}
    path = artifacts.save(tmp_path / "v2.safetensors", t, meta, kind="intervention", version=2)
    with pytest.raises(ValueError, match=r"v2\.safetensors was written by a newer steer"):
        Intervention.load(path)


def test_other_weights_of_the_same_shape_warn_but_load(model, tmp_path):
    iv = hand_made(model)
    path = iv.save(tmp_path / "iv.safetensors", model)
    other = tiny_model(FAMILY, seed=1)
    with pytest.warns(UserWarning, match=r"iv\.safetensors was saved for model .*same shapes but other weights"):
        back = Intervention.load(path, other)
    assert torch.equal(back.add, iv.add)
    # the same weights in bf16: the same model (dtype-independent fingerprint), no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Intervention.load(path, tiny_model(FAMILY).to(torch.bfloat16))
    # saved without a model: nothing to compare, no warning
    bare = iv.save(tmp_path / "bare.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Intervention.load(bare, other)
