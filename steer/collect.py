"""Collection: every sentence's pooled response at every neuron, in one batched pass.

Exact mode (`collect`) keeps the full table of responses ([sentences, layers, width], fp32) so
that any positive/negative split can be scored afterwards without another forward pass.
Stream mode (`collect_stream`) keeps fixed-size per-label histograms instead (steer/stream.py);
`refine` then rescores exactly, in a second pass, the short-list of neurons that could still
enter the exact top-k, so the experts and their values equal exact mode's.

How a batch is run: sentences are tokenized, sorted by length, longest first (stable, so batches
depend only on the corpus, not on its order), cut into batches of at most `batch_size` sentences
and `max_tokens` padded tokens (`batches`; a sentence over the budget runs alone, and the
longest sentences run first, so a memory problem shows at once) and padded on the tokenizer's
side; progress bars count tokens. Position ids count real tokens only, so padding on either side
changes nothing. Only the base model runs (no LM head). The model's backend (`steer.backends`:
hooks or the fused patch) pools each layer's neuron tensor over each sentence's real tokens
(`kernels/fused_mlp_ref.py::pool`): padding never counts, and BOS/special tokens are skipped
unless asked not to. An active `intervene` overrides first, so responses are what the down
projection receives.

Scale (stream mode and refine). Sentences come from `corpus.records()`, an iterator (a
`CorpusFile` streams them from disk), and are bucketed by length within consecutive windows of
`window` sentences (`plan_batches`): memory is bounded by the window, the fixed-size state and
the model, whatever the corpus size. That batch order is deterministic, so a run can be
- checkpointed: every `checkpoint_every` batches the state and the position (batches done) are
  written atomically, with each window's number of batches; `resume=True` skips the batches
  done (whole windows without tokenizing) and refuses a checkpoint of another model, corpus or
  settings (batch_size, window and max_tokens included), naming what differs;
- distributed (steer/distributed.py): rank r runs the batches i with i % world == r; rank 0
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
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, backends
from .adapters import NeuronSites, base_inputs, check_eval
from .corpus import Corpus, Record, check_labels
from .distributed import Group, current
from .metrics import check_k, score_splits
from .runtime import dtype_name
from .stream import StreamState, calibrate_edges, shortlist

log = logging.getLogger(__name__)
POOLINGS = ("max", "mean")
TOO_LONG = ("truncate", "error")
WINDOW = 4096
# padded tokens per batch (sentences x the longest one's length): batches of 16 sentences of up to
# 512 tokens are bounded by the sentence count alone; a longer sentence shrinks its batch and one
# of 4,097 tokens or more runs alone, so a batch's activations stay those of 8,192 tokens
MAX_TOKENS = 8192
CHECKPOINT_VERSION = 1  # a checkpoint: a steer.stream file whose extra metadata has this format
CHECKPOINT_FORMAT = f"steer.checkpoint/{CHECKPOINT_VERSION}"
RESPONSES_VERSION = 1  # steer.responses files (artifacts.py); unversioned older ones are read


def tokenize(tokenizer, texts: list[str], keys: list[str], skip_special: bool, limit: int | None = None,
             too_long: str = "truncate", truncated: list | None = None):
    """Token ids and the mask of pooled tokens of each text (lists, unpadded): the one tokenizing
    function of collection (exact and stream) and of the benchmarks' baselines.

    A text over `limit` tokens (the model's context or max_length; None: no limit) is truncated
    to `limit` (too_long='truncate'; when `truncated` is a list, (position, tokens before
    truncation) is appended to it), or refused with a ValueError naming it (too_long='error')."""
    enc = tokenizer(list(texts), add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    long = [] if limit is None else [(i, len(t)) for i, t in enumerate(ids) if len(t) > limit]
    if long and too_long == "error":
        i, n = long[0]
        raise ValueError(f"sentence {keys[i]!r} has {n} tokens, more than the limit of {limit} "
                         "(the model's context or max_length); too_long='truncate' "
                         "(--too-long truncate) cuts such sentences with a warning")
    if long:
        cut = tokenizer([texts[i] for i, _ in long], add_special_tokens=True,
                        return_special_tokens_mask=True, truncation=True, max_length=limit)
        for j, (i, _) in enumerate(long):
            ids[i], special[i] = cut["input_ids"][j], cut["special_tokens_mask"][j]
        if truncated is not None:
            truncated += long
    pooled = []
    for i, (t, s) in enumerate(zip(ids, special)):
        keep = [not x for x in s] if skip_special else [True] * len(t)
        if not any(keep):
            raise ValueError(f"sentence {keys[i]!r} has no token to pool ({texts[i]!r})")
        pooled.append(keep)
    return ids, pooled


def batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """The batch plan: sentence indices sorted by (descending length, index), so the longest
    sentences run first (a memory problem shows at once) and the plan depends only on the
    lengths, then cut into batches of at most `batch_size` sentences and `max_tokens` padded tokens
    (sentences x the longest one's length; None: no budget). A sentence longer than the budget
    runs alone. Every batching of steer (collect, collect_stream, refine, embed) and of the
    benchmarks' baselines is this one."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan, start = [], 0
    while start < len(order):
        fit = batch_size if max_tokens is None else max(1, max_tokens // max(lengths[order[start]], 1))
        plan.append(order[start:start + min(batch_size, fit)])
        start += len(plan[-1])
    return plan


def pad(rows: list[list], value, side: str = "right") -> torch.Tensor:
    width = max(len(r) for r in rows)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([r + f if side == "right" else f + r for r, f in zip(rows, fill)])


def _nonfinite_info(counts: torch.Tensor, width: int, top: int = 10) -> dict:
    """Summary of per-neuron non-finite response counts [L*M] (JSON-able)."""
    counts = counts.flatten().to(torch.int64).cpu()
    bad = torch.nonzero(counts).squeeze(1)
    worst = bad[torch.argsort(counts[bad], descending=True, stable=True)][:top].tolist()
    return {"responses": int(counts.sum()), "neurons": int(bad.numel()),
            "worst": [[i // width, i % width, int(counts[i])] for i in worst]}


def nonfinite_message(settings: dict) -> str | None:
    """One line about non-finite (NaN / inf) responses, or None when there were none."""
    info = settings.get("nonfinite") or {}
    if not info.get("neurons"):
        return None
    cells = ", ".join(f"L{l}/{u} ({c:,})" for l, u, c in info["worst"])
    more = ", ..." if info["neurons"] > len(info["worst"]) else ""
    return (f"Non-finite responses (NaN/inf): {info['responses']:,} in {info['neurons']:,} "
            f"neurons, never binned; those neurons are scored NaN and cannot be experts: "
            f"{cells}{more}")


def _mask_nonfinite(stats: dict, bad: torch.Tensor) -> None:
    """Scores of neurons with non-finite responses ([L*M] bool `bad`) set to NaN, in place."""
    if not bool(bad.any()):
        return
    for key, v in stats.items():
        if v.dim() >= 2 and v.is_floating_point():
            v.view(v.shape[0], -1)[:, bad.to(v.device)] = math.nan


@dataclass
class Responses:
    """Pooled responses of every sentence at every neuron, with the labels that split them."""

    values: torch.Tensor  # [N, L, M] fp32
    label_ids: torch.Tensor  # [N] int64 into label_names
    label_names: list[str]
    keys: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    def score(self, splits=None) -> "Scores":
        """AP, AUROC and response statistics of every neuron for each split (default: one-vs-rest).

        A neuron with a non-finite response is scored NaN (with a warning) and reported in
        `settings["nonfinite"]`."""
        splits = [Split.one_vs_rest(c) for c in self.label_names] if splits is None else splits
        ids = [s.label_ids(self.label_names) for s in splits]
        flat = self.values.reshape(len(self.values), -1)  # [N, L*M]
        counts = (~torch.isfinite(flat)).sum(0)  # [L*M]
        bad = counts > 0
        layers, width = self.shape
        settings = dict(self.settings, nonfinite=_nonfinite_info(counts, width))
        if bool(bad.any()):
            warnings.warn(nonfinite_message(settings), stacklevel=2)
            flat = torch.where(torch.isfinite(flat), flat, 0.0)  # a copy; scored NaN below
        stats = score_splits(flat, self.label_ids, ids, names=[s.name for s in splits])
        _mask_nonfinite(stats, bad)
        stats = {k: v.reshape(len(splits), layers, width) if v.dim() == 2 else v for k, v in stats.items()}
        return Scores(stats, splits, settings)

    def save(self, path) -> None:
        """Write atomically as a steer.responses file (steer/artifacts.py: safetensors, format
        version, sha256); label names, keys and settings go to its metadata."""
        meta = {"label_names": self.label_names, "keys": self.keys, "settings": self.settings}
        artifacts.save(path, {"values": self.values, "label_ids": self.label_ids}, meta,
                       kind="responses", version=RESPONSES_VERSION)

    @classmethod
    def load(cls, path, *, shape: tuple[int, int] | None = None) -> "Responses":
        """Read a file written by `save` (or an unversioned one of steer before artifacts.py).
        A file that is not responses, is corrupt or truncated, was written by a newer steer, or
        (given `shape` = (layers, width)) is of another shape raises ValueError naming it."""
        head = artifacts.header(path)
        if "format" not in head and "steer" in head:  # unversioned, without a hash
            t = artifacts.read_tensors(path)
            try:
                meta = json.loads(head["steer"])
            except ValueError as e:
                raise ValueError(f"{path} is corrupt: unreadable metadata ({e})") from None
        else:
            t, meta = artifacts.load(path, kind="responses", version=RESPONSES_VERSION)[:2]
        artifacts.check_shapes(path, t, {"values": (None, *(shape or (None, None)))})
        n = t["values"].shape[0]
        artifacts.check_shapes(path, t, {"label_ids": (n,)})
        missing = [k for k in ("label_names", "keys", "settings") if k not in meta]
        ids = t["label_ids"]
        if missing or len(meta["keys"]) != n or (n and not 0 <= int(ids.min()) <= int(ids.max()) < len(meta["label_names"])):
            raise ValueError(f"{path} is not a valid responses file ({n} sentences; metadata "
                             f"missing {missing} or keys / label ids that do not match)")
        return cls(t["values"], ids, meta["label_names"], meta["keys"], meta["settings"])


@dataclass(frozen=True)
class Split:
    """Positive labels against negative labels (None: every other label)."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None = None

    @classmethod
    def one_vs_rest(cls, label: str) -> "Split":
        return cls(label, (label,))

    def label_ids(self, names: list[str]):
        unknown = [c for c in self.positive + (self.negative or ()) if c not in names]
        if unknown:
            raise ValueError(f"split {self.name!r} names labels {unknown} absent from the corpus ({names})")
        neg = None if self.negative is None else [names.index(c) for c in self.negative]
        return [names.index(c) for c in self.positive], neg

    def to_json(self) -> dict:
        return {"name": self.name, "positive": list(self.positive),
                "negative": None if self.negative is None else list(self.negative)}


@dataclass
class Scores:
    """Per-split statistics of every neuron: `stats[name]` is [S, L, M] (n_pos / n_neg: [S])."""

    stats: dict[str, torch.Tensor]
    splits: list[Split]
    settings: dict

    def index(self, name: str) -> int:
        names = [s.name for s in self.splits]
        if name not in names:
            raise KeyError(f"no split named {name!r}; splits: {names}")
        return names.index(name)



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


def context_length(model: nn.Module) -> int | None:
    """Positions the model can attend to (None when unbounded, e.g. BLOOM's ALiBi)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_limit(model: nn.Module, max_length: int | None) -> int | None:
    """The most tokens a sentence may have: max_length if given (at most the context), else the
    model's context."""
    context = context_length(model)
    if max_length is None:
        return context
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {context} tokens")
    return max_length


def check_batching(pooling: str, too_long: str, batch_size: int, window: int = WINDOW,
                   max_tokens: int | None = None) -> None:
    """The batching options of every collection pass."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; choose one of {POOLINGS}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}; choose one of {TOO_LONG}")
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size ({batch_size}) and window ({window}) must be >= 1")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens ({max_tokens!r}) must be an int >= 1, or None (no token budget)")


def check_stream(bins: int, calibration: int, checkpoint, checkpoint_every: int, resume: bool) -> None:
    """The streaming options `collect_stream` takes besides the batching ones (`check_batching`)."""
    if checkpoint is None and (checkpoint_every or resume):
        raise ValueError("checkpoint_every / resume need a checkpoint path")
    if calibration < 1 or bins < 4 or checkpoint_every < 0:
        raise ValueError(f"calibration ({calibration}) must be >= 1, bins ({bins}) >= 4 and "
                         f"checkpoint_every ({checkpoint_every}) >= 0")


def _input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (also right under a HF device_map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


class _Forward:
    """The base model over padded batches, returning pooled responses [B, L, M] fp32.

    A context manager: entering finds the model's backend (`steer.backends.use`: the attached one,
    or hooks / the fused patch added for the duration), leaving removes what it added.
    """

    def __init__(self, model: nn.Module, tokenizer, sites: NeuronSites, pooling: str, backend: str):
        self.model, self.tokenizer, self.sites = model, tokenizer, sites
        self.pooling, self.kind = pooling, backend
        self.device = _input_device(model)
        self.backend, self.owned = None, False

    def __enter__(self) -> "_Forward":
        self.backend, self.owned = backends.use(self.model, self.kind)
        return self

    def __exit__(self, *exc) -> None:  # each call stops its own pooling
        if self.owned:
            self.backend.remove()

    def __call__(self, ids: list[list[int]], pooled: list[list[bool]]) -> torch.Tensor:
        side, dev = self.tokenizer.padding_side, self.device
        input_ids = pad(ids, self.tokenizer.pad_token_id or 0, side).to(dev)  # [B, T]
        mask = pad([[1] * len(t) for t in ids], 0, side).to(dev)  # [B, T]
        out = self.backend.start_pooling(pad(pooled, False, side).to(dev), self.pooling)  # [B, L, M]
        try:
            with torch.inference_mode():
                self.model.base_model(**base_inputs(self.model, input_ids, mask))
        finally:
            self.backend.stop_pooling()
        return out


def pooled_batches(model: nn.Module, tokenizer, texts: list[str], keys: list[str], sites: NeuronSites, *,
                   pooling: str = "max", batch_size: int = 16, skip_special: bool = True,
                   max_length: int | None = None, backend: str = "hooks", progress: bool = True,
                   desc: str = "collect", run: Run | None = None, too_long: str = "truncate",
                   max_tokens: int | None = MAX_TOKENS):
    """Yield (rows, pooled [B, L, M] fp32 on the model's device) for the batches of `texts` planned
    by `batches` (at most batch_size sentences and max_tokens padded tokens, longest first; all
    of them tokenized up front: the exact mode's in-memory path)."""
    check_batching(pooling, too_long, batch_size, max_tokens=max_tokens)
    if not texts:
        return
    run = run if run is not None else Run()
    limit = token_limit(model, max_length)
    long = []
    ids, pooled = tokenize(tokenizer, texts, keys, skip_special, limit, too_long, truncated=long)
    run.note_truncated([keys[i] for i, _ in long], [n for _, n in long], limit)
    bar = _Progress(len(ids), desc, progress)
    bar.plan(len(ids), sum(map(len, ids)))
    start = time.perf_counter()
    try:
        with _Forward(model, tokenizer, sites, pooling, backend) as forward:
            for rows in batches([len(t) for t in ids], batch_size, max_tokens):
                out = forward([ids[i] for i in rows], [pooled[i] for i in rows])
                yield rows, out
                n = sum(len(ids[i]) for i in rows)
                run.tokens += n
                bar.update(len(rows), n)
    finally:
        bar.close()
        run.seconds += time.perf_counter() - start


@dataclass
class Batch:
    """One batch of the deterministic batch order (`plan_batches`)."""

    index: int  # position in the batch order
    rows: list[int]  # corpus indices (Record.index)
    labels: list[int]  # label ids
    ids: list[list[int]]  # token ids, unpadded
    pooled: list[list[bool]]  # pooled-token masks
    truncated: list[tuple[str, int]]  # (key, tokens before truncation) of cut sentences

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))


def plan_batches(records, tokenizer, *, batch_size: int, max_tokens: int | None = None,
                 window: int = WINDOW, skip: int = 0, known: list[int] | tuple = (),
                 skip_special: bool = True, limit: int | None = None, too_long: str = "truncate",
                 on_window=None):
    """The deterministic batch order of a stream of `Record`s, as `Batch`es.

    Consecutive windows of `window` records are tokenized and planned by `batches` (sorted by
    descending length, then corpus index; at most `batch_size` sentences and `max_tokens` padded
    tokens a batch, None: no budget): memory holds one window, and the order depends only on the
    records, the tokenizer, `window`, `batch_size` and `max_tokens` (not on ranks or restarts).

    The first `skip` batches are not yielded. A window all of whose batches are skipped is not
    even tokenized when its number of batches is known: `known[w]` for window w (as reported to
    `on_window` by an earlier pass, e.g. in a checkpoint), or ceil(len / batch_size) without a
    token budget. on_window(w, batches, sentences, tokens, skipped) is called as each window is
    planned: its number of batches, the sentences and tokens of those yielded (tokens None for a
    window passed over without tokenizing), and the sentences of those skipped.
    """
    it = iter(records)
    index = w = 0
    while True:
        chunk: list[Record] = list(islice(it, window))
        if not chunk:
            return
        n_batches = (known[w] if w < len(known) else
                     -(-len(chunk) // batch_size) if max_tokens is None else None)
        if n_batches is not None and index + n_batches <= skip:
            if on_window is not None:
                on_window(w, n_batches, 0, None, len(chunk))
            index += n_batches
            w += 1
            continue
        texts, keys = [r.text for r in chunk], [r.key for r in chunk]
        long = []
        ids, pooled = tokenize(tokenizer, texts, keys, skip_special, limit, too_long, truncated=long)
        long = dict(long)
        plan = batches([len(t) for t in ids], batch_size, max_tokens)
        if on_window is not None:
            todo = [i for j, sel in enumerate(plan) if index + j >= skip for i in sel]
            on_window(w, len(plan), len(todo), sum(len(ids[i]) for i in todo), len(chunk) - len(todo))
        for sel in plan:
            if index >= skip:
                yield Batch(index, [chunk[i].index for i in sel], [chunk[i].label for i in sel],
                            [ids[i] for i in sel], [pooled[i] for i in sel],
                            [(keys[i], long[i]) for i in sel if i in long])
            index += 1
        w += 1


def _settings(model, sites: NeuronSites, corpus, run: Run | None = None, **options) -> dict:
    settings = {
        "model": getattr(model.config, "name_or_path", ""), "architecture": type(model).__name__,
        "fingerprint": sites.fingerprint(), "layers": sites.n_layers, "width": sites.width,
        "dtype": dtype_name(sites.modules[0].weight.dtype), **options,
        "corpus": corpus.description, "corpus_hash": corpus.hash(), "sentences": len(corpus),
    }
    if run is not None:
        settings.update(tokens=run.tokens, seconds=round(run.seconds, 2), truncated=run.truncated)
    return settings


def collect(model: nn.Module, tokenizer, corpus: Corpus, *, pooling: str = "max", batch_size: int = 16,
            skip_special: bool = True, max_length: int | None = None, neuron_module: str | None = None,
            backend: str = "hooks", progress: bool = True, too_long: str = "truncate",
            max_tokens: int | None = MAX_TOKENS) -> Responses:
    """Run `corpus` through the base model and return every sentence's pooled neuron responses.

    backend: "hooks" (reference pre-hooks) or "fused" (the fused MLP op, `steer.patch`).
    batch_size / max_tokens: at most that many sentences and padded tokens a batch (None: no
    token budget), longest first (`batches`); a longer sentence runs alone. Responses do not
    depend on them (up to fp rounding).
    too_long: sentences over the model's context (or max_length) are "truncate"d with a warning
    or an "error". One process (a distributed run uses `collect_stream`).
    """
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    check_eval(model)
    check_labels(corpus)
    if current().active:
        raise RuntimeError("exact collection runs in one process; under torch.distributed use "
                           "collect_stream (--mode stream)")
    if not isinstance(corpus, Corpus):
        corpus = corpus.load()
    sites = NeuronSites(model, neuron_module)
    values = torch.empty(len(corpus), sites.n_layers, sites.width)  # [N, L, M]
    run = Run()
    for rows, pooled in pooled_batches(model, tokenizer, corpus.texts, corpus.keys, sites, pooling=pooling,
                                       batch_size=batch_size, skip_special=skip_special, max_length=max_length,
                                       backend=backend, progress=progress, run=run, too_long=too_long,
                                       max_tokens=max_tokens):
        values[rows] = pooled.cpu()
    settings = _settings(model, sites, corpus, run, mode="exact", pooling=pooling, skip_special=skip_special,
                         backend=backend, max_length=max_length, too_long=too_long)
    return Responses(values, corpus.label_ids, list(corpus.label_names), list(corpus.keys), settings)


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


class _Progress:
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


VOLATILE = ("model", "corpus", "tokens", "seconds", "truncated")  # may differ on resume


def _mismatch(path, saved: dict, now: dict, saved_plan: dict, plan: dict) -> str | None:
    """Why a checkpoint cannot be resumed with these settings (None: it can)."""
    if saved.get("fingerprint") != now.get("fingerprint") or saved.get("architecture") != now.get("architecture"):
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


def _load_checkpoint(path, settings: dict, plan: dict, label_names: list[str], device):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume at {path}")
    state, extra = StreamState.load(path, device, with_extra=True)  # refuses corrupt / newer files
    kind, _, number = str(extra.get("format", "")).rpartition("/")
    if kind != "steer.checkpoint":
        raise ValueError(f"{path} is a streaming state, not a checkpoint (no corpus position)")
    if not number.isdigit() or int(number) > CHECKPOINT_VERSION:
        raise artifacts.newer(path, kind, number, CHECKPOINT_VERSION)
    why = _mismatch(path, state.settings, json.loads(json.dumps(settings)), extra.get("plan", {}), plan)
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
                   max_tokens: int | None = MAX_TOKENS) -> StreamState:
    """Fixed-memory statistics of every neuron (`StreamState`, steer/stream.py) in one pass.

    A seeded random sample of `calibration` sentences runs first: its responses fix every
    neuron's bin edges and are then counted like the rest, so no sentence runs twice. The rest
    streams through `plan_batches` (windows of `window` sentences bucketed by length, batches of
    at most `batch_size` sentences and `max_tokens` padded tokens, None: no token budget).
    corpus: a `Corpus` or a `CorpusFile` (anything with records(), label_names, hash(), len).

    checkpoint / checkpoint_every: every `checkpoint_every` batches (per rank), and after the
    calibration and at the end, the state and the position are written atomically to
    `checkpoint`; resume=True continues from it (refused, with the reason, when the model,
    corpus or settings differ). group: a `steer.distributed.Group` (default: the initialised
    torch.distributed group, else one process); every rank returns the merged state.
    """
    group = group or current()
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    check_eval(model)
    check_labels(corpus)
    check_batching(pooling, too_long, batch_size, window, max_tokens)
    check_stream(bins, calibration, checkpoint, checkpoint_every, resume)
    sites = NeuronSites(model, neuron_module)
    device = sites.modules[0].weight.device
    limit = token_limit(model, max_length)
    cal = calibration_sample(len(corpus), calibration, seed)
    settings = _settings(model, sites, corpus, mode="stream", bins=bins, calibration=len(cal), seed=seed,
                         pooling=pooling, skip_special=skip_special, max_length=max_length, too_long=too_long)
    plan = {"batch_size": batch_size, "window": window, "max_tokens": max_tokens}
    windows: list[int] = []  # batches in each window of the rest, so a resume skips windows untokenized
    label_names = list(corpus.label_names)
    show = progress and group.is_main
    # tokens and truncations of this rank since the last checkpoint; totals live on rank 0
    delta = Run()
    totals = {"tokens": 0, "truncated": 0, "seconds": 0.0}
    start = time.perf_counter()

    def checkpoint_now(position: int) -> None:
        counts = torch.tensor([delta.tokens, delta.truncated], dtype=torch.int64)
        group.reduce_state(state)
        group.all_reduce_sum(counts)
        delta.tokens = delta.truncated = 0
        totals["tokens"] += int(counts[0])
        totals["truncated"] += int(counts[1])
        error = None
        if group.is_main:
            extra = {"format": CHECKPOINT_FORMAT, "position": position, "plan": plan,
                     "tokens": totals["tokens"], "truncated": totals["truncated"],
                     "seconds": round(totals["seconds"] + time.perf_counter() - start, 2),
                     "world": group.world, "windows": list(windows)}
            try:
                state.save(checkpoint, extra)
            except Exception as e:  # tell the other ranks, then fail everywhere
                error = f"could not write the checkpoint {checkpoint}: {e}"
            else:
                log.info("checkpoint: %d batches done -> %s", position, checkpoint)
        error = group.broadcast_object(error)
        if error:
            raise RuntimeError(error)

    with _Forward(model, tokenizer, sites, pooling, backend) as forward:
        # rank 0 resumes or calibrates; the others wait for its edges (or its error)
        state, extra, error = None, {"position": 0}, None
        if group.is_main:
            try:
                if resume:
                    state, extra = _load_checkpoint(checkpoint, settings, plan, label_names, device)
                else:
                    state = _calibrate(forward, tokenizer, corpus, cal, bins, label_names, settings,
                                       batch_size=batch_size, max_tokens=max_tokens,
                                       skip_special=skip_special, limit=limit,
                                       too_long=too_long, run=delta, progress=show)
            except Exception as e:  # raised on every rank below
                error = e
        error = group.broadcast_object(error)
        if error is not None:
            raise error
        edges = torch.empty(sites.n_neurons, bins - 1, device=device)
        edges = group.broadcast_tensor(state.edges if group.is_main else edges)
        if not group.is_main:
            state = StreamState(edges, label_names, settings)
        extra = group.broadcast_object(extra)
        position = saved = int(extra["position"])
        windows[:] = extra.get("windows") or []
        if resume:
            totals.update(tokens=extra["tokens"], truncated=extra["truncated"], seconds=extra["seconds"])
            if group.is_main:
                log.info("resume: %d batches done in %s", position, checkpoint)
        elif checkpoint_every:
            checkpoint_now(0)
        cal_set = set(cal)
        rest = (r for r in corpus.records() if r.index not in cal_set)
        bar = _Progress(len(corpus) - len(cal), "stream", show)
        every = checkpoint_every * group.world

        def planned(w: int, n_batches: int, *sizes) -> None:
            if w == len(windows):
                windows.append(n_batches)
            bar.window(w, n_batches, *sizes)

        for b in plan_batches(rest, tokenizer, batch_size=batch_size, max_tokens=max_tokens, window=window,
                              skip=position, known=list(windows), skip_special=skip_special, limit=limit,
                              too_long=too_long, on_window=planned):
            if group.owns(b.index):
                state.update(forward(b.ids, b.pooled).flatten(1), torch.tensor(b.labels))
                delta.tokens += b.tokens
                _note(delta, b, limit)
            bar.update(len(b.rows), b.tokens)
            position = b.index + 1
            if every and position % every == 0:
                checkpoint_now(position)
                saved = position
        bar.close()
    if checkpoint_every and saved != position:
        checkpoint_now(position)  # the whole pass: a resume goes straight to refine
    counts = torch.tensor([delta.tokens, delta.truncated], dtype=torch.int64)
    group.all_reduce_state(state)
    group.all_reduce_sum(counts)
    seconds = totals["seconds"] + time.perf_counter() - start
    state.settings.update(tokens=totals["tokens"] + int(counts[0]), seconds=round(seconds, 2),
                          truncated=totals["truncated"] + int(counts[1]))
    return state


def _calibrate(forward: _Forward, tokenizer, corpus, cal: list[int], bins: int, label_names, settings,
               *, batch_size, max_tokens, skip_special, limit, too_long, run: Run,
               progress: bool) -> StreamState:
    """A state whose edges come from the responses of the calibration sentences `cal` (sorted
    corpus indices), which it then counts. Reads the corpus only up to the last of them."""
    wanted = set(cal)
    records = [r for r in islice(corpus.records(), cal[-1] + 1) if r.index in wanted]
    where = {r.index: j for j, r in enumerate(records)}
    sample = torch.empty(len(records), forward.sites.n_neurons, device=forward.sites.modules[0].weight.device)  # [S, L*M]
    bar = _Progress(len(records), "calibrate", progress)
    for b in plan_batches(records, tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                          window=len(records), skip_special=skip_special, limit=limit,
                          too_long=too_long, on_window=bar.window):
        sample[[where[i] for i in b.rows]] = forward(b.ids, b.pooled).flatten(1)
        run.tokens += b.tokens
        _note(run, b, limit)
        bar.update(len(b.rows), b.tokens)
    bar.close()
    state = StreamState(calibrate_edges(sample, bins), label_names, settings)
    state.update(sample, torch.tensor([r.label for r in records]))
    return state


def _note(run: Run, batch: Batch, limit) -> None:
    """Count (and warn once about) the truncated sentences of a batch this rank ran."""
    if batch.truncated:
        run.note_truncated([k for k, _ in batch.truncated], [n for _, n in batch.truncated], limit)


def score_state(state: StreamState, splits=None) -> Scores:
    """Histogram scores of every neuron for each split (default one-vs-rest), with certificates.

    Neurons with non-finite responses are scored NaN and reported in settings["nonfinite"]."""
    splits = [Split.one_vs_rest(c) for c in state.label_names] if splits is None else splits
    layers, width = state.settings["layers"], state.settings["width"]
    per_split = [state.score(*s.label_ids(state.label_names)) for s in splits]
    stats = {key: torch.stack([r[key] for r in per_split]).reshape(len(splits), layers, width).cpu()
             for key in per_split[0]}
    for key in ("n_pos", "n_neg"):  # per split, as in exact scores: sentences, not finite responses
        stats[key] = stats[key].flatten(1).max(1).values
    bad = state.nonfinite.cpu() > 0
    _mask_nonfinite(stats, bad)
    settings = dict(state.settings, nonfinite=_nonfinite_info(state.nonfinite, width))
    if bool(bad.any()):
        warnings.warn(nonfinite_message(settings), stacklevel=2)
    return Scores(stats, splits, settings)


def shortlist_scores(hist: Scores, *, k: int = 100, by: str | tuple[str, ...] = "ap",
                     bottom_k: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """The neurons of histogram scores (`score_state`) that could be in any split's exact top-k by
    each score in `by` (or its bottom-k by AUROC): sorted flat indices [K], and the size of each
    split's short-list. `refine` rescores exactly these."""
    flat = {key: v.flatten(1) for key, v in hist.stats.items() if v.dim() == 3}  # [S, L*M]
    sizes, keep = {}, []
    for i, sp in enumerate(hist.splits):
        chosen = torch.cat([shortlist(flat[b][i], flat[f"{b}_bound"][i], k)
                            for b in ((by,) if isinstance(by, str) else by)])
        if bottom_k:
            chosen = torch.cat([chosen, shortlist(flat["auroc"][i], flat["auroc_bound"][i], bottom_k, largest=False)])
        sizes[sp.name] = int(chosen.numel())
        keep.append(chosen)
    return torch.cat(keep).unique(), sizes


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
    hist = sizes = idx = error = None
    if group.is_main:
        try:
            if corpus.hash() != state.settings.get("corpus_hash"):
                raise ValueError("refine needs the corpus the state was collected on (corpus hash differs)")
            hist = score_state(state, splits)
            idx, sizes = shortlist_scores(hist, k=k, by=by, bottom_k=bottom_k)
            log.info("refine: short-list of %s neurons of %s (per split: %s); second pass stores only their "
                     "responses", f"{idx.numel():,}", f"{state.edges.shape[0]:,}", sizes)
        except Exception as e:
            error = e
    error = group.broadcast_object(error)
    if error is not None:
        raise error
    idx = group.broadcast_object(idx)
    settings = group.broadcast_object(None if state is None else
                                      {key: state.settings.get(key) for key in
                                       ("pooling", "skip_special", "max_length", "too_long", "window")})
    sites = NeuronSites(model, forward.pop("neuron_module", None))
    batch_size = forward.pop("batch_size", 16)
    backend = forward.pop("backend", "hooks")
    window = forward.pop("window", None) or settings.get("window") or WINDOW
    max_tokens = forward.pop("max_tokens", MAX_TOKENS)
    if forward:
        raise TypeError(f"refine got unexpected options {sorted(forward)}")
    pooling, skip_special = settings["pooling"], settings["skip_special"]
    too_long = settings.get("too_long") or "truncate"
    limit = token_limit(model, settings.get("max_length"))
    K, N = int(idx.numel()), len(corpus)
    values = label_ids = None
    if K:  # one process fills [N, K] in place; ranks keep their rows, gathered on rank 0
        label_ids = torch.empty(N, dtype=torch.int64) if group.is_main else None
        values = torch.empty(N, K) if not group.active else None
        rows, parts = [], []
        dev_idx = idx.to(sites.modules[0].weight.device)
        bar = _Progress(N, "refine", progress and group.is_main)
        with _Forward(model, tokenizer, sites, pooling, backend) as fwd:
            for b in plan_batches(corpus.records(), tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                                  window=window, skip_special=skip_special, limit=limit,
                                  too_long=too_long, on_window=bar.window):
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
    if not group.is_main:
        return None
    flat = {key: v.flatten(1) if v.dim() == 3 else v for key, v in hist.stats.items()}
    if K:
        exact = score_splits(values, label_ids, [s.label_ids(list(corpus.label_names)) for s in hist.splits],
                             names=[s.name for s in hist.splits])
        for key, v in exact.items():
            if v.dim() == 2:
                flat[key][:, idx] = v
            else:
                flat[key] = v
        for key in ("ap_bound", "auroc_bound"):
            flat[key][:, idx] = 0.0
    layers, width = state.settings["layers"], state.settings["width"]
    stats = {key: v.reshape(len(hist.splits), layers, width) if v.dim() == 2 else v for key, v in flat.items()}
    out = {**hist.settings, "shortlist": sizes, "refined_neurons": K}
    return Scores(stats, hist.splits, out)
