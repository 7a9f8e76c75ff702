"""Today's way: expert finding and steering as existing tools do it, written faithfully as a baseline.

Modelled on apple/ml-selfcond (Suau et al.; `selfcond/responses.py`, `selfcond/expertise.py`)
and apple/ml-aura (`src/hooks/`), with the known mistakes of such pipelines removed where they would
change the *results* (padding is masked out of the pooling, so the responses equal steer's and the
comparison is of speed only). What is kept, because it is what costs time:

- the FULL language model runs (`model(input_ids, attention_mask, position_ids)`): the LM head
  computes logits over the whole vocabulary (262k for Gemma 3) for every position, and they are
  dropped. Position ids count real tokens (what HF `generate` does for left padding; Gemma's
  tokenizer pads on the left), so the responses do not depend on padding;
- batches are taken in corpus order (no length sorting) and padded by the tokenizer
  (`tokenizer(texts, padding=True)`, on its own side), so short and long sentences share a batch;
- a forward pre-hook on every down projection clones the neuron tensor, fills the positions
  that are not pooled with NaN and max-pools with `nan_to_num(min).max` (ml-aura's `nanmax`),
  then copies the pooled responses to host memory as numpy (`.cpu().numpy()`); the per-batch
  arrays are concatenated per layer at the end ([N, M] per layer);
- scoring: per label (one-vs-rest), per layer, scikit-learn `average_precision_score` and
  `roc_auc_score` for every neuron, `multiprocessing.Pool(2).map` over the units (ml-selfcond's
  `average_precision`, one Pool per label); forcing statistics with numpy per layer
  (on_mean, on_p50, on_p90, off_mean, as ml-selfcond's `ExpertiseResult.build`);
- steering: a forward pre-hook that writes the forced values into the chosen units at every
  position.

Timing split: tokenization, forward (model call minus time spent in the hooks; of which lm_head:
the LM head alone), hook (pooling and the copy to host, summed over hooks, and the final
concatenation) and scoring.
"""
from __future__ import annotations

import time
from functools import partial
from multiprocessing import Pool

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from steer.core.adapters import NeuronLayout, base_inputs


class _Recorder:
    """Pre-hooks that max-pool each layer's neuron tensor over pooled tokens and keep numpy copies."""

    def __init__(self, layout: NeuronLayout):
        self.layout = layout
        self.tokens: torch.Tensor | None = None  # [B, T] bool, pooled tokens of the current batch
        self.chunks: list[list[np.ndarray]] = [[] for _ in layout.modules]  # per layer: [B, M] arrays
        self.hook_s = 0.0
        self.handles = [m.register_forward_pre_hook(self._hook(l)) for l, m in enumerate(layout.modules)]

    def _hook(self, layer: int):
        def pre_hook(module, args):
            t0 = time.perf_counter()
            h = self.layout.view(args[0], self.tokens.shape[0]).detach().clone()  # [B, T, M]
            h[~self.tokens] = torch.nan  # ignored by the pooling (ml-aura)
            pooled = h.nan_to_num(torch.finfo(h.dtype).min).max(dim=1).values  # [B, M]
            self.chunks[layer].append(pooled.float().cpu().numpy())
            self.hook_s += time.perf_counter() - t0

        return pre_hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _ModuleTimer:
    """Seconds spent inside one module's forward calls (a pre-hook starts, a forward hook stops)."""

    def __init__(self, module):
        self.seconds, self._t0 = 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self.handles:
            h.remove()


def collect(model, tokenizer, texts: list[str], batch_size: int = 16, skip_special: bool = True,
            neuron_module: str | None = None) -> tuple[dict[int, np.ndarray], dict]:
    """Pooled responses {layer: [N, M] float32 numpy} in corpus order, and a timing breakdown.

    `skip_special` leaves BOS/special tokens out of the pooling (as steer does by default), so the
    responses equal `steer.collect`'s.
    """
    layout = NeuronLayout(model, neuron_module)
    device = layout.modules[0].weight.device
    head = _ModuleTimer(model.get_output_embeddings())  # measurement only: how much of forward is the LM head
    rec = _Recorder(layout)
    tok_s = fwd_s = 0.0
    n_tokens = n_positions = 0
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                t0 = time.perf_counter()
                enc = tokenizer(list(texts[i : i + batch_size]), padding=True, return_tensors="pt",
                                return_special_tokens_mask=True)
                mask = enc["attention_mask"].bool()
                rec.tokens = (mask & ~enc["special_tokens_mask"].bool() if skip_special else mask).to(device)
                t1 = time.perf_counter()
                model(**base_inputs(model, enc["input_ids"].to(device), enc["attention_mask"].to(device)))
                t2 = time.perf_counter()
                tok_s += t1 - t0
                fwd_s += t2 - t1
                n_tokens += int(mask.sum())
                n_positions += mask.numel()
    finally:
        rec.remove()
        head.remove()
    t0 = time.perf_counter()
    responses = {l: np.concatenate(chunks, axis=0) for l, chunks in enumerate(rec.chunks)}
    concat_s = time.perf_counter() - t0
    timing = {"tokenize_s": tok_s, "forward_s": fwd_s - rec.hook_s, "lm_head_s": head.seconds, "hook_s": rec.hook_s + concat_s,
              "tokens": n_tokens, "positions": n_positions}
    return responses, timing


