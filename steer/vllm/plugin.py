"""steer inside stock vLLM: neuron sets per request, in eager and compiled mode.

Registered on vLLM's `vllm.general_plugins` entry point (pyproject.toml): `register` runs in the
front end, the engine core and every worker before the model is built, so a plain
`LLM(model=...)` or the OpenAI-compatible server with steer installed accepts steering requests
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

Expert discovery rides on the same ops: a collection request (`steer_collect`, sent by
steer/vllm/discovery.py) has its neuron tensor pooled by the worker's `Pooling`
(steer/vllm/pooling.py) instead of overridden; `collective_rpc("steer_collect", ...)` reaches it
(`_patch_worker`), and the weight samples steer fingerprints a model by are kept before vLLM's
CPU build repacks the weights (`_patch_weights`).

Where it runs: vLLM's CPU build (Model Runner V1), eager or compiled, no speculative decoding,
unquantized MLPs; steering in one process per model (no tensor or pipeline parallelism),
discovery under tensor parallelism too. Elsewhere such a request is refused at admission and
everything else is served as by stock vLLM.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from steer.core.intervention import SITES, InterventionSets
from steer.kernels.fused_mlp_ref import ACTIVATIONS, apply_override
from steer.vllm.pooling import Pooling, move_row
from steer.vllm.requests import PREFIX, Dims, SteerRequest, collect_request

log = logging.getLogger(__name__)

ARCHITECTURES = ("Gemma3ForCausalLM", "LlamaForCausalLM")  # their MLPs are patched
_FRONT: dict = {}  # front end: the served model's `Dims`, why it cannot steer (or None)


def model_dims(hf_config) -> Dims:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return Dims(int(text.num_hidden_layers), int(text.intermediate_size), int(text.hidden_size))


class Table:
    """One site's sets in the worker: an `InterventionSets` of as many sets as the batch has rows
    (never full), the rows using each set, and the current step's overrides (`step`: per layer,
    the flat indices of the steered (token, unit) pairs with their mask, mul and add; None where
    nothing is steered)."""

    def __init__(self, shape: tuple[int, int], site: str, sets: int, device):
        self.shape = shape
        self.sets = InterventionSets(*shape, sets=sets, capacity=0, device=device, site=site)
        self.users: list[int] = [0] * sets  # batch rows using each set
        self.slots: dict[int, torch.Tensor] = {}  # set index -> its slots in `sets` (cached)
        self.step: list | None = None

    def load(self, iv) -> int:
        """Put `iv` into a free set; its index."""
        index = self.users.index(0)
        need = len(self.sets) - self.sets.sizes[index] + len(iv)
        if need > self.sets.capacity:  # room for more units: the same sets with a larger capacity
            self.sets = self.sets.with_capacity(max(need, 2 * self.sets.capacity, 4096))
        self.sets.put(index, iv.to(self.sets.device))
        self.slots.clear()
        return index

    def prepare(self, rows: dict[int, int], query_start_loc, computed, prompt) -> None:
        """This step's overrides for `rows` (batch row -> set index): query_start_loc [rows + 1]
        splits the flattened tokens into the batch rows, `computed` [rows] counts each row's
        tokens before this step (row r's tokens sit at positions computed[r] ...), `prompt` [rows]
        its prompt length. Each steered token is paired with its set's units (`slots`) and the
        pairs are grouped by layer: the forward then touches only them."""
        self.step = None
        if not rows:
            return
        codes = self.sets.codes.tolist()
        by_set: dict[int, list[torch.Tensor]] = {}
        for r, s in rows.items():
            if r + 1 >= len(query_start_loc):
                continue
            a, b = int(query_start_loc[r]), int(query_start_loc[r + 1])
            pos = torch.arange(int(computed[r]), int(computed[r]) + max(b - a, 0))
            tokens = torch.arange(a, a + len(pos))[POSITION_RULES[codes[s]](pos, int(prompt[r]))]
            if len(tokens):
                by_set.setdefault(s, []).append(tokens)
        if not by_set:
            return
        sets, (layers, width), dev = self.sets, self.shape, self.sets.device
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
        counts = torch.bincount(layer, minlength=layers)[:layers].tolist()
        self.step = [(f, torch.ones_like(f, dtype=torch.bool), sets.mul[j], sets.add[j]) if len(f) else None
                     for f, j in zip(flat.split(counts), slot.split(counts))]

    def pairs(self, layer: int):
        """(flat, mask, mul, add) of `layer` in this step, or None."""
        return self.step[layer] if self.step is not None else None


class Worker:
    """The worker's steering state: one `Table` per site (a batch may mix sites; one request
    steers one), the configs in use, and each steered batch row's (site, set); and its
    collection state (`pooling`: expert discovery's requests, steer/vllm/pooling.py)."""

    def __init__(self, dims: Dims, sets: int, device, rank: int = 0, world: int = 1):
        self.dims = dims
        self.pooling = Pooling(dims, sets, device, rank, world)
        self.tables = {site: Table(dims.shape(site), site, sets, torch.device(device)) for site in SITES}
        self.configs: dict[tuple, tuple[str, int]] = {}  # (request, file time) -> (site, set index)
        self.row_set: dict[int, tuple[str, int]] = {}  # batch row -> (site, set index), steered rows only

    # -- batch changes (SteerLogits.update_state, before each step) --
    def add(self, row: int, request: SteerRequest | None) -> None:
        self.remove(row)
        if request is None:
            return
        try:
            key = (request, request.version())
            where = self.configs.get(key)
            if where is None:
                where = self._load(key)
        except ValueError as e:  # checked at admission; the file changed or vanished since
            log.error("%s: this request runs unsteered", e)
            return
        self.tables[where[0]].users[where[1]] += 1
        self.row_set[row] = where

    def _load(self, key: tuple) -> tuple[str, int]:
        iv = key[0].intervention(self.dims)
        table = self.tables[iv.site]
        index = table.load(iv)
        for old in [k for k, w in self.configs.items() if w == (iv.site, index)]:
            del self.configs[old]
        self.configs[key] = (iv.site, index)
        return iv.site, index

    def remove(self, row: int) -> None:
        where = self.row_set.pop(row, None)
        if where is not None:
            self.tables[where[0]].users[where[1]] -= 1

    def move(self, a: int, b: int, swap: bool) -> None:
        """Row a goes to b: b's request is replaced (it has left) or, with `swap`, goes to a."""
        left = move_row(self.row_set, a, b, swap)
        if left is not None:
            self.tables[left[0]].users[left[1]] -= 1

    # -- each step (the wrapped _model_forward) --
    def prepare(self, query_start_loc, computed, prompt) -> None:
        """Every site's overrides of this step (`Table.prepare`)."""
        for site, table in self.tables.items():
            table.prepare({r: i for r, (s, i) in self.row_set.items() if s == site}, query_start_loc, computed, prompt)

    def clear(self) -> None:
        for table in self.tables.values():
            table.step = None
        self.pooling.select = self.pooling.slot = None

    def override(self, h: torch.Tensor, gate_up: torch.Tensor, layer: int, act: str) -> None:
        """h [tokens, width] (the neuron tensor, `act(gate) * up` as vLLM computed it) with this
        step's steered pairs of `layer` overridden in place, through `apply_override` over the
        pairs: at the neuron site on h itself; at the activation site on `act(gate)`, computed
        again for those pairs only from gate_up [tokens, 2 x width] and multiplied by `up` (vLLM
        fuses act-and-mul, which never shows act(gate)); every other value keeps vLLM's bits."""
        values = h.view(-1)
        pairs = self.tables["neuron"].pairs(layer)
        if pairs is not None:
            flat, mask, mul, add = pairs
            values[flat] = apply_override(values[flat].view(1, 1, -1), mask, mul, add).view(-1)
        pairs = self.tables["activation"].pairs(layer)
        if pairs is not None:
            flat, mask, mul, add = pairs
            width = h.shape[-1]
            at = (flat // width) * (2 * width) + flat % width  # the pair's gate in gate_up; its up: + width
            gate_up = gate_up.reshape(-1)
            a = ACTIVATIONS[act](gate_up[at])
            a = apply_override(a.view(1, 1, -1), mask, mul, add).view(-1)
            values[flat] = (a * gate_up[at + width]).to(h.dtype)

    def residual(self, h: torch.Tensor, r: torch.Tensor, layer: int) -> None:
        """A decoder layer's output, in vLLM's split form: the stream is h + r (vLLM adds them in
        the next fused add-norm). At this step's steered tokens the stream is formed, its
        steered units overridden (`apply_override`), and stored as h with r = 0, so the next
        add-norm reads the steered stream exactly; other tokens are left as they are."""
        pairs = self.tables["residual"].pairs(layer)
        if pairs is None:
            return
        flat, mask, mul, add = pairs
        width = h.shape[-1]
        tokens = torch.unique(flat // width)
        stream = h[tokens] + r[tokens]  # [steered tokens, hidden], in the model's dtype as vLLM adds
        values = stream.view(-1)
        local = torch.searchsorted(tokens, flat // width) * width + flat % width
        values[local] = apply_override(values[local].view(1, 1, -1), mask, mul, add).view(-1)
        h[tokens] = stream
        r[tokens] = 0


# index = POSITIONS.index(name): all, last, prompt, generated (steer/core/intervention.py)
POSITION_RULES = (
    lambda p, prompt: torch.ones_like(p, dtype=torch.bool),
    lambda p, prompt: p >= prompt - 1,
    lambda p, prompt: p < prompt,
    lambda p, prompt: p >= prompt,
)

WORKER: Worker | None = None  # this process's state (set by SteerLogits in the worker)


def neuron_override(h: torch.Tensor, gate_up: torch.Tensor, layer: int, act: str) -> None:
    """The MLP's custom op: h [tokens, width] overridden in place where this step steers the
    neuron or the activation (`Worker.override`), then pooled where it collects (`Pooling.neuron`)."""
    if WORKER is not None:
        WORKER.override(h, gate_up, layer, act)
        WORKER.pooling.neuron(h, gate_up, layer, act)


def residual_override(h: torch.Tensor, r: torch.Tensor, layer: int) -> None:
    """The decoder layer's custom op: (h, r) changed in place where this step steers the stream
    (`Worker.residual`), then summed where it collects DiffMean's statistics (`Pooling.residual`)."""
    if WORKER is not None:
        WORKER.residual(h, r, layer)
        WORKER.pooling.residual(h, r, layer)


def _fake(*args) -> None:
    return None


# -- admission (front end) --
def refusal(architecture: str, vllm_config, collecting: bool = False) -> str | None:
    """Why this engine cannot steer (None: it can): `validate` refuses every steering request.
    With `collecting`: why it cannot collect (discovery also runs under tensor parallelism)."""
    from vllm.platforms import current_platform

    par = vllm_config.parallel_config
    if architecture not in ARCHITECTURES:
        return f"{architecture} is not supported by steer's vLLM plugin; supported: {list(ARCHITECTURES)}"
    if not current_platform.is_cpu() or vllm_config.use_v2_model_runner:
        return "steer's vLLM plugin runs on vLLM's CPU build (Model Runner V1) only, so far"
    if par.pipeline_parallel_size > 1 or (par.tensor_parallel_size > 1 and not collecting):
        return ("steer's vLLM plugin does not support pipeline parallelism" if collecting else
                "steer's vLLM plugin does not steer under tensor or pipeline parallelism yet")
    if vllm_config.speculative_config is not None:
        return "steer's vLLM plugin does not support speculative decoding"
    if vllm_config.model_config.quantization:
        return f"steer's vLLM plugin needs unquantized MLPs (this model: {vllm_config.model_config.quantization})"
    return None


def validate(params) -> None:
    """Refuse a request whose steering is bad or cannot be served here (ValueError -> HTTP 400)."""
    extra = getattr(params, "extra_args", None)
    request = SteerRequest.parse(extra)
    if request is None:
        if collect_request(extra) is not None and _FRONT.get("collect_refusal"):
            raise ValueError(f"steer: {_FRONT['collect_refusal']}")
        return
    if _FRONT.get("refusal"):
        raise ValueError(f"steer: {_FRONT['refusal']}")
    request.intervention(_FRONT["dims"])  # raises ValueError naming the problem


# -- the worker: batch changes --
def _logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SteerLogits(_logits_processor_base()):
    """The batch's rows of steering requests (`update_state`, in the worker before each step);
    leaves logits as they are."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        global WORKER
        from vllm.distributed import get_tensor_model_parallel_rank

        WORKER = Worker(model_dims(vllm_config.model_config.hf_config),
                        sets=int(vllm_config.scheduler_config.max_num_seqs), device=device,
                        rank=get_tensor_model_parallel_rank(), world=vllm_config.parallel_config.tensor_parallel_size)
        self.worker = WORKER

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        w, pooling = self.worker, self.worker.pooling
        for row in batch_update.removed:
            w.remove(row)
            pooling.remove(row)
        for row, params, _, _ in batch_update.added:
            extra = getattr(params, "extra_args", None)
            collect = collect_request(extra)
            w.add(row, None if collect is not None else SteerRequest.parse(extra))
            pooling.remove(row)
            if collect is not None:
                pooling.add(row, collect)
        for a, b, direction in batch_update.moved:
            w.move(a, b, direction == MoveDirectionality.SWAP)
            pooling.move(a, b, direction == MoveDirectionality.SWAP)


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
    _patch_worker()
    _patch_weights()


def _register_op() -> None:
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    global _LIB
    _LIB = Library("steer_vllm", "FRAGMENT")  # kept alive: the op lives as long as the library
    direct_register_custom_op("neuron_override", neuron_override, mutates_args=["h"],
                              fake_impl=_fake, target_lib=_LIB)
    direct_register_custom_op("residual_override", residual_override, mutates_args=["h", "r"],
                              fake_impl=_fake, target_lib=_LIB)


def act_name(act_and_mul) -> str | None:
    """The activation of vLLM's fused act-and-mul module, as `steer.kernels` names it."""
    kind = type(act_and_mul).__name__
    if kind == "SiluAndMul":
        return "silu"
    if kind == "GeluAndMul":
        return "gelu_tanh" if act_and_mul.approximate == "tanh" else "gelu"
    return None


def _patch_mlps() -> None:
    """The MLPs call `neuron_override` on their neuron tensor; the decoder layers call
    `residual_override` on their output."""
    from vllm.model_executor.models import gemma3, llama
    from vllm.model_executor.models.utils import extract_layer_index

    for cls in (gemma3.Gemma3MLP, llama.LlamaMLP):
        init, forward = cls.__init__, cls.forward

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            quant = getattr(self.down_proj, "quant_method", None)  # quantized: vLLM's own forward
            plain = quant is None or type(quant).__name__ == "UnquantizedLinearMethod"
            self.steer_act = act_name(self.act_fn)
            self.steer_layer = extract_layer_index(self.down_proj.prefix) if plain and self.steer_act else None

        def steered_forward(self, x, _forward=forward):
            if self.steer_layer is None:
                return _forward(self, x)
            gate_up, _ = self.gate_up_proj(x)
            h = self.act_fn(gate_up)
            torch.ops.steer_vllm.neuron_override(h, gate_up, self.steer_layer, self.steer_act)
            out, _ = self.down_proj(h)
            return out

        cls.__init__, cls.forward = __init__, steered_forward

    for cls in (gemma3.Gemma3DecoderLayer, llama.LlamaDecoderLayer):
        init, forward = cls.__init__, cls.forward

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            self.steer_layer = extract_layer_index(self.mlp.down_proj.prefix)

        def layer_forward(self, positions, hidden_states, residual, *args, _forward=forward, **kwargs):
            h, r = _forward(self, positions, hidden_states, residual, *args, **kwargs)
            torch.ops.steer_vllm.residual_override(h, r, self.steer_layer)
            return h, r

        cls.__init__, cls.forward = __init__, layer_forward


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    forward = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        w = WORKER
        if w is not None and (w.row_set or w.pooling.rows):
            n, batch = self.input_batch.num_reqs, self.input_batch
            where = self.query_start_loc.cpu[:n + 1], batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n]
            if w.row_set:
                w.prepare(*where)
            if w.pooling.rows:
                w.pooling.prepare(*where)
        try:
            out = forward(self, *args, **kwargs)
            if w is not None:
                w.pooling.finish()
            return out
        finally:
            if w is not None:
                w.clear()

    GPUModelRunner._model_forward = _model_forward


def _patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    init, check = InputProcessor.__init__, InputProcessor._validate_params

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        config = vllm_config.model_config.hf_config
        architecture = (config.architectures or ["?"])[0]
        _FRONT.update(dims=model_dims(config), refusal=refusal(architecture, vllm_config),
                      collect_refusal=refusal(architecture, vllm_config, collecting=True))

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
    if collect_request(extra_args) is not None:  # pooled once: never served from another request's cache
        return "steer-collect:" + request_id
    source = SteerRequest.parse(extra_args).source  # admitted: a valid request
    try:  # the file's version, not just its path, names the steering
        keys["source"] = [source, os.stat(source).st_mtime_ns]
    except OSError:
        keys["source"] = [source]
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


def describe(model, vllm_config) -> dict:
    """What steer records of the served model: its architecture, MLP sizes, load dtype, and this
    rank's part of the down projections' weight samples (`shard_sample`; the front end joins the
    ranks' into the fingerprint and signature of `steer.core.adapters`, so an expert set found
    here checks against the same model in transformers). JSON-able: it crosses processes."""
    from steer.core.runtime import dtype_name

    mlps = sorted((m for m in model.modules() if getattr(m, "steer_act", None) and m.steer_layer is not None),
                  key=lambda m: m.steer_layer)
    samples = [getattr(m.down_proj, "steer_sample", None) or shard_sample(m.down_proj) for m in mlps]
    dims = model_dims(vllm_config.model_config.hf_config)
    return {"architecture": (vllm_config.model_config.hf_config.architectures or ["?"])[0],
            "layers": dims.layers, "width": dims.width, "hidden": dims.hidden,
            "dtype": dtype_name(vllm_config.model_config.dtype), "samples": samples}


def shard_sample(down) -> dict:
    """This rank's entries of the down projection's `weight_sample` (steer.core.adapters): the
    whole weight's shape, the positions of the sample this rank holds (row-parallel: a contiguous
    block of input columns) and their values, as lists."""
    w = down.weight.detach()
    rank, world = getattr(down, "tp_rank", 0), getattr(down, "tp_size", 1)
    rows, local = w.shape
    width = local * world
    numel = rows * width
    at = torch.arange(0, numel, max(1, numel // 4096))
    row, col = at // width, at % width - rank * local
    own = (col >= 0) & (col < local)
    return {"shape": [rows, width], "positions": own.nonzero()[:, 0].tolist(), "size": len(at),
            "values": w[row[own], col[own]].cpu().float().tolist()}


def _patch_weights() -> None:
    """Keep each down projection's `shard_sample` before vLLM's CPU build repacks its weights
    (and frees them): `describe` fingerprints the model with them."""
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm

    def dispatch_cpu_unquantized_gemm(layer, *args, **kwargs):
        w = layer.weight
        if str(getattr(layer, "prefix", "")).endswith("mlp.down_proj") and w.dim() == 2 and not w.is_meta:
            layer.steer_sample = shard_sample(layer)
        return dispatch(layer, *args, **kwargs)

    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def _patch_worker() -> None:
    """`collective_rpc("steer_collect", args=(op, options))` reaches the worker's `Pooling.call`
    (op "describe": `describe`)."""
    from vllm.v1.worker.worker_base import WorkerBase

    def steer_collect(self, op: str, options: dict):
        if op == "describe":
            return describe(self.get_model(), self.vllm_config)
        return WORKER.pooling.call(op, options)

    WorkerBase.steer_collect = steer_collect
