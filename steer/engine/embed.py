"""Sentence embeddings from a model's hidden states, as in the seed paper's analysis.

A sentence's embedding is the mean, over its real tokens, of one layer's hidden state; by
default the last one (`hidden_states[-1]`, after the final norm), as in Sundar et al. (ACL
2025), "Steering into New Embedding Spaces". Only the base model runs (no LM head, whose vocab
can be 262k wide), so any intervention hooked or patched into its layers applies as it is.

Texts go through the rule of every forward pass (`steer.engine.batching`): tokenized by
`tokenize` (special tokens and their mask as collection has them), planned by `batches`
(longest first, at most `batch_size` sentences and `max_tokens` padded tokens, a longer
sentence alone) and padded by `padding` (the tokenizer's pad id and side) with position ids from
the mask. Padding never counts: pooling uses the attention mask (and, with `skip_bos`, the
pooled-token mask). Embeddings therefore do not depend on batch size, token budget, batch
make-up, order or padding side (up to fp rounding, ~1e-6).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steer.core.adapters import base_inputs, check_eval
from steer.core.intervention import Intervention
from steer.engine.steering import PerRow
from steer.engine.batching import (MAX_TOKENS, batches, given_tokens, input_device, pad, pad_batch, padding,
                                   special_ids, tokenize)
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
        (then `tokenizer` may be None; padding goes right).
    layers: "last" -> Tensor [N, D] of `hidden_states[-1]`; "all" or a list of indices into
        `hidden_states` (0 = embedding output, i = output of block i) -> dict index -> [N, D].
    batch_size / max_tokens: at most that many sentences and padded tokens a batch (None: no
        token budget); embeddings do not depend on them (up to fp rounding).
    skip_bos: leave out every special token, as collection's skip_special does (the tokens the
        tokenizer adds: BOS, and any EOS it appends; for token ids, those among `special_ids`:
        the tokenizer's, or without one the model's BOS / EOS / pad). The name is kept from when
        only a leading special token was left out; for the tokenizers steer supports (one BOS
        or none) the two rules give the same embeddings.
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
    texts = list(texts)
    if not texts:
        raise ValueError("embed needs at least one text")
    if all(isinstance(t, str) for t in texts):
        if tokenizer is None:
            raise ValueError("strings need a tokenizer; pass token id lists otherwise")
        ids, pooled = tokenize(tokenizer, texts, skip_special=skip_bos)
    else:
        ids, pooled = given_tokens(texts, special_ids(tokenizer, model), skip_special=skip_bos)
    plan = PerRow(intervention, len(ids))
    pad_id, side = padding(tokenizer)
    device = input_device(model)

    out: dict[int, torch.Tensor] = {}
    bar = tqdm(total=sum(map(len, ids)), desc="embed", unit="tok", unit_scale=True, disable=not progress)
    with torch.inference_mode(), bar:
        for rows in batches([len(s) for s in ids], batch_size, max_tokens):  # longest first: OOM early
            input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, side, device)  # [batch, pos]
            with plan.batch(model, rows):
                hidden = base(**base_inputs(model, input_ids, mask),
                              output_hidden_states=True, use_cache=False).hidden_states
            if not out:  # first batch: resolve the layers and allocate the outputs
                keys = [-1] if layers == "last" else (
                    list(range(len(hidden))) if layers == "all" else list(layers)
                )
                for k in keys:
                    if not -len(hidden) <= k < len(hidden):
                        raise IndexError(f"layer {k} out of range: {len(hidden)} hidden states")
                    out[k] = torch.empty(len(ids), hidden[k].shape[-1], dtype=torch.float32)
            tokens = pad([pooled[i] for i in rows], False, side).to(device)  # [batch, pos]: the positions averaged
            index = torch.tensor(rows)
            for k in out:
                out[k][index] = pool(hidden[k], tokens, "mean").cpu()  # [batch, D]
            bar.update(sum(len(ids[i]) for i in rows))
    return out[-1] if layers == "last" else out

