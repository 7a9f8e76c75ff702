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
4. per sentence, the max and the sum of `h` (as written, upcast to fp32) over its real tokens
   (`pool_tokens`): padding never counts, so results do not depend on padding side or batch;
5. with `act_stats`, per sentence over the same tokens, the number of positions where the
   activation (after an activation-site override) is positive, and its sum (fp32): LAPE's
   activation probabilities and the mean activation, in the same pass.

Only traceable tensor ops, no Python branching on tensor values: `torch.compile(fullgraph=True)`
turns it into one fused loop on CPU. The override and the pooling are functions of their own
(`apply_override`, `pool_max`, `pool_sum`, `pool_mean`, `pool`, `activation_stats`): the hooks backend, collection
and embeddings use the same ones, so each semantic is written once. Run eagerly on CPU, the
reductions take a contiguous slice per row where every row's tokens form one run (`token_runs`),
the usual case, instead of a masked [B, T, M] copy; elsewhere, and under torch.compile, the
masked form. The slice and the masked sum add in other orders (a few fp32 ulp apart).
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
SITES = ("neuron", "activation")  # what an override replaces in the MLP (the residual stream is not here)
POOLS = ("max", "sum")  # the per-sentence poolings the op can return
RUN_MIN_ELEMENTS = 1 << 14  # a row's [T, M] below this: the masked form (a slice per row costs ~us)


class FusedOut(NamedTuple):
    """What the fused op returns; the pooled and statistics fields are None when not asked for."""

    h: torch.Tensor  # [B, T, M] in up's dtype
    pool_max: torch.Tensor | None  # [B, M] fp32 (with pool_tokens)
    pool_sum: torch.Tensor | None  # [B, M] fp32 (with pool_tokens)
    act_pos: torch.Tensor | None  # [B, M] fp32 count of positive activations (with act_stats)
    act_sum: torch.Tensor | None  # [B, M] fp32 sum of activations (with act_stats)


def check_options(act: str, override_site: str, act_stats: bool, pool_tokens: torch.Tensor | None,
                  pools: tuple[str, ...] = POOLS) -> None:
    """The op's options, checked alike on every path (the dispatcher and this reference)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if override_site not in SITES:
        raise ValueError(f"override_site must be one of {SITES}, got {override_site!r}")
    if act_stats and pool_tokens is None:
        raise ValueError("act_stats needs pool_tokens (the tokens they count)")
    if not set(pools) <= set(POOLS):
        raise ValueError(f"pools must be among {POOLS}, got {pools!r}")


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
    pools: tuple[str, ...] = POOLS,
) -> FusedOut:
    """Neuron tensor with override, its per-sentence max / sum pooling and activation statistics.

    up, gate: [B, T, M] (gate None for ungated MLPs); override: (mask [M] bool, mul [M], add [M]),
    or [R, M] tables with override_rows [B] int64 (row b takes table row override_rows[b]),
    applied to the neuron or the activation (`override_site`); steer_tokens, pool_tokens: [B, T]
    bool. Returns `FusedOut`: h [B, T, M] in up's dtype and, when pool_tokens is given, those of
    pool_max / pool_sum [B, M] fp32 that `pools` names (pool_max is -inf for a row without tokens)
    and, with act_stats, act_pos / act_sum [B, M] fp32 over the same tokens.
    """
    check_options(act, override_site, act_stats, pool_tokens, pools)
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
    return FusedOut(h, pool_max(h, pool_tokens) if "max" in pools else None,
                    pool_sum(h, pool_tokens) if "sum" in pools else None, *stats)


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


def token_runs(tokens: torch.Tensor) -> list[tuple[int, int]] | None:
    """Each row's pooled positions as one (start, end) run, when every row's are contiguous and
    non-empty: the usual case (special tokens, the sentence, padding, on either side). Eager CPU
    only: None on other devices (reading the runs would synchronise every layer), while
    torch.compile traces, for an empty batch and for any other mask."""
    if tokens.device.type != "cpu" or torch.compiler.is_compiling() or tokens.shape[0] == 0:
        return None
    n = tokens.sum(1)  # [B]
    rises = tokens[:, 0].long() + (tokens[:, 1:] & ~tokens[:, :-1]).sum(1)  # [B] runs per row
    if not bool(((rises == 1) & (n > 0)).all()):
        return None
    start = tokens.to(torch.uint8).argmax(1)  # [B] first pooled position
    return list(zip(start.tolist(), (start + n).tolist()))


def _runs(x: torch.Tensor, tokens: torch.Tensor) -> list[tuple[int, int]] | None:
    """`token_runs` where slicing x [B, T, M] per row pays (T * M >= RUN_MIN_ELEMENTS), else None."""
    return token_runs(tokens) if x.shape[1] * x.shape[2] >= RUN_MIN_ELEMENTS else None


def _per_run(x: torch.Tensor, runs: list[tuple[int, int]], reduce) -> torch.Tensor:
    """reduce(x[b, start:end]) [M] of every row b, stacked -> [B, M]: a contiguous slice per row,
    no masked [B, T, M] copy (on CPU the masked reduction moves ~3x the bytes; measured in
    bench/collection_paths.py)."""
    return torch.stack([reduce(x[b, s:e]) for b, (s, e) in enumerate(runs)])


def pool_max(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Max of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32 (-inf
    for a row without tokens)."""
    runs = _runs(h, tokens)
    if runs is not None:
        return _per_run(h, runs, lambda v: v.float().amax(0))
    return h.float().masked_fill(~tokens[..., None], float("-inf")).amax(dim=1)


def pool_sum(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32. Masked,
    not multiplied: an inf at a position left out (fp16 overflow at BOS) must not give NaN."""
    runs = _runs(h, tokens)
    if runs is not None:
        return _per_run(h, runs, lambda v: v.float().sum(0))
    return h.float().masked_fill(~tokens[..., None], 0.0).sum(dim=1)


def activation_stats(a: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count of positive values, sum) of activations a [B, T, M] over the positions where tokens
    [B, T] is true -> two [B, M] fp32 (LAPE counts `act > 0`; NaN is not positive)."""
    runs = _runs(a, tokens)
    if runs is not None:
        return (_per_run(a, runs, lambda v: (v > 0).sum(0, dtype=torch.float32)),
                _per_run(a, runs, lambda v: v.float().sum(0)))
    a = a.float().masked_fill(~tokens[..., None], 0.0)
    return (a > 0).sum(dim=1, dtype=torch.float32), a.sum(dim=1)


def pool_mean(pooled_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A `pool_sum` [B, M] divided by each row's token count."""
    return pooled_sum / tokens.sum(1, keepdim=True)


def pool(h: torch.Tensor, tokens: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32."""
    return pool_max(h, tokens) if how == "max" else pool_mean(pool_sum(h, tokens), tokens)
