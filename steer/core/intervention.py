"""Interventions: dense per-layer override buffers, the site they override and the positions.

An `Intervention` holds three dense buffers per model, each [layers, width]:
`mask` (which units are overridden), `mul` and `add`. At a steered position every masked
unit becomes `h * mul + add` (computed in fp32, cast back), which covers the four operations:

    set v    mul 0, add v        scale s  mul s, add 0
    add v    mul 1, add v        zero     mul 0, add 0

The `site` says which units (`SITES`; the width follows from it, `NeuronLayout.width_of`):
"neuron" the input of the MLP's down projection (the experts' site), "activation" the
activation `act(gate)` before its product with `up` (LAPE's deactivate / activate; for ungated
MLPs the same value as the neuron), "residual" the output of a decoder layer, [layers, hidden]
(DiffMean: `add` holds strength x direction on every unit of one layer, mul 1).

Buffers are updated in place, so a compiled graph or a patched model that holds them sees a new
expert set without being rebuilt. `positions` chooses where the override applies:
"all" tokens, the "last" real token of every forward call, the "prompt" (forward calls without
a KV cache: the prefill) or "generated" tokens (calls that extend a cache: decoding steps);
`steered_tokens` turns that into a [B, T] mask for one forward call.

Per-row steering: `InterventionSets` holds S interventions (each with its own neurons, values,
operation and positions) in fixed-capacity sparse storage, plus a per-row set index chosen per
batch (`rows`; S = no set). Storage grows with the forced neurons, not with S x layers x width:
each layer's [S + 1, width] table is densified inside the forward (`table`), so neither the sets'
contents nor the rows change a shape, and positions are codes in a tensor, not strings:
changing any of them never recompiles a compiled model.

Saved interventions: `Intervention.save(path, model=None)` writes one steer.intervention file
(format 1, through `steer/core/artifacts.py`: safetensors, hashed, atomic; suffix `.safetensors`
by convention, any path accepted): tensors `mask` [L, W] bool, `mul` and `add` [L, W] fp32; meta
`site`, `positions`, `shape` and, with a model, what an expert set records of it (`model`,
`architecture`, `fingerprint`, `dtype`, `signature`). `Intervention.load(path, model=None)`
refuses (ValueError naming the file) a bad file, an unknown site or positions, and a shape that
does not fit `model` at the site; other weights of the same shapes (`NeuronLayout.same_weights`)
are a warning. `Intervention.read_meta(path)` checks the file and returns its meta only.

Applying either is the backends' job (`steer.engine.backends`: `intervene`, hooks or the fused
patch); the override itself is `kernels/fused_mlp_ref.py::apply_override`, shared by every path.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steer.core import artifacts
from steer.core.adapters import NeuronLayout

POSITIONS = ("all", "last", "prompt", "generated")
SITES = ("neuron", "activation", "residual")
FILE_KIND, FILE_VERSION = "intervention", 1  # a steer.intervention file, format 1
BUFFERS = {"mask": torch.bool, "mul": torch.float32, "add": torch.float32}


def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"site={site!r}; choose one of {SITES}")
    return site


class Intervention:
    """Dense override buffers `mask`, `mul`, `add`, each [n_layers, width], at one `site`."""

    def __init__(self, n_layers: int, width: int, positions: str = "all", device: str | torch.device = "cpu",
                 site: str = "neuron"):
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
        self.positions, self.site = positions, check_site(site)
        self.mask = torch.zeros(n_layers, width, dtype=torch.bool, device=device)
        self.mul = torch.ones(n_layers, width, dtype=torch.float32, device=device)
        self.add = torch.zeros(n_layers, width, dtype=torch.float32, device=device)

    @classmethod
    def for_model(cls, model: nn.Module, positions: str = "all", neuron_module: str | None = None,
                  site: str = "neuron") -> "Intervention":
        layout = NeuronLayout(model, neuron_module)
        return cls(layout.n_layers, layout.width_of(site), positions, device=layout.device, site=site)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def _index(self, layers, units):
        layers = torch.as_tensor(layers, dtype=torch.long).reshape(-1)
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        if layers.numel() == 1 and units.numel() > 1:
            layers = layers.expand(units.numel())
        if layers.shape != units.shape:
            raise ValueError(f"{layers.numel()} layer indices for {units.numel()} unit indices")
        n_layers, width = self.shape
        for name, idx, size in (("layer", layers, n_layers), ("unit", units, width)):
            bad = (idx < 0) | (idx >= size)
            if bad.any():
                raise IndexError(f"{name} index {int(idx[bad][0])} out of range: the model has {size} {name}s")
        return layers.to(self.mask.device), units.to(self.mask.device)

    def _put(self, layers, units, mul, add) -> "Intervention":
        layers, units = self._index(layers, units)
        shape = layers.shape
        self.mask[layers, units] = True
        self.mul[layers, units] = torch.as_tensor(mul, dtype=torch.float32, device=self.mul.device).expand(shape)
        self.add[layers, units] = torch.as_tensor(add, dtype=torch.float32, device=self.add.device).expand(shape)
        return self

    def set(self, layers, units, values) -> "Intervention":
        """Force neurons to `values`."""
        return self._put(layers, units, 0.0, values)

    def scale(self, layers, units, factors) -> "Intervention":
        return self._put(layers, units, factors, 0.0)

    def shift(self, layers, units, deltas) -> "Intervention":
        """Add `deltas` to neurons."""
        return self._put(layers, units, 1.0, deltas)

    def zero(self, layers, units) -> "Intervention":
        return self._put(layers, units, 0.0, 0.0)

    def clear(self) -> "Intervention":
        """Remove every override, in place."""
        self.mask.zero_()
        self.mul.fill_(1.0)
        self.add.zero_()
        return self

    def copy_(self, other: "Intervention") -> "Intervention":
        """Take another intervention's buffers in place (no recompilation for holders of these)."""
        if other.shape != self.shape or other.site != self.site:
            raise ValueError(f"intervention {other.shape} at the {other.site} differs from {self.shape} at the {self.site}")
        self.mask.copy_(other.mask)
        self.mul.copy_(other.mul)
        self.add.copy_(other.add)
        self.positions = other.positions
        return self

    def with_positions(self, positions: str) -> "Intervention":
        """A copy steering `positions` (e.g. "all" for the perplexity of held-out text)."""
        out = Intervention(*self.shape, device=self.mask.device, site=self.site).copy_(self)
        out.positions = positions
        return out

    @staticmethod
    def every_position(ivs: "Sequence[Intervention | None]") -> "list[Intervention | None]":
        """Each of `ivs` steering every position (`with_positions("all")`); an intervention given
        several times stays one object, so that per-row steering keeps it one set."""
        copies = {id(iv): iv.with_positions("all") for iv in ivs if iv is not None}
        return [None if iv is None else copies[id(iv)] for iv in ivs]

    def to(self, device: str | torch.device) -> "Intervention":
        """This intervention on `device` (itself when already there; else a copy)."""
        if self.mask.device == torch.device(device):
            return self
        return Intervention(*self.shape, self.positions, device=device, site=self.site).copy_(self)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def save(self, path, model: nn.Module | None = None, *, neuron_module: str | None = None) -> Path:
        """Write this intervention as a steer.intervention file (`steer/core/artifacts.py`: hashed,
        atomic; any path, `.safetensors` by convention). meta: site, positions, shape and, with
        `model` (whose layout must fit the shape at the site: else ValueError), its name,
        architecture, fingerprint, dtype and signature, as an expert set records them."""
        meta = {"site": self.site, "positions": self.positions, "shape": list(self.shape)}
        if model is not None:
            layout = NeuronLayout(model, neuron_module)
            _check_fits(path, meta, layout)
            meta.update(model=getattr(model.config, "name_or_path", ""), architecture=type(model).__name__,
                        fingerprint=layout.fingerprint(), dtype=layout.dtype, signature=layout.signature())
        tensors = {name: getattr(self, name).to(dtype) for name, dtype in BUFFERS.items()}
        return artifacts.save(path, tensors, meta, kind=FILE_KIND, version=FILE_VERSION)

    @classmethod
    def read_meta(cls, path) -> dict:
        """The meta of a file written by `save` (site, positions, shape [L, W]; model, architecture,
        fingerprint, dtype, signature when it was saved with a model), after the checks of `load`
        that need no model: e.g. to check site and shape against a model's config before loading
        its weights. ValueError naming the file for a bad one."""
        return _read(path)[1]

    @classmethod
    def load(cls, path, model: nn.Module | None = None, device: str | torch.device | None = None, *,
             neuron_module: str | None = None) -> "Intervention":
        """Read a file written by `save`. ValueError naming the file: not a steer.intervention
        file, newer, corrupt or truncated (`artifacts.load`), a site or positions not in SITES /
        POSITIONS, buffers of another shape or dtype than its meta says; with `model`, a shape
        that does not fit the model at the file's site. Same shapes, other weights than the
        recorded model's (`NeuronLayout.same_weights`, any load dtype): a warning. The buffers go
        to `device` (default: the model's neurons' device with `model`, else the CPU)."""
        tensors, meta = _read(path)
        if model is not None:
            layout = NeuronLayout(model, neuron_module)
            _check_fits(path, meta, layout)
            if meta.get("fingerprint") is not None and not layout.same_weights(meta):
                found = ", ".join(str(meta[k]) for k in ("fingerprint", "dtype") if meta.get(k) is not None)
                warnings.warn(
                    f"intervention {path} was saved for model {meta.get('model')!r} (fingerprint {found}); "
                    f"this model has the same shapes but other weights ({layout.fingerprint()}, {layout.dtype})",
                    stacklevel=2)
            device = layout.device if device is None else device
        iv = cls(*meta["shape"], positions=meta["positions"], device="cpu" if device is None else device,
                 site=meta["site"])
        for name in BUFFERS:
            getattr(iv, name).copy_(tensors[name])
        return iv

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        layers = self.mask.any(1).nonzero().flatten().tolist()
        site = "" if self.site == "neuron" else f", site={self.site!r}"
        return f"Intervention({len(self)} units in layers {layers}, positions={self.positions!r}{site})"


