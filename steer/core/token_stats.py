"""Per-label token statistics: what LAPE and DiffMean need, summed in fixed memory.

Expert discovery scores each sentence's pooled response; LAPE (Tang et al., ACL 2024) and
DiffMean (CLaS-Bench) work on tokens instead: per label, how often each neuron's activation
`act(gate_proj(x))` is positive and its mean over tokens, and the mean of each decoder layer's
output (the residual stream). A `TokenStats` keeps the sums, per label:

    tokens     [C]         int64    tokens seen (the pooled tokens: real, BOS/special skipped as asked)
    act_pos    [C, L, M]   int64    tokens whose activation is > 0          ("activation")
    act_sum    [C, L, M]   float64  sum of the activation                   ("activation")
    resid_sum  [C, L, D]   float64  sum of the decoder layer's output       ("residual")

filled in the same forward pass as the neuron responses (the backends' `stats`, from
`kernels/fused_mlp_ref.py::activation_stats` / `pool_sum` or the fused op), one batch at a time
(`update`). Sums merge by addition (`merge`: batches, checkpoints, ranks), so the result does
not depend on batching. Means and probabilities are derived on demand.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("activation", "residual")
FIELDS = {"activation": ("act_pos", "act_sum"), "residual": ("resid_sum",)}
PREFIX = "token_stats."  # their tensors' names inside a responses or stream-state file


def check_kinds(kinds) -> tuple[str, ...]:
    """The statistics asked for, in canonical order; unknown names are a ValueError."""
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"token_stats {sorted(unknown)}: choose from {KINDS}")
    return tuple(k for k in KINDS if k in set(kinds or ()))


class TokenStats:
    """Token-level sums per label (see the module docstring); `kinds` says which are kept."""

    def __init__(self, label_names: Sequence[str], kinds: Sequence[str], n_layers: int, width: int, hidden: int,
                 device: str | torch.device = "cpu"):
        self.kinds = check_kinds(kinds)
        if not self.kinds:
            raise ValueError(f"TokenStats needs kinds: any of {KINDS}")
        self.label_names = [str(n) for n in label_names]
        self.hidden = hidden
        C = len(self.label_names)
        self.tokens = torch.zeros(C, dtype=torch.int64, device=device)
        if "activation" in self.kinds:
            self.act_pos = torch.zeros(C, n_layers, width, dtype=torch.int64, device=device)
            self.act_sum = torch.zeros(C, n_layers, width, dtype=torch.float64, device=device)
        if "residual" in self.kinds:
            self.resid_sum = torch.zeros(C, n_layers, hidden, dtype=torch.float64, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The sums by name (for files and collectives)."""
        return {"tokens": self.tokens, **{f: getattr(self, f) for k in self.kinds for f in FIELDS[k]}}

    def update(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor, label_ids: torch.Tensor) -> None:
        """Add one batch: `batch` the backend's per-row stats ([B, L, *] fp32), `tokens` [B] each
        row's pooled token count, `label_ids` [B]."""
        dev = self.tokens.device
        label_ids = label_ids.to(dev, torch.int64)
        self.tokens.index_add_(0, label_ids, tokens.to(dev, torch.int64))
        for kind in self.kinds:
            for f in FIELDS[kind]:
                total = getattr(self, f)
                total.index_add_(0, label_ids, batch[f].to(dev).round().long() if f == "act_pos" else
                                 batch[f].to(dev, torch.float64))

    def merge(self, other: "TokenStats") -> "TokenStats":
        if other.label_names != self.label_names or other.kinds != self.kinds:
            raise ValueError(f"cannot merge token statistics of labels {other.label_names} ({other.kinds}) into "
                             f"{self.label_names} ({self.kinds})")
        for name, t in self.tensors().items():
            t += other.tensors()[name].to(t.device)
        return self

    __iadd__ = merge

    def stored(self) -> dict[str, torch.Tensor]:
        """The sums under their names in a file that holds other tensors too (`PREFIX`)."""
        return {PREFIX + name: t for name, t in self.tensors().items()}

    def load_(self, tensors: dict[str, torch.Tensor]) -> "TokenStats":
        """Take the sums from a file's tensors (named as by `stored`; shapes and dtypes checked), in place."""
        for name, t in self.tensors().items():
            got = tensors.get(PREFIX + name)
            if got is None or got.shape != t.shape or got.dtype != t.dtype:
                found = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
                raise ValueError(f"token statistic {name} is {found}, expected {tuple(t.shape)} {t.dtype}")
            t.copy_(got)
        return self

    def to_(self, device: str | torch.device) -> "TokenStats":
        """Move the sums to `device`, in place."""
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def _per_token(self, total: torch.Tensor) -> torch.Tensor:
        if bool((self.tokens == 0).any()):
            empty = [n for n, c in zip(self.label_names, self.tokens.tolist()) if c == 0]
            raise ValueError(f"no tokens seen for labels {empty}")
        return total.double() / self.tokens.double().view(-1, *[1] * (total.dim() - 1))

    def activation_probability(self) -> torch.Tensor:
        """[C, L, M] float64: the fraction of each label's tokens on which a neuron's activation is > 0."""
        return self._per_token(self.act_pos)

    def activation_mean(self) -> torch.Tensor:
        """[C, L, M] float64: each neuron's mean activation over a label's tokens (negative values too)."""
        return self._per_token(self.act_sum)

    def residual_mean(self) -> torch.Tensor:
        """[C, L, D] float64: the mean of each decoder layer's output over a label's tokens."""
        return self._per_token(self.resid_sum)
