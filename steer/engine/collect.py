"""Collection: every sentence's pooled response at every neuron, in one batched pass.

Exact mode (`collect`) keeps the full table of responses ([sentences, layers, width], fp32) so
that any positive/negative split can be scored afterwards without another forward pass.
Stream mode (`collect_stream`) keeps fixed-size per-label histograms instead (steer/core/stream.py);
`refine` then rescores exactly, in a second pass, the short-list of neurons that could still
enter the exact top-k, so the experts and their values equal exact mode's.

How a batch is run: sentences are tokenized, sorted by length, longest first (stable, so batches
depend only on the corpus, not on its order), cut into batches of at most `batch_size` sentences
and `max_tokens` padded tokens (`batches`; a sentence over the budget runs alone, and the
longest sentences run first, so a memory problem shows at once) and padded by `padding` (on the
tokenizer's side); progress bars count tokens. Position ids count real tokens only, so padding
on either side changes nothing. Only the base model runs (no LM head). The model's backend
(`steer.engine.backends`: hooks or the fused patch) pools each layer's neuron tensor over each
sentence's real tokens (`kernels/fused_mlp_ref.py::pool`): padding never counts, and the special
tokens the tokenizer adds are skipped unless asked not to (`steer.engine.batching`: one rule for
every forward pass). An active `intervene` overrides first, so responses are what the down
projection receives.

Scale (stream mode and refine). Sentences come from `corpus.records()`, an iterator (a
`CorpusFile` streams them from disk), and are bucketed by length within consecutive windows of
`window` sentences (`plan_batches`): memory is bounded by the window, the fixed-size state and
the model, whatever the corpus size. That batch order is deterministic, so a run can be
- checkpointed: every `checkpoint_every` batches the state and the position (batches done) are
  written atomically, with each window's number of batches; `resume=True` skips the batches
  done (whole windows without tokenizing) and refuses a checkpoint of another model, corpus or
  settings (batch_size, window and max_tokens included), naming what differs;
- distributed (steer/engine/distributed.py): rank r runs the batches i with i % world == r; rank 0
  calibrates and broadcasts the edges; states merge by all-reduce; refine gathers the
  short-list responses on rank 0.
Sentences longer than the model's context (or `max_length`) are truncated with a warning and
counted (`too_long="truncate"`), or refused (`too_long="error"`). Non-finite responses
(NaN / inf) are counted per neuron, never binned: such a neuron is scored NaN (it can never be
an expert) and `settings["nonfinite"]` reports it (`nonfinite_message`).
"""
from __future__ import annotations

import json
import logging
import random
import time
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from steer.core import artifacts
from steer.core.adapters import NeuronLayout, base_inputs, check_eval
from steer.core.corpus import Corpus, check_labels
from steer.core.metrics import check_k, score_splits
from steer.core.scores import COUNTS, Responses, Scores, score_state, shortlist_scores
from steer.core.stream import StreamState
from steer.core.token_stats import KINDS as TOKEN_STATS
from steer.core.token_stats import TokenStats, check_kinds
from steer.engine import steering
from steer.engine.batching import (
    MAX_TOKENS,
    WINDOW,
    Batch,
    batches,
    check_batching,
    input_device,
    pad,
    pad_batch,
    padding,
    plan_batches,
    token_limit,
    tokenize,
)
from steer.engine.distributed import Group, current

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1  # a checkpoint: a steer.stream file whose extra metadata has this format
CHECKPOINT_FORMAT = f"steer.checkpoint/{CHECKPOINT_VERSION}"


@dataclass
class Run:
    """What a collection pass reports once it is exhausted (tokens run, seconds, truncations)."""

    tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0
    truncated_keys: list = field(default_factory=list)

    def note_truncated(self, keys: list[str], lengths: list[int], limit: int) -> None:
        if keys and not self.truncated:
            warnings.warn(f"sentence {keys[0]!r} has {lengths[0]} tokens, more than the limit of "
                          f"{limit} (the model's context or max_length): truncated to {limit} "
                          "tokens; later truncations are counted in the run's settings "
                          "('truncated'). too_long='error' (--too-long error) refuses them instead",
                          stacklevel=4)
        self.truncated += len(keys)
        self.truncated_keys += keys[: max(0, 10 - len(self.truncated_keys))]


