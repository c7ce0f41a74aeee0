# One-command set-up: `make demo` and `make test` create .venv, install, build rpe_ops, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# The exact versions the suite passed with; `make test-latest` runs the suite on the newest releases instead.
LOCK ?= requirements-lock.txt
PIP_INSTALL_ARGS ?= -c $(LOCK)
LATEST_DIR ?= .latest
OPS_SOURCES := $(wildcard rpe_ops/setup.py rpe_ops/csrc/*.cpp rpe_ops/csrc/*.h rpe_ops/csrc/*/*.cpp rpe_ops/csrc/*/*.cu rpe_ops/csrc/*/*.cuh rpe_ops/csrc/*/*.h)
OPS_STAMP := rpe_ops/.build-stamp
PYTEST_ARGS ?=

.PHONY: setup ops test test-all test-latest lock demo bench compare lint format clean

setup: $(STAMP) $(if $(OPS_SOURCES),$(OPS_STAMP))

# Plain DeiT-Tiny against iRPE variants on a relational synthetic dataset (see README, "Looking at iRPE").
compare: setup
	$(PY) tools/compare_rpe.py

$(STAMP): requirements.txt requirements-dev.txt $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt $(PIP_INSTALL_ARGS)
	@touch $@

# Builds the extension in place (rpe_ops/_C*.so). Without a C++ compiler, or without a usable CUDA toolkit (none, or
# one whose CUDA major version is not torch's), setup.py says so in one line and builds what it can: the PyTorch
# fallback serves the rest, and `python -m irpe` says which backend is used and why. A failing C++ build stops here.
$(OPS_STAMP): $(STAMP) $(OPS_SOURCES)
	cd rpe_ops && ../$(PY) setup.py build_ext --inplace
	@touch $@

ops: $(OPS_STAMP)

test: setup
	$(PY) -m irpe
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# The same suite against the newest releases of every dependency, in a copy of the working tree with its own venv
# and extension build (.latest/), so that an upstream break is found here first. PIP_CONFIG_FILE=/dev/null: no
# machine-wide pip constraints or local wheel folders.
test-latest:
	rm -rf $(LATEST_DIR) && mkdir -p $(LATEST_DIR)/src
	git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(LATEST_DIR)/src
	if [ -d ../shared ]; then ln -s "$(abspath ../shared)" $(LATEST_DIR)/shared; fi
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(MAKE) -C $(LATEST_DIR)/src test VENV=.venv PIP_INSTALL_ARGS=--upgrade
	$(LATEST_DIR)/src/.venv/bin/python -m pip freeze > $(LATEST_DIR)/freeze.txt
	@echo "versions that differ from $(LOCK) (< lock, > latest):"; diff <(grep -v '^#' $(LOCK)) $(LATEST_DIR)/freeze.txt | grep '^[<>]' || echo "none"

# Writes the versions installed in $(VENV) to the lock (after a passing `make test-latest`:
# `make lock VENV=.latest/src/.venv`, then `make test`).
lock:
	@{ echo "# Exact versions the test suite passed with (make test, $$(date +%Y-%m-%d), Python 3.11, x86_64): \`make setup\` installs"; \
	  echo "# requirements-dev.txt under these constraints. Refresh: make test-latest && make lock VENV=.latest/src/.venv && make test"; \
	  $(PY) -m pip freeze --exclude-editable; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) tools/benchmark_ops.py
	$(PY) tools/benchmark_attention.py
	$(PY) tools/benchmark.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf rpe_ops/build rpe_ops/*.so $(OPS_STAMP) outputs .pytest_cache $(LATEST_DIR)
