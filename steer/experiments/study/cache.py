"""Sentence embeddings per text and condition, each computed once, with a safetensors cache on disk.

A condition is the unsteered model ("base") or an intervention, identified by a hash of its
buffers; a text embedded under one condition is never embedded again under it (memory, then the
disk cache when the `Embedder` has a directory).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from steer.core.adapters import NeuronLayout
from steer.core.intervention import Intervention
from steer.engine.steering import intervene
from steer.engine.embed import embed


def condition_key(iv: Intervention | None) -> str:
    """'base' for the unsteered model, else a hash of the intervention's site, buffers and positions."""
    if iv is None or len(iv) == 0:
        return "base"
    idx = iv.mask.nonzero()  # [n, 2]
    h = hashlib.sha256(iv.positions.encode())
    if iv.site != "neuron":  # neuron-site keys as before the other sites existed: caches stay valid
        h.update(iv.site.encode())
    h.update(idx.cpu().numpy().astype(np.int64).tobytes())
    h.update(iv.mul[iv.mask].cpu().numpy().astype(np.float32).tobytes())
    h.update(iv.add[iv.mask].cpu().numpy().astype(np.float32).tobytes())
    return h.hexdigest()[:20]


CACHE_VERSION = 1  # steer.embeddings files (steer/core/artifacts.py)
# The embeddings' numerics: raised whenever steer's code changes them in any bit, so that a cache
# never mixes embeddings of two versions (and every condition built from pooled responses, whose
# forcing values enter its key, is recomputed alike). 2: pooling reduces the positions every row
# pools before the ragged edges (another fp32 summation order than 1). The tokenizer is in the
# file names too (`tokenizer_key`): a tokenizer that splits texts otherwise embeds them otherwise.
NUMERICS = 2
TOKENIZER_PROBE = "Steer, 12 ça?"  # its ids and the special ids stand for the tokenizer in file names


def tokenizer_key(tok) -> list:
    """What a cache file depends on of the tokenizer: the ids of a probe text (special tokens
    added) and the BOS / EOS / pad ids."""
    return [list(tok(TOKENIZER_PROBE)["input_ids"]), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]


def save_embedding_cache(path: Path, table: dict[str, torch.Tensor], meta: dict) -> None:
    """{text: [n_layers, D]} as a steer.embeddings file, atomically (steer/core/artifacts.py): the
    texts as UTF-8 bytes + offsets tensors (no header size limit), `meta` (the model's
    fingerprint and dtype, skip_bos, layers, numerics, tokenizer) in the metadata."""
    from steer.core import artifacts

    raw = [t.encode("utf-8") for t in table]
    sizes = torch.tensor([len(b) for b in raw], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])  # [N + 1]
    text = torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).copy())
    emb = torch.stack(list(table.values())) if table else torch.zeros(0, len(meta["layers"]), 0)
    artifacts.save(path, {"emb": emb, "text_bytes": text, "text_offsets": offsets}, meta,
                   kind="embeddings", version=CACHE_VERSION)


def load_embedding_cache(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The table written by `save_embedding_cache`; ValueError naming the file when it is
    corrupt, truncated, of a newer format, or for another model, dtype, skip_bos, layers, numerics
    or tokenizer than `meta`."""
    from steer.core import artifacts

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
        layout = NeuronLayout(model)
        self.n_layers, self.fingerprint = layout.n_layers, layout.fingerprint()
        self.dtype = layout.dtype  # the fingerprint ignores it; embeddings don't
        self.tokenizer = tokenizer_key(tokenizer)
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.memory: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
        self.stats = Counter()

    def _file(self, cond: str, layers: tuple[int, ...]) -> Path | None:
        if self.directory is None:
            return None
        spec = json.dumps([self.fingerprint, self.dtype, self.skip_bos, list(layers), NUMERICS, self.tokenizer])
        spec = hashlib.sha256(spec.encode()).hexdigest()[:12]
        return self.directory / f"{self.fingerprint}-{spec}-{cond}.safetensors"

    def _cache_meta(self, layers: tuple[int, ...]) -> dict:
        return {"fingerprint": self.fingerprint, "dtype": self.dtype, "skip_bos": self.skip_bos, "layers": list(layers),
                "numerics": NUMERICS, "tokenizer": self.tokenizer}

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
