# Two set-up commands: `make run` and `make test`. Both create the virtual
# environment when it is missing and install the project with its test extras
# and its bench extra (the peers that tests/test_loadtest_peers.py runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8787
DATA_DIR ?= ./data

.PHONY: run test lint typecheck unit bench clean interop-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/broker serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

lint: $(STAMP)
	$(BIN)/ruff check broker protocol tests

typecheck: $(STAMP)
	$(BIN)/mypy

# The real @relaycast/sdk for tests/test_interop_sdk.py and the MCP Inspector CLI for
# tests/test_mcp_inspector.py, from the committed lock file; without npm the step is
# skipped (the tests skip when node is missing).
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.package-lock.json

$(INTEROP_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error; \
	else \
		echo "npm not found: skipping the Relaycast SDK interop dependencies"; \
	fi

interop-deps: $(INTEROP_STAMP)

unit: $(STAMP) interop-deps
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m broker.bench writer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(INTEROP)/node_modules
