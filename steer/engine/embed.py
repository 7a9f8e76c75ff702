"""Sentence embeddings from a model's hidden states, as in the seed paper's analysis.

A sentence's embedding is the mean, over its real tokens, of one layer's hidden state; by
default the last one (`hidden_states[-1]`, after the final norm), as in Sundar et al. (ACL
2025), "Steering into New Embedding Spaces". Only the base model runs (no LM head, whose vocab
can be 262k wide), so any intervention hooked or patched into its layers applies as it is.

Padding never counts: texts are tokenized without padding, planned into batches like
collection's (`steer.engine.batching.batches`: longest first, at most `batch_size` sentences and
`max_tokens` padded tokens, a longer sentence alone), and padded per batch on the tokenizer's
side with explicit position ids (so left padding gives the positions an unpadded sentence would
have); pooling uses the attention mask. Embeddings therefore do not depend on batch size,
token budget, batch make-up, order or padding side (up to fp rounding, ~1e-6).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steer.core.adapters import base_inputs, check_eval
from steer.core.intervention import Intervention
from steer.engine.backends import PerRow
from steer.engine.batching import MAX_TOKENS, batches, input_device, pad_batch
from steer.kernels.fused_mlp_ref import pool


def embed(
    model,
    tokenizer,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    layers: str | Sequence[int] = "last",
    batch_size: int = 16,
    max_tokens: int | None = MAX_TOKENS,
    skip_bos: bool = False,
    progress: bool = True,
    intervention: Intervention | Sequence[Intervention | None] | None = None,
) -> torch.Tensor | dict[int, torch.Tensor]:
    """Mean-pooled hidden states of `texts`, in input order, as fp32 on the CPU.

    texts: strings (tokenized by `tokenizer`, special tokens added) or lists of token ids
        (then `tokenizer` may be None; padding goes right with `model.config.pad_token_id`
        or 0: its value never matters).
    layers: "last" -> Tensor [N, D] of `hidden_states[-1]`; "all" or a list of indices into
        `hidden_states` (0 = embedding output, i = output of block i) -> dict index -> [N, D].
    batch_size / max_tokens: at most that many sentences and padded tokens a batch (None: no
        token budget); embeddings do not depend on them (up to fp rounding).
    skip_bos: leave out each sentence's first token when it is a special token (any of
        `tokenizer.all_special_ids`; without a tokenizer, `model.config.bos_token_id`).
    intervention: None (the model as it is, with any steering already applied), one
        Intervention for every text, or a list with an Intervention (or None) per text, each
        text steered by its own in the same batches (per-row steering).
    The model must be in eval mode (dropout would make embeddings random).
    """
    if layers != "last" and layers != "all" and (
        isinstance(layers, str) or not all(isinstance(i, int) for i in layers)
    ):
        raise ValueError(f'layers must be "last", "all" or a list of ints, got {layers!r}')
    check_eval(model)
    base = model.base_model
    ids = _token_ids(tokenizer, texts)
    if not ids or any(len(s) == 0 for s in ids):
        raise ValueError("embed needs at least one text and no empty token sequence")
    plan = PerRow(intervention, len(ids))

    if skip_bos:
        special = (
            set(tokenizer.all_special_ids)
            if tokenizer is not None
            else {getattr(model.config, "bos_token_id", None)} - {None}
        )
        skip = [s[0] in special for s in ids]
        if any(k and len(s) == 1 for k, s in zip(skip, ids)):
            raise ValueError("a sequence holds only its special token: nothing left to pool")
    else:
        skip = [False] * len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    side = "left" if tokenizer is not None and tokenizer.padding_side == "left" else "right"
    left = side == "left"
    device = input_device(model)

    out: dict[int, torch.Tensor] = {}
    bar = tqdm(total=sum(map(len, ids)), desc="embed", unit="tok", unit_scale=True, disable=not progress)
    with torch.inference_mode(), bar:
        for rows in batches([len(s) for s in ids], batch_size, max_tokens):  # longest first: OOM early
            input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, side)  # [batch, pos]
            # positions of real tokens start at 0 whatever the padding
            with plan.batch(model, rows):
                hidden = base(**base_inputs(model, input_ids.to(device), mask.to(device)),
                              output_hidden_states=True, use_cache=False).hidden_states
            if not out:  # first batch: resolve the layers and allocate the outputs
                keys = [-1] if layers == "last" else (
                    list(range(len(hidden))) if layers == "all" else list(layers)
                )
                for k in keys:
                    if not -len(hidden) <= k < len(hidden):
                        raise IndexError(f"layer {k} out of range: {len(hidden)} hidden states")
                    out[k] = torch.empty(len(ids), hidden[k].shape[-1], dtype=torch.float32)
            tokens = mask.clone()  # [batch, pos]: the positions averaged
            for r, i in enumerate(rows):
                if skip[i]:
                    tokens[r, int((mask[r] == 0).sum()) if left else 0] = 0
            tokens = tokens.to(device).bool()  # [batch, pos]
            index = torch.tensor(rows)
            for k in out:
                out[k][index] = pool(hidden[k], tokens, "mean").cpu()  # [batch, D]
            bar.update(sum(len(ids[i]) for i in rows))
    return out[-1] if layers == "last" else out


def _token_ids(tokenizer, texts) -> list[list[int]]:
    texts = list(texts)
    if texts and all(isinstance(t, str) for t in texts):
        if tokenizer is None:
            raise ValueError("strings need a tokenizer; pass token id lists otherwise")
        return [list(s) for s in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return [[int(t) for t in s] for s in texts]
