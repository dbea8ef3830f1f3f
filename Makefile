# The two set-up commands: `make demo` and `make test`; beside them `make claims` (the method
# claims: from-scratch orderings) and `make demo-all` (every branch). All create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.wsss-installed

# Quiet, local-only Prefect (no analytics; the ephemeral server may take a while on 2 cores).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: demo demo-all test claims install clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss demo

demo-all: $(STAMP)
	$(BIN)/wsss demo --all

# The correctness tier: lint and format (ruff), then equations against loops, store, reliability, CLI, own data, Dask, configs
# and a smoke run of every branch. No from-scratch quality ordering here.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not claims" --durations=15

# The method tier: every from-scratch claim, each model trained once for all the claims on it.
claims: $(STAMP)
	$(BIN)/python -m pytest -q -m claims --durations=15

clean-demo:
	rm -rf artifacts/demo
