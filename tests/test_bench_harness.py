"""The benchmark harness (bench/harness.py), the honesty of today's-way baseline (bench/todays_way.py)
and the per-part profile of bench/collection_paths.py.

Fast: fake callables and a fake clock for the harness; tiny random models for the baseline, whose
responses, scores and steering must equal steer's, so that benchmarks compare speed only.
"""
import contextlib
import csv
import io
import sys
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import harness  # noqa: E402
import todays_way  # noqa: E402
from steer.core.adapters import NeuronLayout, base_inputs  # noqa: E402
from steer.engine.collect import collect  # noqa: E402
from steer.core.corpus import Corpus  # noqa: E402
from steer.engine.backends import attached  # noqa: E402
from steer.engine.steering import intervene  # noqa: E402
from steer.core.intervention import Intervention  # noqa: E402
from tiny import batch, tiny_model, tiny_tokenizer  # noqa: E402

TEXTS = ["the cat sat on the mat today", "a dog", "le chat est là", "un", "das ist gut", "ein Hund bellt laut und lang",
         "the end", "fin", "ende gut alles gut", "hello world", "bonjour à tous", "hallo"]
LABELS = ["en", "en", "fr", "fr", "de", "de", "en", "fr", "de", "en", "fr", "de"]


# --------------------------------------------------------------------------------------------
# compare

