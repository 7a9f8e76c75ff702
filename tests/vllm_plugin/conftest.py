"""Shared by the vLLM tests: a tiny Gemma-3 checkpoint and expert sets found on it by steer.

Each test module skips itself where vLLM is not installed, except under STEER_VLLM_TESTS=1
(`make test-vllm`), where a missing vLLM is an error.
"""
import sys
from pathlib import Path

import pytest

import steer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import from_config, tiny_tokenizer  # noqa: E402


VOCAB = dict(vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # head_dim 32:
# the smallest vLLM's CPU attention takes


def tiny_gemma3(seed=0, intermediate=96):
    import transformers as T

    cfg = T.Gemma3TextConfig(**VOCAB, **SIZES, intermediate_size=intermediate, head_dim=32, sliding_window=64)
    cfg.architectures = ["Gemma3ForCausalLM"]
    return from_config(cfg, seed=seed)


def tiny_llama(seed=1):
    import transformers as T

    cfg = T.LlamaConfig(**VOCAB, **SIZES, intermediate_size=96)
    cfg.architectures = ["LlamaForCausalLM"]
    return from_config(cfg, seed=seed)


CORPUS = (["the cat sat", "le chat est", "the dog ran", "le chien court", "a man walks", "un homme marche"] * 3,
          ["en", "fr"] * 9)
# discovery (test_discovery.py): the toy corpus and two sentences of ~200 characters (tokens: the tiny
# tokenizer reads characters), which vLLM runs in several prefill steps of 32 tokens
# tokenizer reads characters), which vLLM runs in several prefill steps of 32 tokens; no sentence
# twice (a repeated sentence ties with itself in transformers, and only within rounding in vLLM)
_WORDS = {"en": ("today", "again", "now"), "fr": ("aujourd'hui", "encore", "maintenant")}
DISCOVERY = ([f"{t} {w}" for t, label in zip(CORPUS[0][:6], CORPUS[1]) for w in _WORDS[label]]
             + ["the quick brown fox jumps over the lazy dog, " * 5,
                "le renard brun saute par-dessus le chien paresseux, " * 4],
             [label for label in CORPUS[1][:6] for _ in range(3)] + ["en", "fr"])


def find(model, k: int, out: Path):
    """An expert set found by steer on a toy corpus, saved to `out`; the found `Found` (with the
    LAPE and DiffMean token statistics of the same pass)."""
    found = steer.find_experts(model, tiny_tokenizer(), steer.Corpus(*CORPUS), k=k, progress=False,
                               token_stats=("activation", "residual"))
    found.experts.save(out)
    return found


def interventions(model, found, d: Path) -> None:
    """Saved interventions of every site, as requests name them (`steer_intervention`):
    LAPE's (activation site, found by steer), DiffMean's (residual site: an added direction), and
    hand-made ones that set and scale units of the activation and of the residual stream."""
    stats = found.token_stats
    lape = steer.select_lape(stats.activation_probability(), stats.label_names, top_rate=0.2)
    steer.lape_intervention(lape, stats.activation_mean(), activate="fr", deactivate=["en"]).save(d / "lape.safetensors", model)
    directions = steer.diffmean_directions(stats.residual_mean(), stats.label_names, "fr")
    steer.diffmean_intervention(directions, 0, 8.0).save(d / "diffmean.safetensors", model)
    layers, width, hidden = 2, model.config.intermediate_size, model.config.hidden_size
    steer.Intervention(layers, width, site="activation").set(0, [1, 5, 9], [2.0, -1.0, 3.0]).scale(
        1, [2, 4], 4.0).save(d / "act_set.safetensors", model)
    steer.Intervention(layers, hidden, site="residual").set(0, [0, 3, 7], [5.0, -5.0, 2.0]).scale(
        1, list(range(0, hidden, 2)), 0.5).save(d / "resid_set.safetensors", model)
    steer.Intervention(layers, hidden // 2, site="residual").set(0, [0], 1.0).save(d / "resid_other.safetensors")  # another width


def serve(d: Path, model, k: int) -> Path:
    """`d`/model (checkpoint and tokenizer), `d`/experts and the intervention files."""
    model.save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    interventions(model, find(model, k, d / "experts"), d)
    return d


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny Gemma-3 folder, its expert set, and (other/) a set of another model's shapes."""
    d = serve(tmp_path_factory.mktemp("vllm"), tiny_gemma3(), k=10)
    find(tiny_gemma3(intermediate=64), 5, d / "other")
    return d


@pytest.fixture(scope="session")
def served_llama(tmp_path_factory):
    """The same for a tiny Llama (SiLU-gated MLP: vLLM's LlamaMLP)."""
    return serve(tmp_path_factory.mktemp("vllm-llama"), tiny_llama(), k=10)


def discovery_run(model_dir: Path, out: Path, tp: int) -> Path:
    """discovery_run.py in its own process (one engine, every discovery scenario), into `out`."""
    import os
    import subprocess

    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind" if tp == 1 else "0|1"}
    cmd = [sys.executable, str(Path(__file__).with_name("discovery_run.py")), str(model_dir), str(out), "--tp", str(tp)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def discovered(served, tmp_path_factory):
    """discovery_run.py's files on the tiny Gemma-3 (one engine, tensor parallelism 1)."""
    return discovery_run(served / "model", tmp_path_factory.mktemp("discovery-tp1"), tp=1)


@pytest.fixture(scope="session")
def discovered_tp2(served, tmp_path_factory):
    """The same under tensor parallelism 2 (two worker processes, one per core)."""
    return discovery_run(served / "model", tmp_path_factory.mktemp("discovery-tp2"), tp=2)


def run_docs_example(marker: str, replacements, cwd: Path) -> str:
    """The ```python block of docs/vllm.md that contains `marker`, with each (old, new) of
    `replacements` made (each must be there), run in its own process in `cwd`; its stdout."""
    import os
    import re
    import subprocess

    page = (Path(__file__).resolve().parents[2] / "docs" / "vllm.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if marker in b)
    for old, new in replacements:
        assert old in code, old
        code = code.replace(old, new)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
