# `make test` and `make demo` set themselves up on a fresh machine: they create
# .venv, install the pinned requirements and the package, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two workers: XLA compiles are mostly single-threaded, so they overlap well; worksteal
# hands a finished worker the other one's remaining tests, so the long ones do not end alone.
# --durations: the slowest tests, listed at the end of every run (the 20-minute budget).
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=25

.PHONY: setup test test-unit lint format demo parity clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# The fast subset: the tests of single modules (tests/unit), no whole runs or subprocesses.
test-unit: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/unit

# The main job on the built-in synthetic dataset; run it again to resume.
WORKDIR ?= runs/demo
demo: setup
	$(BIN)/python main.py --config=configs/synthetic_t.py --workdir=$(WORKDIR)

# One formatter for the whole tree (ruff, pinned in requirements.txt; settings in pyproject.toml).
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .

parity: setup
	$(BIN)/python ../shared/tools/official_parity.py

clean:
	rm -rf $(VENV) build *.egg-info
