"""Steering in generation: batching with left padding, where the override acts in each forward
call of the KV-cached loop, no state left behind, compiled decoding, the k sweep and its CLI."""
import json
import math

import pytest
import torch
from transformers import DynamicCache

import steer.engine.generation as G
import steer.experiments.language_sweep as LS
from steer.cli import main as cli_main
from steer.core.adapters import NeuronLayout
from steer.core.experts import FORMAT_VERSION, ExpertSet, random_control
from steer.engine.steering import intervene
from steer.core.intervention import Intervention
from steer.engine.batching import pad_batch
from steer.engine.patch import patch
from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "", "le chat noir est sur", "ab"]
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def steer_iv(model, positions="all", units=(1, 5, 9, 20), value=6.0):
    iv = Intervention.for_model(model, positions=positions)
    return iv.set(0, list(units), value).set(1, [3, 7], -value)


def tiny_experts(model, concepts=("en", "fr"), k=8):
    """A hand-made expert set: k random neurons per concept, forced to +-4."""
    layout = NeuronLayout(model)
    g = torch.Generator().manual_seed(0)
    experts = {}
    for i, c in enumerate(concepts):
        idx = torch.randperm(layout.n_neurons, generator=g)[:k]
        experts[c] = {"layer": idx // layout.width, "unit": idx % layout.width,
                      "value": torch.full((k,), 4.0 if i % 2 == 0 else -4.0), "score": torch.ones(k),
                      "other": torch.ones(k), "sign": torch.ones(k, dtype=torch.int8)}
    meta = {"format_version": FORMAT_VERSION, "model": "tiny", "fingerprint": layout.fingerprint(),
            "layers": layout.n_layers, "width": layout.width, "selection": {"k": k}}
    return ExpertSet(experts, meta)


# ---------------------------------------------------------------------------------------------
# batching, padding, positions


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_batched_equals_one_prompt_at_a_time_with_steering(family, backend):
    model = tiny_model(family, DT)
    tok = tiny_tokenizer()
    tok.padding_side = "right"  # generate pads on the left whatever the tokenizer says
    iv = steer_iv(model, "all")
    with patch(model) if backend == "fused" else torch.no_grad():
        batched = G.generate_ids(model, tok, PROMPTS, intervention=iv, max_new_tokens=8, batch_size=4)
        single = [G.generate_ids(model, tok, [p], intervention=iv, max_new_tokens=8)[0] for p in PROMPTS]
        plain = G.generate_ids(model, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    assert batched == single
    assert batched != plain  # the steering does something
    assert all(len(r) <= 8 for r in batched)


class Capture:
    """Down-projection inputs [B, T, M] of every layer, grouped per forward call."""

    def __init__(self, model):
        self.layout = NeuronLayout(model)
        self.calls: list[list[torch.Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(l)) for l, m in enumerate(self.layout.modules)]

    def _hook(self, layer):
        def hook(module, args):
            if layer == 0:
                self.calls.append([])
            self.calls[-1].append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def expected_region(positions, call, shape):
    """[B, T] bool where the override must act in forward call `call` (0 = prefill; left padding)."""
    b, t = shape
    prefill = call == 0
    if positions == "all" or (positions == "prompt" and prefill) or (positions == "generated" and not prefill):
        return torch.ones(b, t, dtype=torch.bool)
    if positions == "last":
        region = torch.zeros(b, t, dtype=torch.bool)
        region[:, -1] = True  # left padding: the last column is every row's last real token
        return region
    return torch.zeros(b, t, dtype=torch.bool)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["prompt", "generated", "last", "all"])
