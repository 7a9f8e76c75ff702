"""Options the commands share: the machine (`--device`, `--dtype`, `--threads`) and
comma-separated lists. Each is parsed here once; what the values mean lives in
`steer.core.runtime` (device, dtype and threads from the machine)."""
from __future__ import annotations

import argparse

import torch

from steer.core.runtime import DTYPES, resolve_device, resolve_dtype, set_threads


def csv_list(text: str | None) -> list[str] | None:
    """'en, fr,de' -> ['en', 'fr', 'de'] (None stays None): every comma-separated option of the CLI."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_machine(p: argparse.ArgumentParser) -> None:
    """`--device`, `--dtype`, `--threads`: every command that runs a model takes them."""
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (default auto: CUDA when available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model weights and activations (default auto: bfloat16 on GPUs of compute capability "
                        "8.0+ and on CPUs with AMX-BF16, float32 elsewhere, AVX512-BF16 CPUs included)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, i.e. the machine's cores)")


def machine(args) -> tuple[torch.device, torch.dtype]:
    """Set the threads of `args` and return the (device, dtype) they resolve to (call it before
    any work: a bad value is a ValueError)."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)
