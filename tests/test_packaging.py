"""The installed project never exposes a top-level `kernels` module (Hugging Face's `kernels`,
which transformers imports, must not be shadowed); its kernels live in `steer.kernels`. A Python
started in the repository root (whose folder `kernels/`, a namespace portion, comes first on
`sys.path` there) imports the other `kernels` as if the repository were not there."""
import importlib
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_into_steer(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {"steer/kernels/dispatch.py", "steer/kernels/fused_mlp_ref.py"} <= set(names)
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "steer").rglob("__init__.py"))
    assert len(packages) >= 6  # steer, core, engine, cli, experiments, experiments/study
    for package in packages:  # every subpackage is listed in pyproject, so the wheel has it
        assert f"{package}/__init__.py" in names, package
        importlib.import_module(package.replace("/", "."))
    assert not [n for n in names if n.startswith("kernels/")]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"steer"}


def test_installed_package_does_not_shadow_pypi_kernels(tmp_path):
    code = (
        "import importlib.util, transformers, steer.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not str(spec.origin).startswith({str(ROOT)!r}), spec\n"
        f"assert steer.kernels.dispatch.__file__.startswith({str(ROOT / 'kernels')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_steer_works_without_triton(tmp_path):
    """Where Triton does not import (macOS, Windows), steer imports and its CPU paths (the torch
    references) still run: streaming update, fused patch; asking for Triton is a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None  # any `import triton` now raises ImportError\n"
        "import pytest, torch, transformers as T, steer\n"
        "from steer.core.stream import StreamState, calibrate_edges\n"
        "from steer.kernels.histogram_ref import histogram_update_ref\n"
        "x = torch.randn(12, 5); labels = torch.arange(12) % 3\n"
        "state = StreamState(calibrate_edges(x, 8), ['a', 'b', 'c'])\n"
        "state.update(x, labels)\n"
        "ref = torch.zeros(3, 5, 8, dtype=torch.int32); histogram_update_ref(ref, x, labels, state.edges)\n"
        "assert torch.equal(state.counts, ref)\n"
        "with pytest.raises(ImportError, match='Triton'):\n"
        "    state.update(x, labels, impl='triton')\n"
        "cfg = T.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,\n"
        "                    num_attention_heads=2, num_key_value_heads=1, vocab_size=50)\n"
        "model = T.AutoModelForCausalLM.from_config(cfg).eval(); ids = torch.randint(0, 50, (2, 5))\n"
        "want = model(ids).logits\n"
        "with steer.patch(model):\n"
        "    torch.testing.assert_close(model(ids).logits, want)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_repository_root_does_not_shadow_kernels(tmp_path):
    """Started in the repository root, no -P (sys.path[0] == ""): `import kernels` gets the
    `kernels` importable elsewhere (Hugging Face's, or a stand-in on PYTHONPATH where this
    environment lacks it), transformers imports, and steer.kernels is the repository's folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    where = "import kernels; print(kernels.__file__)"
    elsewhere = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, env=env, capture_output=True, text=True)
    if elsewhere.returncode:  # no Hugging Face `kernels` here: a stand-in
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        elsewhere = subprocess.run([sys.executable, "-c", where], cwd=ROOT.parent, env=env, capture_output=True,
                                   text=True, check=True)
    other = elsewhere.stdout.strip()
    assert not other.startswith(str(ROOT)), other
    code = (
        "import sys\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "import kernels\n"
        f"assert kernels.__file__ == {other!r}, kernels.__file__\n"
        "import transformers.activations, steer, steer.kernels.dispatch, steer.kernels.fused_mlp\n"
        f"assert steer.kernels.__path__ == [{str(ROOT / 'kernels')!r}], steer.kernels.__path__\n"
        "assert steer.kernels.dispatch.use_triton('torch', None) is False\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_source_tree_without_an_install():
    """Where no other `kernels` exists, `import kernels` in the repository root finds only an
    empty namespace (no file, no code of the repository run: transformers takes it for "not
    installed"); and a source tree imported without an install that maps `steer.kernels` (no
    editable finder: -S skips site-packages' .pth files) maps it itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    code = ("import importlib.util, kernels\n"
            "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'use_triton'), kernels\n"
            "assert importlib.util.find_spec('kernels').origin in (None, 'namespace')\n")
    subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, check=True)
    code = (
        "import sys\n"
        "assert not any('__editable__' in repr(f) for f in sys.meta_path)\n"
        "import steer, steer.kernels.dispatch, steer.kernels.fused_mlp_ref\n"
        f"assert steer.kernels.dispatch.__file__ == {str(ROOT / 'kernels' / 'dispatch.py')!r}\n"
        f"assert steer.__file__ == {str(ROOT / 'steer' / '__init__.py')!r}\n"
    )
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, check=True)
