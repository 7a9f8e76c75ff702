"""Reference of the fused MLP neuron op, in plain torch (also the CPU path).

It spells out, one readable step at a time, what `steer.kernels.fused_mlp` computes in one pass:

1. the neuron tensor, the input of the down projection: `act(gate) * up` (gated MLPs) or
   `act(up)` (ungated MLPs, where `up` is the pre-activation), in fp32;
2. the masked override `value * mul + add` on the expert neurons (`mask`) at the steered
   positions (`steer_tokens`), in fp32;
3. `h`, that value cast back to the input dtype, for the down projection;
4. per sentence, the max and the sum of `h` (as written, upcast to fp32) over its real tokens
   (`pool_tokens`): padding never counts, so results do not depend on padding side or batch.

Only traceable tensor ops, no Python branching on tensor values: `torch.compile(fullgraph=True)`
turns it into one fused loop on CPU.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def fused_mlp_ref(
    up: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    act: str,
    override: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    steer_tokens: torch.Tensor | None = None,
    pool_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Neuron tensor with override, and its per-sentence max / sum pooling.

    up, gate: [B, T, M] (gate None for ungated MLPs); override: (mask [M] bool, mul [M], add [M]);
    steer_tokens, pool_tokens: [B, T] bool. Returns h [B, T, M] in up's dtype and, when
    pool_tokens is given, pool_max / pool_sum [B, M] fp32 (pool_max is -inf for a row without
    tokens); otherwise None, None.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    fn = ACTIVATIONS[act]
    if gate is None:
        value = fn(up.float())  # [B, T, M]
    else:
        value = fn(gate.float()) * up.float()  # [B, T, M]

    if override is not None:
        mask, mul, add = override  # [M] each
        steered = mask if steer_tokens is None else steer_tokens[..., None] & mask  # [B, T, M]
        value = torch.where(steered, value * mul.float() + add.float(), value)

    h = value.to(up.dtype).contiguous()  # [B, T, M]
    if pool_tokens is None:
        return h, None, None

    keep = pool_tokens[..., None]  # [B, T, 1]
    written = h.float()  # [B, T, M]
    pool_max = written.masked_fill(~keep, float("-inf")).amax(dim=1)  # [B, M]
    pool_sum = written.masked_fill(~keep, 0.0).sum(dim=1)  # [B, M]
    return h, pool_max, pool_sum
