"""The bare-forward baselines that collection is compared with, shared by the benchmark scripts.

A bare forward is the base model (no LM head) over padded batches, no hooks: the floor any
collection sits on. It runs over the very batches of the collection it is compared with:
`sorted_plan` for `steer.collect` (length-sorted), `stream_plan` for `steer.collect_stream`
(its calibration sample first, then the rest in windows), both planned by steer's own
`batches` with the same sentence cap and token budget (`max_tokens`, default
`steer.engine.batching.MAX_TOKENS`), so that a ratio measures the collection's own work, not a
different padding.
"""
from __future__ import annotations

import torch

from steer.core.adapters import base_inputs
from steer.engine.batching import MAX_TOKENS, batches, pad, plan_batches, tokenize
from steer.engine.collect import calibration_sample


def sorted_plan(tokenizer, corpus, batch_size: int = 16,
                max_tokens: int | None = MAX_TOKENS) -> list[list[list[int]]]:
    """Token ids of `collect`'s batches: [batch][sentence][token]."""
    ids, _ = tokenize(tokenizer, corpus.texts, corpus.keys, True, None)
    return [[ids[i] for i in rows] for rows in batches([len(t) for t in ids], batch_size, max_tokens)]


def stream_plan(tokenizer, corpus, calibration: int, batch_size: int = 16,
                max_tokens: int | None = MAX_TOKENS) -> list[list[list[int]]]:
    """Token ids of `collect_stream`'s batches with `calibration` sentences (seed 0)."""
    records = list(corpus.records())
    cal = calibration_sample(len(records), calibration)
    in_cal = set(cal)
    kw = dict(batch_size=batch_size, max_tokens=max_tokens)
    plan = [b.ids for b in plan_batches([records[i] for i in cal], tokenizer, window=len(cal), **kw)]
    return plan + [b.ids for b in plan_batches([r for r in records if r.index not in in_cal], tokenizer, **kw)]


def bare_forward(model, tokenizer, plan, sync=lambda: None):
    """A callable running the base model over `plan` (from `sorted_plan` / `stream_plan`)."""
    device = next(model.parameters()).device

    def run():
        with torch.inference_mode():
            for rows in plan:
                input_ids = pad(rows, tokenizer.pad_token_id or 0, tokenizer.padding_side).to(device)
                mask = pad([[1] * len(r) for r in rows], 0, tokenizer.padding_side).to(device)
                model.base_model(**base_inputs(model, input_ids, mask))
        sync()

    return run
