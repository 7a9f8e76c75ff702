"""Test set-up: Triton kernels run through the interpreter on machines without CUDA.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it is set here, before any
kernel module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
