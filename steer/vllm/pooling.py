"""Expert discovery inside vLLM, the worker's half: each collecting request's neuron tensor pooled
over its own tokens in vLLM's packed layout, accumulated where the tensor is computed.

A collection request is a prefill of steer's own token ids carrying `{"steer_collect": [row,
label, skip]}` (steer/vllm/requests.py): its row in the pass, its label id, and the prompt
positions steer does not pool (special tokens). vLLM flattens a step's tokens of all requests
into one [tokens, width] tensor, and chunked prefill spreads a long request over several steps.
So, per step:
- `prepare` (before the forward) lists the flattened tokens to pool (`select`: not skipped, and
  not pooled before: a preempted request may run its tokens again) and the slot of each (`slot`):
  the accumulator row of its request;
- the MLP's op (`neuron`) reduces h[select] into the slots of `acc` [layers, slots, width]
  (max, or sum for mean, with `count` tokens per slot), and the LAPE statistics of act(gate)
  (`act_pos`, `act_sum`); the decoder layer's op (`residual`) sums the stream for DiffMean;
- `finish` (after the forward) hands every request whose last prompt token has run to the
  pass's sink, and frees its slot: a `table` (exact responses [rows, columns]: every neuron, or
  refine's short-list) or the streaming `state` (`StreamState.update`, in chunks of `CHUNK`
  responses); its token statistics go to the label's sums (`TokenStats.update`).
Pooling is `kernels/fused_mlp_ref.py::pooled` (max, or the sum over the token count), so a
request pools as one forward of steer's transformers path does, whatever steps it ran in.

The front end (steer/vllm/discovery.py) drives a pass through `LLM.collective_rpc("steer_collect",
args=(op, options))` (`Pooling.call`): begin, calibrate, save, resume, end. Tensors leave the
worker as files (a `StreamState` file, checkpoints included, or a safetensors table) that the
front end names, never per request.
"""
from __future__ import annotations

import base64
import logging

import numpy as np
import torch
from safetensors.torch import save_file

from steer.core.stream import StreamState
from steer.core.token_stats import TokenStats
from steer.kernels.fused_mlp_ref import ACTIVATIONS, POOLINGS

log = logging.getLogger(__name__)
CHUNK = 256  # finished responses per StreamState.update


