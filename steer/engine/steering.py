"""Which backend steers or collects, and steering through it.

- `choose(model, "auto" | "hooks" | "fused")`: what "auto" stands for: the backend already
  attached, else the fused patch where it gives the hooks' exact responses (float32 on the CPU:
  `_fused_is_exact`), else the hooks. Collection (`find_experts`, `steer find-experts`) defaults
  to "auto".
- `use(model, new)`: the backend attached to the model, or a new one of kind `new` that the
  caller owns and removes.
- `intervene(model, iv)` (`Steering`): steer through the attached backend (a `steer.patch`),
  or through hooks added for the duration of the `with` block.
- `PerRow`: the `intervention=` argument of the verbs (`generate`, `embed`, `perplexity`): one
  Intervention, or one per input, as `InterventionSets` rows.
The two implementations live in `steer.engine.backends` (the protocol, `HookBackend`) and
`steer.engine.patch` (`FusedPatch`); this module is the only one that needs both.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from steer.core.adapters import NeuronLayout
from steer.core.intervention import Intervention, InterventionSets
from steer.engine.backends import Backend, HookBackend, attached
from steer.engine.patch import FusedPatch, fused_act
from steer.kernels.fused_mlp_ref import ACTIVATIONS

BACKENDS = ("hooks", "fused")  # the two implementations
CHOICES = ("auto", *BACKENDS)  # what collection's `backend=` takes ("auto": `choose`)


def check_choice(kind: str) -> None:
    """ValueError unless `kind` is one of `CHOICES`."""
    if kind not in CHOICES:
        raise ValueError(f"backend={kind!r}; choose one of {CHOICES}")


def choose(model: nn.Module, kind: str = "auto", neuron_module: str | None = None) -> str:
    """The backend ("hooks" or "fused") that `kind` stands for when collecting from `model`.

    "hooks" and "fused" stand for themselves. "auto" takes the backend already attached (an
    `intervene`'s hooks, a `steer.patch`), else "fused" where it computes exactly the hooks'
    responses and was measured the faster of the two, else "hooks": fused when the model has a
    declared adapter (no `neuron_module`), every down projection is float32 on the CPU, and
    every layer's activation module is one the fused op implements and gives the op's bits on a
    probe (`_fused_is_exact`). Measured (bench/results/collection_paths.md, Gemma-3-270M, fp32,
    2 CPU threads): streaming collection at 0.979x the bare forward's speed fused, 0.951x hooks.
    Elsewhere fused is not taken: it computes `act(gate) * up` in fp32 and rounds once, so in
    bf16 its responses differ from the model's own by rounding (up to a bf16 step); on CUDA it
    runs Triton, not timed against the hooks on a GPU; GPT-2's and BLOOM's own tanh-GELU
    formulas differ from the op's by an fp32 ulp; other activations it does not implement."""
    check_choice(kind)
    if kind != "auto":
        return kind
    existing = attached(model)
    if existing is not None:
        return existing.kind
    return "fused" if neuron_module is None and _fused_is_exact(NeuronLayout(model)) else "hooks"


def _fused_is_exact(layout: NeuronLayout) -> bool:
    """Whether the fused patch gives `layout`'s model the same bits as its own forward (and so the
    hooks' responses): float32 weights on the CPU, the fused op's torch path, and each layer's
    activation equal, bit for bit on a probe, to the op's activation for that module."""
    if layout.adapter is None or any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32
                                    for m in layout.modules):
        return False
    probe = torch.linspace(-10.0, 10.0, 4001).view(1, 1, -1)  # [B, T, M]: every regime of the activations
    seen: set[int] = set()
    for layer in range(layout.n_layers):
        act = layout.layer_parts(layer)["act"]
        if id(act) in seen:
            continue
        seen.add(id(act))
        name = fused_act(act)
        if name is None:
            return False
        with torch.no_grad():
            if not torch.equal(act(probe), ACTIVATIONS[name](probe)):
                return False
    return True


