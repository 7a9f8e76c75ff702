"""steer inside stock vLLM: neuron sets per request, in eager and compiled mode.

Registered on two vLLM entry points (pyproject.toml), so a plain `LLM(model=...)` or `vllm serve`
with steer installed accepts steering requests (`steer/vllm/requests.py`: the contract):
- `vllm.general_plugins` -> `register`, run in the front end, the engine core and every worker
  before the model is built. It swaps the forward of vLLM's `Gemma3MLP` and `LlamaMLP` for one
  that calls `torch.ops.steer_vllm.neuron_override(h, layer)` on the neuron tensor (the input of
  `down_proj`, `act(gate) * up`), records the served model's shape for admission checks, salts
  the prefix cache of steered requests, and wraps the model runner's `_model_forward` so that
  each step's per-token table is built before the forward.
- `vllm.logits_processors` -> `SteerLogits`. vLLM calls its `validate_params` at admission, in
  the front end (a bad request is refused there), and its `update_state` in the worker before
  every step, with the rows that joined, left or moved in the persistent batch. It never
  changes logits.

Per-request state lives in the worker (`Worker`): an `InterventionSets` (steer.core) of
`max_num_seqs` sets, one per distinct steering config in the batch (requests with the same
config share one), and, per step, `rows` [tokens]: the set each token's neurons follow, or the
"no set" row where a token is not steered (other positions, unsteered requests). The custom op
is opaque to torch.compile: it reads the tables at run time, so new requests, sets or positions
never recompile, and it applies `apply_override` (steer.kernels), the one override semantic of
every steer path. A step with nothing steered skips it (`rows` is None).

Positions per request (token at absolute position p of a request whose prompt has P tokens):
"all"; "prompt" p < P; "generated" p >= P (a token fed back after it was sampled); "last" the
tokens whose output is sampled, p >= P - 1: the last prompt token (in whatever prefill chunk it
falls) and every generated token, as steer's `generate` steers the last token of each call.

Prefix caching: a steered request's cache salt gets a hash of its steering keys, so its KV
blocks are never served to an unsteered request or another config, nor theirs to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from steer.core.intervention import InterventionSets
from steer.kernels.fused_mlp_ref import apply_override
from steer.vllm.requests import PREFIX, SteerRequest

log = logging.getLogger(__name__)

ARCHITECTURES = {"Gemma3ForCausalLM": "gemma3", "LlamaForCausalLM": "llama"}
_SHAPE: dict = {}  # front end: the served model's (layers, MLP width) and architecture


def model_shape(hf_config) -> tuple[int, int]:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(text.num_hidden_layers), int(text.intermediate_size)


class Worker:
    """The worker's steering state: sets, the batch rows' sets and prompt lengths, and the
    current step's per-token set index (`rows`)."""

    def __init__(self, shape: tuple[int, int], sets: int, max_tokens: int, device):
        self.shape, self.device = shape, torch.device(device)
        self.sets = InterventionSets(*shape, sets=sets, capacity=0, device=self.device)
        self.max_tokens = max_tokens
        self.configs: dict[SteerRequest, int] = {}  # config -> set index
        self.users: list[int] = [0] * sets  # batch rows using each set
        self.row_set: dict[int, int] = {}  # batch row -> set index (steered rows only)
        self.row_prompt: dict[int, int] = {}  # batch row -> prompt length
        self.tables: list | None = None  # per layer (mask, mul, add) [S + 1, width], built on change
        self.rows: torch.Tensor | None = None  # [tokens] set index this step; None: nothing steered

    # -- batch changes (SteerLogits.update_state, before each step) --
    def add(self, row: int, request: SteerRequest | None, prompt_len: int) -> None:
        self.remove(row)
        self.row_prompt[row] = prompt_len
        if request is None:
            return
        index = self.configs.get(request)
        if index is None:
            index = self.users.index(0)  # sets >= max_num_seqs: never full
            for old, i in list(self.configs.items()):
                if i == index:
                    del self.configs[old]
            iv = request.intervention(self.shape)
            self._grow(len(iv))
            self.sets.put(index, iv.to(self.device))
            self.configs[request] = index
            self.tables = None
        self.users[index] += 1
        self.row_set[row] = index

    def remove(self, row: int) -> None:
        self.row_prompt.pop(row, None)
        index = self.row_set.pop(row, None)
        if index is not None:
            self.users[index] -= 1

    def move(self, a: int, b: int, swap: bool) -> None:
        for table in (self.row_set, self.row_prompt):
            va, vb = table.pop(a, None), table.pop(b, None)
            if va is not None:
                table[b] = va
            if swap and vb is not None:
                table[a] = vb

    def _grow(self, extra: int) -> None:
        """Room for `extra` more neurons: a larger InterventionSets with the same sets."""
        need = sum(self.sets.sizes) + extra
        if need <= self.sets.capacity:
            return
        old, capacity = self.sets, max(need, 2 * self.sets.capacity, 4096)
        new = InterventionSets(*self.shape, sets=old.sets, capacity=capacity, device=self.device)
        used = old.layer < old.n_layers
        n = int(used.sum())
        for name in ("layer", "unit", "set", "mul", "add"):
            getattr(new, name)[:n] = getattr(old, name)[used]
        new.codes.copy_(old.codes)
        new.sizes = list(old.sizes)
        self.sets = new

    # -- each step (the wrapped _model_forward) --
    def prepare(self, num_reqs: int, query_start_loc: torch.Tensor, positions: torch.Tensor | None,
                num_tokens: int) -> None:
        """`rows` for this step: query_start_loc [num_reqs + 1] (host) splits the flattened
        tokens into the batch rows, positions [tokens] are their absolute positions."""
        steered = [r for r in range(num_reqs) if r in self.row_set]
        if not steered or positions is None:
            self.rows = None
            return
        if self.tables is None:
            self.tables = [self.sets.table(layer) for layer in range(self.shape[0])]
        none = self.sets.sets
        rows = torch.full((num_tokens,), none, dtype=torch.long)
        pos = positions[:num_tokens].to("cpu", torch.long)
        qsl = query_start_loc.tolist()
        codes = self.sets.codes.tolist()
        for r in steered:
            a, b = qsl[r], qsl[r + 1]
            index, prompt = self.row_set[r], self.row_prompt.get(r, 0)
            where = POSITION_RULES[codes[index]](pos[a:b], prompt)
            rows[a:b] = torch.where(where, index, none)
        self.rows = rows.to(self.device, non_blocking=True)

    def override(self, h: torch.Tensor, layer: int) -> None:
        rows = self.rows
        if rows is None or self.tables is None:
            return
        n = h.shape[0]
        mask, mul, add = self.tables[layer]
        r = rows[:n] if rows.shape[0] >= n else torch.cat([rows, rows.new_full((n - rows.shape[0],), self.sets.sets)])
        h.copy_(apply_override(h.view(n, 1, -1), mask, mul, add, None, r).view_as(h))