class Pooling:
    """The worker's collection state: one pass at a time (see the module docstring)."""

    def __init__(self, dims, slots: int, device, rank: int = 0, world: int = 1):
        self.dims, self.device = dims, torch.device(device)
        self.rank, self.world = rank, world
        self.width = dims.width // world  # this rank's units (tensor parallelism: a contiguous shard)
        self.slots = max(int(slots), 1)
        self.rows: dict[int, tuple] = {}  # batch row -> its request (row, label, skip)
        self.open: dict[tuple, list] = {}  # request -> [slot, tokens pooled so far]
        self.free: list[int] = []
        self.select = self.slot = None  # this step's pooled tokens and their slots (device)
        self.done: list[tuple] = []  # requests whose last prompt token runs in this step
        self.table = self.state = self.stats = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # finished responses not yet in `state`
        self.finished: torch.Tensor | None = None  # [rows] bool: the rows `state` counts (stream)
        self.options: dict = {}

    # -- the pass, driven by the front end --
    OPS = ("begin", "calibrate", "save", "resume", "end")

    def call(self, op: str, options: dict):
        """One operation of the front end (`collective_rpc`): one of `OPS`."""
        if op not in self.OPS:
            raise ValueError(f"steer_collect: unknown operation {op!r}; the operations are {self.OPS}")
        return getattr(self, op)(**options)

    def begin(self, pooling: str, label_names: list[str], kinds: list[str], rows: int = 0,
              columns: list[int] | None = None, keep: str = "table", done: list[int] = ()) -> dict:
        """Start a pass of `rows` rows: responses go to a table of rows x (every neuron | `columns`)
        or, with keep="stream", to the state of `calibrate` / `resume`, whose rows already counted
        (`done`, or a resumed checkpoint's) are recorded as finished. Token statistics of `kinds`
        (LAPE's "activation", DiffMean's "residual") start afresh unless the state carries them."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: choose one of {POOLINGS}")
        layers, width, hidden = self.dims.layers, self.width, self.dims.hidden
        self.options = dict(pooling=pooling, label_names=list(label_names), keep=keep)
        self.columns = None if columns is None else local_columns(columns, self.dims.width, self.rank, self.world).to(self.device)
        self.rows.clear()  # and what an interrupted pass left: its requests were aborted
        self.open.clear()
        self.pending = []
        self.free = list(range(self.slots))
        if keep == "table":
            self.table = torch.empty(rows, layers * width if columns is None else len(self.columns), device=self.device)
            self.table_labels = torch.full((rows,), -1, dtype=torch.int64, device=self.device)
            self.stats = TokenStats(label_names, kinds, layers, width, hidden, self.device) if kinds else None
        elif self.state is None:
            raise ValueError("a streaming pass needs a state: calibrate or resume first")
        else:
            self.table, self.stats = None, self.state.token_stats
            if self.finished is None or len(self.finished) != rows:
                self.finished = torch.zeros(rows, dtype=torch.bool)
            self.finished[list(done)] = True
        self.kinds = tuple(self.stats.kinds) if self.stats is not None else ()
        self._allocate()
        return {"slots": self.slots}

    def _allocate(self) -> None:
        layers, width, hidden = self.dims.layers, self.width, self.dims.hidden
        S, dev = self.slots, self.device
        self.acc = torch.full((layers, S, width), self._empty, device=dev)
        self.count = torch.zeros(S, dtype=torch.int64, device=dev)
        self.act_pos = torch.zeros(layers, S, width, device=dev) if "activation" in self.kinds else None
        self.act_sum = torch.zeros(layers, S, width, device=dev) if "activation" in self.kinds else None
        self.resid = torch.zeros(layers, S, hidden, device=dev) if "residual" in self.kinds else None

    @property
    def _empty(self) -> float:
        """An accumulator before its first token: the identity of max, or of the sum (mean)."""
        return -torch.inf if self.options["pooling"] == "max" else 0.0

    def calibrate(self, bins: int, settings: dict) -> dict:
        """The streaming state from this table pass's responses (`StreamState.from_sample`: edges
        from them, then counted), carrying its token statistics; the table is dropped."""
        self._flush_check()
        state = StreamState.from_sample(self.table, self.table_labels, bins, self.options["label_names"],
                                        {**settings, "width": self.width}, self.stats)
        self.state, self.table = state, None
        return {"sentences": int(state.n.sum())}

    def resume(self, path: str) -> dict:
        """Take the state of a checkpoint file, and its finished rows."""
        state, extra = StreamState.load(path, self.device, with_extra=True)
        self.state, self.pending = shard_state(state, self.rank, self.world), []
        self.finished = unpack_rows(extra["done"])
        return {"sentences": int(self.state.n.sum())}

    def save(self, path: str, extra: dict | None = None) -> dict:
        """Write the pass's result to `path`: the state with `extra` and the rows it counts
        (`extra["done"]`, `pack_rows`: a checkpoint), or the table (`values` [rows, columns], the
        rows' `labels`, and the token sums)."""
        path = shard_path(path, self.rank, self.world)
        if self.options.get("keep") == "stream":
            self._flush()
            self.state.save(path, {**(extra or {}), "done": pack_rows(self.finished)})
            return {"sentences": int(self.state.n.sum())}
        self._flush_check()
        tensors = {"values": self.table.contiguous().cpu(), "labels": self.table_labels.cpu()}
        if self.stats is not None:
            tensors.update({k: v.cpu() for k, v in self.stats.stored().items()})
        save_file(tensors, path)
        return {"sentences": int((self.table_labels >= 0).sum())}

    def end(self) -> dict:
        """Drop every tensor of the passes."""
        self.__init__(self.dims, self.slots, self.device, self.rank, self.world)
        return {}

    def _flush_check(self) -> None:
        missing = int((self.table_labels < 0).sum())
        if missing:
            raise RuntimeError(f"{missing} rows of the table were never collected")

    # -- batch changes (SteerLogits.update_state) --
    def add(self, row: int, request: tuple) -> None:
        if self.table is None and self.state is None:
            log.error("steer: a collection request arrived outside a collection pass; it runs unpooled")
            return
        self.rows[row] = request
        if request not in self.open:  # a preempted request comes back with its slot and tokens
            if not self.free:
                self._grow()
            self.open[request] = [self.free.pop(), 0]

    def _grow(self) -> None:
        """Twice the slots (more requests in flight than the engine's batch: preemption)."""
        old = self.slots
        keep = dict(acc=self.acc, count=self.count, act_pos=self.act_pos, act_sum=self.act_sum, resid=self.resid)
        self.slots *= 2
        self._allocate()
        for name, t in keep.items():
            if t is not None:
                new = getattr(self, name)
                (new[:, :old] if t.dim() == 3 else new[:old]).copy_(t)
        self.free += list(range(old, self.slots))

    def remove(self, row: int) -> None:
        self.rows.pop(row, None)

    def move(self, a: int, b: int, swap: bool) -> None:
        move_row(self.rows, a, b, swap)

    # -- each step --
    def prepare(self, query_start_loc, computed, prompt) -> None:
        """This step's pooled tokens (`select`) and their slots (`slot`), and the requests it completes."""
        self.select = self.slot = None
        self.done = []
        select, slot = [], []
        for r, request in self.rows.items():
            if r + 1 >= len(query_start_loc):
                continue
            a, b = int(query_start_loc[r]), int(query_start_loc[r + 1])
            start, length, skip = int(computed[r]), int(prompt[r]), request[2]
            s, pooled = self.open[request]
            end = min(start + b - a, length)
            positions = [p for p in range(max(start, pooled), end) if p not in skip]
            select += [a + p - start for p in positions]
            slot += [s] * len(positions)
            self.open[request][1] = max(pooled, end)
            if end >= length:
                self.done.append(request)
        if select:
            self.select = torch.tensor(select, device=self.device)
            self.slot = torch.tensor(slot, device=self.device)
            self.index = self.slot[:, None].expand(-1, self.width)  # scatter's index, [pooled, width]
            self.count.index_add_(0, self.slot, torch.ones_like(self.slot))

    def neuron(self, h: torch.Tensor, gate_up: torch.Tensor, layer: int, act: str) -> None:
        """Pool this step's tokens of h [tokens, width] (the neuron tensor) into their slots, and
        count LAPE's statistics of act(gate) (recomputed from gate_up for these tokens only)."""
        if self.select is None:
            return
        x = h[self.select].float()
        if self.options["pooling"] == "max":
            self.acc[layer].scatter_reduce_(0, self.index, x, "amax")
        else:
            self.acc[layer].index_add_(0, self.slot, x)
        if self.act_pos is not None:
            a = ACTIVATIONS[act](gate_up[self.select, : h.shape[-1]]).float()
            self.act_pos[layer].index_add_(0, self.slot, (a > 0).float())
            self.act_sum[layer].index_add_(0, self.slot, a)

    def residual(self, h: torch.Tensor, r: torch.Tensor, layer: int) -> None:
        """Sum the stream after `layer` (h + r, as vLLM's next add-norm forms it) for DiffMean."""
        if self.select is not None and self.resid is not None:
            self.resid[layer].index_add_(0, self.slot, (h[self.select] + r[self.select]).float())

    def finish(self) -> None:
        """Hand the requests this step completed to the sink; free their slots."""
        if not self.done:
            return
        slots = torch.tensor([self.open[q][0] for q in self.done], device=self.device)
        labels = torch.tensor([q[1] for q in self.done], device=self.device)
        pooled = self.acc[:, slots].transpose(0, 1)  # [B, L, M]
        tokens = self.count[slots]
        if self.options["pooling"] == "mean":
            pooled = pooled / tokens.view(-1, 1, 1)
        pooled = pooled.flatten(1)
        if self.stats is not None:
            batch = {}
            if self.act_pos is not None:
                batch.update(act_pos=self.act_pos[:, slots].transpose(0, 1), act_sum=self.act_sum[:, slots].transpose(0, 1))
            if self.resid is not None:
                batch["resid_sum"] = self.resid[:, slots].transpose(0, 1)
            self.stats.update(batch, tokens, labels)
        if self.table is not None:
            rows = torch.tensor([q[0] for q in self.done], device=self.device)
            self.table[rows] = pooled if self.columns is None else pooled[:, self.columns]
            self.table_labels[rows] = labels
        else:
            self.finished[[q[0] for q in self.done]] = True
            self.pending.append((pooled.clone(), labels))
            if sum(len(l) for _, l in self.pending) >= CHUNK:
                self._flush()
        self.acc[:, slots] = self._empty
        self.count[slots] = 0
        for t in (self.act_pos, self.act_sum, self.resid):
            if t is not None:
                t[:, slots] = 0.0
        for q in self.done:
            self.free.append(self.open.pop(q)[0])
        self.done = []

    def _flush(self) -> None:
        if self.pending:
            self.state.update(torch.cat([p for p, _ in self.pending]), torch.cat([l for _, l in self.pending]))
            self.pending = []


def move_row(rows: dict, a: int, b: int, swap: bool):
    """vLLM's batch move on a map of batch rows: a's entry goes to b, and b's to a with `swap`,
    else b's is dropped and returned (its request has left)."""
    va, vb = rows.pop(a, None), rows.pop(b, None)
    if va is not None:
        rows[b] = va
    if vb is not None and swap:
        rows[a] = vb
    return None if swap else vb


def pack_rows(rows: torch.Tensor) -> dict:
    """A bool row mask as JSON: {"rows": n, "bits": base64 of its packed bits}."""
    bits = np.packbits(rows.cpu().numpy().astype(np.uint8))
    return {"rows": int(len(rows)), "bits": base64.b64encode(bits.tobytes()).decode()}


def unpack_rows(packed: dict) -> torch.Tensor:
    """The mask of `pack_rows`."""
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits)[: packed["rows"]].astype(bool))


