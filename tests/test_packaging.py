"""The installed project never exposes a top-level `kernels` module (PyPI's `kernels`, which
transformers imports when present, must not be shadowed); its kernels live in `steer.kernels`."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_into_steer(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "steer/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"steer"}


def test_installed_package_does_not_shadow_pypi_kernels(tmp_path):
    code = (
        "import importlib.util, transformers, steer.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not str(spec.origin).startswith({str(ROOT)!r}), spec\n"
        f"assert steer.kernels.__file__.startswith({str(ROOT / 'kernels')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