def test_positions_act_only_where_asked_in_every_cached_call(family, positions):
    model = tiny_model(family, DT)
    tok = tiny_tokenizer()
    iv = steer_iv(model, positions)
    raw = Capture(model)  # registered before the steering hooks: sees the neurons as computed
    with intervene(model, iv):
        steered = Capture(model)  # after them: sees what the down projection receives
        tokens = G.generate_ids(model, tok, PROMPTS[:3], intervention=None, max_new_tokens=5)
        steered.remove()
    raw.remove()
    assert len(steered.calls) == 5  # a prefill and 4 cached decoding steps
    for c, (r_layers, s_layers) in enumerate(zip(raw.calls, steered.calls)):
        for layer, (r, s) in enumerate(zip(r_layers, s_layers)):
            assert s.shape[1] == (r.shape[1]) and (c == 0) == (s.shape[1] > 1)
            region = expected_region(positions, c, s.shape[:2])[..., None] & iv.mask[layer]  # [B, T, M]
            forced = iv.add[layer].to(DT).expand_as(s)
            torch.testing.assert_close(s[region], forced[region].to(torch.float32).to(DT))
            assert torch.equal(s[~region], r[~region])  # untouched everywhere else, bit for bit
            if positions == "prompt" and c > 0 or positions == "generated" and c == 0:
                assert torch.equal(s, r)

    # the fused path gives the same tokens and the same neurons in every call
    with patch(model), intervene(model, iv):
        fused = Capture(model)
        tokens_fused = G.generate_ids(model, tok, PROMPTS[:3], max_new_tokens=5)
        fused.remove()
    assert tokens_fused == tokens
    for f_layers, s_layers in zip(fused.calls, steered.calls):
        for f, s in zip(f_layers, s_layers):
            torch.testing.assert_close(f, s, rtol=1e-6, atol=1e-6)  # the fused op works in fp32


def test_plain_intervene_tells_decoding_steps_from_the_prefill():
    model = tiny_model("llama", DT)
    tok = tiny_tokenizer()
    iv = steer_iv(model, "generated")
    with intervene(model, iv):
        want = G.generate_ids(model, tok, PROMPTS[:2], max_new_tokens=4)
    with intervene(model, iv):
        got = G.generate_ids(model, tok, PROMPTS[:2], max_new_tokens=4)
    assert got == want


