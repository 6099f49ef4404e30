# One task runner for the README, CI and developers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROWS ?= 20000
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: 2 on this 2-core machine (533 s against 763 s serial)
TEST_WORKERS ?= 2
BENCH_ROWS ?= 1000000
BENCH_SCENARIO ?= all
BENCH_SHARDS ?= 2
BENCH_REPEAT ?= 3
BENCH_JSON ?= bench/results/bench-$(BENCH_ROWS).json
MATRIX_VERSIONS ?= 14,15,16,17,18
# The live scenario (bench/live.py): its own primary and replica, the application's load
LIVE_ROWS ?= 1000000
LIVE_TURNS ?= 5
LIVE_LOAD_S ?= 60
LIVE_RATE ?= 250
LIVE_JSON ?= bench/results/live-$(LIVE_ROWS).json
# The job as the image runs it: a wheel and the locked dependencies in a virtualenv of its
# own, on the system's CPython 3.11 where there is one (an optimized distribution build, as
# the image's is; pyenv's default build is configured without --enable-optimizations).
BENCH_JOB_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) $(PYTHON))
JOB_VENV := bench/.job-venv

.PHONY: help demo test test-fast test-matrix lint typecheck check bench bench-live bench-evidence doc-figures alerts report-screenshot clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test,dev]'
	touch $@

demo: $(BIN)/.installed  ## the whole cycle on an embedded PostgreSQL (ROWS=200000 to scale)
	$(BIN)/dispatch-retention demo --rows $(ROWS)

test: $(BIN)/.installed  ## the whole suite against a real PostgreSQL
	$(BIN)/pytest -n $(TEST_WORKERS) --durations=20 $(PYTEST_ARGS)

test-fast: $(BIN)/.installed  ## the tests that need no database (about 20 s; no server needed)
	$(BIN)/pytest -m "not db" $(PYTEST_ARGS)

test-matrix: $(BIN)/.installed  ## the compatibility tests on PostgreSQL 14-18, a fresh server each (MATRIX_VERSIONS=)
	$(BIN)/python -m tests.matrix --versions $(MATRIX_VERSIONS) -- -n $(TEST_WORKERS)

lint: $(BIN)/.installed  ## ruff lint and format check, and the import contract of the layers
	$(BIN)/ruff check src tests bench k8s/alerts
	$(BIN)/ruff format --check src tests bench k8s/alerts
	$(BIN)/lint-imports --no-cache

typecheck: $(BIN)/.installed  ## mypy strict on src/ and bench/
	$(BIN)/mypy

check: lint typecheck test  ## everything CI runs before the demo

$(JOB_VENV)/.installed: $(BIN)/.installed requirements.lock pyproject.toml $(shell find src -name '*.py' -o -name '*.toml')
	rm -rf $(JOB_VENV)
	$(BENCH_JOB_PYTHON) -m venv --without-pip $(JOB_VENV)
	$(BIN)/pip --python $(JOB_VENV)/bin/python install --quiet --require-hashes \
	    --only-binary=:all: -r requirements.lock
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(JOB_VENV)/wheel .
	$(BIN)/pip --python $(JOB_VENV)/bin/python install --quiet --no-deps $(JOB_VENV)/wheel/*.whl
	touch $@

bench: $(BIN)/.installed $(JOB_VENV)/.installed  ## the job against the single-statement bound (BENCH_ROWS=, BENCH_SCENARIO=, BENCH_REPEAT=, BENCH_JSON=)
	$(BIN)/python -m bench --rows $(BENCH_ROWS) --scenario $(BENCH_SCENARIO) \
	    --shards $(BENCH_SHARDS) --repeat $(BENCH_REPEAT) --job-bin $(JOB_VENV)/bin/dispatch-retention \
	    --json $(BENCH_JSON)

bench-live: $(BIN)/.installed $(JOB_VENV)/.installed  ## what a run costs the application and its replica (LIVE_ROWS=, LIVE_TURNS=, LIVE_LOAD_S=, LIVE_RATE=, LIVE_JSON=)
	$(BIN)/python -m bench.live --rows $(LIVE_ROWS) --turns $(LIVE_TURNS) --load-s $(LIVE_LOAD_S) \
	    --rate $(LIVE_RATE) --job-bin $(JOB_VENV)/bin/dispatch-retention --json $(LIVE_JSON)

bench-evidence: $(BIN)/.installed  ## the report on a year of nightly runs of 1,000 chunks: its time and size
	$(BIN)/python -m bench.evidence --days 365 --chunks 1000 --json docs/bench/evidence/evidence-365x1000.json

alerts: $(BIN)/.installed  ## rewrite the alert rules, the PrometheusRule and their promtool tests (k8s/alerts/generate.py)
	$(BIN)/python k8s/alerts/generate.py

report-screenshot: $(BIN)/.installed  ## rewrite docs/img/report.png: the report of a simulated history in headless chromium
	$(BIN)/python -m tests.report.screenshot --output docs/img/report.png

doc-figures: $(BIN)/.installed  ## rewrite the marked figures of the docs from the bench reports in docs/bench/
	$(BIN)/python -m bench.figures

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) $(JOB_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
