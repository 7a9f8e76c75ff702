"""Reference of the fused MLP neuron op, in plain torch (also the CPU path).

It spells out, one readable step at a time, what `steer.kernels.fused_mlp` computes in one pass:

1. the neuron tensor, the input of the down projection: `act(gate) * up` (gated MLPs) or
   `act(up)` (ungated MLPs, where `up` is the pre-activation), in fp32;
2. the masked override `value * mul + add` on the expert neurons (`mask`) at the steered
   positions (`steer_tokens`), in fp32; with `override_rows` [B], each row takes its own row
   of [R, M] override tables (per-row steering: a set per row). `override_site` says which
   value it overrides: the neuron (default) or the activation `act(gate)` before its product
   with `up` (LAPE-style deactivation / activation; for ungated MLPs the two are the same value);
3. `h`, that value cast back to the input dtype, for the down projection;
4. per sentence, the max and / or the sum of `h` (`reductions`; as written, upcast to fp32) over its
   real tokens (`pool_tokens`): padding never counts, so results do not depend on padding side
   or batch;
5. with `act_stats`, per sentence over the same tokens, the number of positions where the
   activation (after an activation-site override) is positive, and its sum (fp32): LAPE's
   activation probabilities and the mean activation, in the same pass.

Traced, it is only tensor ops with no Python branching on tensor values (the eager CPU split of
the reductions below steps aside while torch.compile traces): `torch.compile(fullgraph=True)`
turns it into one fused loop on CPU. The override and the pooling are functions of their own
(`apply_override`, `pool_max`, `pool_sum`, `pool_mean`, `pool`, `pooled`, `activation_stats`): the hooks backend, collection
and embeddings use the same ones, so each semantic is written once. Run eagerly on CPU, the
reductions read the positions every row pools as a plain view and mask only the ragged edges
(`token_core`); elsewhere, and under torch.compile, the whole tensor is masked. The two sums
add in other orders (a few fp32 ulp apart).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
MLP_SITES = ("neuron", "activation")  # the intervention sites inside the MLP (the residual is outside)
#: One vocabulary: a *pooling* turns a sentence's token values into its response (max or mean);
#: the op returns *reductions* (max, sum), and each pooling needs one (mean = sum / tokens: `pooled`).
POOLINGS = ("max", "mean")
REDUCTIONS = ("max", "sum")
REDUCTION = {"max": "max", "mean": "sum"}  # pooling -> the reduction it is computed from


class FusedOut(NamedTuple):
    """What the fused op returns; the pooled and statistics fields are None when not asked for."""

    h: torch.Tensor  # [B, T, M] in up's dtype
    pool_max: torch.Tensor | None  # [B, M] fp32 (with pool_tokens)
    pool_sum: torch.Tensor | None  # [B, M] fp32 (with pool_tokens)
    act_pos: torch.Tensor | None  # [B, M] fp32 count of positive activations (with act_stats)
    act_sum: torch.Tensor | None  # [B, M] fp32 sum of activations (with act_stats)


def check_options(act: str, override_site: str, act_stats: bool, pool_tokens: torch.Tensor | None,
                  reductions: tuple[str, ...] = REDUCTIONS) -> None:
    """The op's options, checked alike on every path (the dispatcher and this reference)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if override_site not in MLP_SITES:
        raise ValueError(f"override_site must be one of {MLP_SITES}, got {override_site!r}")
    if act_stats and pool_tokens is None:
        raise ValueError("act_stats needs pool_tokens (the tokens they count)")
    if not set(reductions) <= set(REDUCTIONS):
        raise ValueError(f"reductions must be among {REDUCTIONS}, got {reductions!r}")


def fused_mlp_ref(
    up: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    act: str,
    override: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    steer_tokens: torch.Tensor | None = None,
    pool_tokens: torch.Tensor | None = None,
    override_rows: torch.Tensor | None = None,
    override_site: str = "neuron",
    act_stats: bool = False,
    reductions: tuple[str, ...] = REDUCTIONS,
) -> FusedOut:
    """Neuron tensor with override, its per-sentence max / sum pooling and activation statistics.

    up, gate: [B, T, M] (gate None for ungated MLPs); override: (mask [M] bool, mul [M], add [M]),
    or [R, M] tables with override_rows [B] int64 (row b takes table row override_rows[b]),
    applied to the neuron or the activation (`override_site`); steer_tokens, pool_tokens: [B, T]
    bool. Returns `FusedOut`: h [B, T, M] in up's dtype and, when pool_tokens is given, those of
    pool_max / pool_sum [B, M] fp32 that `reductions` names (pool_max is -inf for a row without tokens)
    and, with act_stats, act_pos / act_sum [B, M] fp32 over the same tokens.
    """
    check_options(act, override_site, act_stats, pool_tokens, reductions)
    a = ACTIVATIONS[act]((up if gate is None else gate).float())  # [B, T, M]
    if override is not None and override_site == "activation":
        a = apply_override(a, *override, steer_tokens, override_rows)
    value = a if gate is None else a * up.float()  # [B, T, M]
    if override is not None and override_site == "neuron":
        value = apply_override(value, *override, steer_tokens, override_rows)

    h = value.to(up.dtype).contiguous()  # [B, T, M]
    if pool_tokens is None:
        return FusedOut(h, None, None, None, None)
    stats = activation_stats(a, pool_tokens) if act_stats else (None, None)
    return FusedOut(h, pool_max(h, pool_tokens) if "max" in reductions else None,
                    pool_sum(h, pool_tokens) if "sum" in reductions else None, *stats)


