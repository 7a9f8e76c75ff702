"""How steer reaches into a model's forward: one protocol, two implementations.

A backend is attached to a model (at most one at a time; `attached(model)` finds it) and, in
every forward of the model, does two things to each layer:
- steer: the override of an `Intervention` (`steer(iv)` / `unsteer()`), at the positions it
  names, with the real-token mask and cache use of the call (`CallInfo`); or, per row, the
  sets of an `InterventionSets` with a set index per row (`steer(sets, rows)`: `override`).
  The intervention's site says where: the neuron tensor (the input of the MLP's down
  projection), the activation before `* up`, or the residual stream (a decoder layer's output);
- pool: each sentence's max or mean of the neuron tensor over chosen tokens into `pooled`
  [B, L, M] fp32 (`start_pooling(tokens, how)` before a forward, `stop_pooling()` after), and on
  request the token statistics of LAPE and DiffMean over the same tokens into `stats`:
  `act_pos` / `act_sum` [B, L, M] (positive activations, their sum) and `resid_sum` [B, L, D].
Implementations:
- `HookBackend`: one forward pre-hook per down projection (plus one on the layer stack, and
  forward hooks on the activations once the activation site is used). The simplest correct
  means: the reference, and the tests' oracle for the fused path.
- `FusedPatch` (`steer.patch`): each MLP swapped for a module whose neuron tensor comes from one
  fused op that applies the override (neuron or activation site) and pools in the same pass.
The residual site is a forward hook on every decoder layer in both, added the first time it is
used. The semantics (override, pooling, activation statistics) are the kernels' reference
functions (`kernels/fused_mlp_ref.py`): written once, used by every site and both backends.
Which backend a call gets, and `intervene`, are in `steer.engine.steering`.
"""
from __future__ import annotations

import logging
import sys
import weakref

import torch
from torch import nn

from steer.core.adapters import NeuronLayout
from steer.core.intervention import Intervention, InterventionSets, steered_tokens
from steer.core.token_stats import check_kinds
from steer.kernels.fused_mlp_ref import activation_stats, apply_override, pool, pool_sum

log = logging.getLogger(__name__)

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Backend]" = weakref.WeakKeyDictionary()


def attached(model: nn.Module) -> "Backend | None":
    """The backend attached to `model`, if any."""
    return _ATTACHED.get(model)


def guard_hooks() -> None:
    """Make `torch.compile` guard on module hooks before steer adds any (called whenever it does).

    torch 2.13 skips those guards by default (`torch._dynamo.config.skip_nnmodule_hook_guards`),
    so a graph compiled before steer's hooks existed, or compiled for another copy of the same
    model class, silently runs WITHOUT them: steering or pooling would be ignored and nothing
    would say so. steer turns the guards on the first time it adds hooks, and if dynamo may
    already hold graphs compiled without them (dynamo was loaded) it drops those graphs once
    (`torch._dynamo.reset()`, a debug log): they recompile on their next call, with the guards. From then on adding or removing
    a hook recompiles (tests/test_intervention.py). Importing steer changes nothing.
    """
    compiled_before = "torch._dynamo" in sys.modules  # not loaded: nothing can have been compiled
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        if compiled_before:
            torch._dynamo.reset()
            log.debug("torch.compile now guards module hooks (steer adds hooks); compiled graphs recompile once")