def use(model: nn.Module, new: str, neuron_module: str | None = None) -> tuple[Backend, bool]:
    """(backend, owned): the backend attached to `model`, or else a new one of kind `new`
    ("auto": `choose`) that the caller owns and removes when done. A hooks backend attached by
    `intervene` cannot serve new="fused" (patch the model first, then intervene)."""
    check_choice(new)
    existing = attached(model)
    if existing is not None:
        if new == "fused" and existing.kind != "fused":
            raise RuntimeError("hooks are active on this model (a hook-based intervene?); with backend='fused', "
                               "patch the model first and intervene after")
        return existing, False
    if choose(model, new, neuron_module) == "fused":
        return FusedPatch(model), True
    return HookBackend(model, neuron_module), True


class Steering:
    """An intervention applied to a model; `remove()` or leave the `with` block to undo."""

    def __init__(self, model: nn.Module, intervention: Intervention | InterventionSets,
                 neuron_module: str | None = None, rows: torch.Tensor | None = None):
        self.backend, self.owned = use(model, new="hooks", neuron_module=neuron_module)
        self.previous = (self.backend.intervention, self.backend.rows)
        try:
            self.backend.steer(intervention, rows)
        except Exception:
            if self.owned:
                self.backend.remove()
            raise
        self.intervention = intervention

    def remove(self) -> None:
        if self.backend is None:
            return
        if self.backend.intervention is self.intervention:
            if self.previous[0] is None:
                self.backend.unsteer()
            else:
                self.backend.steer(*self.previous)
        if self.owned and self.backend.idle:
            self.backend.remove()
        self.backend = None

    def __enter__(self) -> "Steering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def intervene(model: nn.Module, intervention: Intervention | InterventionSets, neuron_module: str | None = None,
              *, rows: torch.Tensor | None = None) -> Steering:
    """Apply `intervention` to `model` until `.remove()` (or use it as a context manager): through
    the model's backend (e.g. a `steer.patch`), or forward pre-hooks added for the duration.
    With `InterventionSets`, `rows` [B] names each row's set (`sets.rows([...])`; S: none)."""
    return Steering(model, intervention, neuron_module, rows)


class PerRow:
    """The `intervention=` argument of steer's verbs (`generate`, `embed`, `perplexity`), for a
    list of `n` inputs: None (no steering), one `Intervention` for every input, or a list with an
    Intervention or None per input. A list becomes one `InterventionSets` (an Intervention used
    by several inputs is one set); `batch(model, indices)` steers a batch of those inputs."""

    def __init__(self, intervention: "Intervention | Sequence[Intervention | None] | None", n: int):
        self.single = self.sets = None
        self.assignment: list[int | None] = []
        if intervention is None or isinstance(intervention, Intervention):
            self.single = intervention
            return
        if not isinstance(intervention, Sequence) or isinstance(intervention, str):
            raise TypeError(f"intervention must be None, an Intervention or a list of them, not {type(intervention).__name__}")
        if len(intervention) != n:
            raise ValueError(f"{len(intervention)} interventions for {n} inputs: give one per input (None: unsteered)")
        index: dict[int, int] = {}  # id -> set number, in order of first use
        distinct: list[Intervention] = []
        for iv in intervention:
            if iv is not None and not isinstance(iv, Intervention):
                raise TypeError(f"a per-input intervention must be an Intervention or None, not {type(iv).__name__}")
            if iv is not None and id(iv) not in index:
                index[id(iv)] = len(distinct)
                distinct.append(iv)
        self.assignment = [None if iv is None else index[id(iv)] for iv in intervention]
        if distinct:
            self.sets = InterventionSets.of(distinct)

    def batch(self, model: nn.Module, indices: Sequence[int]):
        """A context steering one batch made of the inputs `indices` (in batch row order)."""
        if self.sets is not None:
            rows = self.sets.rows([self.assignment[i] for i in indices])
            return intervene(model, self.sets, rows=rows)
        return contextlib.nullcontext() if self.single is None else intervene(model, self.single)
