"""Test set-up: Triton kernels run through the interpreter on machines without CUDA.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it is set here, before any
kernel module is imported. With CUDA it stays unset and the kernel tests run the compiled
kernels on CUDA tensors (`bench/gpu.sh`'s tests stage); a TRITON_INTERPRET set by the caller
wins either way. Tests that hand CPU tensors to the Triton path (`INTERPRETER_ONLY`) only make
sense under the interpreter: they are skipped when real Triton runs.

Every test sees a CPU without bf16 matrix units (`cpu_bf16_off`), so `dtype="auto"` is float32 on
every machine and no result depends on the CPU vendor, and "auto" devices stay on the CPU on a GPU
machine (the device tests of test_gpu_script.py name CUDA themselves); `tests/test_user_door.py` tests the choice
itself with the real detector (`REAL_CPU_BF16`).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from steer.core import runtime  # noqa: E402  (after TRITON_INTERPRET: kernels read it when imported)

REAL_CPU_BF16 = runtime.cpu_has_bf16_matmul

#: tests that run the Triton kernels on CPU tensors (node ids relative to tests/)
INTERPRETER_ONLY = {
    "test_stream.py::test_triton_kernel_equals_reference",
    "test_stream.py::test_state_update_triton_equals_torch",
    "test_histogram_cpu.py::test_triton_kernel_equals_fast_path",
    "test_patch.py::test_triton_path_in_a_patched_model_under_the_interpreter",
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if interpreting():
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors: only under TRITON_INTERPRET=1 "
                                   "(the CUDA versions are in test_gpu_script.py)")
    for item in items:
        if item.nodeid.split("tests/")[-1].split("[")[0] in INTERPRETER_ONLY:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_bf16_off(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr(runtime, "default_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: one intra-op thread (on a shared 2-core machine thread hand-offs cost more
    than they give). A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
