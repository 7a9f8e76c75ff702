"""pytest-benchmark suites (`pytest bench/ --benchmark-only`): tiny random models, synthetic responses.

Not collected by the default test command (pyproject `testpaths = ["tests"]`). The tiny model and
tokenizer builders come from tests/tiny.py; bench/ itself is on sys.path for `todays_way`.
Torch runs on one thread: tiny tensors gain nothing from more, and on a shared machine a second
thread mostly adds waits at OpenMP barriers (noise).
"""
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
_HERE = Path(__file__).resolve().parent
for p in (_HERE, _HERE.parent / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
