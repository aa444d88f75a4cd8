# lmforge: set-up, tests, the pipeline and the benchmarks. `make help` lists the targets.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= tiny
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: help setup test test-slow run bench lint clean

help:
	@echo "make setup      create $(VENV) (torch 2.13.0 CPU first, then lmforge with dev extras)"
	@echo "make run        set up, then run the whole pipeline on the embedded default (PRESET=$(PRESET))"
	@echo "make test       set up, then run the test suite (what CI runs)"
	@echo "make test-slow  the slow end-to-end tests (by hand)"
	@echo "make bench      the benchmarks in bench/ (by hand)"

setup: $(VENV)/.installed

# torch goes in first and alone: any other spec, or a resolver that upgrades it, pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

run: setup
	$(BIN)/lmforge run --preset $(PRESET)

bench: setup
	$(BIN)/python bench/model_step.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf .lmforge .pytest_cache .ruff_cache
