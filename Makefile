# `make demo` and `make test` each work as the only command on a fresh machine: they install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT := results/runs
DEMO_EPOCHS ?=

.PHONY: install test test-slurm demo lint bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# one pytest worker per CPU core (each test process uses one torch thread: tests/conftest.py)
test: $(STAMP)
	$(BIN)/python -m pytest -n auto tests

# sweeps through a real one-node Slurm started (and stopped) by .ci/slurm/test.sh; needs root
test-slurm: $(STAMP)
	PYTHON=$(BIN)/python bash .ci/slurm/test.sh

demo: $(STAMP)
	$(BIN)/python -m cilbench.bench.demo

lint: $(STAMP)
	$(BIN)/ruff check cilbench methods tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict   # into site/ (ignored)

bench: $(STAMP)
	$(BIN)/cilbench bench

clean:
	rm -rf results/runs results/report site
