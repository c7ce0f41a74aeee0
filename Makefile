# One-command set-up: `make demo` and `make test` create .venv, install, build rpe_ops, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
OPS_SOURCES := $(wildcard rpe_ops/setup.py rpe_ops/csrc/*.cpp rpe_ops/csrc/*.h rpe_ops/csrc/*/*.cpp rpe_ops/csrc/*/*.cu rpe_ops/csrc/*/*.cuh rpe_ops/csrc/*/*.h)
OPS_STAMP := rpe_ops/.build-stamp
PYTEST_ARGS ?=

.PHONY: setup ops test test-all demo bench lint format clean

setup: $(STAMP) $(if $(OPS_SOURCES),$(OPS_STAMP))

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

# Builds the extension in place (rpe_ops/_C*.so). A build failure is reported, and the PyTorch fallback
# keeps everything working; `python -m irpe` says which backend is used and why.
$(OPS_STAMP): $(STAMP) $(OPS_SOURCES)
	cd rpe_ops && ../$(PY) setup.py build_ext --inplace
	@touch $@

ops: $(OPS_STAMP)

test: setup
	$(PY) -m irpe
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

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
	rm -rf rpe_ops/build rpe_ops/*.so $(OPS_STAMP) outputs .pytest_cache
