"""Triton kernels of steer, each beside its pure-PyTorch reference.

Installed as `steer.kernels` (see pyproject.toml): the project never exposes a top-level
`kernels` module, which would shadow Hugging Face's `kernels` package that transformers imports.
A Python started in the repository root still finds this folder first under the name `kernels`
(the working directory leads `sys.path`). `_hand_over` then gives that name to the package it
means without the repository (ModuleNotFoundError where there is none), so `import kernels` and
`import transformers` work there as anywhere else.

Each op has three files: `<op>_ref.py` (the semantics in plain torch: the CPU path and the tests'
reference), `<op>_triton.py` (the Triton kernel, registered as `torch.ops.steer.<op>`) and
`<op>.py` (the dispatcher). Triton is imported only when a Triton path runs (`triton_module`):
importing steer imports neither Triton nor Inductor, and works where Triton does not install.
`use_triton` is the one backend rule every dispatcher follows. The histogram update has a
fourth, `histogram_cpu.py`: a compiled CPU loop that "auto" takes on CPU (equal counts).
"""
import importlib
import os
import sys


def _hand_over() -> None:
    """Replace this module, imported as top-level `kernels`, by the `kernels` found on `sys.path`
    without the repository root (the import statement returns what `sys.modules` then holds)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    del sys.modules["kernels"]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


if __name__ == "kernels":
    _hand_over()

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, tensor) -> bool:
    """The backend rule: "auto" runs Triton on CUDA tensors and the reference elsewhere, "torch"
    always the reference, "triton" always Triton (on CPU tensors only under TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend == "triton" or (backend == "auto" and tensor.is_cuda)


_LOADED: dict = {}  # name -> module: after the first import a plain dict look-up, which
# torch.compile traces (it refuses importlib inside a graph)


def triton_module(name: str):
    """`steer.kernels.<name>` (a Triton module), imported on first use; a clear ImportError where
    Triton does not import (macOS, Windows: use backend "auto" or "torch" there)."""
    module = _LOADED.get(name)
    if module is None:
        try:
            module = _LOADED[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:
            raise ImportError(f"the Triton path needs Triton, which does not import here ({e}); "
                              "use backend='auto' or 'torch'") from e
    return module
