"""bench/gpu.sh's stages, markers and budgets (fast, no GPU), and the device tests its tests stage runs.

The device tests compare the Triton kernels on CUDA tensors with their references on the CPU:
the histogram update, and patched models of several families (steering logits, fused
collection) against the unpatched CPU model with the reference hooks. Without CUDA they are
skipped, unless STEER_DEVICE_TESTS=1 (gpu.sh --quick), which runs them on CPU tensors under
Triton's interpreter.
"""
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# --- the script: stages, markers, budget, $OUT ------------------------------------------------

FAKE_STAGE = """#!/usr/bin/env bash
# fake stage runner: NAME --out DIR --budget S [--quick]; FAKE_<NAME>=ok|fail|hang
name=$1 out=$3
case "$(printenv FAKE_$name)" in
    fail) echo "boom"; exit 3 ;;
    hang) sleep 30 ;;
    *) echo "# $name result" > "$out/gpu_$name.md"; echo "a,b" > "$out/gpu_$name.csv"
       printf 'status=ok\\nstage=%s\\n' "$name" > "$out/$name.done" ;;
esac
"""


def gpu_sh(tmp_path, *args, **fake):
    runner = tmp_path / "fake_stage.sh"
    runner.write_text(FAKE_STAGE)
    runner.chmod(0o755)
    env = {**os.environ, "GPU_BENCH": str(runner), "GPU_RUN_DIR": str(tmp_path / "run"), "OUT": str(tmp_path / "out"),
           "GPU_SH_INSTALL": "0", "GPU_SH_LIMITS": "smoke=2,tests=2,collection=2,steering=1,per_row=6,scoring=5",
           **{f"FAKE_{k}": v for k, v in fake.items()}}
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout, (tmp_path / "run" / "gpu_summary.md").read_text()


def summary_rows(summary: str) -> dict[str, list[str]]:
    """stage -> cells of its row in the last run's table."""
    last = summary.split("## Run of")[-1]
    rows = [line.strip("|").split("|") for line in last.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_stages_write_markers_and_out_at_once_and_report_failures(tmp_path):
    out, summary = gpu_sh(tmp_path, "--budget", "4", collection="fail", steering="hang")
    rows = summary_rows(summary)
    assert rows["smoke"][-1] == "ok" and rows["tests"][-1] == "ok"
    assert rows["collection"][-1].startswith("ERROR exit 3")
    assert rows["steering"][-1].startswith("TIMEOUT after 1 s")
    assert rows["per_row"][-1].startswith("skipped: needs 6 s")  # at most 4 s are left
    assert rows["scoring"][-1].startswith("skipped: needs 5 s")  # 1-3 s of the 4 are left
    assert rows["smoke"][:2] == ["20", "2"]  # the GPU budget and this run's limit
    assert rows["per_row"][:2] == ["60", "6"] and rows["total"][0] == "360"
    assert list(rows) == ["install", "smoke", "tests", "collection", "steering", "per_row", "scoring", "total"]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.done")) == ["smoke.done", "tests.done"]
    assert "boom" in (run / "gpu_collection.log").read_text()
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert back == ["gpu_live.log", "gpu_results.md", "gpu_run.tgz", "gpu_summary.md"]  # the device tool takes 8
    with tarfile.open(tmp_path / "out" / "gpu_run.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"smoke.done", "tests.done", "gpu_smoke.md", "gpu_tests.csv", "gpu_collection.log"} <= names
    assert "# smoke result" in (tmp_path / "out" / "gpu_results.md").read_text()


def test_second_run_does_only_the_stages_without_a_marker(tmp_path):
    gpu_sh(tmp_path, "--stages", "smoke,tests", tests="fail")
    _, summary = gpu_sh(tmp_path, "--stages", "smoke,tests")
    rows = summary_rows(summary)
    assert rows["smoke"][-1].startswith("done in an earlier run")
    assert rows["tests"][-1] == "ok"
    assert summary.count("## Run of") == 2
    _, summary = gpu_sh(tmp_path, "--stages", "smoke", "--fresh")
    assert summary_rows(summary)["smoke"][-1] == "ok" and summary.count("## Run of") == 1


def test_stage_lists_and_budgets_agree():
    """gpu.sh's default stages, its publish loop and gpu_bench.STAGES name the same stages in the
    same order, and the stages' GPU budgets (install included) add up to the default total."""
    import re

    sh = (REPO / "bench" / "gpu.sh").read_text()
    bench = (REPO / "bench" / "gpu_bench.py").read_text()
    default = re.search(r'STAGES="([a-z_,]+)"', sh).group(1).split(",")
    published = re.search(r"for s in ([a-z_ ]+); do", sh).group(1).split()
    in_bench = re.findall(r'"(\w+)"', re.search(r"^STAGES = \(([^)]*)\)", bench, re.M).group(1))
    assert default == published == in_bench
    budget = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"GPU_BUDGET=\(([^)]*)\)", sh).group(1)))
    quick = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"QUICK_LIMIT=\(([^)]*)\)", sh).group(1)))
    assert set(budget) - {"total"} == set(quick) == {"install", *default}
    assert sum(int(v) for k, v in budget.items() if k != "total") == int(budget["total"]) == 360
    assert re.search(r'BUDGET="\$\{BUDGET:-(\d+)\}"; QFLAG=""', sh).group(1) == budget["total"]
    quick_default = re.search(r'BUDGET="\$\{BUDGET:-(\d+)\}"; QFLAG="--quick"', sh).group(1)
    assert sum(int(v) for v in quick.values()) <= int(quick_default)  # the dry run skips nothing for time
    assert budget["per_row"] == "60" and quick["per_row"] == "180"


