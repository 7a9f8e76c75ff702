"""Steering in generation: `generate`, held-out perplexity, and the language-steering k sweep.

Generation is Hugging Face's `model.generate` with its KV cache (a `DynamicCache`); steering is an
`Intervention` applied for the duration of one call (`intervene`: reference pre-hooks, or the
fused op's buffers on a model patched with `steer.patch`). Its `positions` decide where the
override acts, per forward call of the generation loop:

    "all"        every position of the prefill and every decoding step
    "prompt"     the prefill only (the call without a cached past): prompt tokens
    "generated"  decoding steps only (calls that extend the cache): each new token
    "last"       the last real token of every call: the prompt's last token, then each new token

Prompts are tokenised one by one (the tokenizer's special tokens, e.g. BOS, included; "" is a
BOS-only prompt), grouped into batches in the given order and padded on the LEFT here (whatever
the tokenizer's `padding_side`), so that a prompt's greedy continuation does not depend on the
batch it sits in. Sampling (temperature + nucleus top-p, no top-k) is `NucleusSampler`, a logits
processor that draws the token itself inside transformers' greedy search: a top-k and a
Gumbel-max draw instead of a sort and a multinomial over Gemma's 262k-token vocabulary. It draws
from a fresh seed per batch, `(seed, batch index)`, inside `torch.random.fork_rng`: the caller's
RNG state is left as it was, and two calls with the same seed and batches draw the same random
numbers (the k sweep below compares k values on the same draws). Nothing outlives a call: the
intervention is removed (or detached from the patch) when it returns, so steering can be switched
on and off, or the expert set changed, between calls without reloading the model.

`language_steering` is the seed paper's generation experiment: for each target language and k,
`n_samples` continuations of a BOS prompt with the language's top-k experts forced, the fraction
that py3langid (restricted to the study's languages) calls the target language, with a Wilson 95%
interval; the perplexity of held-out text of that language (Bible test verses) with the same
steering at every position; and a control that forces the same values on k random neurons
(several seeds, mean and sd). `plot_language_steering` draws it; `add_parser` registers the
`steer generate` command (single prompts, `--sweep`, `--overhead`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .adapters import base_inputs
from .intervention import POSITIONS, Intervention, intervene
from . import runtime
from .artifacts import atomic_write_text
from .runtime import add_arguments, environment

# ---------------------------------------------------------------------------------------------
# Generation


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of every prompt with the tokenizer's special tokens; "" -> [BOS] (EOS if no BOS)."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    for p in prompts:
        ids = list(tok(p)["input_ids"]) if p else []
        if not ids:
            if start is None:
                raise ValueError("an empty prompt needs a tokenizer with a BOS (or EOS) token")
            ids = [start]
        rows.append(ids)
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, T], padded on the left."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _batch_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"steer.generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def steering(model: nn.Module, intervention: Intervention | None):
    """`intervene(model, intervention)` for the duration of a `with` block (None: nothing)."""
    return contextlib.nullcontext() if intervention is None else intervene(model, intervention)


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


def _generation_config(model, tok, max_new_tokens, do_sample, temperature, top_p, min_new_tokens):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    if eos is None:
        eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
    # sampling is done by `NucleusSampler` inside a greedy search: transformers' own warpers
    # (and its default top_k=50) stay off
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
              pad_token_id=pad, eos_token_id=eos, bos_token_id=tok.bos_token_id, use_cache=True)
    return GenerationConfig(**kw), pad


def generate_ids(model: nn.Module, tok, prompts: Sequence[str], *, intervention: Intervention | None = None,
                 max_new_tokens: int = 48, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 min_new_tokens: int = 0) -> list[list[int]]:
    """The new token ids of every prompt (EOS and later padding cut off); see `generate`."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}")
    rows = encode_prompts(tok, prompts)
    cfg, pad = _generation_config(model, tok, max_new_tokens, do_sample, temperature, top_p, min_new_tokens)
    eos = {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id or ())
    device = _device(model)
    out: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), steering(model, intervention), torch.inference_mode():
        for b, start in enumerate(range(0, len(rows), batch_size)):
            ids, mask = left_pad(rows[start:start + batch_size], pad, device)
            torch.manual_seed(_batch_seed(seed, b))
            extra = {}
            if do_sample:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList([NucleusSampler(temperature, top_p)])
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **extra)
            new = new[:, ids.shape[1]:]
            for r in new.tolist():
                cut = next((i for i, t in enumerate(r) if t in eos), len(r))
                out.append(r[:cut])
    return out