def test_switching_steering_and_experts_needs_no_reload_and_leaves_nothing():
    model = tiny_model("qwen2", DT)
    tok = tiny_tokenizer()
    kw = dict(max_new_tokens=6, batch_size=2)
    base = G.generate_ids(model, tok, PROMPTS, **kw)
    a, b = steer_iv(model, "all"), steer_iv(model, "generated", units=(2, 4, 6, 8, 10), value=-5.0)
    with_a = G.generate_ids(model, tok, PROMPTS, intervention=a, **kw)
    with_b = G.generate_ids(model, tok, PROMPTS, intervention=b, **kw)
    assert with_a != base and with_b != base and with_a != with_b
    assert G.generate_ids(model, tok, PROMPTS, **kw) == base  # off again: nothing left behind
    assert all(not m._forward_pre_hooks for m in NeuronLayout(model).modules)
    assert not model.model._forward_pre_hooks

    rng = torch.get_rng_state()
    with patch(model) as p:
        assert G.generate_ids(model, tok, PROMPTS, **kw) == base  # patched, steering off == unpatched
        assert G.generate_ids(model, tok, PROMPTS, intervention=a, **kw) == with_a
        assert p.intervention is None  # detached after the call
        assert G.generate_ids(model, tok, PROMPTS, intervention=b, **kw) == with_b
        iv = Intervention.for_model(model)  # one object changed in place between calls
        assert G.generate_ids(model, tok, PROMPTS, intervention=iv.copy_(a), **kw) == with_a
        assert G.generate_ids(model, tok, PROMPTS, intervention=iv.copy_(b), **kw) == with_b
        assert G.generate_ids(model, tok, PROMPTS, intervention=iv.clear(), **kw) == base
    assert G.generate_ids(model, tok, PROMPTS, **kw) == base
    # sampling: reproducible per seed, different across seeds, caller's RNG untouched
    s0 = G.generate(model, tok, [""] * 4, do_sample=True, top_p=0.9, seed=0, max_new_tokens=6)
    assert s0 == G.generate(model, tok, [""] * 4, do_sample=True, top_p=0.9, seed=0, max_new_tokens=6)
    assert s0 != G.generate(model, tok, [""] * 4, do_sample=True, top_p=0.9, seed=1, max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("candidates", [4, 1024])  # 4: the top-k misses the nucleus, full sort
def test_nucleus_sampler_keeps_transformers_top_p_set_and_draws_its_distribution(candidates):
    from transformers import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g, dtype=torch.float64) * 2
    for top_p in (0.3, 0.9):
        hf = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
        idx, keep = G.nucleus_mask(logits, top_p, candidates)
        ours = torch.zeros_like(hf).scatter_(1, idx, keep)
        assert torch.equal(ours, hf)
    # draws: frequencies match the renormalised nucleus of logits / T
    row = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]], dtype=torch.float64)
    sampler = G.NucleusSampler(temperature=0.7, top_p=0.8, candidates=candidates)
    torch.manual_seed(0)
    out = sampler(None, row.expand(20000, -1).clone())
    assert torch.isfinite(out).sum(1).eq(1).all()
    freq = torch.bincount(out.argmax(-1), minlength=6).double() / 20000
    p = (row[0] / 0.7).softmax(-1)
    nucleus = (p.cumsum(0) - p) < 0.8
    want = torch.where(nucleus, p, 0) / p[nucleus].sum()
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)
    full = G.NucleusSampler(temperature=1.0, top_p=1.0)(None, row.expand(20000, -1).clone())
    torch.testing.assert_close(torch.bincount(full.argmax(-1), minlength=6).double() / 20000,
                               row[0].softmax(-1), atol=0.015, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch.compile


def greedy_loop(step, model, ids, mask, n):
    """Greedy decoding with a DynamicCache through `step` (a compiled forward)."""
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = step(ids, mask, pos, cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        logits = step(nxt, mask, pos, cache)
    return torch.cat(out, 1).tolist()


def test_compiled_prefill_and_decode_fullgraph_same_tokens_new_experts_without_recompiling():
    torch._dynamo.reset()
    model = tiny_model("llama", DT)
    tok = tiny_tokenizer()
    prompts = PROMPTS[:3]
    iv = steer_iv(model, "generated")  # the prefill graph must not steer, the decoding graph must
    other = steer_iv(model, "generated", units=(0, 2, 4, 6, 8, 11), value=-4.0)
    n = 6
    compiles = []

    def counting(gm, inputs):
        compiles.append(gm)
        return gm.forward

    def step(ids, mask, pos, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).logits

    ids, mask = pad_batch(G.encode_prompts(tok, prompts), tok.pad_token_id, "left")
    with patch(model), torch.no_grad():
        eager = G.generate_ids(model, tok, prompts, intervention=iv, max_new_tokens=n, min_new_tokens=n)
        eager_other = G.generate_ids(model, tok, prompts, intervention=other, max_new_tokens=n, min_new_tokens=n)
        assert eager != eager_other
        compiled = torch.compile(step, backend=counting, fullgraph=True, dynamic=True)  # a break raises
        with intervene(model, iv):
            assert greedy_loop(compiled, model, ids, mask, n) == eager
            n_compiles = len(compiles)
            assert n_compiles <= 2  # the prefill graph and one (dynamic) decoding graph
            iv.copy_(other)  # a new expert set, in place
            assert greedy_loop(compiled, model, ids, mask, n) == eager_other
    assert len(compiles) == n_compiles  # took effect without recompiling


# ---------------------------------------------------------------------------------------------
# statistics, the sweep, the CLI


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Oracle: the Wilson score interval written out (no continuity correction)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_matches_known_values():
    lo, hi = LS.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8414588 / 13.8414588, abs=1e-6)  # z^2 / (n + z^2)
    lo, hi = LS.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.40383, abs=1e-5), pytest.approx(0.59617, abs=1e-5))
    for k, n in [(0, 100), (3, 100), (37, 100), (100, 100), (1, 7), (6, 7), (1, 1)]:
        assert LS.wilson_interval(k, n) == pytest.approx(_wilson(k, n), abs=1e-9)
    lo, hi = LS.wilson_interval(3, 20, confidence=0.9)
    assert (lo, hi) == pytest.approx(_wilson(3, 20, z=1.6448536269514722), abs=1e-9)
    assert LS.wilson_interval(0, 7)[0] == 0.0 and LS.wilson_interval(7, 7)[1] == 1.0  # exact ends
    assert all(type(x) is float for x in LS.wilson_interval(3, 7))
    assert all(math.isnan(x) for x in LS.wilson_interval(0, 0))
    assert all(math.isnan(x) for x in LS.wilson_interval(0, -1))
    for k in (-1, 11):
        with pytest.raises(ValueError, match=f"successes={k} outside"):
            LS.wilson_interval(k, 10)


def fake_langid(texts, languages):
    """Deterministic stand-in for py3langid: a text is 'fr' when it holds more a..m than n..z."""
    assert set(languages) == {"en", "fr"}
    out = []
    for t in texts:
        lo = sum("a" <= ch <= "m" for ch in t)
        hi = sum("n" <= ch <= "z" for ch in t)
        out.append("fr" if lo > hi else "en")
    return out


