"""Expert discovery inside vLLM (steer/vllm/discovery.py, pooling.py) against steer's transformers path.

Needs vLLM (`make test-vllm`). Two engine processes (discovery_run.py: tensor parallelism 1 and 2)
and one `steer find-experts --engine vllm`. The floor of every tolerance is the difference of
the two forwards themselves (vLLM's CPU kernels vs transformers', fp32): ~1e-7 on these
responses; the tests allow 1e-5.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

if not os.environ.get("STEER_VLLM_TESTS"):
    pytest.importorskip("vllm")

import steer  # noqa: E402
from conftest import DISCOVERY, run_docs_example  # noqa: E402
from discovery_run import STEP_TOKENS  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from steer.core.scores import Responses  # noqa: E402
from steer.core.stream import StreamState  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(served):
    """steer's transformers path on the same checkpoint: exact responses (max, mean) with token
    statistics, and its tokenizer and model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(served / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(served / "model")
    corpus = steer.Corpus(*DISCOVERY)
    found = {p: steer.find_experts(model, tok, corpus, k=5, mode="exact", pooling=p, progress=False,
                                   token_stats=("activation", "residual")) for p in ("max", "mean")}
    return {"model": model, "tok": tok, "corpus": corpus, "found": found}


def test_long_sentences_run_in_several_prefill_steps(reference):
    lengths = [len(t) for t in reference["tok"](DISCOVERY[0])["input_ids"]]
    assert max(lengths) > 5 * STEP_TOKENS  # so they pool across >= 6 chunked-prefill steps


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_pooled_responses_and_token_statistics_equal_the_transformers_path(discovered, reference, pooling):
    got = Responses.load(discovered / f"exact_{pooling}.safetensors")
    want = reference["found"][pooling].responses
    assert got.values.shape == want.values.shape
    torch.testing.assert_close(got.values, want.values, **TOL)
    for name, t in want.token_stats.tensors().items():
        g = got.token_stats.tensors()[name]
        if t.dtype == torch.int64:
            assert torch.equal(g, t), name  # counts of tokens, of positive activations: exact
        else:
            torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-4)
    s = got.settings
    assert s["engine"]["name"] == "vllm" and s["pooling"] == pooling
    for key in ("fingerprint", "signature", "layers", "width", "dtype", "corpus_hash", "sentences", "tokens"):
        assert s[key] == want.settings[key], key


def near_tie(values: torch.Tensor, positive: torch.Tensor, tol: float = 1e-5) -> bool:
    """Whether a neuron's responses [N] of a positive sentence and another lie within `tol`: the
    forwards' rounding may swap them or split their tie (the corpus repeats sentences, which
    transformers pools bit-identically and vLLM, in other batch slots, within ~1e-8), which moves
    AP / AUROC by a step."""
    order = values.argsort()
    v, p = values[order], positive[order]
    close = (v[1:] - v[:-1]).abs() <= tol
    return bool((close & (p[1:] | p[:-1])).any())


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_scores_and_expert_sets_equal_but_at_near_ties(discovered, reference, pooling):
    got_r = Responses.load(discovered / f"exact_{pooling}.safetensors")
    want_r = reference["found"][pooling].responses
    got_s, want_s = got_r.score(), want_r.score()
    values = want_r.values.flatten(1)
    moved = 0
    for i, split in enumerate(want_s.splits):
        positive = torch.isin(want_r.label_ids, torch.tensor(split.label_ids(want_r.label_names)[0]))
        for score in ("ap", "auroc"):
            gap = (got_s.stats[score][i] - want_s.stats[score][i]).abs().flatten()
            for n in (gap > 1e-6).nonzero()[:, 0].tolist():  # every moved score sits at a near-tie
                assert near_tie(values[:, n], positive), (split.name, score, n, float(gap[n]))
                moved += 1
    assert moved <= values.shape[1] // 10  # a few neurons, not a drift
    got = steer.ExpertSet.load(discovered / f"experts_{pooling}", reference["model"])  # the fingerprint check passes
    want = reference["found"][pooling].experts
    for label in want.concepts:
        g, w = got.experts[label], want.experts[label]
        pairs = lambda e: set(zip(e["layer"].tolist(), e["unit"].tolist()))  # noqa: E731
        for layer, unit in pairs(g) ^ pairs(w):  # a different expert: a near-tie of its own or at the k-th score
            i = want_s.index(label)
            positive = torch.isin(want_r.label_ids, torch.tensor(want_s.splits[i].label_ids(want_r.label_names)[0]))
            assert near_tie(want_r.values[:, layer, unit], positive), (label, layer, unit)


