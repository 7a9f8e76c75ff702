"""What steer runs on: device, dtype and threads, chosen from the machine, overridable everywhere.

- device: CUDA (the local rank's under torchrun) when available, else the CPU.
- dtype: bfloat16 on GPUs with bf16 tensor cores (compute capability 8.0, Ampere, and later)
  and on CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later); float32 elsewhere.
  Measured with `make run`: on an Intel Xeon with AVX512-BF16 but no AMX, collection ran at
  611-656 tok/s in bf16 and 829 tok/s in fp32 (fp32 1.27x faster), and on an AVX2-only CPU,
  where bf16 is emulated, bf16 was 6.5x slower than fp32. So AVX512-BF16 (Intel Cooper Lake and
  later, AMD Zen 4 and later) alone does not select bf16. bf16 on AMX follows oneDNN, which runs
  bf16 matrix products on the AMX tiles; steer has not timed an AMX machine.
- threads: torch's default (the machine's cores); `--threads` sets it for one command.

Every command that runs a model takes `--device`, `--dtype` and `--threads`
(`steer.cli.options.add_machine`); `steer info` prints what they resolve to (`describe`). `environment()` is the one record of the
machine that benchmarks and reports store beside their numbers.
"""
from __future__ import annotations

import os
import platform

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA when available (device `LOCAL_RANK` under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from None / "auto" (`default_device`) or a name; ValueError for a name torch
    does not know or a CUDA device this machine does not have."""
    if device is None or device == "auto":
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {device}: this machine has {count} CUDA device(s)")
    return device


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: must be at least 1")
        torch.set_num_threads(threads)


def cpu_capabilities() -> dict:
    """torch's record of the CPU's instruction sets (`torch.cpu.get_capabilities`; {} where absent)."""
    return getattr(torch.cpu, "get_capabilities", lambda: {})()


def cpu_has_bf16_matmul() -> bool:
    """True when "auto" takes bf16 on this CPU: it has AMX-BF16 tiles (torch's capability
    `amx_bf16`). AVX512-BF16 alone does not count: fp32 was 1.27x faster there (module docstring)."""
    return bool(cpu_capabilities().get("amx_bf16"))


def native_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype "auto" picks on `device`: bf16 on CUDA devices of compute capability 8.0 and
    later and on CPUs with AMX-BF16 (`cpu_has_bf16_matmul`), fp32 elsewhere."""
    device = resolve_device(device)
    if device.type == "cuda":  # bf16 tensor cores from compute capability 8.0 (Ampere) on
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name (`float32`, `bfloat16`, `float16`), a dtype, or None/"auto"."""
    if dtype is None or dtype == "auto":
        return native_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for records beside every measurement."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Machine and software record stored with results (CPU, cores, threads, versions, load)."""
    import transformers

    caps = cpu_capabilities()
    env = {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "cpu_amx_bf16": bool(caps.get("amx_bf16")), "cpu_avx512_bf16": bool(caps.get("avx512_bf16")),
        "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """What `steer info` prints about the machine: device, dtype (and what auto would choose,
    and why), threads."""
    if device.type == "cpu":
        name = cpu_name()
        why = "AMX-BF16" if cpu_has_bf16_matmul() else "no AMX-BF16"
    else:
        name = torch.cuda.get_device_name(device)
        why = f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    auto = dtype_name(native_dtype(device))
    return (f"device {device} ({name}), dtype {dtype_name(dtype)} (auto: {auto}, {why}), "
            f"threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs)")