# index = POSITIONS.index(name): all, last, prompt, generated (steer/core/intervention.py)
POSITION_RULES = (
    lambda p, prompt: torch.ones_like(p, dtype=torch.bool),
    lambda p, prompt: p >= prompt - 1,
    lambda p, prompt: p < prompt,
    lambda p, prompt: p >= prompt,
)

WORKER: Worker | None = None  # this process's state (set by SteerLogits in the worker)


def neuron_override(h: torch.Tensor, layer: int) -> None:
    """The custom op: h [tokens, width] overridden in place where this step steers it."""
    if WORKER is not None:
        WORKER.override(h, layer)


def _neuron_override_fake(h: torch.Tensor, layer: int) -> None:
    return None


# -- the logits processor: admission checks and batch changes --
def _logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SteerLogits(_logits_processor_base()):
    """Admission checks (`validate_params`, front end) and the batch's rows (`update_state`,
    worker) of steering requests; leaves logits as they are."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request = SteerRequest.parse(sampling_params.extra_args)
        if request is None:
            return
        if not _SHAPE:
            raise ValueError("steer: steer's vLLM plugin is not active in this server (VLLM_PLUGINS excludes "
                             "'steer'?), so steer_* requests cannot be served")
        if _SHAPE["architecture"] not in ARCHITECTURES:
            raise ValueError(f"steer: {_SHAPE['architecture']} is not supported by steer's vLLM plugin; "
                             f"supported: {sorted(ARCHITECTURES)}")
        request.intervention(_SHAPE["shape"])  # raises ValueError naming the problem

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        global WORKER
        sched = vllm_config.scheduler_config
        WORKER = Worker(model_shape(vllm_config.model_config.hf_config), sets=int(sched.max_num_seqs),
                        max_tokens=int(sched.max_num_batched_tokens), device=device)
        self.worker = WORKER

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        w = self.worker
        for row in batch_update.removed:
            w.remove(row)
        for row, params, prompt_ids, _ in batch_update.added:
            extra = getattr(params, "extra_args", None)
            w.add(row, SteerRequest.parse(extra), len(prompt_ids) if prompt_ids is not None else 0)
        for a, b, direction in batch_update.moved:
            w.move(a, b, direction == MoveDirectionality.SWAP)


# -- the general plugin --
_REGISTERED = False


def register() -> None:
    """vLLM's general-plugin entry point (every process, before the model is built)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    _register_op()
    _patch_mlps()
    _patch_runner()
    _patch_front_end()
    _patch_cache_salt()


