"""Distributed collection on torch.distributed: one process per device, no home-made networking.

Launch with torchrun (`torchrun --nproc-per-node N -m steer.cli find-experts ...`, or the
`steer` script): `init_from_env` sees torchrun's WORLD_SIZE / RANK / LOCAL_RANK and initialises
the default process group (NCCL when CUDA is available, else gloo; gloo works on CPU). Library
code never initialises anything: `current()` wraps whatever group the caller set up (or a
trivial one-process group), so `collect_stream` and `refine` run unchanged in one process, under
torchrun, or under `torch.multiprocessing.spawn` with an explicit `init_process_group`.

What a distributed streaming run does (steer/engine/collect.py, steer/core/stream.py):
- rank 0 runs the calibration sample and broadcasts the bin edges; every rank builds its
  `StreamState` on those edges, so states merge by addition;
- the deterministic batch order (windows of sentences sorted by length, cut into batches) is the
  same on every rank and for any number of ranks; rank r runs the batches i with i % world == r,
  so every batch has the same composition and padding as in a one-process run;
- at a checkpoint every rank `reduce_state`s onto rank 0 (counts / sums / n / nonfinite and the
  LAPE / DiffMean token sums summed, lo / hi by MIN / MAX), rank 0 writes the merged state and the position (batches done), and the
  other ranks restart from zero; a checkpoint therefore resumes under any number of ranks;
- at the end `all_reduce_state` leaves the merged state on every rank;
- the refine pass is sharded the same way; `gather_rows` collects the short-list responses on
  rank 0, which scores and writes the outputs.
Counts are integers, so they equal a one-process run's exactly; float64 sums are added in
another order and agree to rounding.

Models too large for one device: load them with Hugging Face's `device_map` (e.g.
`AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.bfloat16)`, which
needs `accelerate`) and pass the model to `collect_stream` / `refine` in a single process:
inputs go to the device of the input embeddings, each layer's pooled responses are copied into
one buffer, and accelerate's hooks move activations between devices. (Not tested here: the
test machine has no GPU. `steer.engine.models.load_model` would pass `device_map` through.) Combining
`device_map` with torchrun (pipeline within a node, data parallel across nodes) works the same
way as long as each rank's `device_map` names only its own devices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    """The ranks of a run: rank, world size, and the device collectives use (cuda for NCCL)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False  # initialised by `init_from_env` (so `shutdown` destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether this rank runs batch `batch_index` of the deterministic batch order."""
        return batch_index % self.world == self.rank

    # --- collectives (no-ops in a one-process group) -------------------------------------------

    def broadcast_object(self, obj, src: int = 0):
        """`obj` of rank `src` on every rank (pickled; for small messages)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def broadcast_tensor(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s tensor, in place into `t` (same shape and dtype on every rank)."""
        if not self.active:
            return t
        buf = t.to(self.device).contiguous()
        dist.broadcast(buf, src=src)
        t.copy_(buf)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            buf = t.to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        return t

    @staticmethod
    def _state_ops():
        S, MIN, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX
        return [("counts", S), ("sums", S), ("n", S), ("nonfinite", S), ("lo", MIN), ("hi", MAX)]

    def all_reduce_state(self, state) -> None:
        """Merge every rank's `StreamState` (same edges) into each of them, in place."""
        if not self.active:
            return
        for name, op in self._state_ops():
            t = getattr(state, name)
            buf = t.to(self.device)
            dist.all_reduce(buf, op=op)
            setattr(state, name, buf.to(t.device))
        for t in _token_sums(state):
            buf = t.to(self.device)
            dist.all_reduce(buf)
            t.copy_(buf)

    def reduce_state(self, state) -> None:
        """Merge every rank's state onto rank 0; the other ranks' states restart from zero."""
        if not self.active:
            return
        for name, op in self._state_ops():
            t = getattr(state, name)
            buf = t.to(self.device)
            dist.reduce(buf, dst=0, op=op)
            if self.is_main:
                setattr(state, name, buf.to(t.device))
        for t in _token_sums(state):
            buf = t.to(self.device)
            dist.reduce(buf, dst=0)
            if self.is_main:
                t.copy_(buf)
            else:
                t.zero_()
        if not self.is_main:
            state.counts.zero_()
            state.sums.zero_()
            state.n.zero_()
            state.nonfinite.zero_()
            state.lo.fill_(float("inf"))
            state.hi.fill_(float("-inf"))

    def gather_rows(self, rows: torch.Tensor, values: torch.Tensor, total: int):
        """Rows [n] int64 and values [n, K] of every rank assembled on rank 0 into [total, K]
        (row i of the result = the value of sentence i); None on the other ranks."""
        K = values.shape[1]
        if not self.active:
            out = torch.empty(total, K, dtype=values.dtype)
            out[rows] = values.cpu()
            return out
        n = torch.tensor([rows.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        width = max(int(s) for s in sizes)
        pad_rows = torch.full((width,), -1, dtype=torch.int64, device=self.device)
        pad_rows[: rows.numel()] = rows.to(self.device)
        pad_vals = torch.zeros(width, K, dtype=values.dtype, device=self.device)
        pad_vals[: rows.numel()] = values.to(self.device)
        if self.is_main:
            all_rows = [torch.empty_like(pad_rows) for _ in range(self.world)]
            all_vals = [torch.empty_like(pad_vals) for _ in range(self.world)]
        else:
            all_rows = all_vals = None
        dist.gather(pad_rows, all_rows, dst=0)
        dist.gather(pad_vals, all_vals, dst=0)
        if not self.is_main:
            return None
        out = torch.empty(total, K, dtype=values.dtype)
        for r, v, s in zip(all_rows, all_vals, sizes):
            out[r[: int(s)].cpu()] = v[: int(s)].cpu()
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _object_device(self):
        return self.device if dist.get_backend() == "nccl" else None


def _token_sums(state) -> list:
    """The LAPE / DiffMean token sums a stream state carries (summed across ranks like its counts)."""
    return [] if state.token_stats is None else list(state.token_stats.tensors().values())


def current() -> Group:
    """The group of the default process group if one is initialised, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), device)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(backend: str | None = None) -> Group:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1).

    backend: None picks NCCL when CUDA is available, else gloo. Under NCCL each rank uses
    cuda:LOCAL_RANK. Without torchrun (or with one process) nothing is initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return Group()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    group = current()
    group.owned = True
    return group


def shutdown(group: Group) -> None:
    """Destroy the default process group if `init_from_env` created it."""
    if group.owned and dist.is_initialized():
        dist.destroy_process_group()
