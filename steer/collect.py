"""Collection: every sentence's pooled response at every neuron, in one batched pass.

Exact mode (`collect`) keeps the full table of responses ([sentences, layers, width], fp32) so
that any positive/negative split can be scored afterwards without another forward pass.
Stream mode (`collect_stream`) keeps fixed-size per-label histograms instead (steer/stream.py,
DESIGN.md §2); `refine` then rescores exactly, in a second pass, the short-list of neurons that
could still enter the exact top-k, so the experts and their values equal exact mode's.

How a batch is run: sentences are tokenized once, sorted by length (stable, so batches depend
only on the corpus, not on its order) and padded on the tokenizer's side; position ids count
real tokens only, so padding on either side changes nothing. Only the base model runs (no LM head). A
pre-hook on every down projection pools the neuron tensor over each sentence's real tokens
(`pool`, below): padding never counts, and BOS/special tokens are skipped unless asked not to.
Hooks registered earlier (an active `intervene`) run first, so responses are what the down
projection receives.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import NeuronSites, base_inputs
from .corpus import Corpus
from .metrics import score_splits
from .stream import StreamState, calibrate_edges, shortlist

POOLINGS = ("max", "mean")


def pool(h: torch.Tensor, tokens: torch.Tensor, how: str) -> torch.Tensor:
    """Pool h [B, T, M] over the positions where tokens [B, T] is true -> [B, M] fp32."""
    h = h.float()
    if how == "max":
        return h.masked_fill(~tokens[:, :, None], float("-inf")).amax(1)
    return (h * tokens[:, :, None]).sum(1) / tokens.sum(1, keepdim=True)


def tokenize(tokenizer, texts: list[str], keys: list[str], skip_special: bool, max_length: int | None):
    """Token ids and the mask of pooled tokens of each text (lists, unpadded)."""
    enc = tokenizer(list(texts), add_special_tokens=True, return_special_tokens_mask=True,
                    truncation=max_length is not None, max_length=max_length)
    ids, pooled = [], []
    for i, (t, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
        keep = [not s for s in special] if skip_special else [True] * len(t)
        if not any(keep):
            raise ValueError(f"sentence {keys[i]!r} has no token to pool ({texts[i]!r})")
        ids.append(t)
        pooled.append(keep)
    return ids, pooled


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(rows: list[list], value, side: str = "right") -> torch.Tensor:
    width = max(len(r) for r in rows)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([r + f if side == "right" else f + r for r, f in zip(rows, fill)])


class Pooler:
    """Pre-hooks that pool each layer's neuron tensor of the current batch into `pooled` [B, L, M].

    The fused path (`steer.patch`) has the same three attributes and does this inside its op.
    """

    def __init__(self, sites: NeuronSites, pooling: str):
        self.sites, self.pooling = sites, pooling
        self.pool_tokens: torch.Tensor | None = None  # [B, T] bool, set before each forward
        self.pooled: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(l)) for l, m in enumerate(sites.modules)]

    def _hook(self, layer: int):
        def pre_hook(module, args):
            h = self.sites.view(args[0], self.pool_tokens.shape[0])  # [B, T, M]
            self.pooled[:, layer] = pool(h, self.pool_tokens, self.pooling)

        return pre_hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _pooler(model: nn.Module, sites: NeuronSites, pooling: str, backend: str):
    """(pooler, undo) for a backend: reference hooks, or the fused op (patched here if need be)."""
    if backend == "hooks":
        p = Pooler(sites, pooling)
        return p, p.remove
    if backend != "fused":
        raise ValueError(f"backend={backend!r}; choose 'hooks' or 'fused'")
    from .patch import patch

    if any(m._forward_pre_hooks for m in sites.modules):
        raise RuntimeError("hooks are active on the down projections (a hook-based intervene?); "
                           "with backend='fused', patch the model first and intervene after")
    existing = getattr(model, "_steer_patch", None)
    p = existing or patch(model)
    p.pooling = pooling

    def undo():
        p.pool_tokens = p.pooled = None
        if existing is None:
            p.revert()

    return p, undo


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
        """AP, AUROC and response statistics of every neuron for each split (default: one-vs-rest)."""
        splits = [Split.one_vs_rest(c) for c in self.label_names] if splits is None else splits
        ids = [s.label_ids(self.label_names) for s in splits]
        flat = self.values.reshape(len(self.values), -1)  # [N, L*M]
        stats = score_splits(flat, self.label_ids, ids)
        layers, width = self.shape
        stats = {k: v.reshape(len(splits), layers, width) if v.dim() == 2 else v for k, v in stats.items()}
        return Scores(stats, splits, dict(self.settings))

    def save(self, path) -> None:
        meta = {"label_names": self.label_names, "keys": self.keys, "settings": self.settings}
        save_file({"values": self.values.contiguous(), "label_ids": self.label_ids}, str(path),
                  metadata={"steer": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "Responses":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["steer"])
        t = load_file(str(path))
        return cls(t["values"], t["label_ids"], meta["label_names"], meta["keys"], meta["settings"])


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
    """What `pooled_batches` reports once it is exhausted."""

    tokens: int = 0
    seconds: float = 0.0


def pooled_batches(model: nn.Module, tokenizer, texts: list[str], keys: list[str], sites: NeuronSites, *,
                   pooling: str = "max", batch_size: int = 16, skip_special: bool = True,
                   max_length: int | None = None, backend: str = "hooks", progress: bool = True,
                   desc: str = "collect", run: Run | None = None):
    """Yield (rows, pooled [B, L, M] fp32 on the model's device) for length-sorted batches of `texts`."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; choose one of {POOLINGS}")
    if not texts:
        return
    device = sites.modules[0].weight.device
    ids, pooled = tokenize(tokenizer, texts, keys, skip_special, max_length)
    side = tokenizer.padding_side
    pooler, undo = _pooler(model, sites, pooling, backend)
    bar = tqdm(total=sum(map(len, ids)), unit="tok", desc=desc, disable=not progress, unit_scale=True)
    run = run if run is not None else Run()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for rows in batches([len(t) for t in ids], batch_size):
                input_ids = pad([ids[i] for i in rows], tokenizer.pad_token_id or 0, side).to(device)
                mask = pad([[1] * len(ids[i]) for i in rows], 0, side).to(device)
                pooler.pool_tokens = pad([pooled[i] for i in rows], False, side).to(device)
                pooler.pooled = torch.empty(len(rows), sites.n_layers, sites.width, device=device)
                model.base_model(**base_inputs(model, input_ids, mask))
                yield rows, pooler.pooled
                run.tokens += int(mask.sum())
                bar.update(int(mask.sum()))
    finally:
        undo()
        bar.close()
        run.seconds += time.perf_counter() - start


def _settings(model, sites: NeuronSites, corpus: Corpus, run: Run, **options) -> dict:
    return {
        "model": getattr(model.config, "name_or_path", ""), "architecture": type(model).__name__,
        "fingerprint": sites.fingerprint(), "layers": sites.n_layers, "width": sites.width, **options,
        "corpus": corpus.description, "corpus_hash": corpus.hash(), "sentences": len(corpus),
        "tokens": run.tokens, "seconds": round(run.seconds, 2),
    }


def collect(model: nn.Module, tokenizer, corpus: Corpus, *, pooling: str = "max", batch_size: int = 16,
            skip_special: bool = True, max_length: int | None = None, neuron_module: str | None = None,
            backend: str = "hooks", progress: bool = True) -> Responses:
    """Run `corpus` through the base model and return every sentence's pooled neuron responses.

    backend: "hooks" (reference pre-hooks) or "fused" (the fused MLP op, `steer.patch`).
    """
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    sites = NeuronSites(model, neuron_module)
    values = torch.empty(len(corpus), sites.n_layers, sites.width)  # [N, L, M]
    run = Run()
    for rows, pooled in pooled_batches(model, tokenizer, corpus.texts, corpus.keys, sites, pooling=pooling,
                                       batch_size=batch_size, skip_special=skip_special, max_length=max_length,
                                       backend=backend, progress=progress, run=run):
        values[rows] = pooled.cpu()
    settings = _settings(model, sites, corpus, run, mode="exact", pooling=pooling, skip_special=skip_special,
                         backend=backend, max_length=max_length)
    return Responses(values, corpus.label_ids, list(corpus.label_names), list(corpus.keys), settings)


def collect_stream(model: nn.Module, tokenizer, corpus: Corpus, *, bins: int = 64, calibration: int = 1000,
                   seed: int = 0, pooling: str = "max", batch_size: int = 16, skip_special: bool = True,
                   max_length: int | None = None, neuron_module: str | None = None, backend: str = "hooks",
                   progress: bool = True) -> StreamState:
    """Fixed-memory statistics of every neuron (`StreamState`, DESIGN.md §2) in one pass.

    A seeded random sample of `calibration` sentences runs first: its responses fix every
    neuron's bin edges and are then counted like the rest, so no sentence runs twice.
    """
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    sites = NeuronSites(model, neuron_module)
    device = sites.modules[0].weight.device
    perm = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    cal, rest = sorted(perm[:calibration]), sorted(perm[calibration:])
    label_ids = corpus.label_ids.to(device)
    opts = dict(pooling=pooling, batch_size=batch_size, skip_special=skip_special, max_length=max_length,
                backend=backend, progress=progress)
    run = Run()
    sample = torch.empty(len(cal), sites.n_neurons, device=device)  # [S, L*M]
    for rows, pooled in pooled_batches(model, tokenizer, [corpus.texts[i] for i in cal], [corpus.keys[i] for i in cal],
                                       sites, desc="calibrate", run=run, **opts):
        sample[rows] = pooled.flatten(1)
    settings = _settings(model, sites, corpus, run, mode="stream", bins=bins, calibration=len(cal), seed=seed,
                         pooling=pooling, skip_special=skip_special, max_length=max_length)
    state = StreamState(calibrate_edges(sample, bins), corpus.label_names, settings)
    state.update(sample, label_ids[cal])
    del sample
    rest_ids = label_ids[rest]
    for rows, pooled in pooled_batches(model, tokenizer, [corpus.texts[i] for i in rest], [corpus.keys[i] for i in rest],
                                       sites, desc="stream", run=run, **opts):
        state.update(pooled.flatten(1), rest_ids[rows])
    state.settings.update(tokens=run.tokens, seconds=round(run.seconds, 2))
    return state


def score_state(state: StreamState, splits=None) -> Scores:
    """Histogram scores of every neuron for each split (default one-vs-rest), with certificates."""
    splits = [Split.one_vs_rest(c) for c in state.label_names] if splits is None else splits
    layers, width = state.settings["layers"], state.settings["width"]
    per_split = [state.score(*s.label_ids(state.label_names)) for s in splits]
    stats = {key: torch.stack([r[key] for r in per_split]).reshape(len(splits), layers, width).cpu()
             for key in per_split[0]}
    for key in ("n_pos", "n_neg"):  # per split, as in exact scores: sentences, not finite responses
        stats[key] = stats[key].flatten(1).max(1).values
    return Scores(stats, splits, dict(state.settings))


def refine(model: nn.Module, tokenizer, corpus: Corpus, state: StreamState, splits=None, *, k: int = 100,
           by: str | tuple[str, ...] = "ap", bottom_k: int = 0, progress: bool = True, **forward) -> Scores:
    """Exact scores for every neuron that could still enter the exact top-k (or bottom-k).

    From the histogram scores and their certificates, `shortlist` keeps each split's candidates;
    a second pass stores only their responses and scores them exactly (`by` may name both scores). The returned table holds
    exact statistics for the short-list and histogram ones elsewhere, so `select_experts` on it
    returns exactly the exact mode's experts and forcing values.
    """
    if corpus.hash() != state.settings.get("corpus_hash"):
        raise ValueError("refine needs the corpus the state was collected on (corpus hash differs)")
    hist = score_state(state, splits)
    flat = {key: v.flatten(1) if v.dim() == 3 else v for key, v in hist.stats.items()}  # [S, L*M]
    sizes, keep = {}, []
    for i, sp in enumerate(hist.splits):
        chosen = torch.cat([shortlist(flat[b][i], flat[f"{b}_bound"][i], k) for b in ((by,) if isinstance(by, str) else by)])
        if bottom_k:
            chosen = torch.cat([chosen, shortlist(flat["auroc"][i], flat["auroc_bound"][i], bottom_k, largest=False)])
        sizes[sp.name] = int(chosen.numel())
        keep.append(chosen)
    idx = torch.cat(keep).unique()  # [K] sorted flat neuron indices
    print(f"refine: short-list of {idx.numel():,} neurons of {flat['ap'].shape[1]:,} "
          f"(per split: {sizes}); second pass stores only their responses", flush=True)
    sites = NeuronSites(model, forward.pop("neuron_module", None))
    values = torch.empty(len(corpus), idx.numel())  # [N, K]
    dev_idx = idx.to(sites.modules[0].weight.device)
    opts = {key: state.settings[key] for key in ("pooling", "skip_special", "max_length")}
    for rows, pooled in pooled_batches(model, tokenizer, corpus.texts, corpus.keys, sites, desc="refine",
                                       progress=progress, **opts, **forward):
        values[rows] = pooled.flatten(1)[:, dev_idx].cpu()
    exact = score_splits(values, corpus.label_ids, [s.label_ids(corpus.label_names) for s in hist.splits])
    for key, v in exact.items():
        if v.dim() == 2:
            flat[key][:, idx] = v
        else:
            flat[key] = v
    for key in ("ap_bound", "auroc_bound"):
        flat[key][:, idx] = 0.0
    layers, width = state.settings["layers"], state.settings["width"]
    stats = {key: v.reshape(len(hist.splits), layers, width) if v.dim() == 2 else v for key, v in flat.items()}
    settings = {**state.settings, "shortlist": sizes, "refined_neurons": int(idx.numel())}
    return Scores(stats, hist.splits, settings)