def test_language_steering_sweep_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setattr(LS, "identify_languages", fake_langid)
    model = tiny_model("llama", torch.float32)
    tok = tiny_tokenizer()
    experts = tiny_experts(model)
    heldout = {"fr": ["le chat noir", "un chien"], "en": ["the cat", "a dog sat"]}
    res = LS.language_steering(model, tok, experts, ["fr", "en"], [8], n_samples=10, max_new_tokens=4,
                              heldout=heldout, random_seeds=(0, 1, 2), random_samples=4, batch_size=6, log=None)
    assert res["settings"]["ks"] == [0, 8] and res["settings"]["study_languages"] == ["en", "fr"]
    base = G.generate(model, tok, [""] * 10, do_sample=True, temperature=1.0, top_p=0.9, seed=0,
                      max_new_tokens=4, batch_size=6)
    for lang in ("fr", "en"):
        rows = res["results"][lang]
        assert [r["k"] for r in rows] == [0, 8]
        r0 = rows[0]
        assert r0["hits"] == sum(l == lang for l in fake_langid(base, ["en", "fr"]))  # same seeds
        assert r0["ppl_ratio"] == 1.0 and r0["random"] is None
        assert r0["ppl"] == pytest.approx(G.perplexity(model, tok, heldout[lang])["ppl"])
        for r in rows:
            assert r["n"] == 10 and 0 <= r["fraction"] <= 1
            assert r["ci95"][0] <= r["fraction"] <= r["ci95"][1]
            assert r["ppl"] > 1
        for r in rows[1:]:
            iv = experts.intervention(lang, k=r["k"])
            assert r["ppl"] == pytest.approx(G.perplexity(model, tok, heldout[lang], intervention=iv)["ppl"])
            rnd = r["random"]
            assert [s["seed"] for s in rnd["seeds"]] == [0, 1, 2] and rnd["fraction_sd"] >= 0
            assert rnd["ppl_mean"] == pytest.approx(sum(s["ppl"] for s in rnd["seeds"]) / 3)
    assert res["results"]["fr"][1]["ppl"] != res["results"]["fr"][0]["ppl"]
    assert all(s["n"] == 4 for s in res["results"]["fr"][1]["random"]["seeds"])
    # the control: same values, same count, other neurons
    riv, _ = random_control(experts, "fr", 8, seed=0)
    eiv = experts.intervention("fr")  # the whole set: none of its neurons is drawn
    assert len(riv) == 8 and not (riv.mask & eiv.mask).any()
    eiv = experts.intervention("fr", k=8)
    assert sorted(riv.add[riv.mask].tolist()) == sorted(eiv.add[eiv.mask].tolist())
    png = LS.plot_language_steering(res, tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(res)  # serialisable


def test_cli_generate_jsonl_and_sweep(monkeypatch, tmp_path, capsys):
    model = tiny_model("llama", torch.float32)
    tok = tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tiny_experts(model).save(tmp_path / "experts")
    common = ["--model", str(tmp_path / "m"), "--max-new-tokens", "5"]
    out = tmp_path / "g.jsonl"
    cli_main(["generate", *common, "--prompt", "ab", "--prompt", "le", "--n", "2", "--sample", "--top-p", "0.9",
              "--experts", str(tmp_path / "experts"), "--concept", "fr", "-k", "4", "--positions", "generated",
              "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("ab", 0), ("ab", 1), ("le", 0), ("le", 1)]
    assert rows[0]["k"] == 4 and rows[0]["positions"] == "generated"
    cli_main(["generate", *common, "--backend", "fused"])  # a BOS prompt, greedy, printed
    assert "--- ''" in capsys.readouterr().out

    monkeypatch.setattr(LS, "identify_languages", fake_langid)
    sweep = tmp_path / "sweep" / "ls.json"
    cli_main(["generate", *common, "--sweep", "--experts", str(tmp_path / "experts"), "--languages", "fr",
              "--ks", "0,4", "--n-samples", "4", "--random-seeds", "2", "--heldout-n", "0", "--out", str(sweep)])
    res = json.loads(sweep.read_text())
    assert [r["k"] for r in res["results"]["fr"]] == [0, 4] and sweep.with_suffix(".png").exists()