def test_unknown_argument_is_an_error(tmp_path):
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--nope"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "GPU_RUN_DIR": str(tmp_path)})
    assert p.returncode == 2 and "unknown argument" in p.stderr


# --- device tests: Triton on CUDA tensors vs the CPU reference ---------------------------------

DEV = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("STEER_DEVICE_TESTS") == "1" else None)
device = pytest.mark.skipif(DEV is None, reason="device test: needs CUDA (or STEER_DEVICE_TESTS=1: CPU tensors "
                                                "under Triton's interpreter, as gpu.sh --quick does)")
HIST_CASES = [(3, 37, 21, 9, 0), (1, 5, 3, 2, 1), (4, 67, 17, 16, 2)]
if DEV == "cuda":  # many neuron blocks and a full 64-bin histogram
    HIST_CASES.append((8, 3001, 64, 64, 3))


@device
@pytest.mark.parametrize("C,M,B,NB,seed", HIST_CASES)
def test_device_histogram_update_equals_cpu_reference(C, M, B, NB, seed):
    from steer.kernels.histogram import histogram_update
    from steer.kernels.histogram_ref import histogram_update_ref

    g = torch.Generator().manual_seed(seed)
    edges = torch.sort(torch.randn(M, NB - 1, generator=g), dim=1).values  # [M, NB - 1]
    if NB > 3:
        edges[:, 2] = edges[:, 1]  # duplicate edges
    x = torch.randn(B, M, generator=g) * 1.5  # [B, M]
    on_edge = torch.rand(B, M, generator=g) < 0.25  # values exactly on an edge
    x = torch.where(on_edge, edges[torch.arange(M), torch.randint(0, NB - 1, (M,), generator=g)], x)
    x[0, : min(M, 4)] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])[: min(M, 4)]
    labels = torch.randint(0, C, (B,), generator=g)
    start = torch.randint(0, 5, (C, M, NB), generator=g, dtype=torch.int32)  # accumulates
    ref = start.clone()
    histogram_update_ref(ref, x, labels, edges)
    got = start.to(DEV)
    histogram_update(got, x.to(DEV), labels.to(DEV), edges.to(DEV), impl="triton")
    assert torch.equal(got.cpu(), ref)


@device
def test_device_stream_state_equals_cpu_state():
    from steer.core.stream import StreamState, calibrate_edges

    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 300, generator=g)
    x[3, 7] = float("nan")
    labels = torch.randint(0, 3, (50,), generator=g)
    edges = calibrate_edges(torch.randn(400, 300, generator=g), bins=16)
    cpu, dev = StreamState(edges, list("abc")), StreamState(edges.to(DEV), list("abc"))
    for i in range(0, 50, 16):
        cpu.update(x[i:i + 16], labels[i:i + 16], impl="torch")
        dev.update(x[i:i + 16].to(DEV), labels[i:i + 16].to(DEV), impl="triton")
    assert torch.equal(dev.counts.cpu(), cpu.counts) and torch.equal(dev.nonfinite.cpu(), cpu.nonfinite)
    torch.testing.assert_close(dev.sums.cpu(), cpu.sums)


def _experts(model):
    from steer.core.intervention import Intervention

    return Intervention.for_model(model).set(0, [1, 5, 9], torch.tensor([2.0, -1.0, 0.5])).scale(1, [3], 4.0).zero(1, [7])


def _logits(model, ids, mask):
    from steer.core.adapters import base_inputs

    with torch.no_grad():
        return model(**base_inputs(model, ids, mask)).logits.float().cpu()


@device
@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_patched_model_matches_cpu_reference(family, dtype):
    """Steered logits of the patched model on the device (Triton op) against the unpatched model
    with the reference hooks: on the CPU in fp32; in bf16 on the device, within bf16's tolerance."""
    import copy

    from steer.engine.steering import intervene
    from steer.engine.patch import patch
    from tiny import batch, tiny_model

    cpu = tiny_model(family)
    dev = copy.deepcopy(cpu).to(DEV, dtype)
    ids, mask = batch([5, 3, 4], pad_left=family == "llama")
    if dtype == torch.float32:
        with intervene(cpu, _experts(cpu)):
            ref = _logits(cpu, ids, mask)
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        with intervene(dev, _experts(dev)):
            ref = _logits(dev, ids.to(DEV), mask.to(DEV))
        tol = dict(rtol=2e-2, atol=2e-2)
    with patch(dev, impl="triton"):
        with intervene(dev, _experts(dev)):
            got = _logits(dev, ids.to(DEV), mask.to(DEV))
        unsteered = _logits(dev, ids.to(DEV), mask.to(DEV))
    torch.testing.assert_close(got, ref, **tol)
    assert not torch.allclose(unsteered, ref, **tol)


@device
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_device_fused_collection_equals_cpu_exact_collection(family):
    import copy

    from steer.engine.collect import collect
    from steer.core.corpus import Corpus
    from steer.engine.patch import patch
    from tiny import tiny_model, tiny_tokenizer

    texts = ["the cat sat", "a dog", "le chat est là", "un chien", "das ist gut", "ein Hund bellt laut"]
    corpus = Corpus(texts, ["en", "en", "fr", "fr", "de", "de"])
    cpu = tiny_model(family)
    dev = copy.deepcopy(cpu).to(DEV)
    ref = collect(cpu, tiny_tokenizer(), corpus, backend="hooks", batch_size=4, progress=False)
    with patch(dev, impl="triton"):
        got = collect(dev, tiny_tokenizer(), corpus, backend="fused", batch_size=4, progress=False)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-4, atol=1e-5)
