"""Batching: how texts become padded batches, the one rule of every forward pass of steer.

Collection (exact, stream, refine), embeddings, generation and perplexity all read texts the
same way:
- `tokenize`: the tokenizer's special tokens added; a text of no token at all is the start
  token alone (BOS, else EOS); too-long texts truncated or refused where a limit applies.
- Special tokens: the pooled-token mask leaves out every token the tokenizer marks special in
  its `special_tokens_mask` (the tokens it added: BOS, and any EOS or separator it appends),
  wherever it sits, not only the first; a special-token string written in the text is text.
  That is collection's rule (the responses experts are found from); embeddings pool and
  perplexity scores the same tokens. Token ids given without a text (`given_tokens`) mark the
  tokenizer's special ids, or the model's BOS / EOS / pad ids without a tokenizer (`special_ids`).
- `batches`: the plan, longest first, stable, at most `batch_size` sentences and `max_tokens`
  padded tokens, a longer sentence alone.
- `padding`: the pad id (the tokenizer's, else 0: its value never reaches a result) and side
  (the tokenizer's; left when generating, `generating=True`, so that every row's last real
  token is the last column the next token follows); `pad_batch` pads ids and attention mask
  there. Position ids are computed from the mask (`steer.core.adapters.base_inputs`), so the
  side changes nothing but fp rounding.
`plan_batches` does the same for a stream of records, window by window, in a deterministic
order that checkpoints and ranks share. Inputs go to the device of the input embeddings
(`input_device`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from steer.core.corpus import Record
from steer.kernels.fused_mlp_ref import POOLINGS

TOO_LONG = ("truncate", "error")
WINDOW = 4096
# padded tokens per batch (sentences x the longest one's length): batches of 16 sentences of up to
# 512 tokens are bounded by the sentence count alone; a longer sentence shrinks its batch and one
# of 4,097 tokens or more runs alone, so a batch's activations stay those of 8,192 tokens
MAX_TOKENS = 8192


def tokenize(tokenizer, texts: Sequence[str], keys: Sequence[str] | None = None, skip_special: bool = True,
             limit: int | None = None, too_long: str = "truncate", truncated: list | None = None):
    """Token ids and the mask of pooled tokens of each text (lists, unpadded): the one tokenizing
    function of every forward pass (collection, embeddings, generation, perplexity) and of the
    benchmarks' baselines.

    Special tokens are added; a text of no token (e.g. "" with a tokenizer that adds none) is the
    start token alone (BOS, else EOS; a special token). With `skip_special`, the pooled mask
    leaves out the special tokens (see the module docstring); a text left with none is refused.
    A text over `limit` tokens (the model's context or max_length; None: no limit) is truncated
    to `limit` (too_long='truncate'; when `truncated` is a list, (position, tokens before
    truncation) is appended to it), or refused with a ValueError naming it (too_long='error').
    `keys` name the texts in errors (None: their positions)."""
    texts = list(texts)
    names = list(keys) if keys is not None else [f"#{i}" for i in range(len(texts))]
    enc = tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    long = [] if limit is None else [(i, len(t)) for i, t in enumerate(ids) if len(t) > limit]
    if long and too_long == "error":
        i, n = long[0]
        raise ValueError(f"sentence {names[i]!r} has {n} tokens, more than the limit of {limit} "
                         "(the model's context or max_length); too_long='truncate' "
                         "(--too-long truncate) cuts such sentences with a warning")
    if long:
        cut = tokenizer([texts[i] for i, _ in long], add_special_tokens=True,
                        return_special_tokens_mask=True, truncation=True, max_length=limit)
        for j, (i, _) in enumerate(long):
            ids[i], special[i] = cut["input_ids"][j], cut["special_tokens_mask"][j]
        if truncated is not None:
            truncated += long
    for i, t in enumerate(ids):
        if not len(t):
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise ValueError(f"sentence {names[i]!r} has no token, and the tokenizer no BOS (or EOS) "
                                 "token to stand for it")
            ids[i], special[i] = [start], [1]
    return [list(t) for t in ids], _pooled(special, skip_special, names, texts)


def special_ids(tokenizer, model: nn.Module | None = None) -> set[int]:
    """The ids that are special tokens in token ids given without a text: the tokenizer's
    (`all_special_ids`, which its `get_special_tokens_mask` marks in such ids), or without a
    tokenizer the model config's BOS, EOS and pad ids."""
    if tokenizer is not None:
        return set(tokenizer.all_special_ids)
    config = getattr(model, "config", None)
    found = (getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return {i for v in found for i in ([v] if isinstance(v, int) else v or ())}


def given_tokens(rows: Sequence[Sequence[int]], special: set[int], skip_special: bool = True):
    """`tokenize` for token ids a caller made: (ids, pooled masks), a token special when its id
    is in `special` (`special_ids`). An empty row, or one with no token left to pool, is refused."""
    ids = [[int(t) for t in r] for r in rows]
    names = [f"#{i}" for i in range(len(ids))]
    for name, r in zip(names, ids):
        if not r:
            raise ValueError(f"token sequence {name} is empty")
    return ids, _pooled([[t in special for t in r] for r in ids], skip_special, names, ids)


def _pooled(special: list[list], skip_special: bool, names: list[str], texts) -> list[list[bool]]:
    """The pooled-token masks: every token, or (skip_special) every token not special."""
    pooled = []
    for i, s in enumerate(special):
        keep = [not x for x in s] if skip_special else [True] * len(s)
        if not any(keep):
            raise ValueError(f"sentence {names[i]!r} has no token left once its special tokens are "
                             f"skipped ({texts[i]!r})")
        pooled.append(keep)
    return pooled


def batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """The batch plan: sentence indices sorted by (descending length, index), so the longest
    sentences run first (a memory problem shows at once) and the plan depends only on the
    lengths, then cut into batches of at most `batch_size` sentences and `max_tokens` padded tokens
    (sentences x the longest one's length; None: no budget). A sentence longer than the budget
    runs alone. Every batching of steer (collect, collect_stream, refine, embed, generate,
    perplexity) and of the benchmarks' baselines is this one."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan, start = [], 0
    while start < len(order):
        fit = batch_size if max_tokens is None else max(1, max_tokens // max(lengths[order[start]], 1))
        plan.append(order[start:start + min(batch_size, fit)])
        start += len(plan[-1])
    return plan


def pad(rows: Sequence[Sequence], value, side: str = "right") -> torch.Tensor:
    """Rows of unequal length as one tensor [B, T], filled with `value` on the `side` given."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([list(r) + f if side == "right" else f + list(r) for r, f in zip(rows, fill)])


def padding(tokenizer, generating: bool = False) -> tuple[int, str]:
    """(pad id, side) of every forward pass: the one padding rule.

    The pad id is the tokenizer's, else 0 (an id every vocabulary has): its value never reaches
    a result, as the attention mask leaves padding out of every forward, pooling and scoring
    ignore it, and generation cuts each row at its EOS. The side is the tokenizer's
    `padding_side` ("right" without a tokenizer): position ids come from the mask
    (`base_inputs`), so it changes nothing but fp rounding, and collection's numbers stay those
    of the tokenizer's side. `generating`: "left" whatever the tokenizer says, since new tokens
    follow the last column, which must be every row's last real token."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    side = "left" if generating else getattr(tokenizer, "padding_side", None) or "right"
    return (0 if pad_id is None else pad_id), side


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 [B, T] on `device`: the padding of every forward
    pass of steer (collection, embeddings, generation, perplexity), with the id and side of
    `padding`. Position ids come from the mask (`base_inputs`), so the side never changes a
    real token's result."""
    return (pad(ids, pad_id, side).to(device),
            pad([[1] * len(r) for r in ids], 0, side).to(device))


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (also right under a HF device_map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


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
