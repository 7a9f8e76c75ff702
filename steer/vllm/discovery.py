"""Expert discovery inside vLLM, the front end's half: `steer.find_experts` given a `vllm.LLM`.

The corpus goes in as prefill-only requests of steer's own token ids (`plan_batches`: the one
tokenizing, truncation and special-token rule of steer), each naming its row, its label id and
the positions not pooled (`{"steer_collect": [row, label, skip]}`, steer/vllm/requests.py),
with `max_tokens=1` (the prefill's own sample ends it) and a cache salt of its own (a prefix
served from the cache would never be computed, so never pooled). vLLM packs, chunks and
schedules them; the worker pools each over its own tokens and accumulates on the device
(steer/vllm/pooling.py). The modes are those of the transformers path (steer/find.py):
- exact: one pass into a table of every response [sentences, neurons] in the worker, read back
  once as `Responses`;
- stream: the seeded calibration sample into a table, from which the worker builds the
  `StreamState` (`StreamState.from_sample`), then the rest of the corpus into the state, then
  `refine`'s pass over the short-list (`Shortlist`, the transformers path's rule) into a table of
  those columns. Token statistics (LAPE, DiffMean) ride along in the first pass.
Requests are fed lazily, window by window, at most `IN_FLIGHT` x the engine's batch at once, so
memory stays bounded whatever the corpus size. A checkpoint (stream mode, every
`checkpoint_every` x `batch_size` finished sentences) is the whole model's state with the set of
sentences it counts (a bitmap the worker keeps beside its state: vLLM finishes requests out of
order); a resumed run runs exactly the others. Under tensor parallelism each rank pools its
shard of the units; tables, states and token sums are joined here (steer/vllm/pooling.py).
"""
from __future__ import annotations

import itertools
import logging
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from steer.core.adapters import same_weights, weights_fingerprint, weights_signature
from steer.core.scores import Responses, Scores
from steer.core.stream import StreamState
from steer.core.token_stats import TokenStats
from steer.engine.batching import plan_batches
from steer.engine.collect import (CHECKPOINT_FORMAT, Run, Shortlist, load_checkpoint, note_batch, Progress,
                                  calibration_sample, settings_of)
from steer.vllm.pooling import join_states, join_tables, join_token_stats, shard_path, unpack_rows
from steer.vllm.requests import COLLECT