def _unit_scores(unit_response: np.ndarray, labels: np.ndarray, auroc: bool) -> tuple[float, float]:
    ap = average_precision_score(y_true=labels, y_score=unit_response)
    return ap, (roc_auc_score(labels, unit_response) if auroc else float("nan"))


def score(responses: dict[int, np.ndarray], label_ids: np.ndarray, label_names: list[str], processes: int = 2,
          auroc: bool = True, stats: bool = True, units: np.ndarray | None = None) -> tuple[dict, dict]:
    """Per label (one-vs-rest), every neuron's AP (and AUROC) with scikit-learn, in a process Pool.

    responses: {layer: [N, M]}; label_ids: [N] int. `units`: optional sorted flat indices
    (layer * M + unit) to score instead of all neurons (a subset for timing extrapolation).
    Returns ({"ap", "auroc", "on_mean", "on_p50", "on_p90", "off_mean"}: [S, n_scored] float64,
    timing) where columns follow `units` (or every neuron in (layer, unit) order).
    """
    layers = sorted(responses)
    width = responses[layers[0]].shape[1]
    label_ids = np.asarray(label_ids)
    if units is None:
        per_layer = {l: np.arange(width) for l in layers}
    else:
        units = np.asarray(units)
        per_layer = {l: units[units // width == l] % width for l in layers}
    keys = ["ap", "auroc"] + (["on_mean", "on_p50", "on_p90", "off_mean"] if stats else [])
    out = {k: [] for k in keys}
    pool_s = 0.0  # starting and stopping the worker processes
    t0 = time.perf_counter()
    for c in range(len(label_names)):
        labels = (label_ids == c).astype(int)
        pos = labels == 1
        row = {k: [] for k in keys}
        tp = time.perf_counter()
        pool = Pool(processes=processes)  # ml-selfcond: one Pool per concept, map over units per layer
        pool_s += time.perf_counter() - tp
        for l in layers:
            cols = per_layer[l]
            if not len(cols):
                continue
            resp = responses[l][:, cols].T  # [units, sentences], as ml-selfcond stores them
            pairs = pool.map(partial(_unit_scores, labels=labels, auroc=auroc), resp)
            row["ap"].append(np.array([p[0] for p in pairs]))
            row["auroc"].append(np.array([p[1] for p in pairs]))
            if stats:
                row["on_mean"].append(np.mean(resp[:, pos], axis=1))
                row["on_p50"].append(np.percentile(resp[:, pos], q=50, axis=1))
                row["on_p90"].append(np.percentile(resp[:, pos], q=90, axis=1))
                row["off_mean"].append(np.mean(resp[:, ~pos], axis=1))
        tp = time.perf_counter()
        pool.close()
        pool.join()
        pool_s += time.perf_counter() - tp
        for k in keys:
            out[k].append(np.concatenate(row[k]))
    seconds = time.perf_counter() - t0
    n_scored = sum(len(c) for c in per_layer.values())
    return {k: np.stack(v) for k, v in out.items()}, {"score_s": seconds, "pool_s": pool_s,
                                                      "neurons_scored": n_scored, "neurons_total": len(layers) * width}


def steer(model, forced: dict[int, tuple[torch.Tensor, torch.Tensor]], neuron_module: str | None = None):
    """Force units of down-projection inputs at every position: {layer: (units [K], values [K])}.

    Returns the hook handles; `.remove()` each to undo.
    """
    layout = NeuronLayout(model, neuron_module)

    def make(units, values):
        def pre_hook(module, args):
            h = args[0].clone()
            h[..., units] = values.to(h.dtype)
            return (h,) + tuple(args[1:])

        return pre_hook

    return [layout.modules[l].register_forward_pre_hook(make(torch.as_tensor(u), torch.as_tensor(v)))
            for l, (u, v) in forced.items()]