def test_stream_mode_refines_to_the_exact_experts_and_its_certificates_hold(discovered):
    exact = Responses.load(discovered / "exact_max.safetensors")
    scores = exact.score()
    stream = steer.ExpertSet.load(discovered / "experts_stream")
    found = steer.ExpertSet.load(discovered / "experts_max")
    for label in found.concepts:
        assert stream.experts[label]["unit"].tolist() == found.experts[label]["unit"].tolist()
        assert stream.experts[label]["layer"].tolist() == found.experts[label]["layer"].tolist()
        torch.testing.assert_close(stream.experts[label]["value"], found.experts[label]["value"])
    state = StreamState.load(discovered / "state.safetensors")
    assert int(state.n.sum()) == len(DISCOVERY[0]) and state.settings["engine"]["name"] == "vllm"
    hist = steer.score_state(state)
    for i, name in enumerate(hist.splits):
        for score in ("ap", "auroc"):
            gap = (hist.stats[score][i] - scores.stats[score][i]).abs()
            assert bool((gap <= hist.stats[f"{score}_bound"][i] + 1e-6).all()), (name, score)
    refined = load_file(discovered / "stream_scores.safetensors")
    assert refined["ap"].shape == scores.flat()["ap"].shape


def test_a_resumed_run_equals_an_uninterrupted_one(discovered):
    whole = StreamState.load(discovered / "state.safetensors")
    resumed = StreamState.load(discovered / "resumed_state.safetensors")
    for name in ("counts", "n", "nonfinite", "edges"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    torch.testing.assert_close(resumed.sums, whole.sums, rtol=1e-6, atol=1e-6)
    assert torch.equal(resumed.token_stats.act_pos, whole.token_stats.act_pos)
    a, b = steer.ExpertSet.load(discovered / "experts_resumed"), steer.ExpertSet.load(discovered / "experts_stream")
    for label in a.concepts:
        assert a.experts[label]["unit"].tolist() == b.experts[label]["unit"].tolist()


def test_tensor_parallel_2_equals_1(discovered, discovered_tp2):
    for pooling in ("max", "mean"):
        one, two = (Responses.load(d / f"exact_{pooling}.safetensors") for d in (discovered, discovered_tp2))
        torch.testing.assert_close(two.values, one.values, **TOL)  # TP sums down_proj in two parts: rounding
        assert two.settings["fingerprint"] == one.settings["fingerprint"]
        for name, t in one.token_stats.tensors().items():
            torch.testing.assert_close(two.token_stats.tensors()[name].double(), t.double(), rtol=1e-5, atol=1e-4)
    one, two = (StreamState.load(d / "state.safetensors") for d in (discovered, discovered_tp2))
    assert torch.equal(two.n, one.n)
    torch.testing.assert_close(two.edges, one.edges, **TOL)
    for d in ("experts_stream", "experts_resumed"):
        a, b = steer.ExpertSet.load(discovered / d), steer.ExpertSet.load(discovered_tp2 / d)
        for label in a.concepts:
            assert a.experts[label]["unit"].tolist() == b.experts[label]["unit"].tolist()


def test_command_line_engine_vllm(served, discovered, tmp_path):
    """`steer find-experts --engine vllm` writes what the transformers engine writes, the same experts."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(f"{label}\t{text}\n" for text, label in zip(*DISCOVERY)))
    out = tmp_path / "out"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    args = ["find-experts", "--model", str(served / "model"), "--corpus", str(corpus), "--k", "5", "--mode", "exact",
            "--dtype", "float32", "--out", str(out), "--engine", "vllm",
            "--vllm-args", json.dumps({"max_model_len": 512, "enforce_eager": True})]
    run = subprocess.run([sys.executable, "-m", "steer.cli", *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("experts", "statistics.csv", "summary.txt", "run.json", "responses.safetensors"):
        assert (out / name).exists(), name
    assert json.loads((out / "run.json").read_text())["engine"]["name"] == "vllm"
    a, b = steer.ExpertSet.load(out / "experts"), steer.ExpertSet.load(discovered / "experts_max")
    for label in b.concepts:
        assert a.experts[label]["unit"].tolist() == b.experts[label]["unit"].tolist()
    bad = subprocess.run([sys.executable, "-m", "steer.cli", *args[:-2], "--vllm-args", "{not json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--vllm-args" in bad.stderr


def test_docs_discovery_example_runs(served, tmp_path):
    """docs/vllm.md's discovery example, as written, on the tiny model (20 verses per language)."""
    out = run_docs_example("find_experts(llm", [('resolve("gemma-3-270m")', repr(str(served / "model"))),
                                                ("n_per_language=200", "n_per_language=20")], tmp_path)
    assert out.strip().splitlines()[-1].startswith("exact ")
    assert (tmp_path / "runs" / "experts-vllm" / "experts.json").exists()