def check_stream(bins: int, calibration: int, checkpoint, checkpoint_every: int, resume: bool) -> None:
    """The streaming options `collect_stream` takes besides the batching ones (`check_batching`)."""
    if checkpoint is None and (checkpoint_every or resume):
        raise ValueError("checkpoint_every / resume need a checkpoint path")
    if calibration < 1 or bins < 4 or checkpoint_every < 0:
        raise ValueError(f"calibration ({calibration}) must be >= 1, bins ({bins}) >= 4 and "
                         f"checkpoint_every ({checkpoint_every}) >= 0")


class _Forward:
    """The base model over padded batches, returning pooled responses [B, L, M] fp32; with
    `stats` (LAPE's "activation", DiffMean's "residual"), `add_stats` adds the batch's token
    statistics, computed in the same forward, to a `TokenStats`.

    A context manager: entering finds the model's backend (`steer.engine.steering.use`: the attached one,
    or hooks / the fused patch added for the duration), leaving removes what it added.
    """

    def __init__(self, model: nn.Module, tokenizer, layout: NeuronLayout, pooling: str, backend: str,
                 stats: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.pooling, self.kind, self.stats = pooling, backend, tuple(stats)
        self.device = input_device(model)
        self.backend, self.owned = None, False
        self.batch_stats: dict[str, torch.Tensor] = {}  # the last batch's, [B, L, *]
        self.batch_tokens: torch.Tensor | None = None  # [B] pooled tokens of each row

    def __enter__(self) -> "_Forward":
        self.backend, self.owned = steering.use(self.model, self.kind)
        return self

    def __exit__(self, *exc) -> None:  # each call stops its own pooling
        if self.owned:
            self.backend.remove()

    def __call__(self, ids: list[list[int]], pooled: list[list[bool]]) -> torch.Tensor:
        (pad_id, side), dev = padding(self.tokenizer), self.device
        input_ids, mask = pad_batch(ids, pad_id, side, dev)  # [B, T]
        tokens = pad(pooled, False, side).to(dev)  # [B, T]
        out = self.backend.start_pooling(tokens, self.pooling, self.stats)  # [B, L, M]
        try:
            with torch.inference_mode():
                self.model.base_model(**base_inputs(self.model, input_ids, mask))
            self.batch_stats, self.batch_tokens = self.backend.stats, tokens.sum(1)
        finally:
            self.backend.stop_pooling()
        return out

    def add_stats(self, stats: TokenStats | None, label_ids: list[int]) -> None:
        """Add the last batch's token statistics to `stats` (None: not collected)."""
        if stats is not None:
            stats.update(self.batch_stats, self.batch_tokens, torch.tensor(label_ids))


def pooled_batches(model: nn.Module, tokenizer, texts: list[str], keys: list[str], layout: NeuronLayout, *,
                   pooling: str = "max", batch_size: int = 16, skip_special: bool = True,
                   max_length: int | None = None, backend: str = "hooks", progress: bool = True,
                   desc: str = "collect", run: Run | None = None, too_long: str = "truncate",
                   max_tokens: int | None = MAX_TOKENS, token_stats: TokenStats | None = None,
                   label_ids: list[int] | None = None):
    """Yield (rows, pooled [B, L, M] fp32 on the model's device) for the batches of `texts` planned
    by `batches` (at most batch_size sentences and max_tokens padded tokens, longest first; all
    of them tokenized up front: the exact mode's in-memory path). With `token_stats`, each
    batch's token statistics are added to it under the texts' `label_ids`."""
    check_batching(pooling, too_long, batch_size, max_tokens=max_tokens)
    if not texts:
        return
    run = run if run is not None else Run()
    limit = token_limit(model, max_length)
    long = []
    ids, pooled = tokenize(tokenizer, texts, keys, skip_special, limit, too_long, truncated=long)
    run.note_truncated([keys[i] for i, _ in long], [n for _, n in long], limit)
    bar = Progress(len(ids), desc, progress)
    bar.plan(len(ids), sum(map(len, ids)))
    start = time.perf_counter()
    try:
        kinds = token_stats.kinds if token_stats is not None else ()
        with _Forward(model, tokenizer, layout, pooling, backend, kinds) as forward:
            for rows in batches([len(t) for t in ids], batch_size, max_tokens):
                out = forward([ids[i] for i in rows], [pooled[i] for i in rows])
                if token_stats is not None:
                    forward.add_stats(token_stats, [label_ids[i] for i in rows])
                yield rows, out
                n = sum(len(ids[i]) for i in rows)
                run.tokens += n
                bar.update(len(rows), n)
    finally:
        bar.close()
        run.seconds += time.perf_counter() - start


def model_record(model, layout: NeuronLayout) -> dict:
    """What a collection records of its model (steer/vllm/discovery.py records vLLM's the same way)."""
    return {"model": getattr(model.config, "name_or_path", ""), "architecture": type(model).__name__,
            "fingerprint": layout.fingerprint(), "layers": layout.n_layers, "width": layout.width,
            "dtype": layout.dtype, "signature": layout.signature()}


def settings_of(record: dict, corpus, run: Run | None = None, **options) -> dict:
    """A collection's settings: its model's `record`, its options, corpus and run."""
    settings = {**record, **options, "corpus": corpus.description, "corpus_hash": corpus.hash(),
                "sentences": len(corpus)}
    if run is not None:
        settings.update(tokens=run.tokens, seconds=round(run.seconds, 2), truncated=run.truncated)
    return settings


def collect(model: nn.Module, tokenizer, corpus: Corpus, *, pooling: str = "max", batch_size: int = 16,
            skip_special: bool = True, max_length: int | None = None, neuron_module: str | None = None,
            backend: str = "hooks", progress: bool = True, too_long: str = "truncate",
            max_tokens: int | None = MAX_TOKENS, token_stats: tuple[str, ...] = ()) -> Responses:
    """Run `corpus` through the base model and return every sentence's pooled neuron responses.

    backend: "hooks" (reference pre-hooks) or "fused" (the fused MLP op, `steer.patch`).
    token_stats: any of "activation" (LAPE) and "residual" (DiffMean): per-label token sums
    collected in the same pass (`Responses.token_stats`, steer/core/token_stats.py).
    batch_size / max_tokens: at most that many sentences and padded tokens a batch (None: no
    token budget), longest first (`batches`); a longer sentence runs alone. Responses do not
    depend on them (up to fp rounding).
    too_long: sentences over the model's context (or max_length) are "truncate"d with a warning
    or an "error". One process (a distributed run uses `collect_stream`).
    """
    _check_corpus(model, corpus)
    if current().active:
        raise RuntimeError("exact collection runs in one process; under torch.distributed use "
                           "collect_stream (--mode stream)")
    if not isinstance(corpus, Corpus):
        corpus = corpus.load()
    layout = NeuronLayout(model, neuron_module)
    stats = _token_stats(layout, corpus.label_names, token_stats)
    values = torch.empty(len(corpus), layout.n_layers, layout.width)  # [N, L, M]
    run = Run()
    for rows, pooled in pooled_batches(model, tokenizer, corpus.texts, corpus.keys, layout, pooling=pooling,
                                       batch_size=batch_size, skip_special=skip_special, max_length=max_length,
                                       backend=backend, progress=progress, run=run, too_long=too_long,
                                       max_tokens=max_tokens, token_stats=stats, label_ids=corpus.label_ids.tolist()):
        values[rows] = pooled.cpu()
    settings = settings_of(model_record(model, layout), corpus, run, mode="exact", pooling=pooling,
                           skip_special=skip_special, backend=backend, max_length=max_length, too_long=too_long)
    return Responses(values, corpus.label_ids, list(corpus.label_names), list(corpus.keys), settings,
                     stats.to_("cpu") if stats is not None else None)


def collect_token_stats(model: nn.Module, tokenizer, corpus: Corpus, kinds: tuple[str, ...], *, batch_size: int = 16,
                        skip_special: bool = True, max_length: int | None = None, backend: str = "hooks",
                        progress: bool = True, too_long: str = "truncate",
                        max_tokens: int | None = MAX_TOKENS) -> TokenStats:
    """Only the token statistics of `collect(..., token_stats=kinds)` (LAPE's "activation", DiffMean's
    "residual"), on the model's device: the responses are dropped batch by batch."""
    _check_corpus(model, corpus)
    if not kinds:
        raise ValueError(f"collect_token_stats needs kinds: any of {TOKEN_STATS}")
    if not isinstance(corpus, Corpus):
        corpus = corpus.load()
    layout = NeuronLayout(model)
    stats = _token_stats(layout, corpus.label_names, kinds)
    for _ in pooled_batches(model, tokenizer, corpus.texts, corpus.keys, layout, batch_size=batch_size,
                            skip_special=skip_special, max_length=max_length, backend=backend, progress=progress,
                            desc="token statistics", too_long=too_long, max_tokens=max_tokens, token_stats=stats,
                            label_ids=corpus.label_ids.tolist()):
        pass
    return stats


def _check_token_stats(layout: NeuronLayout, kinds) -> tuple[str, ...]:
    """The token statistics asked for, in canonical order, checked before any forward."""
    kinds = check_kinds(kinds)
    if kinds and layout.adapter is None:
        layout.layer_parts(0)  # raises: the activation and the decoder layers need a declared adapter
    return kinds


def _check_corpus(model: nn.Module, corpus) -> None:
    """What every collection pass refuses before any forward: an empty corpus, a model in training
    mode, fewer than two labels."""
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    check_eval(model)
    check_labels(corpus)


def _token_stats(layout: NeuronLayout, label_names, kinds) -> TokenStats | None:
    """An empty `TokenStats` of `kinds` for this model (None for no kinds)."""
    kinds = _check_token_stats(layout, kinds)
    return TokenStats(label_names, kinds, layout.n_layers, layout.width, layout.hidden, layout.device) if kinds else None


def calibration_sample(n: int, k: int, seed: int = 0) -> list[int]:
    """k distinct indices of range(n) (all of them when k >= n), sorted, drawn with a seeded
    `random.Random` by Floyd's algorithm: O(k) memory, whatever n."""
    if k >= n:
        return list(range(n))
    rng = random.Random(seed)
    chosen: set[int] = set()
    for j in range(n - k, n):
        t = rng.randint(0, j)
        chosen.add(j if t in chosen else t)
    return sorted(chosen)


class Progress:
    """A bar over tokens (tqdm: tok/s and ETA; sentences run in the postfix), shown by rank 0 only.

    Tokens, not sentences, so a batch of long sentences advances the bar by its share of the
    work. The total (this pass's work: `sentences`, less those a resumed run skips) is exact
    once every window is tokenized (`plan`); before, the sentences not yet tokenized count at
    the mean length of those that were."""

    def __init__(self, sentences: int, desc: str, enabled: bool):
        self.bar = tqdm(total=None, unit="tok", desc=desc, disable=not enabled, unit_scale=True,
                        dynamic_ncols=True)
        self.sentences, self.run = sentences, 0
        self.planned_sentences = self.planned_tokens = 0

    def plan(self, sentences: int, tokens: int | None, skipped: int = 0) -> None:
        """`sentences` to run were tokenized into `tokens` (None: not tokenized); `skipped`
        sentences will not run in this pass."""
        self.sentences -= skipped
        if tokens is None:
            return
        self.planned_sentences += sentences
        self.planned_tokens += tokens
        rest = max(self.sentences - self.planned_sentences, 0)
        estimate = self.planned_tokens + round(rest * self.planned_tokens / max(self.planned_sentences, 1))
        self.bar.total = max(estimate, self.bar.n)
        self.bar.refresh()

    def window(self, w: int, batches: int, sentences: int, tokens: int | None, skipped: int) -> None:
        """`plan_batches`' on_window callback."""
        self.plan(sentences, tokens, skipped)

    def update(self, sentences: int, tokens: int) -> None:
        self.run += sentences
        self.bar.set_postfix_str(f"{self.run:,} sentences", refresh=False)
        self.bar.update(tokens)

    def close(self) -> None:
        self.bar.close()


# not compared as settings on resume: they may differ, or (fingerprint, signature) `same_weights` decides
VOLATILE = ("model", "corpus", "tokens", "seconds", "truncated", "fingerprint", "signature")


def _mismatch(path, saved: dict, now: dict, saved_plan: dict, plan: dict, same_weights: bool) -> str | None:
    """Why a checkpoint cannot be resumed with these settings (None: it can). `same_weights`:
    `NeuronLayout.same_weights(saved)`, which ignores the load dtype (another dtype is one of the
    other settings, "dtype")."""
    if saved.get("architecture") != now.get("architecture") or not same_weights:
        return (f"checkpoint {path} is from another model: fingerprint {saved.get('fingerprint')} "
                f"({saved.get('architecture')}, model {saved.get('model')!r}), this model has "
                f"{now.get('fingerprint')} ({now.get('architecture')}, model {now.get('model')!r})")
    if saved.get("corpus_hash") != now.get("corpus_hash"):
        return (f"checkpoint {path} is from another corpus: hash {str(saved.get('corpus_hash'))[:16]}... "
                f"({saved.get('sentences')} sentences, {(saved.get('corpus') or {}).get('source')}), "
                f"this corpus has {str(now.get('corpus_hash'))[:16]}... ({now.get('sentences')} "
                f"sentences, {(now.get('corpus') or {}).get('source')})")
    old = {**{k: v for k, v in saved.items() if k not in VOLATILE}, **saved_plan}
    new = {**{k: v for k, v in now.items() if k not in VOLATILE}, **plan}
    diff = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        return f"checkpoint {path} was written with other settings: " + "; ".join(diff)
    return None


def load_checkpoint(path, layout: NeuronLayout, settings: dict, plan: dict, label_names: list[str]):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume at {path}")
    state, extra = StreamState.load(path, layout.device, with_extra=True)  # refuses corrupt / newer files
    kind, _, number = str(extra.get("format", "")).rpartition("/")
    if kind != "steer.checkpoint":
        raise ValueError(f"{path} is a streaming state, not a checkpoint (no corpus position)")
    if not number.isdigit() or int(number) > CHECKPOINT_VERSION:
        raise artifacts.newer(path, kind, number, CHECKPOINT_VERSION)
    why = _mismatch(path, state.settings, json.loads(json.dumps(settings)), extra.get("plan", {}), plan,
                    layout.same_weights(state.settings))
    if why is None and state.label_names != list(label_names):
        why = f"checkpoint {path} has labels {state.label_names}, this corpus {list(label_names)}"
    if why:
        raise ValueError(why + "; refusing to resume (start afresh without --resume, or use "
                         "another --out)")
    return state, extra


def collect_stream(model: nn.Module, tokenizer, corpus, *, bins: int = 64, calibration: int = 1000,
                   seed: int = 0, pooling: str = "max", batch_size: int = 16, skip_special: bool = True,
                   max_length: int | None = None, neuron_module: str | None = None, backend: str = "hooks",
                   progress: bool = True, window: int = WINDOW, too_long: str = "truncate",
                   checkpoint: str | Path | None = None, checkpoint_every: int = 0,
                   resume: bool = False, group: Group | None = None,
                   max_tokens: int | None = MAX_TOKENS, token_stats: tuple[str, ...] = ()) -> StreamState:
    """Fixed-memory statistics of every neuron (`StreamState`, steer/core/stream.py) in one pass.

    A seeded random sample of `calibration` sentences runs first: its responses fix every
    neuron's bin edges and are then counted like the rest, so no sentence runs twice. The rest
    streams through `plan_batches` (windows of `window` sentences bucketed by length, batches of
    at most `batch_size` sentences and `max_tokens` padded tokens, None: no token budget).
    corpus: a `Corpus` or a `CorpusFile` (anything with records(), label_names, hash(), len).
    token_stats: any of "activation" (LAPE) and "residual" (DiffMean): per-label token sums in
    the same pass (`StreamState.token_stats`), checkpointed and merged across ranks with it.

    checkpoint / checkpoint_every: every `checkpoint_every` batches (per rank), and after the
    calibration and at the end, the state and the position are written atomically to
    `checkpoint`; resume=True continues from it (refused, with the reason, when the model,
    corpus or settings differ). group: a `steer.engine.distributed.Group` (default: the initialised
    torch.distributed group, else one process); every rank returns the merged state.
    """
    group = group or current()
    _check_corpus(model, corpus)
    check_batching(pooling, too_long, batch_size, window, max_tokens)
    check_stream(bins, calibration, checkpoint, checkpoint_every, resume)
    layout = NeuronLayout(model, neuron_module)
    kinds = _check_token_stats(layout, token_stats)
    cal = calibration_sample(len(corpus), calibration, seed)
    settings = settings_of(model_record(model, layout), corpus, mode="stream", bins=bins, calibration=len(cal),
                           seed=seed, pooling=pooling, skip_special=skip_special, max_length=max_length,
                           too_long=too_long, **({"token_stats": list(kinds), "hidden": layout.hidden} if kinds else {}))
    batching = {"batch_size": batch_size, "max_tokens": max_tokens, "skip_special": skip_special,
                "limit": token_limit(model, max_length), "too_long": too_long}
    run = _StreamPass(group, checkpoint, {"batch_size": batch_size, "window": window, "max_tokens": max_tokens},
                      show=progress and group.is_main)
    with _Forward(model, tokenizer, layout, pooling, backend, kinds) as forward:
        run.begin(forward, tokenizer, corpus, cal, bins, settings, resume, batching)
        if checkpoint_every and not resume:
            run.checkpoint(0)
        cal_set = set(cal)
        rest = (r for r in corpus.records() if r.index not in cal_set)
        run.stream(forward, tokenizer, rest, len(corpus) - len(cal), window, checkpoint_every, batching)
    return run.finish(checkpointing=bool(checkpoint_every))


class _StreamPass:
    """One streaming pass across ranks: the state, the batches done (`position`), this rank's
    tokens and truncations since the last checkpoint (`delta`), the totals (rank 0) and the
    checkpoints. Rank 0 resumes or calibrates and broadcasts the edges; every `checkpoint`
    merges the states onto rank 0, which writes them with the position atomically."""

    def __init__(self, group: Group, path, plan: dict, show: bool):
        self.group, self.path, self.plan, self.show = group, path, plan, show
        self.state: StreamState | None = None
        self.windows: list[int] = []  # batches of each window of the rest: a resume skips windows untokenized
        self.delta = Run()
        self.totals = {"tokens": 0, "truncated": 0, "seconds": 0.0}
        self.position = self.saved = 0
        self.start = time.perf_counter()

    def _counts(self) -> torch.Tensor:
        """This rank's tokens and truncations since the last call, summed over the ranks."""
        counts = torch.tensor([self.delta.tokens, self.delta.truncated], dtype=torch.int64)
        self.delta.tokens = self.delta.truncated = 0
        return self.group.all_reduce_sum(counts)

    def begin(self, forward: _Forward, tokenizer, corpus, cal: list[int], bins: int, settings: dict,
              resume: bool, batching: dict) -> None:
        """The state every rank starts from: rank 0 resumes or calibrates, the others wait for
        its edges (or its error)."""
        group, label_names = self.group, list(corpus.label_names)
        device = forward.layout.device
        state, extra, error = None, {"position": 0}, None
        if group.is_main:
            try:
                if resume:
                    state, extra = load_checkpoint(self.path, forward.layout, settings, self.plan, label_names)
                else:
                    state = _calibrate(forward, tokenizer, corpus, cal, bins, label_names, settings,
                                       run=self.delta, progress=self.show, **batching)
            except Exception as e:  # raised on every rank below
                error = e
        error = group.broadcast_object(error)
        if error is not None:
            raise error
        edges = torch.empty(forward.layout.n_neurons, bins - 1, device=device)
        edges = group.broadcast_tensor(state.edges if group.is_main else edges)
        self.state = state if group.is_main else StreamState(edges, label_names, settings)
        extra = group.broadcast_object(extra)
        self.position = self.saved = int(extra["position"])
        self.windows[:] = extra.get("windows") or []
        if resume:
            self.totals.update(tokens=extra["tokens"], truncated=extra["truncated"], seconds=extra["seconds"])
            if group.is_main:
                log.info("resume: %d batches done in %s", self.position, self.path)

    def stream(self, forward: _Forward, tokenizer, records, sentences: int, window: int, checkpoint_every: int,
               batching: dict) -> None:
        """Count this rank's batches of `records` (from `position` on), checkpointing every
        `checkpoint_every` batches per rank."""
        bar = Progress(sentences, "stream", self.show)
        every = checkpoint_every * self.group.world

        def planned(w: int, n_batches: int, *sizes) -> None:
            if w == len(self.windows):
                self.windows.append(n_batches)
            bar.window(w, n_batches, *sizes)

        for b in plan_batches(records, tokenizer, window=window, skip=self.position, known=list(self.windows),
                              on_window=planned, **batching):
            if self.group.owns(b.index):
                self.state.update(forward(b.ids, b.pooled).flatten(1), torch.tensor(b.labels))
                forward.add_stats(self.state.token_stats, b.labels)
                self.delta.tokens += b.tokens
                note_batch(self.delta, b, batching["limit"])
            bar.update(len(b.rows), b.tokens)
            self.position = b.index + 1
            if every and self.position % every == 0:
                self.checkpoint(self.position)
        bar.close()

    def checkpoint(self, position: int) -> None:
        """Merge the states onto rank 0 and write them with `position` (batches done)."""
        self.group.reduce_state(self.state)
        counts = self._counts()
        self.totals["tokens"] += int(counts[0])
        self.totals["truncated"] += int(counts[1])
        error = None
        if self.group.is_main:
            extra = {"format": CHECKPOINT_FORMAT, "position": position, "plan": self.plan,
                     "tokens": self.totals["tokens"], "truncated": self.totals["truncated"],
                     "seconds": round(self.totals["seconds"] + time.perf_counter() - self.start, 2),
                     "world": self.group.world, "windows": list(self.windows)}
            try:
                self.state.save(self.path, extra)
            except Exception as e:  # tell the other ranks, then fail everywhere
                error = f"could not write the checkpoint {self.path}: {e}"
            else:
                log.info("checkpoint: %d batches done -> %s", position, self.path)
        error = self.group.broadcast_object(error)
        if error:
            raise RuntimeError(error)
        self.saved = position

    def finish(self, checkpointing: bool) -> StreamState:
        """The merged state on every rank, with the pass's tokens, seconds and truncations."""
        if checkpointing and self.saved != self.position:
            self.checkpoint(self.position)  # the whole pass: a resume goes straight to refine
        self.group.all_reduce_state(self.state)
        counts = self._counts()
        seconds = self.totals["seconds"] + time.perf_counter() - self.start
        self.state.settings.update(tokens=self.totals["tokens"] + int(counts[0]), seconds=round(seconds, 2),
                                   truncated=self.totals["truncated"] + int(counts[1]))
        return self.state


def _calibrate(forward: _Forward, tokenizer, corpus, cal: list[int], bins: int, label_names, settings,
               *, batch_size, max_tokens, skip_special, limit, too_long, run: Run,
               progress: bool) -> StreamState:
    """A state whose edges come from the responses of the calibration sentences `cal` (sorted
    corpus indices), which it then counts. Reads the corpus only up to the last of them."""
    wanted = set(cal)
    records = [r for r in islice(corpus.records(), cal[-1] + 1) if r.index in wanted]
    where = {r.index: j for j, r in enumerate(records)}
    sample = torch.empty(len(records), forward.layout.n_neurons, device=forward.layout.device)  # [S, L*M]
    stats = _token_stats(forward.layout, label_names, forward.stats)
    bar = Progress(len(records), "calibrate", progress)
    for b in plan_batches(records, tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                          window=len(records), skip_special=skip_special, limit=limit,
                          too_long=too_long, on_window=bar.window):
        sample[[where[i] for i in b.rows]] = forward(b.ids, b.pooled).flatten(1)
        forward.add_stats(stats, b.labels)
        run.tokens += b.tokens
        note_batch(run, b, limit)
        bar.update(len(b.rows), b.tokens)
    bar.close()
    return StreamState.from_sample(sample, torch.tensor([r.label for r in records]), bins, label_names, settings, stats)


def note_batch(run: Run, batch: Batch, limit) -> None:
    """Count (and warn once about) the truncated sentences of a batch this rank ran."""
    if batch.truncated:
        run.note_truncated([k for k, _ in batch.truncated], [n for _, n in batch.truncated], limit)


def refine(model: nn.Module, tokenizer, corpus, state: StreamState | None, splits=None, *, k: int = 100,
           by: str | tuple[str, ...] = "ap", bottom_k: int = 0, progress: bool = True,
           group: Group | None = None, **forward) -> Scores | None:
    """Exact scores for every neuron that could still enter the exact top-k (or bottom-k).

    From the histogram scores and their certificates, `shortlist` keeps each split's candidates;
    a second pass stores only their responses and scores them exactly (`by` may name both scores). The returned table holds
    exact statistics for the short-list and histogram ones elsewhere, so `select_experts` on it
    returns exactly the exact mode's experts and forcing values.

    Distributed: rank 0 (which needs `state`; other ranks may pass None) picks the short-list
    and broadcasts it, every rank runs its share of the batches, the responses are gathered on
    rank 0, which returns the scores; the other ranks return None.
    forward: batch_size, max_tokens (default MAX_TOKENS; None: no token budget), backend,
    neuron_module, window (default: as collected); the scores do not depend on the batches.
    """
    group = group or current()
    check_eval(model)
    check_k(k, "k")
    check_k(bottom_k, "bottom_k", allow_zero=True)
    short = error = None
    if group.is_main:
        try:
            short = Shortlist.of(state, corpus, splits, k=k, by=by, bottom_k=bottom_k)
        except Exception as e:
            error = e
    error = group.broadcast_object(error)
    if error is not None:
        raise error
    idx = group.broadcast_object(None if short is None else short.idx)
    settings = group.broadcast_object(None if state is None else
                                      {key: state.settings.get(key) for key in
                                       ("pooling", "skip_special", "max_length", "too_long", "window")})
    values, label_ids = _shortlist_responses(model, tokenizer, corpus, idx, settings, group, progress, **forward)
    if not group.is_main:
        return None
    return short.scores(values, label_ids, list(corpus.label_names))


@dataclass
class Shortlist:
    """refine's plan: the histogram scores of a state (`hist`), the flat indices of the neurons
    that could still enter an exact top-k (`idx`) and their number per split (`sizes`); `scores`
    merges their exact responses in. Every engine's refine goes through it."""

    hist: Scores
    idx: torch.Tensor
    sizes: list
    shape: tuple[int, int]

    @classmethod
    def of(cls, state: StreamState, corpus, splits, *, k: int, by, bottom_k: int) -> "Shortlist":
        if corpus.hash() != state.settings.get("corpus_hash"):
            raise ValueError("refine needs the corpus the state was collected on (corpus hash differs)")
        hist = score_state(state, splits)
        idx, sizes = shortlist_scores(hist, k=k, by=by, bottom_k=bottom_k)
        log.info("refine: short-list of %s neurons of %s (per split: %s); second pass stores only their "
                 "responses", f"{idx.numel():,}", f"{state.edges.shape[0]:,}", sizes)
        return cls(hist, idx, sizes, (state.settings["layers"], state.settings["width"]))

    def scores(self, values: torch.Tensor | None, label_ids: torch.Tensor | None, label_names: list[str]) -> Scores:
        """The histogram scores with exact ones at the short-list, from its responses values [N, K]
        and the sentences' label ids [N] (None for an empty short-list)."""
        hist, idx = self.hist, self.idx
        flat = hist.flat()  # [S, L*M] views of hist's tensors, updated in place
        if idx.numel():
            exact = score_splits(values, label_ids, [s.label_ids(label_names) for s in hist.splits],
                                 names=[s.name for s in hist.splits])
            for key, v in exact.items():
                if key in COUNTS:
                    flat[key] = v
                else:
                    flat[key][:, idx] = v
            for key in ("ap_bound", "auroc_bound"):
                flat[key][:, idx] = 0.0
        out = {**hist.settings, "shortlist": self.sizes, "refined_neurons": int(idx.numel())}
        return Scores.from_flat(flat, hist.splits, out, self.shape)


def _shortlist_responses(model: nn.Module, tokenizer, corpus, idx: torch.Tensor, settings: dict, group: Group,
                         progress: bool, **forward) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """refine's second pass: the responses [N, K] of the flat neuron indices `idx` [K] and the
    label ids [N], on rank 0 (None elsewhere, and for an empty short-list), with the pooling and
    truncation the state was collected with. forward: see `refine`."""
    layout = NeuronLayout(model, forward.pop("neuron_module", None))
    batch_size = forward.pop("batch_size", 16)
    backend = forward.pop("backend", "hooks")
    window = forward.pop("window", None) or settings.get("window") or WINDOW
    max_tokens = forward.pop("max_tokens", MAX_TOKENS)
    if forward:
        raise TypeError(f"refine got unexpected options {sorted(forward)}")
    K, N = int(idx.numel()), len(corpus)
    if not K:
        return None, None
    # one process fills [N, K] in place; ranks keep their rows, gathered on rank 0
    label_ids = torch.empty(N, dtype=torch.int64) if group.is_main else None
    values = torch.empty(N, K) if not group.active else None
    rows, parts = [], []
    dev_idx = idx.to(layout.device)
    bar = Progress(N, "refine", progress and group.is_main)
    with _Forward(model, tokenizer, layout, settings["pooling"], backend) as fwd:
        for b in plan_batches(corpus.records(), tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                              window=window, skip_special=settings["skip_special"],
                              limit=token_limit(model, settings.get("max_length")),
                              too_long=settings.get("too_long") or "truncate", on_window=bar.window):
            if group.is_main:
                label_ids[b.rows] = torch.tensor(b.labels)
            if group.owns(b.index):
                part = fwd(b.ids, b.pooled).flatten(1)[:, dev_idx].cpu()  # [B, K]
                if values is not None:
                    values[b.rows] = part
                else:
                    rows.append(torch.tensor(b.rows))
                    parts.append(part)
            bar.update(len(b.rows), b.tokens)
    bar.close()
    if group.active:
        local_rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
        local_vals = torch.cat(parts) if parts else torch.empty(0, K)
        del rows, parts
        values = group.gather_rows(local_rows, local_vals, N)  # [N, K] on rank 0
    return values, label_ids