# -- tensor parallelism: rank r holds units [r * width / world, (r + 1) * width / world) of every
# layer; its files are merged into (and a checkpoint is cut back from) the whole model's --
NEURON_AXIS = {"edges": 0, "counts": 1, "sums": 1, "nonfinite": 0, "lo": 0, "hi": 0}  # StreamState's flat axis
UNIT_AXIS = {"act_pos": 2, "act_sum": 2}  # TokenStats' [C, L, M] (tokens and resid_sum: the same on every rank)


def shard_path(path: str, rank: int, world: int) -> str:
    """The file rank `rank` of `world` writes for `path`."""
    return str(path) if world == 1 else f"{path}.rank{rank}"


def local_columns(columns, width: int, rank: int, world: int) -> torch.Tensor:
    """The flat indices (layer * width + unit) of `columns` that rank `rank` holds, in their order,
    as indices of its own flat axis (layer * width / world + unit - its first unit)."""
    columns = torch.as_tensor(columns, dtype=torch.int64)
    local = width // world
    layer, unit = columns // width, columns % width - rank * local
    own = (unit >= 0) & (unit < local)
    return layer[own] * local + unit[own]


def _narrow(t: torch.Tensor, axis: int, layers: int, start: int, size: int) -> torch.Tensor:
    return t.unflatten(axis, (layers, -1)).narrow(axis + 1, start, size).flatten(axis, axis + 1).contiguous()


