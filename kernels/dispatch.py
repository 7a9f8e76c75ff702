"""Triton kernels of steer, each beside its pure-PyTorch reference.

The folder is installed as `steer.kernels` (pyproject.toml) and has no `__init__.py`: it is a
namespace portion, so a Python started in the repository root (whose working directory leads
`sys.path`) still imports Hugging Face's `kernels` package, which transformers imports, wherever
it is installed (a regular package wins over a namespace portion), and where none is, the
folder is an empty namespace that transformers takes for "not installed". This module holds
what the package's `__init__` would: the implementation rule and the Triton loader.

Each op has three files: `<op>_ref.py` (the semantics in plain torch: the CPU path and the tests'
reference), `<op>_triton.py` (the Triton kernel, registered as `torch.ops.steer.<op>`) and
`<op>.py` (the dispatcher). Triton is imported only when a Triton path runs (`triton_module`):
importing steer imports neither Triton nor Inductor, and works where Triton does not install.
`use_triton` is the one implementation rule every dispatcher follows (`impl`: "auto", "triton" or
"torch"; the word "backend" is the steering path's: hooks or fused, `steer.engine.backends`). The histogram update has a
fourth, `histogram_cpu.py`: a compiled CPU loop that "auto" takes on CPU (equal counts).
"""
import importlib

IMPLS = ("auto", "triton", "torch")  # how a kernel op runs


def use_triton(impl: str, tensor) -> bool:
    """The implementation rule: "auto" runs Triton on CUDA tensors and the reference elsewhere,
    "torch" always the reference, "triton" always Triton (on CPU tensors only under TRITON_INTERPRET=1)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and tensor.is_cuda)


_LOADED: dict = {}  # name -> module: after the first import a plain dict look-up, which
# torch.compile traces (it refuses importlib inside a graph)


def triton_module(name: str):
    """`steer.kernels.<name>` (a Triton module), imported on first use; a clear ImportError where
    Triton does not import (macOS, Windows: use impl "auto" or "torch" there)."""
    module = _LOADED.get(name)
    if module is None:
        try:
            module = _LOADED[name] = importlib.import_module(f"{__package__}.{name}")
        except ImportError as e:
            raise ImportError(f"the Triton path needs Triton, which does not import here ({e}); "
                              "use impl='auto' or 'torch'") from e
    return module