log = logging.getLogger(__name__)
IN_FLIGHT = 4  # requests in flight: this many times the engine's max_num_seqs
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Served:
    """A vLLM engine as discovery sees it: its sizes and what a collection records of it."""

    llm: object
    n_layers: int
    width: int
    hidden: int
    record: dict
    world: int  # tensor-parallel ranks: each pools its shard of every layer's units

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.width

    @property
    def limit(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def rpc(self, op: str, **options) -> list:
        """`Pooling.call` on every worker (their answers, in rank order)."""
        return self.llm.collective_rpc("steer_collect", args=(op, options))

    def table(self, path: Path, columns=None) -> dict[str, torch.Tensor]:
        """The workers' table at `path` (and token sums), joined across ranks."""
        self.rpc("save", path=str(path))
        parts = [load_file(shard_path(path, r, self.world)) for r in range(self.world)]
        out = join_token_stats(parts)  # and the rows' labels, the same on every rank
        out["values"] = join_tables([p["values"] for p in parts], self.n_layers, self.width, columns)
        return out

    def state(self, path: Path, extra: dict | None = None) -> tuple[StreamState, dict]:
        """The workers' streaming state, joined across ranks, with the extra it was saved with
        (and the rows it counts: "done")."""
        self.rpc("save", path=str(path), extra=extra or {})
        parts = [StreamState.load(shard_path(path, r, self.world), with_extra=True) for r in range(self.world)]
        return join_states([p for p, _ in parts]), parts[0][1]


def served(llm) -> Served:
    """The `Served` view of `llm` (its worker asked once): ValueError where steer cannot collect."""
    if llm in _ENGINES:
        return _ENGINES[llm]
    from steer.vllm.plugin import refusal

    config = llm.llm_engine.vllm_config
    architecture = (config.model_config.hf_config.architectures or ["?"])[0]
    why = refusal(architecture, config, collecting=True)
    if why:
        raise ValueError(f"steer: {why}")
    try:
        ranks = llm.collective_rpc("steer_collect", args=("describe", {}))
    except NotImplementedError:
        raise ValueError("steer's vLLM plugin is not loaded in this engine (is steer installed in vLLM's "
                         "environment, and VLLM_PLUGINS unset or naming 'steer'?)") from None
    info = ranks[0]
    samples = []
    for layer in range(info["layers"]):
        values = torch.zeros(info["samples"][layer]["size"])
        for rank in ranks:
            part = rank["samples"][layer]
            values[part["positions"]] = torch.tensor(part["values"])
        samples.append((tuple(part["shape"]), values.to(getattr(torch, info["dtype"]))))
    name = config.model_config.served_model_name or config.model_config.model
    record = {"model": name[0] if isinstance(name, (list, tuple)) else name,
              "architecture": info["architecture"], "fingerprint": weights_fingerprint(samples),
              "layers": info["layers"], "width": info["width"], "dtype": info["dtype"],
              "signature": weights_signature(samples)}
    _ENGINES[llm] = out = Served(llm, info["layers"], info["width"], info["hidden"], record, len(ranks))
    return out


def open_engine(name_or_path, *, dtype="auto", seed: int = 0, **llm_args):
    """A vLLM engine for discovery (`steer find-experts --engine vllm`): steer's checkpoint of
    `name_or_path` (`steer.engine.models.resolve`: built-in names too), steer's dtype default
    (`steer.core.runtime.resolve_dtype`), the name recorded as given; `llm_args` go to `vllm.LLM`."""
    from vllm import LLM

    from steer.core.runtime import dtype_name, resolve_dtype
    from steer.engine.models import resolve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(model=resolve(name_or_path), served_model_name=str(name_or_path),
                   dtype=dtype_name(resolve_dtype(dtype, device)), seed=seed, **llm_args)
    return LLM(**options)


def tokenizer_of(llm):
    """The Hugging Face tokenizer of the engine's model (steer tokenizes; vLLM never does here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm.llm_engine.model_config.tokenizer)


class _Pass:
    """One pass of requests through the engine: `feed` adds each sentence of the batches as a
    request, at most `IN_FLIGHT` x max_num_seqs at once, and steps the engine; `finished(row)` is
    called as each request completes."""

    def __init__(self, engine: Served, desc: str, sentences: int, progress: bool, run: Run, limit: int):
        self.engine, self.run, self.limit = engine, run, limit
        self.bar = Progress(sentences, desc, progress)
        self.tag = f"steer-{desc}-{uuid.uuid4().hex[:8]}"
        self.in_flight = IN_FLIGHT * int(engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        self.pending: dict[str, tuple[int, int]] = {}  # request id -> (row, tokens)

    def feed(self, batches, finished=None) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        add = self.engine.llm.llm_engine.add_request
        start = time.perf_counter()
        try:
            for b in batches:
                note_batch(self.run, b, self.limit)
                for row, label, ids, pooled in zip(b.rows, b.labels, b.ids, b.pooled):
                    skip = [p for p, keep in enumerate(pooled) if not keep]
                    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                            extra_args={COLLECT: [row, label, skip]})
                    rid = f"{self.tag}-{row}"
                    add(rid, TokensPrompt(prompt_token_ids=ids), params)
                    self.pending[rid] = (row, len(ids))
                self._drain(self.in_flight, finished)
            self._drain(0, finished)
        except BaseException:  # interrupted: the engine drops what is in flight (a checkpoint has the rest)
            self.engine.llm.llm_engine.abort_request(list(self.pending))
            raise
        finally:
            self.run.seconds += time.perf_counter() - start
            self.bar.close()

    def _drain(self, until: int, finished) -> None:
        step = self.engine.llm.llm_engine.step
        while len(self.pending) > until:
            for out in step():
                if out.finished:
                    row, n = self.pending.pop(out.request_id)
                    self.run.tokens += n
                    self.bar.update(1, n)
                    if finished is not None:
                        finished(row)


@dataclass
class _Job:
    """What every pass of one discovery shares: the engine, the tokenizer, the options."""

    engine: Served
    tokenizer: object
    config: object  # FindConfig
    names: list

    @property
    def limit(self) -> int:
        """The most tokens a sentence may have: max_length, at most the engine's max_model_len."""
        ml, engine_limit = self.config.max_length, self.engine.limit
        if ml is not None and not 1 <= ml <= engine_limit:
            raise ValueError(f"max_length={ml}: between 1 and the engine's max_model_len ({engine_limit})")
        return ml or engine_limit

    def feed(self, records, sentences: int, desc: str, run: Run, rows: dict | None = None, finished=None) -> None:
        """Run `records` (`sentences` of them; each pooled into row `rows[index]`, None: its corpus index)."""
        c = self.config
        one = _Pass(self.engine, desc, sentences, c.progress, run, self.limit)
        batches = plan_batches(records, self.tokenizer, batch_size=c.batch_size, max_tokens=c.max_tokens,
                               window=c.window, skip_special=c.skip_special, limit=self.limit,
                               too_long=c.too_long, on_window=one.bar.window)
        one.feed(batches if rows is None else (replace(b, rows=[rows[i] for i in b.rows]) for b in batches),
                 finished)

    def table(self, records, n: int, desc: str, run: Run, kinds=(), rows: dict | None = None,
              columns: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A table pass of n rows (every neuron, or `columns`): the worker's table and token sums,
        read back once."""
        self.engine.rpc("begin", pooling=self.config.pooling, label_names=self.names, kinds=list(kinds), rows=n,
                        columns=None if columns is None else columns.tolist(), keep="table")
        self.feed(records, n, desc, run, rows)
        with tempfile.TemporaryDirectory() as d:
            return self.engine.table(Path(d) / "table.safetensors", columns)

    def stats(self, tensors: dict, kinds) -> TokenStats | None:
        e = self.engine
        return TokenStats(self.names, kinds, e.n_layers, e.width, e.hidden).load_(tensors) if kinds else None


def collect(engine: Served, tokenizer, corpus, config) -> Responses:
    """Exact mode: every sentence's pooled responses (`steer.engine.collect.collect`'s result)."""
    job, kinds, run = _Job(engine, tokenizer, config, list(corpus.label_names)), tuple(config.token_stats), Run()
    tensors = job.table(corpus.records(), len(corpus), "collect", run, kinds)
    engine.rpc("end")
    settings = settings_of(engine.record, corpus, run, mode="exact", pooling=config.pooling,
                           skip_special=config.skip_special, backend="vllm", max_length=config.max_length,
                           too_long=config.too_long, engine=_engine_info())
    values = tensors["values"].view(len(corpus), engine.n_layers, engine.width)
    return Responses(values, corpus.label_ids, job.names, list(corpus.keys), settings, job.stats(tensors, kinds))


def collect_stream(engine: Served, tokenizer, corpus, config) -> StreamState:
    """Stream mode's first pass: the calibration sample into a table, from which the worker
    builds the state, then the rest of the corpus into it (checkpointed: the worker writes the
    state with the rows it counts); the state is read back once, at the end."""
    job, kinds, run = _Job(engine, tokenizer, config, list(corpus.label_names)), tuple(config.token_stats), Run()
    cal = calibration_sample(len(corpus), config.calibration, config.seed)
    settings = settings_of(engine.record, corpus, mode="stream", bins=config.bins, calibration=len(cal),
                           seed=config.seed, pooling=config.pooling, skip_special=config.skip_special,
                           max_length=config.max_length, too_long=config.too_long, engine=_engine_info(),
                           **({"token_stats": list(kinds), "hidden": engine.hidden} if kinds else {}))
    plan = {"batch_size": config.batch_size, "window": config.window, "max_tokens": config.max_tokens}
    totals = {"tokens": 0, "truncated": 0, "seconds": 0.0}
    if config.resume:
        _, extra = load_checkpoint(config.checkpoint, _Weights(engine), settings, plan, job.names)
        if extra.get("engine") != "vllm":
            raise ValueError(f"checkpoint {config.checkpoint} was written by steer's transformers engine: "
                             "resume it there")
        engine.rpc("resume", path=str(config.checkpoint))
        done = set(unpack_rows(extra["done"]).nonzero()[:, 0].tolist())
        totals.update(tokens=extra["tokens"], truncated=extra["truncated"], seconds=extra["seconds"])
    else:
        wanted = set(cal)
        records = [r for r in itertools.islice(corpus.records(), cal[-1] + 1) if r.index in wanted]
        job.table(records, len(records), "calibrate", run, kinds, rows={r.index: j for j, r in enumerate(records)})
        engine.rpc("calibrate", bins=config.bins, settings=settings)
        done = set(cal)
    engine.rpc("begin", pooling=config.pooling, label_names=job.names, kinds=list(kinds), rows=len(corpus),
               keep="stream", done=[] if config.resume else cal)
    start, every, count = time.perf_counter(), config.checkpoint_every * config.batch_size, [0]

    def checkpoint() -> None:  # the ranks' states, joined: a checkpoint resumes under any tensor parallelism
        extra = {"format": CHECKPOINT_FORMAT, "engine": "vllm", "plan": plan,
                 "tokens": totals["tokens"] + run.tokens, "truncated": totals["truncated"] + run.truncated,
                 "seconds": round(totals["seconds"] + time.perf_counter() - start, 2)}
        with tempfile.TemporaryDirectory() as d:
            state, extra = engine.state(Path(d) / "state.safetensors", extra)
        state.save(config.checkpoint, extra)
        log.info("checkpoint -> %s", config.checkpoint)

    def finished(row: int) -> None:  # a checkpoint every checkpoint_every x batch_size sentences
        count[0] += 1
        if every and count[0] % every == 0:
            checkpoint()

    if every and not config.resume:
        checkpoint()
    job.feed((r for r in corpus.records() if r.index not in done), len(corpus) - len(done), "stream", run,
             finished=finished)
    if every:
        checkpoint()  # the whole pass: a resume goes straight to refine
    with tempfile.TemporaryDirectory() as d:
        state = engine.state(Path(d) / "state.safetensors")[0]
    state.settings.update(tokens=totals["tokens"] + run.tokens, truncated=totals["truncated"] + run.truncated,
                          seconds=round(totals["seconds"] + run.seconds, 2))
    return state


class _Weights:
    """`same_weights` of a served model, as `load_checkpoint` asks a layout."""

    def __init__(self, engine: Served):
        self.record, self.device = engine.record, "cpu"

    def same_weights(self, recorded: dict) -> bool:
        r = self.record
        return same_weights(recorded, r["fingerprint"], lambda: r["signature"], r["dtype"])


def refine(engine: Served, tokenizer, corpus, state: StreamState, splits, config) -> Scores:
    """Exact scores at the short-list (`Shortlist`, the transformers path's rule): a table pass of
    its columns only; then the worker's state is dropped."""
    short = Shortlist.of(state, corpus, splits, k=config.k, by=config.selection()[0], bottom_k=config.bottom_k)
    values = labels = None
    if short.idx.numel():
        job = _Job(engine, tokenizer, config, list(corpus.label_names))
        table = job.table(corpus.records(), len(corpus), "refine", Run(), columns=short.idx)
        values, labels = table["values"], table["labels"]
    engine.rpc("end")
    return short.scores(values, labels, list(corpus.label_names))


def run(llm, tokenizer, job) -> tuple[Responses | None, StreamState | None, Scores]:
    """`steer.find_experts`' collection and scoring on a vLLM engine, for a checked and fitted
    `Plan` (`job`): (responses, state, scores), as the transformers path makes them."""
    from steer.core.corpus import Corpus

    engine, config, corpus = served(llm), job.config, job.corpus
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(llm)
    if job.mode == "exact":
        responses = collect(engine, tokenizer, corpus if isinstance(corpus, Corpus) else corpus.load(), config)
        return responses, None, responses.score(job.splits)
    if config.checkpoint is not None:
        Path(config.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    state = collect_stream(engine, tokenizer, corpus, config)
    return None, state, refine(engine, tokenizer, corpus, state, job.splits, config)


def _engine_info() -> dict:
    import vllm

    return {"name": "vllm", "version": vllm.__version__}
