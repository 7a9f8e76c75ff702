#!/usr/bin/env bash
# On a lent GPU machine (its own torch/triton; no network): install steer without dependencies,
# run the kernel tests with real Triton (no interpreter), then the GPU benchmarks. ~20 minutes.
# Results land in bench/results/gpu_*.md/.csv (and $OUT when run through the device tool).
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m pip install -q --no-deps -e . 2>&1 | tail -1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
pytest -q -p no:cacheprovider tests/test_fused_kernel.py tests/test_stream.py tests/test_patch.py \
    tests/test_intervention.py 2>&1 | tee bench/results/gpu_tests.txt | tail -15
python bench/gpu_bench.py all
if [ -n "${OUT:-}" ]; then cp bench/results/gpu_* "$OUT"/; fi
