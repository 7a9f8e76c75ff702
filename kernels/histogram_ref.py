"""Reference of the streaming histogram update, in plain torch (the oracle; CPU: histogram_cpu.py).

`counts[label, neuron, bin] += 1` for every finite response of a tile. The bin of a response x
of neuron m is the number of m's inner edges that are <= x, so with NB bins and NB - 1 inner
edges bin 0 is (-inf, e_0), bin j is [e_{j-1}, e_j) and the last bin is [e_{NB-2}, +inf): the
end bins are open and counted. Duplicate edges give empty bins between them. NaN and +-inf
responses are not binned (the caller counts them). `steer.kernels.histogram` does the same in
one Triton pass; both check their inputs with `check_update`.
"""
import torch


def histogram_update_ref(
    counts: torch.Tensor,  # [C, M, NB] int32, updated in place
    x: torch.Tensor,  # [B, M] fp32 pooled responses
    label_ids: torch.Tensor,  # [B] int64 in [0, C)
    edges: torch.Tensor,  # [M, NB - 1] fp32, non-decreasing per neuron
) -> None:
    """Add one to counts[label_ids[b], m, bin(x[b, m])] for every finite x[b, m]."""
    _, M, NB = counts.shape
    xt = x.t().contiguous()  # [M, B]
    flat = torch.searchsorted(edges.contiguous(), xt, right=True)  # [M, B] = #edges <= x
    flat += (label_ids.long() * (M * NB))[None, :]  # now the index into counts.view(-1)
    flat += torch.arange(0, M * NB, NB, device=x.device)[:, None]
    keep = torch.isfinite(xt)  # [M, B]
    idx = flat.view(-1) if bool(keep.all()) else flat[keep]  # [K]
    counts.view(-1).index_add_(0, idx, torch.ones(1, dtype=counts.dtype, device=x.device).expand(idx.numel()))


def check_update(counts, x, label_ids, edges) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and label range of an update (out-of-range ids would write out of bounds in
    the kernel; on CUDA the check costs one synchronisation). Returns x fp32, label_ids int64 and
    edges fp32, contiguous."""
    if counts.dim() != 3 or counts.dtype != torch.int32 or not counts.is_contiguous():
        raise ValueError("counts must be a contiguous [C, M, NB] int32 tensor")
    C, M, NB = counts.shape
    if x.dim() != 2 or x.shape[1] != M:
        raise ValueError(f"x must be [B, {M}], got {tuple(x.shape)}")
    if label_ids.shape != (x.shape[0],):
        raise ValueError(f"label_ids must be [{x.shape[0]}], got {tuple(label_ids.shape)}")
    if edges.shape != (M, NB - 1):
        raise ValueError(f"edges must be [{M}, {NB - 1}], got {tuple(edges.shape)}")
    if label_ids.numel() and (int(label_ids.min()) < 0 or int(label_ids.max()) >= C):
        raise ValueError(f"label ids must lie in [0, {C})")
    return (x.to(torch.float32).contiguous(), label_ids.to(torch.int64).contiguous(),
            edges.to(torch.float32).contiguous())
