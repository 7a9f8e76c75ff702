"""What a new user meets first: models from anywhere, machine-fitted defaults, the documented API,
and decisions that do not depend on one CPU's floating-point rounding."""
import os
import platform
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import steer
from steer.experiments import analysis as A
from steer.core import runtime
from steer.cli import main
from conftest import REAL_CPU_BF16
from tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: the pages whose Python blocks a user may copy: the README first (its blocks save what later pages
#: load, e.g. runs/fr-experts), then docs/*.md by name (the committed reports under docs/ hold no code)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _nudge(x: torch.Tensor, max_ulp: int, seed: int) -> torch.Tensor:
    """x with each element moved by a random number of ulp in [-max_ulp, max_ulp] (its own dtype)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-max_ulp, max_ulp + 1, x.shape, generator=g)
    out, inf = x.clone(), torch.full_like(x, float("inf"))
    for _ in range(max_ulp):
        up, down = steps > 0, steps < 0
        out = torch.where(up, torch.nextafter(out, inf), out)
        out = torch.where(down, torch.nextafter(out, -inf), out)
        steps = steps - up.long() + down.long()
    return out


def test_retrieval_ranks_survive_a_few_ulp_and_another_summation_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(40, 64, generator=g)
    c = q + 0.8 * torch.randn(40, 64, generator=g)
    c[10:20] = c[10]  # ten identical candidates: exact ties that a BLAS may round apart
    c[30:] = torch.ones(64)  # and a collapsed block
    want = A.retrieval(q, c)["rank"]
    assert (want[10:20] >= 10).all() and (want[30:] >= 10).all()  # ties rank pessimistically
    for seed in range(3):
        got = A.retrieval(q, _nudge(c, 3, seed))["rank"]
        assert torch.equal(got, want)
    perm = torch.randperm(64, generator=g)  # the same vectors, summed in another order
    assert torch.equal(A.retrieval(q[:, perm], c[:, perm])["rank"], want)
    # a real difference (well above the tie tolerance) still ranks
    far = c.clone()
    far[0] = q[0] * 0.5 + far[0] * 1e-3
    assert A.retrieval(q, far)["rank"][0] == 1


def test_medoid_does_not_follow_rounding():
    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    embs = {"a": base + 1.0, "b": base + 1.0, "c": -base}  # a and b tie exactly
    assert A.distance_report(embs)["medoid"] == "a"
    embs["b"] = _nudge(embs["b"], 2, 0)
    assert A.distance_report(embs)["medoid"] == "a"


def test_dtype_follows_the_cpus_matrix_units(monkeypatch):
    """bf16 only with AMX-BF16: AVX512-BF16 alone measured slower than fp32 (1.27x), AVX2 6.5x."""
    if platform.machine().lower() in ("x86_64", "amd64"):  # the key the rule reads, as this torch names it
        assert "amx_bf16" in torch.cpu.get_capabilities()
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", REAL_CPU_BF16)  # conftest pins it off
    for caps, dtype in [({}, torch.float32),
                        ({"avx2": True, "amx_bf16": False, "avx512_bf16": False}, torch.float32),
                        ({"avx512_bf16": True}, torch.float32),
                        ({"avx512_bf16": True, "amx_bf16": False}, torch.float32),
                        ({"amx_bf16": True}, torch.bfloat16),
                        ({"avx512_bf16": True, "amx_bf16": True}, torch.bfloat16)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert runtime.native_dtype("cpu") == dtype, caps
        assert runtime.resolve_dtype(None, "cpu") == dtype, caps
    assert runtime.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert runtime.resolve_dtype("float32", "cpu") == torch.float32
    assert runtime.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        runtime.resolve_dtype("fp8")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_info_prints_device_dtype_threads_and_threads_apply(checkpoint, capsys):
    before = torch.get_num_threads()
    try:
        main(["info", "--model", str(checkpoint), "--threads", "1", "--dtype", "float32"])
        out = capsys.readouterr().out
        assert "device cpu" in out and "dtype float32" in out and "threads 1 " in out
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    main(["info", "--model", str(checkpoint)])
    assert f"dtype {runtime.dtype_name(runtime.native_dtype('cpu'))}" in capsys.readouterr().out


def test_load_model_local_folder_and_clear_errors(checkpoint, tmp_path):
    model, tok = steer.load_model(checkpoint, dtype="float32", device="cpu")
    assert not model.training and model.dtype == torch.float32 and tok.pad_token is not None
    with pytest.raises(FileNotFoundError, match="without config.json"):
        steer.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        steer.load_model(str(tmp_path / "no" / "such" / "model"))


def test_load_model_resolves_a_hub_id_from_the_local_hub_cache(checkpoint, tmp_path):
    """A Hub id loads through transformers' own cache (laid out here as the Hub lays it out), with
    the standard variables the user sets (huggingface_hub reads them at import: a subprocess)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent("""
        import steer
        model, tok = steer.load_model("someone/tiny-llama", dtype="float32", device="cpu")
        assert type(model).__name__ == "LlamaForCausalLM", type(model)
        assert model.config.name_or_path == "someone/tiny-llama"
        print(steer.NeuronLayout(model).n_neurons)
    """)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "96"  # 2 layers x 48 neurons
    missing = subprocess.run([sys.executable, "-c", "import steer; steer.load_model('someone/other')"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "cannot load 'someone/other'" in missing.stderr


def _python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a markdown page, except vLLM's (they run in tests/vllm_plugin, where
    vLLM is installed)."""
    return [b for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S) if "from vllm" not in b]


def test_readme_python_snippets_run(checkpoint, monkeypatch, tmp_path):
    """Every ```python block of the README and of docs/*.md runs as written, in page order, in one
    working directory, on a tiny model where it names Gemma."""
    blocks = [(page, code) for page in PAGES for code in _python_blocks(page)]
    assert _python_blocks(README), "the README shows no Python"
    assert {page.name for page, _ in blocks} >= {"README.md", "per_row.md", "methods.md"}, (
        "a page's Python moved: check that its blocks still run here")
    real_load = steer.load_model

    def load_model(name, **kw):
        return real_load(checkpoint if name == "gemma-3-270m" else name, **kw)

    monkeypatch.setattr(steer, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():  # the pages use today's names, not the deprecated ones
        warnings.filterwarnings("error", message=".* is renamed ", category=DeprecationWarning)
        for page, code in blocks:
            exec(compile(code, str(page), "exec"), {"__name__": "readme"})
