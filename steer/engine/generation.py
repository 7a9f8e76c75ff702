"""Steering in generation: `generate` and held-out perplexity.

Generation is Hugging Face's `model.generate` with its KV cache (a `DynamicCache`); steering is an
`Intervention` applied for the duration of one call (`intervene`: reference pre-hooks, or the
fused op's buffers on a model patched with `steer.patch`). Its `positions` decide where the
override acts, per forward call of the generation loop:

    "all"        every position of the prefill and every decoding step
    "prompt"     the prefill only (the call without a cached past): prompt tokens
    "generated"  decoding steps only (calls that extend the cache): each new token
    "last"       the last real token of every call: the prompt's last token, then each new token

Prompts and texts follow the rule of every forward pass (`steer.engine.batching`): tokenized by
`tokenize` (the tokenizer's special tokens, e.g. BOS, included; "" is a BOS-only prompt),
planned by `batches` (longest first, at most `batch_size` rows and `max_tokens` padded tokens,
a longer one alone; a generated row counts its `max_new_tokens` too, the length its KV cache
reaches) and padded by `padding`: on the LEFT when generating (`generating=True`, whatever the
tokenizer's `padding_side`), so that a prompt's greedy continuation does not depend on the
batch it sits in. Sampling (temperature + nucleus top-p, no top-k) is `NucleusSampler`, a logits
processor that draws the token itself inside transformers' greedy search: a top-k and a
Gumbel-max draw instead of a sort and a multinomial over Gemma's 262k-token vocabulary. It draws
from a fresh seed per batch, `(seed, batch index)`, inside `torch.random.fork_rng`: the caller's
RNG state is left as it was, and two calls with the same seed and batches draw the same random
numbers (the language-steering sweep compares k values on the same draws). Nothing outlives a call: the
intervention is removed (or detached from the patch) when it returns, so steering can be switched
on and off, or the expert set changed, between calls without reloading the model.

The language-steering sweep built on these functions is an experiment
(`steer.experiments.language_sweep`); the `steer generate` command is `steer.cli.generate`. The
overhead of steering per generated token is timed by bench/generation_overhead.py.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from steer.core.adapters import base_inputs
from steer.core.intervention import Intervention
from steer.engine.steering import PerRow
from steer.engine.batching import MAX_TOKENS, batches, input_device, pad, pad_batch, padding, tokenize

# ---------------------------------------------------------------------------------------------
# Generation


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of every prompt as every forward pass reads them (`tokenize`: the tokenizer's
    special tokens; "" -> [BOS], EOS if no BOS)."""
    return tokenize(tok, prompts, skip_special=False)[0]


def _batch_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"steer.generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def nucleus_mask(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus (top-p) sets of `logits` [B, V]: (token ids [B, C], keep [B, C] bool).

    The kept tokens are the smallest most-probable prefix whose probability reaches `top_p`
    (the most probable token always), as transformers' `TopPLogitsWarper` keeps them. Only the
    `candidates` most probable tokens are ranked (a top-k, not a sort of the whole vocabulary);
    when they hold less than `top_p`, 16x as many, and then the whole vocabulary.
    """
    lse = logits.logsumexp(-1, keepdim=True)  # [B, 1]
    vocab = logits.shape[-1]
    c = min(candidates, vocab)
    while True:
        top, idx = logits.topk(c, dim=-1) if c < vocab else logits.sort(dim=-1, descending=True)  # [B, C]
        p = (top - lse).exp()
        cum = p.cumsum(-1)
        if c == vocab or bool((cum[:, -1] >= top_p).all()):
            return idx, (cum - p) < top_p
        c = min(16 * c, vocab)


class NucleusSampler:
    """A logits processor that draws the next token itself (temperature + top-p, no top-k).

    Its output is -inf everywhere except the drawn token, so transformers' greedy search picks
    that token: sampling at the cost of a top-k and a Gumbel-max draw over the nucleus, instead
    of a sort and a multinomial over the whole vocabulary per step (Gemma's 262k tokens: about
    1.2 s per step of batch 16 on 2 CPU cores, more than the model). Random numbers come from
    torch's global generator (seeded per batch by `generate_ids`).
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, candidates: int = 1024):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be > 0 and top_p={top_p} in (0, 1]")
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates

    @staticmethod
    def _gumbel(shape, device) -> torch.Tensor:
        u = torch.rand(shape, device=device, dtype=torch.float64).clamp_(1e-300, 1.0 - 1e-16)
        return -(-u.log()).log()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # [B, V]
        if self.top_p < 1.0:
            idx, keep = nucleus_mask(logits, self.top_p, self.candidates)  # [B, C]
            cand = logits.gather(1, idx).double().masked_fill(~keep, float("-inf"))
            token = idx.gather(1, (cand + self._gumbel(cand.shape, cand.device)).argmax(-1, keepdim=True))
        else:
            token = (logits + self._gumbel(logits.shape, logits.device)).argmax(-1, keepdim=True)  # [B, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def _generation_config(model, tok, max_new_tokens, min_new_tokens):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    if eos is None:
        eos = tok.eos_token_id
    # sampling is done by `NucleusSampler` inside a greedy search: transformers' own warpers
    # (and its default top_k=50) stay off
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                            pad_token_id=padding(tok, generating=True)[0], eos_token_id=eos,
                            bos_token_id=tok.bos_token_id, use_cache=True)


