"""Adapters: where each model family keeps its MLP neurons.

A *neuron* is one unit of the input of an MLP's down projection (docs/concepts.md): gated MLPs feed
it `act(gate_proj(x)) * up_proj(x)`, ungated ones the activation output. One declared `Adapter`
per family maps these canonical parts to module paths inside a Hugging Face model (the way
TransformerLens declares its architecture adapters):

    layers  the ModuleList of decoder layers          e.g. "model.layers"
    down    the down projection, relative to a layer  e.g. "mlp.down_proj"  (its input = neurons)
    up      first projection (ungated: the only one)  e.g. "mlp.up_proj"
    gate    gate projection of gated MLPs, or None
    act     the activation module

Everything else in steer reaches neurons through `NeuronLayout`: the down projection of every
layer, the layout (layers x width), and a `view` that restores [batch, pos, neuron] for families
that flatten tokens (OPT). Unknown architectures take a user-given regex over module names.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from steer.core.deprecation import renamed_attribute
from steer.core.runtime import dtype_name


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: str
    down: str
    up: str
    gate: str | None
    act: str
    merged_gate_up: bool = False  # Phi-3: one gate_up_proj, gate half first
    flat_tokens: bool = False  # OPT: MLP sees [batch * pos, hidden]


def _gated(family, layers="model.layers", act="mlp.act_fn"):
    return Adapter(family, layers, "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj", act)


ADAPTERS: dict[str, Adapter] = {
    "llama": _gated("llama"),
    "mistral": _gated("mistral"),
    "qwen2": _gated("qwen2"),
    "qwen3": _gated("qwen3"),
    "gemma": _gated("gemma"),
    "gemma2": _gated("gemma2"),
    "gemma3_text": _gated("gemma3"),
    "phi3": Adapter("phi3", "model.layers", "mlp.down_proj", "mlp.gate_up_proj", None, "mlp.activation_fn", merged_gate_up=True),
    "gpt2": Adapter("gpt2", "transformer.h", "mlp.c_proj", "mlp.c_fc", None, "mlp.act"),
    "bloom": Adapter("bloom", "transformer.h", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", None, "mlp.gelu_impl"),
    "xglm": Adapter("xglm", "model.layers", "fc2", "fc1", None, "activation_fn"),
    "opt": Adapter("opt", "model.decoder.layers", "fc2", "fc1", None, "activation_fn", flat_tokens=True),
}


SIGNATURE_CHUNKS = 16  # chunk sums per down projection in `NeuronLayout.signature`
SAME_WEIGHTS_TOLERANCE = 1e-2  # `NeuronLayout.same_weights`: RMS chunk-sum difference / scale


def _sample(module: nn.Module) -> torch.Tensor:
    """The strided sample of a down projection's weights that fingerprints read (CPU, its dtype)."""
    w = module.weight.detach().flatten()
    return w[:: max(1, w.numel() // 4096)].cpu()


def weight_sample(module: nn.Module) -> tuple[tuple[int, ...], torch.Tensor]:
    """(shape, strided sample) of a down projection's weights: all its fingerprint and signature
    read (vLLM's CPU build keeps them before it repacks the weights: steer/vllm/plugin.py)."""
    return tuple(module.weight.shape), _sample(module)


def weights_fingerprint(samples) -> str:
    """`NeuronLayout.fingerprint` of the down projections' `weight_sample`s."""
    digest = hashlib.sha256()
    for shape, sample in samples:
        digest.update(str(shape).encode())
        b = sample.to(torch.bfloat16)
        b = torch.where(b.abs() < 2 ** -14, torch.zeros_like(b), b)  # fp16 keeps these inexactly
        digest.update(b.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_signature(samples) -> list[list[float]]:
    """`NeuronLayout.signature` of the down projections' `weight_sample`s."""
    out = []
    for _, sample in samples:  # fsum: exact, so every machine and rank records the same numbers
        s = sample.double()
        scale = math.sqrt(math.fsum(s.square().tolist()) / SIGNATURE_CHUNKS)
        out.append([_digits(scale)] + [_digits(math.fsum(c.tolist())) for c in s.tensor_split(SIGNATURE_CHUNKS)])
    return out


def same_weights(recorded: dict, fingerprint: str, signature, dtype: str, legacy=None) -> bool:
    """`NeuronLayout.same_weights` given a model's fingerprint, its signature (a callable: computed
    only when needed), load dtype and, for records without a signature, its legacy fingerprint
    (a callable, or None)."""
    expected = recorded.get("signature")
    if expected is None:
        return recorded.get("fingerprint") in (fingerprint, legacy() if legacy else None)
    dtypes = {recorded.get("dtype"), dtype}
    if None not in dtypes and "float16" not in dtypes and recorded.get("fingerprint") != fingerprint:
        return False
    try:
        d = [abs(c - c2) / max(a[0], b[0]) if c != c2 else 0.0
             for a, b in zip(expected, signature(), strict=True)
             for c, c2 in zip(a[1:], b[1:], strict=True)]
    except (TypeError, ValueError, IndexError, ZeroDivisionError):  # another layout, or garbage
        return False
    return bool(d) and (sum(x * x for x in d) / len(d)) ** 0.5 <= SAME_WEIGHTS_TOLERANCE


def _digits(x: float) -> float:
    return float(f"{x:.7g}")


def _legacy_fingerprint(modules) -> str:
    """The fingerprint before dtype-independence (fp32 bytes of the sample): read for old records."""
    digest = hashlib.sha256()
    for m in modules:
        digest.update(str(tuple(m.weight.shape)).encode())
        digest.update(_sample(m).float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is [in, out]
        return tuple(module.weight.shape)
    raise TypeError(f"cannot read the input width of {type(module).__name__}; expected a Linear-like module")


class NeuronLayout:
    """The neuron tensor of every layer of one model: its modules, layout and [B, T, M] view."""

    def __init__(self, model: nn.Module, neuron_module: str | None = None):
        self.model = model
        model_type = getattr(model.config, "model_type", None)
        if neuron_module is not None:
            self.adapter = None
            pattern = re.compile(neuron_module)
            self.names = [n for n, _ in model.named_modules() if pattern.search(n)]
            if not self.names:
                raise ValueError(f"neuron_module={neuron_module!r} matches no module of {type(model).__name__}")
        elif model_type in ADAPTERS:
            self.adapter = ADAPTERS[model_type]
            layers = model.get_submodule(self.adapter.layers)
            self.names = [f"{self.adapter.layers}.{i}.{self.adapter.down}" for i in range(len(layers))]
        else:
            raise ValueError(
                f"unknown architecture {model_type!r} ({type(model).__name__}): steer has adapters for "
                f"{', '.join(sorted(ADAPTERS))}. Pass neuron_module=<regex matching the down-projection "
                r"module of every layer>, e.g. neuron_module=r'layers\.\d+\.mlp\.down_proj'"
            )
        self.modules = [model.get_submodule(n) for n in self.names]
        # the module whose forward call runs the layers (OPT's LM head skips its base model's)
        self.stack = model.get_submodule(self.adapter.layers.rpartition(".")[0]) if self.adapter else model.base_model
        widths = {_features(m)[0] for m in self.modules}
        if len(widths) != 1:
            raise ValueError(f"layers have different MLP widths {sorted(widths)}; steer needs one width")
        self.width = widths.pop()
        self.hidden = _features(self.modules[0])[1]  # the residual stream's width
        self.flat_tokens = self.adapter is not None and self.adapter.flat_tokens

    @property
    def n_layers(self) -> int:
        return len(self.modules)

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.width

    def width_of(self, site: str) -> int:
        """Units per layer at an intervention site (steer.core.intervention.SITES): the MLP width,
        or the hidden size for the residual stream."""
        return self.hidden if site == "residual" else self.width

    @property
    def device(self) -> torch.device:
        """Where the neuron tensors (and so interventions, pooled responses and states) live: the
        first layer's down projection (under a device map, per-layer buffers move with each call)."""
        return self.modules[0].weight.device

    @property
    def dtype(self) -> str:
        """The name of the dtype the weights were loaded in (`float32`, `bfloat16`, ...): what
        fingerprints leave out and records that depend on it (settings, caches) name."""
        return dtype_name(self.modules[0].weight.dtype)

    def layer_parts(self, layer: int) -> dict[str, nn.Module | None]:
        """The up / gate / act / down modules of one layer (declared adapters only)."""
        if self.adapter is None:
            raise ValueError("layer parts (the activation, the decoder layers) are known only for declared "
                             "adapters, not for neuron_module=")
        root = self.model.get_submodule(f"{self.adapter.layers}.{layer}")
        a = self.adapter
        return {
            "up": root.get_submodule(a.up),
            "gate": root.get_submodule(a.gate) if a.gate else None,
            "act": root.get_submodule(a.act),
            "down": root.get_submodule(a.down),
        }

    def decoder_layer(self, layer: int) -> nn.Module:
        """The decoder layer whose output is the residual stream after `layer` (declared adapters)."""
        if self.adapter is None:
            self.layer_parts(layer)  # the error
        return self.model.get_submodule(f"{self.adapter.layers}.{layer}")

    def view(self, h: torch.Tensor, batch: int) -> torch.Tensor:
        """The neuron tensor as [batch, pos, neuron] (OPT hands its MLP [batch * pos, neuron])."""
        return h.view(batch, -1, h.shape[-1]) if h.dim() == 2 else h

    def fingerprint(self) -> str:
        """Short hex id of the down projections' weights (display, keys): sha256 of their shapes and
        of a strided sample rounded to bf16, |w| < 2**-14 flushed to 0. The same for fp32 and bf16
        loads of any checkpoint, and for fp16 loads of fp16- or bf16-stored ones; an fp16 load of
        an fp32-stored checkpoint may differ (double rounding), so `same_weights` decides with
        `signature`. It does not name the dtype: keys that must separate dtypes add it."""
        return weights_fingerprint(map(weight_sample, self.modules))

    def signature(self) -> list[list[float]]:
        """Per down projection [S, c_1 .. c_16]: the float64 sums c of 16 contiguous chunks of the
        fingerprint's sample and their scale S (the RMS of the chunks' L2 norms), 7 significant
        digits. Loading in another dtype moves each sum by rounding noise, ~2e-3 S (bf16);
        other weights move them by ~S. Compared by `same_weights`."""
        return weights_signature(map(weight_sample, self.modules))

    def same_weights(self, recorded: dict) -> bool:
        """Whether `recorded` (metadata with "fingerprint", "signature", "dtype": an expert set's,
        a collection's settings) names this model's weights, in whatever dtype either was loaded.

        With a signature: the RMS over all chunks of |c - c'| / max(S, S') is at most
        SAME_WEIGHTS_TOLERANCE (1e-2: bf16 rounding gives ~2e-3, other weights ~1.4), and, where
        both dtypes are known and neither is float16, the fingerprints are equal too (then exact:
        a fine-tune that moved sampled weights by one bf16 step is other weights).
        Without (written before steer had signatures): the recorded fingerprint equals this
        model's, by today's hash or by the older one (fp32 bytes of the sample: that one also
        changes with the load dtype, so such records only match a load in their own dtype)."""
        return same_weights(recorded, self.fingerprint(), self.signature, self.dtype,
                            lambda: _legacy_fingerprint(self.modules))

    def describe(self) -> str:
        family = self.adapter.family if self.adapter else "generic"
        return (
            f"{type(self.model).__name__} ({family}): {self.n_layers} layers x {self.width} neurons = "
            f"{self.n_neurons:,} neurons; neuron = input of {self.names[0]}"
        )


def check_eval(model: nn.Module) -> None:
    """Refuse a model in training mode (the model or its base model; `from_config` returns one):
    dropout would make responses and embeddings random (GPT-2's 0.1 moves responses by up to
    ~0.2 between identical calls). collect, collect_stream, refine and embed call it before any
    forward pass. Submodules are not inspected: modules swapped in later (steer.patch) start in
    training mode without any dropout."""
    if model.training or getattr(model, "base_model", model).training:
        raise ValueError("model is in training mode (dropout is active): call model.eval() first")


def base_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Keyword arguments for the base model such that padding on either side changes nothing.

    Position ids count real tokens only (many families otherwise number left padding too); a
    base model without a `position_ids` argument (BLOOM: ALiBi from the mask) derives them itself.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.base_model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return kwargs


def __getattr__(name: str):
    return renamed_attribute(__name__, name)