class CallInfo:
    """Pre-hook on the layer stack that records each forward call's real-token mask and cache use."""

    def __init__(self, stack: nn.Module):
        guard_hooks()
        self.attention_mask: torch.Tensor | None = None  # [B, T] of the current call
        self.extends_cache = False
        self.handle = stack.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs["inputs_embeds"]
        batch, length = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(batch, length, dtype=torch.long, device=x.device)
            self.attention_mask, self.extends_cache = mask, None
        else:  # a cache-extending call passes past + new columns: known from shapes, no sync
            self.attention_mask, self.extends_cache = mask[:, -length:], mask.shape[1] > length
        if self.extends_cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 passes `cache=`
            self.extends_cache = cache is not None and cache.get_seq_length() > 0
        return None

    def steered(self, positions: str | torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool of the current call's positions steered by `positions` (a name, or a code
        per row; None: all of them)."""
        return steered_tokens(positions, self.attention_mask, self.extends_cache)


class Backend:
    """The state both implementations share: the layout, the call info, the intervention being
    applied and the pooling requested for the next forward."""

    kind = ""

    def __init__(self, model: nn.Module, neuron_module: str | None = None):
        existing = attached(model)
        if existing is not None:
            raise RuntimeError("this model is already patched; revert() the first patch" if existing.kind == "fused"
                               else "hooks are active on this model (an intervene or a collection); remove them first")
        self.model = model
        self.layout = NeuronLayout(model, neuron_module)
        self.info = CallInfo(self.layout.stack)
        self.intervention: Intervention | InterventionSets | None = None
        self.rows: torch.Tensor | None = None  # [B] set index per row, with InterventionSets
        self.pool_tokens: torch.Tensor | None = None  # [B, T] bool, for the next forward
        self.pooling = "max"
        self.pooled: torch.Tensor | None = None  # [B, L, M] fp32, written layer by layer
        self.stats: dict[str, torch.Tensor] = {}  # act_pos, act_sum [B, L, M]; resid_sum [B, L, D]
        self.residual_handles: list = []  # forward hooks on the decoder layers, once needed
        _ATTACHED[model] = self

    def steer(self, intervention: Intervention | InterventionSets, rows: torch.Tensor | None = None) -> None:
        """Apply `intervention` from the next forward on; InterventionSets need `rows` [B], the
        set of each row (replace it, or change it in place, between batches)."""
        width = self.layout.width_of(intervention.site)
        if intervention.shape != (self.layout.n_layers, width):
            unit = "hidden units" if intervention.site == "residual" else "neurons"
            raise ValueError(
                f"intervention is for {intervention.shape[0]} layers x {intervention.shape[1]} {unit}; "
                f"the model has {self.layout.n_layers} x {width} at the {intervention.site}")
        if isinstance(intervention, InterventionSets) != (rows is not None):
            raise ValueError("rows (a set index per row) go with InterventionSets, and only with them")
        if rows is not None and (rows.dim() != 1 or rows.dtype != torch.long):
            raise ValueError(f"rows must be a 1-D int64 tensor, got {tuple(rows.shape)} {rows.dtype}")
        if intervention.device.type != self.layout.device.type:
            raise ValueError(f"the intervention is on {intervention.device}, the model's neurons on {self.layout.device}: "
                             "build it there (device=, or Intervention.to)")
        self.use_site(intervention.site)
        self.intervention, self.rows = intervention, rows

    def unsteer(self) -> None:
        self.intervention = self.rows = None

    def use_site(self, site: str) -> None:
        """Make the backend able to reach `site` (an intervention site or a statistic's):
        the residual stream needs hooks on the decoder layers, added once."""
        if site == "residual" and not self.residual_handles:
            # prepended: Hugging Face's output_hidden_states capture (hooks added at the first
            # forward) then records the steered output as hidden state layer + 1
            self.residual_handles = [self.layout.decoder_layer(layer).register_forward_hook(
                self._residual_hook(layer), prepend=True) for layer in range(self.layout.n_layers)]

    def steers(self, site: str, layer: int) -> bool:
        """Whether the current call overrides `site` in `layer`. Sets and the residual stream: every
        layer (rows vary; a residual override is cheap, and an empty one changes nothing); an
        Intervention at an MLP site: the layers it touches (a host sync, only while it steers)."""
        iv = self.intervention
        if iv is None or iv.site != site:
            return False
        return self.rows is not None or site == "residual" or bool(iv.mask[layer].any())

    def view(self, x: torch.Tensor, layer: int, steered: bool) -> torch.Tensor:
        """x (a site's tensor of this call) as [B, T, units], with the override of `layer` applied
        when `steered`: what every hook does first."""
        h = self.layout.view(x, self.info.attention_mask.shape[0])
        if not steered:
            return h
        (mask, mul, add), rows, tokens = self.override(layer)
        return apply_override(h, mask, mul, add, tokens, rows)

    def _residual_hook(self, layer: int):
        def hook(module, args, output):
            tuple_out = isinstance(output, tuple)
            hidden = output[0] if tuple_out else output
            steered = self.steers("residual", layer)
            if not steered and "resid_sum" not in self.stats:
                return None
            h = self.view(hidden, layer, steered)  # [B, T, D]
            if "resid_sum" in self.stats:
                self.stats["resid_sum"][:, layer] = pool_sum(h, self.pool_tokens)
            if not steered:
                return None
            return (h.view(hidden.shape),) + tuple(output[1:]) if tuple_out else h.view(hidden.shape)

        return hook

    def override(self, layer: int):
        """What the current call does to `layer`: ((mask, mul, add), rows, steered tokens) for the
        kernels' `apply_override` / `fused_mlp`, or None without steering. A single Intervention
        gives [M] buffers and no rows; sets give the layer's [S + 1, M] tables and the row index
        (repeated when generation expands each row, e.g. num_return_sequences or beams)."""
        iv = self.intervention
        if iv is None:
            return None
        if self.rows is None:
            return (iv.mask[layer], iv.mul[layer], iv.add[layer]), None, self.info.steered(iv.positions)
        rows, batch = self.rows, self.info.attention_mask.shape[0]
        if rows.shape[0] != batch:
            if batch % rows.shape[0]:
                raise ValueError(f"{rows.shape[0]} row set indices for a batch of {batch} rows")
            rows = rows.repeat_interleave(batch // rows.shape[0])
        return iv.table(layer), rows, self.info.steered(iv.codes[rows])

    def start_pooling(self, tokens: torch.Tensor, how: str, stats: tuple[str, ...] = ()) -> torch.Tensor:
        """Pool the next forward over `tokens` [B, T]; returns the [B, L, M] buffer it fills.
        stats: any of `token_stats.KINDS`, filled into `self.stats` over the same tokens."""
        for site in check_kinds(stats):
            self.use_site(site)
        self.pool_tokens, self.pooling = tokens, how
        B, L, dev = tokens.shape[0], self.layout.n_layers, tokens.device
        self.pooled = torch.empty(B, L, self.layout.width, device=dev)
        self.stats = {}
        if "activation" in stats:
            self.stats.update(act_pos=torch.empty(B, L, self.layout.width, device=dev),
                              act_sum=torch.empty(B, L, self.layout.width, device=dev))
        if "residual" in stats:
            self.stats["resid_sum"] = torch.empty(B, L, self.layout.hidden, device=dev)
        return self.pooled

    def stop_pooling(self) -> None:
        self.pool_tokens = self.pooled = None
        self.stats = {}

    @property
    def idle(self) -> bool:
        return self.intervention is None and self.pool_tokens is None

    def remove(self) -> None:
        """Detach from the model; it runs as if steer had never touched it."""
        for h in self.residual_handles:
            h.remove()
        self.residual_handles = []
        self.info.handle.remove()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]


class HookBackend(Backend):
    """Forward pre-hooks on every down projection: override, then pool, the neuron tensor; forward
    hooks on every activation module, once the activation site is used."""

    kind = "hooks"

    def __init__(self, model: nn.Module, neuron_module: str | None = None):
        super().__init__(model, neuron_module)
        self.handles = [m.register_forward_pre_hook(self._hook(layer)) for layer, m in enumerate(self.layout.modules)]
        self.act_handles: list = []

    def use_site(self, site: str) -> None:
        super().use_site(site)
        if site == "activation" and not self.act_handles:
            acts = [self.layout.layer_parts(layer)["act"] for layer in range(self.layout.n_layers)]
            if len({id(a) for a in acts}) != len(acts):
                raise ValueError("the layers share one activation module: the activation site needs one per layer")
            self.act_handles = [a.register_forward_hook(self._act_hook(layer)) for layer, a in enumerate(acts)]

    def _hook(self, layer: int):
        def pre_hook(module, args):
            tokens = self.pool_tokens
            steered = self.steers("neuron", layer)
            if tokens is None and not steered:
                return None
            h = self.view(args[0], layer, steered)  # [B, T, M]
            if steered:
                args = (h.view(args[0].shape),) + tuple(args[1:])
            if tokens is not None:
                self.pooled[:, layer] = pool(h, tokens, self.pooling)
            return args

        return pre_hook

    def _act_hook(self, layer: int):
        def hook(module, args, output):
            steered = self.steers("activation", layer)
            if not steered and "act_pos" not in self.stats:
                return None
            a = self.view(output, layer, steered)  # [B, T, M]
            if "act_pos" in self.stats:
                self.stats["act_pos"][:, layer], self.stats["act_sum"][:, layer] = activation_stats(a, self.pool_tokens)
            return a.view(output.shape) if steered else None

        return hook

    def remove(self) -> None:
        for h in self.handles + self.act_handles:
            h.remove()
        self.handles, self.act_handles = [], []
        super().remove()