def generate(model: nn.Module, tok, prompts: Sequence[str], *, intervention: Intervention | None = None,
             max_new_tokens: int = 48, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 16) -> list[str]:
    """Continue every prompt ("" = BOS only) with `intervention` steering; the new text of each.

    Greedy by default; `do_sample` draws with `temperature` and nucleus `top_p` (no top-k;
    `NucleusSampler`), from per-batch seeds derived from `seed`. Batched greedy output equals
    one prompt at a time.
    """
    ids = generate_ids(model, tok, prompts, intervention=intervention, max_new_tokens=max_new_tokens,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size)
    return [tok.decode(r, skip_special_tokens=True) for r in ids]


# ---------------------------------------------------------------------------------------------
# Perplexity


def perplexity(model: nn.Module, tok, texts: Sequence[str], *, intervention: Intervention | None = None,
               batch_size: int = 8) -> dict:
    """Token-level perplexity of `texts` (each with the tokenizer's BOS), optionally steered.

    Every token after the first is predicted; the mean negative log-likelihood is over all of
    them (token-weighted). Returns {"ppl", "nll", "tokens"}.
    """
    rows = encode_prompts(tok, texts)
    device = _device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # little padding
    with steering(model, intervention), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start:start + batch_size]]
            ids, mask = left_pad(batch, pad, device)
            logits = model(**base_inputs(model, ids, mask)).logits[:, :-1]  # [B, T-1, V]
            target = ids[:, 1:]
            real = (mask[:, :-1] * mask[:, 1:]).bool()  # predicted token and its context both real
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            total += float(nll[real].double().sum())
            count += int(real.sum())
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


# ---------------------------------------------------------------------------------------------
# Statistics and language identification


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (no continuity correction)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, {n}]")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding noise
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


_IDENTIFIERS: dict[tuple[str, ...], object] = {}


def identify_languages(texts: Sequence[str], languages: Sequence[str]) -> list[str]:
    """py3langid's language of every text, restricted to `languages`; "" for an empty text.

    Uses its own `LanguageIdentifier` per language set (py3langid's module-level
    `set_languages` would change every other user's classifier).
    """
    key = tuple(sorted(languages))
    if key not in _IDENTIFIERS:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE)
        ident.set_languages(list(key))
        _IDENTIFIERS[key] = ident
    ident = _IDENTIFIERS[key]
    return [ident.classify(t)[0] if t.strip() else "" for t in texts]


# ---------------------------------------------------------------------------------------------
# The language-steering sweep