def _join(parts: list[torch.Tensor], axis: int, layers: int) -> torch.Tensor:
    return torch.cat([p.unflatten(axis, (layers, -1)) for p in parts], axis + 1).flatten(axis, axis + 1)


def shard_state(state: StreamState, rank: int, world: int) -> StreamState:
    """Rank `rank`'s part of a whole model's state (itself when world is 1)."""
    if world == 1:
        return state
    layers, local = state.settings["layers"], state.settings["width"] // world
    out = StreamState(_narrow(state.edges, 0, layers, rank * local, local), state.label_names,
                      {**state.settings, "width": local})
    for name, axis in NEURON_AXIS.items():
        setattr(out, name, _narrow(getattr(state, name), axis, layers, rank * local, local))
    out.n = state.n.clone()
    if state.token_stats is not None:
        for name, t in state.token_stats.tensors().items():
            setattr(out.token_stats, name, t.narrow(UNIT_AXIS[name], rank * local, local).contiguous()
                    if name in UNIT_AXIS else t.clone())
    return out


def join_states(states: list[StreamState]) -> StreamState:
    """The whole model's state from the ranks' (in rank order)."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    layers = first.settings["layers"]
    out = StreamState(_join([s.edges for s in states], 0, layers), first.label_names,
                      {**first.settings, "width": first.settings["width"] * len(states)})
    for name, axis in NEURON_AXIS.items():
        setattr(out, name, _join([getattr(s, name) for s in states], axis, layers))
    out.n = first.n
    if first.token_stats is not None:
        for name, t in first.token_stats.tensors().items():
            setattr(out.token_stats, name, torch.cat([s.token_stats.tensors()[name] for s in states], UNIT_AXIS[name])
                    if name in UNIT_AXIS else t)
    return out


def join_tables(parts: list[torch.Tensor], layers: int, width: int, columns=None) -> torch.Tensor:
    """The whole model's table [rows, layers * width] (or [rows, len(columns)]) from the ranks'."""
    if len(parts) == 1:
        return parts[0]
    if columns is None:
        return _join(parts, 1, layers)
    columns = torch.as_tensor(columns, dtype=torch.int64)
    out = torch.empty(parts[0].shape[0], len(columns), dtype=parts[0].dtype)
    local, unit = width // len(parts), columns % width
    for rank, part in enumerate(parts):
        out[:, (unit // local) == rank] = part
    return out


def join_token_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole model's token sums (files' tensors by name, `TokenStats.stored`) from the ranks'."""
    from steer.core.token_stats import PREFIX

    out = dict(parts[0])
    for name, axis in UNIT_AXIS.items():
        if PREFIX + name in out:
            out[PREFIX + name] = torch.cat([p[PREFIX + name] for p in parts], axis)
    return out
