"""steer inside stock vLLM: neuron sets per request, in eager and compiled mode.

Registered on vLLM's `vllm.general_plugins` entry point (pyproject.toml): `register` runs in the
front end, the engine core and every worker before the model is built, so a plain
`LLM(model=...)` or `vllm serve` with steer installed accepts steering requests
(`steer/vllm/requests.py`: the contract). It
- swaps the forward of vLLM's `Gemma3MLP` and `LlamaMLP` for one that calls
  `torch.ops.steer_vllm.neuron_override(h, layer)` on the neuron tensor (the input of
  `down_proj`, `act(gate) * up`);
- checks every request at admission, in the front end (`InputProcessor._validate_params`): a bad
  request, or any steering request where the plugin cannot serve it, is refused there;
- adds `SteerLogits` to the engine's logits processors (Model Runner V1, vLLM's CPU build): its
  `update_state` runs in the worker before every step with the rows that joined, left or moved
  in the persistent batch; it never changes logits;
- wraps the model runner's `_model_forward`, so each step's steered tokens are listed before the
  forward, and salts the prefix cache of steered requests.

Per-request state lives in the worker (`Worker`): an `InterventionSets` (steer.core) of
`max_num_seqs` sets, one per distinct steering config in the batch (requests with the same
config share one). Before each forward the step's steered tokens (by each request's positions)
are paired with their set's neurons and grouped by layer; the custom op, opaque to
torch.compile, reads those pairs at run time, so new requests, sets or positions never
recompile, and applies `apply_override` (steer.kernels), the one override semantic of every
steer path, to them only. A step with nothing steered skips it.

Positions per request (token at absolute position p of a request whose prompt has P tokens):
"all"; "prompt" p < P; "generated" p >= P (a token fed back after it was sampled); "last" the
tokens whose output is sampled, p >= P - 1: the last prompt token (in whatever prefill chunk it
falls) and every generated token, as steer's `generate` steers the last token of each call.

Prefix caching: a steered request's cache salt gets a hash of its steering keys, so its KV
blocks are never served to an unsteered request or another config, nor theirs to it; with
positions other than "all" also its request id (whether a token is steered then depends on the
prompt's length, so its blocks are not shared).

Where it runs: vLLM's CPU build (Model Runner V1), eager or compiled, one process per model
(no tensor or pipeline parallelism), no speculative decoding, unquantized MLPs. Elsewhere a
steering request is refused at admission and everything else is served as by stock vLLM.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from steer.core.intervention import InterventionSets
from steer.kernels.fused_mlp_ref import apply_override
from steer.vllm.requests import PREFIX, SteerRequest, set_time

log = logging.getLogger(__name__)

ARCHITECTURES = ("Gemma3ForCausalLM", "LlamaForCausalLM")  # their MLPs are patched
_FRONT: dict = {}  # front end: the served model's (layers, MLP width), why it cannot steer (or None)


def model_shape(hf_config) -> tuple[int, int]:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(text.num_hidden_layers), int(text.intermediate_size)


class Worker:
    """The worker's steering state: sets, the batch rows' sets, and the current step's overrides
    (`step`: per layer, the flat indices of the steered (token, neuron) pairs in the neuron
    tensor with their mul and add; None where nothing is steered)."""

    def __init__(self, shape: tuple[int, int], sets: int, device):
        self.shape, self.device = shape, torch.device(device)
        self.sets = InterventionSets(*shape, sets=sets, capacity=0, device=self.device)
        self.configs: dict[tuple, int] = {}  # (config, set file time) -> set index
        self.users: list[int] = [0] * sets  # batch rows using each set
        self.row_set: dict[int, int] = {}  # batch row -> set index (steered rows only)
        self.slots: dict[int, torch.Tensor] = {}  # set index -> its slots in `sets` (cached)
        self.step: list | None = None  # per layer (flat, mask, mul, add) or None

    # -- batch changes (SteerLogits.update_state, before each step) --
    def add(self, row: int, request: SteerRequest | None) -> None:
        self.remove(row)
        if request is None:
            return
        try:
            key = (request, set_time(request.experts))
            index = self.configs.get(key)
            if index is None:
                index = self._load(key)
        except ValueError as e:  # checked at admission; the set changed or vanished since
            log.error("%s: this request runs unsteered", e)
            return
        self.users[index] += 1
        self.row_set[row] = index

    def _load(self, key: tuple) -> int:
        iv = key[0].intervention(self.shape)
        index = self.users.index(0)  # as many sets as the batch has rows: never full
        for old in [k for k, i in self.configs.items() if i == index]:
            del self.configs[old]
        self._grow(len(iv))
        self.sets.put(index, iv.to(self.device))
        self.configs[key] = index
        self.slots.clear()
        return index

    def remove(self, row: int) -> None:
        index = self.row_set.pop(row, None)
        if index is not None:
            self.users[index] -= 1

    def move(self, a: int, b: int, swap: bool) -> None:
        """Row a goes to b: b's request is replaced (it has left) or, with `swap`, goes to a."""
        if not swap:
            self.remove(b)
        va, vb = self.row_set.pop(a, None), self.row_set.pop(b, None)
        if va is not None:
            self.row_set[b] = va
        if vb is not None:
            self.row_set[a] = vb

    def _grow(self, extra: int) -> None:
        """Room for `extra` more neurons: the same sets with a larger capacity."""
        need = len(self.sets) + extra
        if need > self.sets.capacity:
            self.sets = self.sets.with_capacity(max(need, 2 * self.sets.capacity, 4096))
            self.slots.clear()

    # -- each step (the wrapped _model_forward) --
    def prepare(self, query_start_loc, computed, prompt) -> None:
        """This step's overrides: query_start_loc [rows + 1] splits the flattened tokens into the
        batch rows, `computed` [rows] counts each row's tokens before this step (so row r's
        tokens sit at positions computed[r] ...), `prompt` [rows] its prompt length (host arrays
        of the input batch). Each steered token is paired with its set's neurons (`slots`), and
        the pairs are grouped by layer: the forward then touches only them."""
        codes = self.sets.codes.tolist()
        by_set: dict[int, list[torch.Tensor]] = {}
        for r, s in self.row_set.items():
            if r + 1 >= len(query_start_loc):
                continue
            a, b = int(query_start_loc[r]), int(query_start_loc[r + 1])
            pos = torch.arange(int(computed[r]), int(computed[r]) + max(b - a, 0))
            tokens = torch.arange(a, a + len(pos))[POSITION_RULES[codes[s]](pos, int(prompt[r]))]
            if len(tokens):
                by_set.setdefault(s, []).append(tokens)
        if not by_set:
            self.step = None
            return
        sets, width, dev = self.sets, self.shape[1], self.sets.device
        flat, slot = [], []
        for s, parts in by_set.items():
            tokens = torch.cat(parts).to(dev)
            if s not in self.slots:
                self.slots[s] = (sets.set == s).nonzero()[:, 0]
            slots = self.slots[s]
            flat.append((tokens[:, None] * width + sets.unit[slots][None, :]).reshape(-1))
            slot.append(slots.expand(len(tokens), -1).reshape(-1))
        flat, slot = torch.cat(flat), torch.cat(slot)
        layer = sets.layer[slot]
        order = torch.argsort(layer, stable=True)
        flat, slot = flat[order], slot[order]
        counts = torch.bincount(layer, minlength=self.shape[0])[:self.shape[0]].tolist()
        self.step = [(f, torch.ones_like(f, dtype=torch.bool), sets.mul[j], sets.add[j]) if len(f) else None
                     for f, j in zip(flat.split(counts), slot.split(counts))]

    def override(self, h: torch.Tensor, layer: int) -> None:
        """h [tokens, width] with this step's steered (token, neuron) pairs of `layer` overridden
        in place, through `apply_override` over the pairs (one axis of steered neurons)."""
        step = self.step[layer] if self.step is not None else None
        if step is None:
            return
        flat, mask, mul, add = step
        values = h.view(-1)
        values[flat] = apply_override(values[flat].view(1, 1, -1), mask, mul, add).view(-1)


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