def random_intervention(experts, concept: str, k: int, seed: int, *, positions: str = "all",
                        strength: float = 1.0, exclude_experts: bool = True) -> Intervention:
    """The control: the values of `concept`'s first k experts forced on k random neurons.

    Neurons are drawn uniformly from all layers x units (a seeded permutation), leaving out the
    concept's own first k experts. k: 0 (an empty intervention) .. the experts the set holds.
    """
    from .experts import check_k

    e = experts.experts[concept]
    k = check_k(k, allow_zero=True, available=len(e["layer"]),
                where=f"the set holds {{n}} experts for {concept!r}")
    n_layers, width = experts.shape
    values = e["value"][:k].float() * strength
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_layers * width, generator=g)
    if exclude_experts:
        taken = set((e["layer"][:k] * width + e["unit"][:k]).tolist())
        perm = perm[~torch.isin(perm, torch.tensor(sorted(taken), dtype=torch.long))] if taken else perm
    idx = perm[:k]
    iv = Intervention(n_layers, width, positions=positions)
    return iv.set(idx // width, idx % width, values) if k else iv


def _heldout(languages: Sequence[str], n: int, seed: int) -> tuple[dict[str, list[str]], dict]:
    from .corpus import bible_parallel

    par = bible_parallel(list(languages), split="test", n=n, seed=seed)
    return {lang: list(par.texts[lang]) for lang in languages}, par.description


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


def language_steering(model: nn.Module, tok, experts, languages: Sequence[str], ks: Sequence[int], *,
                      n_samples: int = 100, max_new_tokens: int = 48, temperature: float = 1.0,
                      top_p: float = 0.9, seed: int = 0, heldout: dict[str, list[str]] | int | None = 50,
                      study_languages: Sequence[str] | None = None, random_seeds: Sequence[int] = (0, 1, 2),
                      random_samples: int | None = None, positions: str = "all", strength: float = 1.0,
                      batch_size: int = 16, ppl_batch_size: int = 8, keep_samples: int = 5,
                      random_ppl: bool = True, checkpoint: str | Path | None = None,
                      classify: Callable[[Sequence[str], Sequence[str]], list[str]] | None = None,
                      log: Callable[[str], None] | None = print) -> dict:
    """The k sweep: target-language fraction of BOS-prompted samples and held-out perplexity.

    For each target language in `languages` and each k in `ks` (k=0: no steering, generated once
    and shared by all targets): `n_samples` sampled continuations of a BOS prompt (temperature,
    nucleus top_p, seeds fixed by `seed`, so every k draws the same random numbers) with the
    target's first k experts forced at `positions`; the fraction that `classify` (default
    py3langid restricted to `study_languages`, default the expert set's concepts) assigns to the
    target, with a Wilson 95% interval; the perplexity of held-out text of the target with the
    same experts forced at every position. Control, for every k > 0 and each of `random_seeds`:
    the same values on k random neurons (`random_samples` samples each, default n_samples);
    mean and sd over seeds (with their perplexities unless `random_ppl` is False).

    checkpoint: a JSON file rewritten with the results so far after every (language, k).
    heldout: {language: texts}, or an int n = that many Bible test verses per language
    (aligned across languages), or None (no perplexity).
    """
    classify = classify or identify_languages
    say = log or (lambda s: None)
    study = list(study_languages or experts.concepts)
    missing = [l for l in languages if l not in experts.concepts]
    if missing:
        raise KeyError(f"no experts for {missing}; the set has {experts.concepts}")
    outside = [l for l in languages if l not in study]
    if outside:
        raise ValueError(f"target languages {outside} are not among the identified languages {study}")
    from .experts import check_k

    ks = sorted(set(check_k(k, allow_zero=True) for k in ks) | {0})  # k=0, the unsteered reference, always
    for lang in languages:  # before any sample is drawn
        check_k(ks[-1], allow_zero=True, available=len(experts.experts[lang]["layer"]),
                where=f"the set holds {{n}} experts for {lang!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
    experts.check(model)
    heldout_desc = None
    if isinstance(heldout, int):
        heldout, heldout_desc = _heldout(languages, heldout, seed)
    elif heldout is not None:
        heldout_desc = {"source": "given", "n": {l: len(heldout[l]) for l in languages}}
    n_random = n_samples if random_samples is None else random_samples
    gen = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
               batch_size=batch_size)
    start = time.perf_counter()

    def sample(iv, n):
        t = time.perf_counter()
        texts = generate(model, tok, [""] * n, intervention=iv, seed=seed, **gen)
        langs = classify(texts, study)
        return texts, langs, time.perf_counter() - t

    def ppl(lang, iv):
        if heldout is None:
            return None
        return perplexity(model, tok, heldout[lang], intervention=iv, batch_size=ppl_batch_size)["ppl"]

    def frac(langs, lang):
        hits = sum(l == lang for l in langs)
        lo, hi = wilson_interval(hits, len(langs))
        return {"n": len(langs), "hits": hits, "fraction": hits / len(langs), "ci95": [lo, hi]}

    base_texts, base_langs, secs = sample(None, n_samples)
    say(f"k=0 (no steering): {n_samples} samples in {secs:.0f} s; identified {dict(Counter(base_langs))}")
    base_ppl = {lang: ppl(lang, None) for lang in languages}
    results: dict[str, list[dict]] = {}
    samples: dict[str, dict[str, list[str]]] = {}
    for lang in languages:
        rows = []
        samples[lang] = {}
        for k in ks:
            if k == 0:
                row = {"k": 0, **frac(base_langs, lang), "identified": dict(Counter(base_langs)),
                       "ppl": base_ppl[lang], "ppl_ratio": 1.0 if base_ppl[lang] else None, "random": None}
                samples[lang]["0"] = base_texts[:keep_samples]
                rows.append(row)
                continue
            iv = experts.intervention(lang, k=k, positions=positions, strength=strength)
            texts, langs, secs = sample(iv, n_samples)
            p = ppl(lang, _all_positions(iv))
            row = {"k": k, **frac(langs, lang), "identified": dict(Counter(langs)), "ppl": p,
                   "ppl_ratio": None if p is None else p / base_ppl[lang]}
            samples[lang][str(k)] = texts[:keep_samples]
            ctrl = []
            for rs in random_seeds:
                riv = random_intervention(experts, lang, k, rs, positions=positions, strength=strength)
                rt, rl, _ = sample(riv, n_random)
                rp = ppl(lang, _all_positions(riv)) if random_ppl else None
                ctrl.append({"seed": rs, **frac(rl, lang), "identified": dict(Counter(rl)), "ppl": rp})
            if ctrl:
                fm, fs = _mean_sd([c["fraction"] for c in ctrl])
                pm, ps = (None, None) if heldout is None or not random_ppl else _mean_sd([c["ppl"] for c in ctrl])
                row["random"] = {"fraction_mean": fm, "fraction_sd": fs, "ppl_mean": pm, "ppl_sd": ps,
                                 "seeds": ctrl}
            else:
                row["random"] = None
            rows.append(row)
            rnd = row["random"]
            say(f"{lang} k={k}: {row['fraction']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] "
                f"(k=0: {frac(base_langs, lang)['fraction']:.2f}); ppl {p if p is None else round(p, 1)}"
                f" (k=0: {base_ppl[lang] if p is None else round(base_ppl[lang], 1)})"
                + ("" if rnd is None else f"; random {rnd['fraction_mean']:.2f}±{rnd['fraction_sd']:.2f}")
                + f"; {secs:.0f} s per {n_samples} samples")
            if checkpoint is not None:
                atomic_write_text(checkpoint, json.dumps(
                    {"partial": True, "results": {**results, lang: rows}, "samples": samples}, ensure_ascii=False))
        results[lang] = rows
    settings = {
        "model": getattr(model.config, "name_or_path", ""), "architecture": type(model).__name__,
        "patched": getattr(model, "_steer_patch", None) is not None,
        "languages": list(languages), "study_languages": study, "ks": ks, "n_samples": n_samples,
        "random_samples": n_random, "random_seeds": list(random_seeds), "random_ppl": random_ppl,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": None, "seed": seed, "prompt": "BOS only",
        "positions_generation": positions, "positions_perplexity": "all", "strength": strength,
        "experts": {"model": experts.meta.get("model"), "selection": experts.meta.get("selection"),
                    "corpus": experts.meta.get("corpus"), "concepts": experts.concepts},
        "heldout": heldout_desc,
        "classifier": "py3langid restricted to study_languages" if classify is identify_languages else "custom",
    }
    return {"settings": settings, "results": results, "samples": samples,
            "seconds": round(time.perf_counter() - start, 1)}


def _all_positions(iv: Intervention) -> Intervention:
    """A copy of `iv` that steers every position (perplexity of held-out text)."""
    out = Intervention(*iv.shape, positions="all", device=iv.mask.device)
    out.mask.copy_(iv.mask)
    out.mul.copy_(iv.mul)
    out.add.copy_(iv.add)
    return out


def plot_language_steering(result: dict, path) -> Path:
    """Target-language fraction (Wilson 95% CI) and held-out perplexity against k, per language.

    Random-neuron control: fraction mean ± sd over seeds (clipped to [0, 1]); perplexity as the
    geometric mean over seeds with the seeds' min-max range (a log axis: mean ± sd would cross 0).
    """
    from matplotlib.figure import Figure  # renders with Agg; no pyplot global state

    langs = list(result["results"])
    fig = Figure(figsize=(3.6 * len(langs), 6.6))
    axes = fig.subplots(2, len(langs), squeeze=False, sharex="col")
    for j, lang in enumerate(langs):
        rows = result["results"][lang]
        ks = [r["k"] for r in rows]
        xs = [max(k, 0.5) for k in ks]  # log axis: k=0 drawn at 0.5
        ax = axes[0, j]
        f = [r["fraction"] for r in rows]
        lo = [r["fraction"] - r["ci95"][0] for r in rows]
        hi = [r["ci95"][1] - r["fraction"] for r in rows]
        ax.errorbar(xs, f, yerr=[lo, hi], marker="o", capsize=3, label="experts (Wilson 95% CI)")
        rnd = [(x, r["random"]) for x, r in zip(xs, rows) if r["random"]]
        if rnd:
            m = [r["fraction_mean"] for _, r in rnd]
            sd = [r["fraction_sd"] for _, r in rnd]
            ax.errorbar([x for x, _ in rnd], m, yerr=[[min(a, b) for a, b in zip(sd, m)], [min(a, 1 - b) for a, b in zip(sd, m)]],
                        marker="s", ls="--", capsize=3, color="gray", label="random neurons (mean ± sd)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"target {lang}")
        if j == 0:
            ax.set_ylabel("fraction identified as target")
        ax = axes[1, j]
        if all(r["ppl"] is not None for r in rows):
            ax.plot(xs, [r["ppl"] for r in rows], marker="o", label="experts")
            seeds = [(x, [s["ppl"] for s in r["seeds"]]) for x, r in rnd]
            if seeds and all(p is not None for _, ps in seeds for p in ps):
                gm = [math.exp(sum(map(math.log, ps)) / len(ps)) for _, ps in seeds]
                ax.errorbar([x for x, _ in seeds], gm, yerr=[[g - min(ps) for g, (_, ps) in zip(gm, seeds)],
                                                            [max(ps) - g for g, (_, ps) in zip(gm, seeds)]],
                            marker="s", ls="--", capsize=3, color="gray", label="random (geo. mean, min-max)")
            ax.set_yscale("log")
        if j == 0:
            ax.set_ylabel("held-out perplexity of the target language")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (experts forced; 0 = none)")
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    labels = [l for ax in axes[:, 0] for l in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    s = result.get("settings", {})
    fig.suptitle(f"{s.get('model', '')}: BOS-prompted samples (n={s.get('n_samples')}, T={s.get('temperature')}, "
                 f"top-p={s.get('top_p')}, {s.get('max_new_tokens')} new tokens), py3langid", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Overhead of steering during generation


def generation_overhead(model: nn.Module, tok, intervention: Intervention, *, batch_sizes=(1, 8),
                        new_tokens: int = 32, repeats: int = 3, prompt: str = "The") -> dict:
    """Seconds per generated token (greedy, exactly `new_tokens`), steering off/on, hooks/fused.

    Configurations are interleaved within every repeat (a shared machine drifts); the median
    (and the minimum) of the repeats is kept. Ratios are against the unpatched model without
    steering ("hooks, off"). "ms_per_step" is per decoding step of the whole batch.
    """
    from .patch import patch

    configs = ["hooks, off", "hooks, on", "fused, off", "fused, on"]
    times: dict[int, dict[str, list[float]]] = {b: {c: [] for c in configs} for b in batch_sizes}

    def run(b, iv):
        t = time.perf_counter()
        generate_ids(model, tok, [prompt] * b, intervention=iv, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, batch_size=b)
        return (time.perf_counter() - t) / new_tokens

    for b in batch_sizes:
        run(b, None)  # warm-up
        for _ in range(repeats):
            for c in configs:
                iv = intervention if c.endswith("on") else None
                if c.startswith("fused"):
                    with patch(model):
                        times[b][c].append(run(b, iv))
                else:
                    times[b][c].append(run(b, iv))
    out = {"new_tokens": new_tokens, "repeats": repeats, "neurons_steered": len(intervention),
           "positions": intervention.positions, "threads": torch.get_num_threads(), "by_batch": {}}
    for b in batch_sizes:
        med = {c: statistics.median(v) for c, v in times[b].items()}
        base = med["hooks, off"]
        low = {c: min(v) for c, v in times[b].items()}
        out["by_batch"][str(b)] = {c: {"s_per_token": med[c], "ms_per_step": 1e3 * med[c], "ratio": med[c] / base,
                                       "ms_per_step_min": 1e3 * low[c], "ratio_min": low[c] / low["hooks, off"],
                                       "all": times[b][c]} for c in configs}
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `steer generate` on an argparse subparsers object."""
    g = subparsers.add_parser(
        "generate", help="generate with experts forced (single prompts, --sweep, --overhead)",
        description="Generate continuations with a concept's experts forced; --sweep runs the "
                    "language-steering k sweep; --overhead times steering per generated token.")
    g.add_argument("--model", default=None,
                   help="built-in name, local checkpoint or Hub id (default: the model recorded in --experts, "
                        "else gemma-3-270m)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable); none = BOS only")
    g.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    g.add_argument("--experts", default=None, help="expert-set directory (steer find-experts OUT/experts)")
    g.add_argument("--concept", default=None, help="concept whose experts are forced")
    g.add_argument("-k", "--k", type=int, default=None, help="number of experts forced (default: all in the set)")
    g.add_argument("--strength", type=float, default=1.0, help="multiply the forcing values (default 1)")
    g.add_argument("--positions", choices=POSITIONS, default="all", help="where to steer (default all)")
    g.add_argument("--backend", choices=["hooks", "fused"], default="hooks",
                   help="reference pre-hooks or the fused MLP op (steer.patch)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1, sweep 0.9)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--out", default=None, help="JSONL file (sweep: a JSON file, PNG beside it)")
    add_arguments(g)
    s = g.add_argument_group("language-steering sweep (--sweep)")
    s.add_argument("--sweep", action="store_true", help="run the k sweep over --languages")
    s.add_argument("--languages", default="fr,de,es", help="target languages (default fr,de,es)")
    s.add_argument("--study-languages", default=None,
                   help="languages langid may answer (default: the expert set's concepts)")
    s.add_argument("--ks", default="0,10,50,200", help="k values (default 0,10,50,200)")
    s.add_argument("--n-samples", type=int, default=100, help="samples per (language, k) (default 100)")
    s.add_argument("--random-seeds", type=int, default=3, help="random-neuron control seeds (default 3)")
    s.add_argument("--random-samples", type=int, default=None, help="samples per control seed (default --n-samples)")
    s.add_argument("--heldout-n", type=int, default=50, help="Bible test verses per language for perplexity (0: none)")
    s.add_argument("--random-ppl", action=argparse.BooleanOptionalAction, default=True,
                   help="also the perplexity under each random-neuron control (default yes)")
    g.add_argument("--overhead", action="store_true", help="time steering per generated token (hooks/fused, on/off)")
    g.add_argument("--repeats", type=int, default=5, help="--overhead: interleaved repeats (median kept)")
    g.set_defaults(func=cmd_generate)
    return g


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    return prompts or [""]


def cmd_generate(args) -> None:
    from .cli import writable_dir
    from .experts import ExpertSet, check_k
    from .models import load_model
    from .patch import patch

    # every option is checked before the model loads
    if (args.sweep or args.overhead) and not args.experts:
        raise ValueError(f"--{'sweep' if args.sweep else 'overhead'} needs --experts DIR")
    if args.concept is not None and not args.experts:
        raise ValueError("--concept needs --experts DIR")
    if args.k is not None:
        check_k(args.k, "-k")
    experts = ExpertSet.load(args.experts) if args.experts else None
    if experts is not None and not args.sweep:
        if args.concept is None:
            raise ValueError(f"--experts needs --concept (one of {experts.concepts})")
        if args.concept not in experts.concepts:
            raise ValueError(f"--concept {args.concept!r} is not in {args.experts} (its concepts: {experts.concepts})")
        if args.k is not None:
            check_k(args.k, "-k", available=len(experts.experts[args.concept]["layer"]),
                    where=f"the set holds {{n}} experts for {args.concept!r}")
    out = Path(args.out or "runs/language_steering/language_steering.json") if args.sweep or args.out else None
    if out is not None:
        writable_dir(out.parent, "--out's folder")
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory; give a file name")
    device, dtype = runtime.apply(args)
    args.model = args.model or (experts.meta.get("model") if experts else None) or "gemma-3-270m"
    model, tok = load_model(args.model, device=device, dtype=dtype)
    if args.sweep:
        if args.backend == "fused":
            patch(model)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial.json")
        result = language_steering(
            model, tok, experts, _csv(args.languages), [int(k) for k in _csv(args.ks)],
            n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=0.9 if args.top_p is None else args.top_p, seed=args.seed,
            heldout=args.heldout_n or None, study_languages=_csv(args.study_languages) or None,
            random_seeds=list(range(args.random_seeds)), random_samples=args.random_samples,
            positions=args.positions, strength=args.strength, batch_size=args.batch_size,
            random_ppl=args.random_ppl, checkpoint=partial)
        result["settings"]["command"] = " ".join(sys.argv)
        result["settings"]["machine"] = environment()
        atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False))
        partial.unlink(missing_ok=True)
        png = plot_language_steering(result, out.with_suffix(".png"))
        print(f"wrote {out} and {png}")
        return
    iv = None
    if experts is not None:
        iv = experts.intervention(args.concept, model, k=args.k, positions=args.positions, strength=args.strength)
    if args.overhead:
        result = generation_overhead(model, tok, iv, new_tokens=args.max_new_tokens, repeats=args.repeats)
        result["settings"] = {"model": args.model, "concept": args.concept, "k": len(iv), "command": " ".join(sys.argv),
                              "machine": environment()}
        text = json.dumps(result, indent=1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, text)
        print(text)
        return
    if args.backend == "fused":
        patch(model)
    prompts = _prompts(args)
    expanded = [p for p in prompts for _ in range(args.n)]
    texts = generate(model, tok, expanded, intervention=iv, max_new_tokens=args.max_new_tokens,
                     do_sample=args.sample, temperature=args.temperature,
                     top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, batch_size=args.batch_size)
    meta = {"model": args.model, "concept": args.concept, "k": None if iv is None else len(iv),
            "strength": args.strength, "positions": args.positions, "do_sample": args.sample, "seed": args.seed}
    rows = [{"prompt": p, "sample": i % args.n, "text": t, **meta} for i, (p, t) in enumerate(zip(expanded, texts))]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out}")
    else:
        for r in rows:
            print(f"--- {r['prompt']!r} #{r['sample']}\n{r['text']}")


def main(argv: list[str] | None = None) -> None:
    """`python -m steer.generation ...`: the same as `steer generate ...`."""
    from .cli import main as cli_main

    cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