def generate_ids(model: nn.Module, tok, prompts: Sequence[str], *,
                 intervention: Intervention | Sequence[Intervention | None] | None = None,
                 max_new_tokens: int = 48, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 min_new_tokens: int = 0, max_tokens: int | None = MAX_TOKENS) -> list[list[int]]:
    """The new token ids of every prompt, in prompt order (EOS and later padding cut off); see
    `generate`."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    plan = PerRow(intervention, len(prompts))
    rows = encode_prompts(tok, prompts)
    order = batches([len(r) + max_new_tokens for r in rows], batch_size, max_tokens)
    cfg = _generation_config(model, tok, max_new_tokens, min_new_tokens)
    pad_id, side = padding(tok, generating=True)
    eos = {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id or ())
    device = input_device(model)
    out: list[list[int]] = [[] for _ in rows]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        for b, batch in enumerate(order):
            ids, mask = pad_batch([rows[i] for i in batch], pad_id, side, device)
            torch.manual_seed(_batch_seed(seed, b))
            extra = {}
            if do_sample:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList([NucleusSampler(temperature, top_p)])
            with plan.batch(model, batch):
                new = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **extra)
            for i, r in zip(batch, new[:, ids.shape[1]:].tolist()):
                out[i] = r[:next((j for j, t in enumerate(r) if t in eos), len(r))]
    return out


def generate(model: nn.Module, tok, prompts: Sequence[str], *,
             intervention: Intervention | Sequence[Intervention | None] | None = None,
             max_new_tokens: int = 48, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 16, max_tokens: int | None = MAX_TOKENS) -> list[str]:
    """Continue every prompt ("" = BOS only) with `intervention` steering; the new text of each.

    intervention: None, one Intervention for every prompt, or a list with an Intervention (or
    None) per prompt: each prompt is steered by its own, in the same batches (per-row steering).

    Greedy by default; `do_sample` draws with `temperature` and nucleus `top_p` (no top-k;
    `NucleusSampler`), from per-batch seeds derived from `seed`. Batched greedy output equals
    one prompt at a time. batch_size / max_tokens: at most that many prompts and padded tokens
    (prompt and new tokens) a batch (None: no token budget), longest first (`batches`).
    """
    ids = generate_ids(model, tok, prompts, intervention=intervention, max_new_tokens=max_new_tokens,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size, max_tokens=max_tokens)
    return [tok.decode(r, skip_special_tokens=True) for r in ids]


# ---------------------------------------------------------------------------------------------
# Perplexity


def scored_batches(model: nn.Module, tok, texts: Sequence[str],
                   intervention: Intervention | Sequence[Intervention | None] | None,
                   batch_size: int, max_tokens: int | None):
    """The batches of `texts` as perplexity reads them (`tokenize`, `batches`, `padding`), each as
    (text indices, ids, attention mask, scored-token mask [B, T] bool on the model's device, a
    context steering the batch's rows: `PerRow`). Padding is never scored."""
    plan = PerRow(intervention, len(texts))
    rows, scored = tokenize(tok, texts)
    pad_id, side = padding(tok)
    device = input_device(model)
    for batch in batches([len(r) for r in rows], batch_size, max_tokens):
        ids, mask = pad_batch([rows[i] for i in batch], pad_id, side, device)
        real = pad([scored[i] for i in batch], False, side).to(device) & mask.bool()
        yield batch, ids, mask, real, plan.batch(model, batch)


def perplexity(model: nn.Module, tok, texts: Sequence[str], *,
               intervention: Intervention | Sequence[Intervention | None] | None = None,
               batch_size: int = 8, max_tokens: int | None = MAX_TOKENS, per_text: bool = False) -> dict:
    """Token-level perplexity of `texts` (each with the tokenizer's special tokens), optionally
    steered.

    Every token after the first is predicted, except the special tokens the tokenizer adds (those
    collection skips: `tokenize`); the mean negative log-likelihood is over all of them
    (token-weighted). intervention: as in `generate` (one, or one per text). batch_size /
    max_tokens: as in `generate`. Returns {"ppl", "nll", "tokens"}; with `per_text`, also
    "nll_sums" and "counts": each text's summed negative log-likelihood and scored tokens (in
    input order), so that a per-row batch of several interventions yields each one's perplexity.
    """
    sums, counts = [0.0] * len(texts), [0] * len(texts)
    with torch.inference_mode():
        for batch, ids, mask, scored, steering in scored_batches(model, tok, texts, intervention, batch_size, max_tokens):
            with steering:
                logits = model(**base_inputs(model, ids, mask)).logits[:, :-1]  # [B, T-1, V]
            target = ids[:, 1:]
            real = mask[:, :-1].bool() & scored[:, 1:]  # a scored token, after a real one
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            for i, row_nll, row_real in zip(batch, nll.double(), real):
                sums[i], counts[i] = float(row_nll[row_real].sum()), int(row_real.sum())
    count = sum(counts)
    mean = sum(sums) / max(count, 1)
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": count}
    return {**out, "nll_sums": sums, "counts": counts} if per_text else out