def _register_op() -> None:
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    global _LIB
    _LIB = Library("steer_vllm", "FRAGMENT")  # kept alive: the op lives as long as the library
    direct_register_custom_op("neuron_override", neuron_override, mutates_args=["h"],
                              fake_impl=_neuron_override_fake, target_lib=_LIB)


def _steered_forward(self, x):
    gate_up, _ = self.gate_up_proj(x)
    h = self.act_fn(gate_up)
    torch.ops.steer_vllm.neuron_override(h, self.steer_layer)
    out, _ = self.down_proj(h)
    return out


def _patch_mlps() -> None:
    from vllm.model_executor.models import gemma3, llama
    from vllm.model_executor.models.utils import extract_layer_index

    for cls in (gemma3.Gemma3MLP, llama.LlamaMLP):
        init = cls.__init__

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            self.steer_layer = extract_layer_index(self.down_proj.prefix)
            quant = getattr(self.down_proj, "quant_method", None)
            if quant is not None and type(quant).__name__ != "UnquantizedLinearMethod":
                raise ValueError(f"steer's vLLM plugin: quantized MLPs ({type(quant).__name__}) are not supported; "
                                 "serve the model unquantized, or without the plugin (VLLM_PLUGINS)")

        cls.__init__ = __init__
        cls.forward = _steered_forward


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    forward = GPUModelRunner._model_forward

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        w = WORKER
        if w is not None and w.row_set:
            num_reqs = self.input_batch.num_reqs
            n = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
            w.prepare(num_reqs, self.query_start_loc.cpu[:num_reqs + 1], positions, n)
        try:
            return forward(self, input_ids, positions, *args, **kwargs)
        finally:
            if w is not None:
                w.rows = None

    GPUModelRunner._model_forward = _model_forward


def _patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    init = InputProcessor.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        config = vllm_config.model_config.hf_config
        _SHAPE.update(shape=model_shape(config), architecture=(config.architectures or ["?"])[0])

    InputProcessor.__init__ = __init__


def cache_salt(extra_args: dict | None) -> str | None:
    """The salt steering adds to a request's prefix-cache key (None: the request does not steer)."""
    keys = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
    if not keys:
        return None
    if "steer_experts" in keys:  # the set's files, not just its path, name the steering
        path = os.path.abspath(str(keys["steer_experts"]))
        try:
            keys["steer_experts"] = [path, os.stat(os.path.join(path, "experts.safetensors")).st_mtime_ns]
        except OSError:
            keys["steer_experts"] = [path]
    return "steer:" + hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _patch_cache_salt() -> None:
    from vllm.v1.request import Request

    original = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls, request, block_hasher):
        params = request.sampling_params
        salt = cache_salt(getattr(params, "extra_args", None)) if params is not None else None
        if salt is not None:
            request.cache_salt = (request.cache_salt or "") + salt
        return original(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)