@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter that only moves when a fake variant 'works'."""
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    return now


def test_compare_interleaves_round_robin(clock):
    calls = []

    def make(name):
        return lambda: calls.append(name)

    result = harness.compare({n: make(n) for n in "abc"}, baseline="a", repeats=4, warmup=2, log=None)
    assert len(calls) == 3 * (4 + 2)
    for r in range(6):  # every round runs every variant exactly once
        assert sorted(calls[3 * r:3 * r + 3]) == ["a", "b", "c"]
    assert calls[3:6] != calls[:3]  # the start rotates
    assert result.order == calls[6:]  # warm-up rounds are not timed
    assert all(len(v.seconds) == 4 for v in result.variants.values())


def test_compare_min_median_and_ratios(clock):
    costs = {"base": iter([3.0, 1.0, 2.0, 9.0]), "fast": iter([0.5, 0.25, 1.0, 0.5]), "slow": iter([4.0, 6.0, 5.0, 4.0])}

    def make(name):
        def run():
            clock[0] += next(costs[name])
        return run

    result = harness.compare({n: make(n) for n in costs}, baseline="base", repeats=4, warmup=0, log=None)
    base, fast, slow = (result.variants[n] for n in ("base", "fast", "slow"))
    assert sorted(base.seconds) == [1.0, 2.0, 3.0, 9.0] and base.min == 1.0 and base.median == 2.5
    assert result.ratio("fast", "min") == pytest.approx(0.25)
    assert result.ratio("fast", "median") == pytest.approx(0.5 / 2.5)
    assert result.ratio("slow", "min") == pytest.approx(4.0)
    assert result.ratio("slow", "median") == pytest.approx(4.5 / 2.5)
    rows = {r["variant"]: r for r in result.rows(N=7)}
    assert rows["base"]["ratio_min"] == 1.0 and rows["slow"]["N"] == 7 and rows["fast"]["baseline"] == "base"


def test_compare_reported_seconds_breakdown_and_notes(clock):
    k = count()

    def extrapolated():
        clock[0] += 1.0
        i = next(k)
        return {"seconds": 10.0 * (i + 1), "forward_s": float(i), "note": "EXTRAPOLATED"}

    def plain():
        clock[0] += 2.0

    result = harness.compare({"x": extrapolated, "y": plain}, baseline="y", repeats=3, warmup=0, log=None)
    x = result.variants["x"]
    assert x.seconds == [10.0, 20.0, 30.0]  # the variant's own figure replaces wall time
    assert x.breakdown["forward_s"] == [0.0, 1.0, 2.0] and x.breakdown["wall_s"] == [1.0] * 3
    assert x.notes == {"note": "EXTRAPOLATED"}
    assert result.ratio("x") == pytest.approx(5.0)
    row = [r for r in result.rows() if r["variant"] == "x"][0]
    assert row["forward_s"] == 1.0 and row["note"] == "EXTRAPOLATED"


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        harness.compare({"a": lambda: None}, baseline="b")
    with pytest.raises(ValueError, match="repeats"):
        harness.compare({"a": lambda: None}, baseline="a", repeats=0)


# --------------------------------------------------------------------------------------------
# writers and environment

def test_environment_record():
    env = harness.finish(harness.environment("float32"))
    for key in ("cpu", "gpu", "torch", "triton", "transformers", "dtype", "threads", "git",
                "load_start", "load_end"):
        assert key in env and env[key] != ""
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()


def test_writers_produce_valid_csv_and_markdown(tmp_path):
    env = {"cpu": "Test CPU", "load_start": "1.00 1.00 1.00", "load_end": "2.00 1.50 1.00"}
    tables = [
        harness.Table("Speed, in | seconds", [{"variant": "a", "min_s": 0.1234567, "note": "x, with comma"},
                                              {"variant": "b", "min_s": 1234.5, "ratio_min": 2.0}]),
        harness.Table("Padding", [{"batching": "sorted", "padding_fraction": 0.01}], note="a note"),
    ]
    md, cs = harness.write_results("case", env, tables, title="Case", out_dir=tmp_path)
    assert (md.name, cs.name) == ("case.md", "case.csv")
    rows = list(csv.DictReader(io.StringIO(cs.read_text())))
    assert len(rows) == 3
    assert rows[0]["table"] == "Speed, in | seconds" and float(rows[0]["min_s"]) == 0.1234567  # full precision
    assert rows[0]["note"] == "x, with comma" and rows[1]["ratio_min"] == "2.0" and rows[1]["note"] == ""
    assert rows[2]["padding_fraction"] == "0.01" and all(r["env_cpu"] == "Test CPU" for r in rows)
    text = md.read_text()
    assert text.startswith("# Case") and "## Environment" in text and "| cpu | Test CPU |" in text
    for block in text.split("\n\n"):  # every Markdown table has one cell count throughout
        lines = [l for l in block.splitlines() if l.startswith("|")]
        if lines:
            assert len({l.count("|") for l in lines}) == 1, block
    # overwritten, not appended
    harness.write_results("case", env, tables[1:], out_dir=tmp_path)
    assert len(list(csv.DictReader(io.StringIO(cs.read_text())))) == 1


# --------------------------------------------------------------------------------------------
# today's way is an honest baseline: same responses, scores and steering as steer

@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2", "opt"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_todays_way_responses_equal_steer_collect(family, side):
    model, tok = tiny_model(family), tiny_tokenizer()
    tok.padding_side = side
    ref = collect(model, tok, Corpus(TEXTS, LABELS), batch_size=12, progress=False).values  # [N, L, M]
    resp, timing = todays_way.collect(model, tok, TEXTS, batch_size=5)
    got = torch.from_numpy(np.stack([resp[l] for l in sorted(resp)], 1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert timing["tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS) < timing["positions"]


@pytest.mark.parametrize("skip_special", [True, False])
def test_todays_way_pools_over_real_tokens_only(skip_special):
    """Huge values planted at every padding position never reach a pooled response."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ref = collect(model, tok, Corpus(TEXTS, LABELS), batch_size=1, skip_special=skip_special, progress=False).values
    layout = NeuronLayout(model)
    call, planted = {}, []

    def plant(module, args):  # registered first, so it runs before today's pooling hooks
        h = args[0].clone()
        h[call["mask"] == 0] = 1e6
        planted.append(bool((call["mask"] == 0).any()))
        return (h,)

    handles = [layout.stack.register_forward_pre_hook(
        lambda m, a, kw: call.__setitem__("mask", kw["attention_mask"]), with_kwargs=True)]
    handles += [m.register_forward_pre_hook(plant) for m in layout.modules]
    try:
        resp, _ = todays_way.collect(model, tok, TEXTS, batch_size=6, skip_special=skip_special)
    finally:
        for h in handles:
            h.remove()
    assert any(planted)
    got = torch.from_numpy(np.stack([resp[l] for l in sorted(resp)], 1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_todays_way_scores_equal_steer_scores():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    r = collect(model, tok, Corpus(TEXTS, LABELS), progress=False)
    ref = r.score()
    resp = {l: r.values[:, l].numpy() for l in range(r.values.shape[1])}  # the same responses
    got, timing = todays_way.score(resp, r.label_ids.numpy(), r.label_names)
    for key, values in got.items():  # AP/AUROC exactly; numpy's statistics accumulate in float32
        tol = dict(atol=1e-12) if key in ("ap", "auroc") else dict(rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(values, ref.stats[key].reshape(len(r.label_names), -1).numpy(), err_msg=key, **tol)
    units = np.array([1, 50, 95])  # a subset: columns follow the given flat indices
    sub, t2 = todays_way.score(resp, r.label_ids.numpy(), r.label_names, units=units, auroc=False)
    np.testing.assert_allclose(sub["ap"], got["ap"][:, units], atol=1e-12)
    assert np.isnan(sub["auroc"]).all()
    assert (t2["neurons_scored"], t2["neurons_total"]) == (3, timing["neurons_total"]) and t2["pool_s"] <= t2["score_s"]


def test_todays_way_steering_equals_steer_intervene():
    model = tiny_model("gemma3")
    kwargs = base_inputs(model, *batch([9, 6, 3]))
    units, values = torch.tensor([0, 5, 17]), torch.tensor([2.0, -1.0, 0.5])
    iv = Intervention.for_model(model).set(1, units, values)
    with torch.no_grad():
        plain = model(**kwargs).logits
        with intervene(model, iv):
            ref = model(**kwargs).logits
        handles = todays_way.steer(model, {1: (units, values)})
        got = model(**kwargs).logits
        for h in handles:
            h.remove()
        assert torch.equal(model(**kwargs).logits, plain)  # removed cleanly
    assert not torch.allclose(ref, plain)
    torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------------------------
# bench/generation_overhead.py: steering overhead per generated token

def test_generation_overhead_reports_every_configuration(tmp_path):
    """Structure only (never timings): every configuration at every batch size, exactly the new
    tokens asked for, ratios against the unsteered unpatched model, the model left as it was."""
    import generation_overhead as GO

    model = tiny_model("gpt2")
    iv = Intervention.for_model(model).set(0, [1, 5, 9, 20], 6.0).set(1, [3, 7], -6.0)
    tables = GO.measure(model, tiny_tokenizer(), iv, batch_sizes=(1, 2), new_tokens=3, repeats=2, log=None)
    assert [[r["batch"] for r in t.rows] for t in tables] == [[1] * 4, [2] * 4]
    for t in tables:
        rows = {r["variant"]: r for r in t.rows}
        assert list(rows) == ["hooks, off", "hooks, on", "fused, off", "fused, on"]
        base = rows["hooks, off"]
        assert base["ratio_median"] == base["ratio_min"] == 1.0
        for r in rows.values():
            assert (r["baseline"], r["repeats"], r["new_tokens"]) == ("hooks, off", 2, 3)
            assert r["ratio_median"] == pytest.approx(r["median_s"] / base["median_s"])
            assert r["ratio_min"] == pytest.approx(r["min_s"] / base["min_s"])
            assert r["s_per_token"] == pytest.approx(r["median_s"] / 3)
            assert r["ms_per_step"] == pytest.approx(1e3 * r["median_s"] / 3)
            assert r["ms_per_step_min"] == pytest.approx(1e3 * r["min_s"] / 3)
    assert attached(model) is None  # unsteered
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())  # unpatched
    md, cs = harness.write_results("generation_overhead", harness.environment(), tables, out_dir=tmp_path)
    assert len(list(csv.DictReader(io.StringIO(cs.read_text())))) == 8 and "fused, on" in md.read_text()


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_collection_profile_parts_and_the_previous_path(backend):
    """bench/collection_paths.py: the per-part profile adds up to the wall time and sees pooling and
    binning; the path before issue 19 (`previous_path`) gives the same state and is undone after."""
    import collection_paths as cp
    from steer.engine.collect import collect_stream
    from steer.kernels import fused_mlp as fused_mlp_module
    from steer.kernels import fused_mlp_ref

    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = Corpus(TEXTS, LABELS)
    originals = [getattr(o, n) for fns in cp.PARTS.values() for o, n in fns]
    originals += [fused_mlp_ref.token_core, fused_mlp_module.fused_mlp_ref]
    states = {}

    def run(before):
        def go():
            with cp.previous_path() if before else contextlib.nullcontext():
                states[before] = collect_stream(model, tok, corpus, backend=backend, calibration=4,
                                                batch_size=4, progress=False)
        return cp.profiled(go)()

    for before in (False, True):
        parts = run(before)
        assert all(v >= 0 for v in parts.values()) and parts["pooling_s"] > 0 and parts["binning_s"] > 0
        assert parts["calibration_s"] > 0 and parts["state_s"] > 0
        assert sum(v for k, v in parts.items() if k != "seconds") == pytest.approx(parts["seconds"])
    now = [getattr(o, n) for fns in cp.PARTS.values() for o, n in fns]
    now += [fused_mlp_ref.token_core, fused_mlp_module.fused_mlp_ref]
    assert all(a is b for a, b in zip(now, originals))
    assert torch.equal(states[False].counts, states[True].counts)
