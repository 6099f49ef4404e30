# One task runner for the README, CI and developers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROWS ?= 20000
PYTEST_ARGS ?=

.PHONY: help demo test lint typecheck check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test,dev]'
	touch $@

demo: $(BIN)/.installed  ## the whole cycle on an embedded PostgreSQL (ROWS=200000 to scale)
	$(BIN)/dispatch-retention demo --rows $(ROWS)

test: $(BIN)/.installed  ## the whole suite against a real PostgreSQL
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed  ## ruff lint and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(BIN)/.installed  ## mypy strict on src/
	$(BIN)/mypy

check: lint typecheck test  ## everything CI runs before the demo

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