def _read(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The buffers and meta of a steer.intervention file, checked without a model."""
    tensors, meta = artifacts.load(path, kind=FILE_KIND, version=FILE_VERSION)[:2]
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupt: its meta is not a mapping")
    if meta.get("site") not in SITES:
        raise ValueError(f"{path}: site {meta.get('site')!r} is not one of {SITES}")
    if meta.get("positions") not in POSITIONS:
        raise ValueError(f"{path}: positions {meta.get('positions')!r} is not one of {POSITIONS}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"{path}: shape {shape!r} is not [layers, width]")
    artifacts.check_shapes(path, tensors, {name: tuple(shape) for name in BUFFERS})
    for name, dtype in BUFFERS.items():
        if tensors[name].dtype != dtype:
            raise ValueError(f"{path}: {name} is {tensors[name].dtype}, expected {dtype}")
    return tensors, meta


def _check_fits(path, meta: dict, layout: NeuronLayout) -> None:
    """ValueError naming `path` when an intervention of meta's shape at meta's site does not fit
    the model of `layout` (its layers, `width_of(site)`)."""
    site, shape = meta["site"], tuple(meta["shape"])
    want = (layout.n_layers, layout.width_of(site))
    if shape != want:
        saved = f" (saved for model {meta['model']!r})" if meta.get("model") is not None else ""
        raise ValueError(f"{path}: the intervention is {shape[0]} layers x {shape[1]} units at the {site}{saved}; "
                         f"this model has {want[0]} x {want[1]} there")


def steered_tokens(positions: str | torch.Tensor, attention_mask: torch.Tensor,
                   extends_cache: bool) -> torch.Tensor | None:
    """[B, T] bool of the positions to steer in one forward call; None means all of them.

    positions: one of POSITIONS for every row, or a [B] tensor of codes (indices into POSITIONS)
    per row. Tensor ops only, no host synchronisation: "last" is each row's last real token
    (whatever the padding side), "prompt" a call that does not extend a KV cache, "generated"
    one that does."""
    ext = bool(extends_cache)
    if isinstance(positions, str):
        if positions == "all" or positions == ("generated" if ext else "prompt"):
            return None  # every position of this call
        codes = torch.full((1, 1), POSITIONS.index(positions), device=attention_mask.device)
    else:
        codes = positions[:, None]  # [B, 1]
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = t[None, :] == (attention_mask.bool() * (t + 1)).argmax(1)[:, None]  # [B, T]
    whole = POSITIONS.index("generated" if ext else "prompt")  # steers every position of this call
    return (codes == 0) | (codes == whole) | ((codes == 1) & last)  # [B, T]


class InterventionSets:
    """S interventions in one object of fixed capacity, for steering each row of a batch alike
    its own set (`rows`, one set index per row; S = no set).

    Storage: `capacity` slots of (layer, unit, set, mul, add), free slots with layer = n_layers,
    and `codes` [S + 1] (each set's positions; the last row, "no set", has none). `put` writes a
    set (host side, between batches); the forward reads only the tensors (`table`, `codes`).
    """

    def __init__(self, n_layers: int, width: int, sets: int, capacity: int, device: str | torch.device = "cpu",
                 site: str = "neuron"):
        if sets < 1 or capacity < 0:
            raise ValueError(f"sets ({sets}) must be >= 1 and capacity ({capacity}) >= 0")
        self.n_layers, self.width, self.sets, self.capacity = n_layers, width, sets, capacity
        self.site = check_site(site)  # every set overrides this site
        self.layer = torch.full((capacity,), n_layers, dtype=torch.long, device=device)
        self.unit = torch.zeros(capacity, dtype=torch.long, device=device)
        self.set = torch.full((capacity,), sets, dtype=torch.long, device=device)
        self.mul = torch.ones(capacity, dtype=torch.float32, device=device)
        self.add = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.codes = torch.zeros(sets + 1, dtype=torch.long, device=device)  # positions code per set
        self.sizes = [0] * sets  # neurons of each set (host side)

    @classmethod
    def of(cls, interventions: Sequence[Intervention], capacity: int | None = None) -> "InterventionSets":
        """The given interventions as sets 0..S-1 (capacity: their neurons, unless given)."""
        if not interventions:
            raise ValueError("InterventionSets.of needs at least one Intervention")
        n_layers, width = interventions[0].shape
        total = sum(len(iv) for iv in interventions)
        out = cls(n_layers, width, len(interventions), total if capacity is None else capacity,
                  device=interventions[0].mask.device, site=interventions[0].site)
        for i, iv in enumerate(interventions):
            out.put(i, iv)
        return out

    def with_capacity(self, capacity: int) -> "InterventionSets":
        """The same sets in a new object of `capacity` slots (at least the neurons in use)."""
        if capacity < len(self):
            raise ValueError(f"capacity {capacity} < the {len(self)} neurons these sets hold")
        out = InterventionSets(self.n_layers, self.width, self.sets, capacity, device=self.device, site=self.site)
        used = self.layer < self.n_layers
        for name in ("layer", "unit", "set", "mul", "add"):
            getattr(out, name)[:len(self)] = getattr(self, name)[used]
        out.codes.copy_(self.codes)
        out.sizes = list(self.sizes)
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.width)

    @property
    def device(self) -> torch.device:
        return self.layer.device

    def put(self, index: int, iv: Intervention | None) -> "InterventionSets":
        """Make set `index` steer like `iv` (None: nothing), in place: a compiled model that holds
        these buffers sees the change without recompiling."""
        if not 0 <= index < self.sets:
            raise IndexError(f"set {index} out of range: {self.sets} sets")
        if iv is not None and iv.shape != self.shape:
            raise ValueError(f"intervention is for {iv.shape[0]} x {iv.shape[1]} neurons; these sets are for "
                             f"{self.n_layers} x {self.width}")
        if iv is not None and iv.site != self.site:
            raise ValueError(f"an intervention at the {iv.site} in sets at the {self.site}: one batch steers one site")
        new = 0 if iv is None else len(iv)
        if sum(self.sizes) - self.sizes[index] + new > self.capacity:
            raise ValueError(f"set {index} needs {new} neurons; {self.capacity - sum(self.sizes) + self.sizes[index]} "
                             f"of the capacity ({self.capacity}) are free: make the sets with a larger capacity")
        self.layer[self.set == index] = self.n_layers  # free the old entries
        self.set[self.layer == self.n_layers] = self.sets
        if new:
            layers, units = iv.mask.nonzero(as_tuple=True)
            slots = (self.layer == self.n_layers).nonzero().flatten()[:new].to(self.layer.device)
            self.layer[slots], self.unit[slots], self.set[slots] = layers.to(self.layer.device), units.to(
                self.layer.device), index
            self.mul[slots] = iv.mul[layers, units].to(self.mul.device)
            self.add[slots] = iv.add[layers, units].to(self.add.device)
        self.codes[index] = 0 if iv is None else POSITIONS.index(iv.positions)
        self.sizes[index] = new
        return self

    def rows(self, assignment: Sequence[int | None], device=None) -> torch.Tensor:
        """[B] int64 set index of each row (None: no set -> S)."""
        bad = [a for a in assignment if a is not None and not 0 <= a < self.sets]
        if bad:
            raise IndexError(f"set index {bad[0]} out of range: {self.sets} sets")
        return torch.tensor([self.sets if a is None else a for a in assignment], dtype=torch.long,
                            device=device if device is not None else self.layer.device)

    def table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense (mask, mul, add), each [S + 1, width], of one layer (row S: no set). Built in
        the forward from the slots (entries of other layers land in a dropped row)."""
        row = torch.where(self.layer == layer, self.set, self.sets + 1)  # [capacity]
        shape, dev = (self.sets + 2, self.width), self.layer.device
        mask = torch.zeros(shape, dtype=torch.bool, device=dev).index_put_(
            (row, self.unit), torch.ones_like(row, dtype=torch.bool))
        mul = torch.ones(shape, dtype=torch.float32, device=dev).index_put_((row, self.unit), self.mul)
        add = torch.zeros(shape, dtype=torch.float32, device=dev).index_put_((row, self.unit), self.add)
        return mask[:-1], mul[:-1], add[:-1]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __repr__(self) -> str:
        return f"InterventionSets({self.sets} sets, {len(self)} of {self.capacity} slots used)"