# -- admission (front end) --
def refusal(architecture: str, vllm_config) -> str | None:
    """Why this engine cannot steer (None: it can): `validate` refuses every steering request."""
    from vllm.platforms import current_platform

    par = vllm_config.parallel_config
    if architecture not in ARCHITECTURES:
        return f"{architecture} is not supported by steer's vLLM plugin; supported: {list(ARCHITECTURES)}"
    if not current_platform.is_cpu() or vllm_config.use_v2_model_runner:
        return "steer's vLLM plugin runs on vLLM's CPU build (Model Runner V1) only, so far"
    if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
        return "steer's vLLM plugin does not support tensor or pipeline parallelism yet"
    if vllm_config.speculative_config is not None:
        return "steer's vLLM plugin does not support speculative decoding"
    if vllm_config.model_config.quantization:
        return f"steer's vLLM plugin needs unquantized MLPs (this model: {vllm_config.model_config.quantization})"
    return None


def validate(params) -> None:
    """Refuse a request whose steering is bad or cannot be served here (ValueError -> HTTP 400)."""
    request = SteerRequest.parse(getattr(params, "extra_args", None))
    if request is None:
        return
    if _FRONT.get("refusal"):
        raise ValueError(f"steer: {_FRONT['refusal']}")
    request.intervention(_FRONT["shape"])  # raises ValueError naming the problem