# The semantics every path shares: the reference hooks (steer.engine.backends), this op and its
# Triton kernel, collection and embeddings. Each is written once, here.

def apply_override(value: torch.Tensor, mask: torch.Tensor, mul: torch.Tensor, add: torch.Tensor,
                   tokens: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """value [B, T, M] with `value * mul + add` (computed in fp32, cast back to value's dtype) where
    `mask` [M] and `tokens` [B, T] (None: every position) are both true; every other element
    bit-identical. With `rows` [B], mask / mul / add are [R, M] tables and row b uses row
    rows[b] of them (per-row steering)."""
    if rows is not None:
        mask, mul, add = mask[rows][:, None], mul[rows][:, None], add[rows][:, None]  # [B, 1, M]
    sel = mask if tokens is None else tokens[..., None] & mask  # [B, T, M], [B, 1, M] or [M]
    return torch.where(sel, (value.float() * mul.float() + add.float()).to(value.dtype), value)


def token_core(tokens: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(lo, c0, c1, hi) of a pooling mask tokens [B, T]: positions [c0, c1) are pooled in every
    row (the core), every other pooled position lies in the ragged edges [lo, c0) and [c1, hi).
    Eager CPU only: None on other devices (reading the bounds would synchronise every layer),
    while torch.compile traces, and where no position is pooled by every row."""
    if tokens.device.type != "cpu" or torch.compiler.is_compiling() or tokens.numel() == 0:
        return None
    every = tokens.all(0)  # [T]
    if not bool(every.any()):
        return None
    c0 = int(every.to(torch.uint8).argmax())
    rest = ~every[c0:]
    c1 = c0 + (int(rest.to(torch.uint8).argmax()) if bool(rest.any()) else rest.numel())
    some = tokens.any(0).nonzero()[:, 0]
    return int(some[0]), c0, c1, int(some[-1]) + 1


def _masked(x: torch.Tensor, tokens: torch.Tensor, fill: float, *reductions) -> tuple[torch.Tensor, ...]:
    """For each (reduce, combine) of `reductions`: reduce(x [B, T, M] in fp32 with the positions
    outside tokens [B, T] set to `fill`) -> [B, M], all from one masked copy or one split. Where
    `token_core` finds a core, the core is reduced as a plain view and combined with the masked
    reductions of the ragged edges: in length-sorted batches the edges are a few positions, so no
    masked [B, T, M] copy is made (on CPU that copy cost ~3x the reduction;
    bench/collection_paths.py). Otherwise the whole tensor is masked."""
    split = token_core(tokens)
    if split is None:
        masked = x.float().masked_fill(~tokens[..., None], fill)
        return tuple(reduce(masked) for reduce, _ in reductions)
    lo, c0, c1, hi = split
    core = x[:, c0:c1].float()
    outs = [reduce(core) for reduce, _ in reductions]
    for a, b in ((lo, c0), (c1, hi)):
        if b > a:
            edge = torch.where(tokens[:, a:b, None], x[:, a:b].float(), fill)
            outs = [combine(out, reduce(edge)) for out, (reduce, combine) in zip(outs, reductions)]
    return tuple(outs)


def _max(v: torch.Tensor) -> torch.Tensor:
    return v.amax(dim=1)


def _sum(v: torch.Tensor) -> torch.Tensor:
    return v.sum(dim=1)


def _positives(v: torch.Tensor) -> torch.Tensor:
    return (v > 0).sum(dim=1, dtype=torch.float32)


def pool_max(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Max of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32 (-inf
    for a row without tokens)."""
    return _masked(h, tokens, float("-inf"), (_max, torch.maximum))[0]


def pool_sum(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32. Masked,
    not multiplied: an inf at a position left out (fp16 overflow at BOS) must not give NaN."""
    return _masked(h, tokens, 0.0, (_sum, torch.add))[0]


def activation_stats(a: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count of positive values, sum) of activations a [B, T, M] over the positions where tokens
    [B, T] is true -> two [B, M] fp32 (LAPE counts `act > 0`; NaN is not positive)."""
    return _masked(a, tokens, 0.0, (_positives, torch.add), (_sum, torch.add))


def pool_mean(pooled_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A `pool_sum` [B, M] divided by each row's token count."""
    return pooled_sum / tokens.sum(1, keepdim=True)


def pooled(how: str, tokens: torch.Tensor, maxed: torch.Tensor | None, summed: torch.Tensor | None) -> torch.Tensor:
    """The pooling `how` ("max" or "mean") of each row [B, M] from its reduction (`REDUCTION[how]`)."""
    return maxed if how == "max" else pool_mean(summed, tokens)


def pool(h: torch.Tensor, tokens: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32."""
    if how == "max":
        return pooled(how, tokens, pool_max(h, tokens), None)
    return pooled(how, tokens, None, pool_sum(h, tokens))