# -- the worker: batch changes --
def _logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SteerLogits(_logits_processor_base()):
    """The batch's rows of steering requests (`update_state`, in the worker before each step);
    leaves logits as they are."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        global WORKER
        WORKER = Worker(model_shape(vllm_config.model_config.hf_config),
                        sets=int(vllm_config.scheduler_config.max_num_seqs), device=device)
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
        for row, params, _, _ in batch_update.added:
            w.add(row, SteerRequest.parse(getattr(params, "extra_args", None)))
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
    _patch_config()
    _patch_cache_salt()


def _register_op() -> None:
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    global _LIB
    _LIB = Library("steer_vllm", "FRAGMENT")  # kept alive: the op lives as long as the library
    direct_register_custom_op("neuron_override", neuron_override, mutates_args=["h"],
                              fake_impl=_neuron_override_fake, target_lib=_LIB)


def _patch_mlps() -> None:
    from vllm.model_executor.models import gemma3, llama
    from vllm.model_executor.models.utils import extract_layer_index

    for cls in (gemma3.Gemma3MLP, llama.LlamaMLP):
        init, forward = cls.__init__, cls.forward

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            quant = getattr(self.down_proj, "quant_method", None)  # quantized: vLLM's own forward
            plain = quant is None or type(quant).__name__ == "UnquantizedLinearMethod"
            self.steer_layer = extract_layer_index(self.down_proj.prefix) if plain else None

        def steered_forward(self, x, _forward=forward):
            if self.steer_layer is None:
                return _forward(self, x)
            gate_up, _ = self.gate_up_proj(x)
            h = self.act_fn(gate_up)
            torch.ops.steer_vllm.neuron_override(h, self.steer_layer)
            out, _ = self.down_proj(h)
            return out

        cls.__init__, cls.forward = __init__, steered_forward


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    forward = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        w = WORKER
        if w is not None and w.row_set:
            n, batch = self.input_batch.num_reqs, self.input_batch
            w.prepare(self.query_start_loc.cpu[:n + 1], batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n])
        try:
            return forward(self, *args, **kwargs)
        finally:
            if w is not None:
                w.step = None

    GPUModelRunner._model_forward = _model_forward


def _patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    init, check = InputProcessor.__init__, InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        config = vllm_config.model_config.hf_config
        architecture = (config.architectures or ["?"])[0]
        _FRONT.update(shape=model_shape(config), refusal=refusal(architecture, vllm_config))

    def _validate_params(self, params, *args, **kwargs):
        out = check(self, params, *args, **kwargs)
        try:
            validate(params)
        except ValueError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e)) from None
        return out

    InputProcessor.__init__, InputProcessor._validate_params = __init__, _validate_params


def _patch_config() -> None:
    """Add `SteerLogits` to the engine's logits processors where it can run (Model Runner V1:
    vLLM's V2 runner refuses logits processors of this interface)."""
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = create(self, *args, **kwargs)
        model = config.model_config
        if not config.use_v2_model_runner and model.runner_type == "generate":
            model.logits_processors = [*(model.logits_processors or []), f"{__name__}:SteerLogits"]
        return config

    EngineArgs.create_engine_config = create_engine_config


def cache_salt(extra_args: dict | None, request_id: str) -> str | None:
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
    if keys.get("steer_positions", "all") != "all":  # steered tokens depend on the prompt's length
        keys["request"] = request_id
    return "steer:" + hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _patch_cache_salt() -> None:
    from vllm.v1.request import Request

    original = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls, request, block_hasher):
        params = request.sampling_params
        salt = cache_salt(getattr(params, "extra_args", None), request.request_id) if params is not None else None
        if salt is not None:
            request.cache_salt = (request.cache_salt or "") + salt
        return original(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)
