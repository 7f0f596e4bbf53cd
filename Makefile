# dinoforge: the two Quickstart commands. Each sets up .venv (pinned CPU stack) and the Debian data packages.
.PHONY: setup demo test lint

PY := .venv/bin/python
RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
OUT ?= demo_out
ARGS ?=

setup:
	@bash infra/setup.sh

demo: setup
	OMP_NUM_THREADS=1 $(RAY_ENV) $(PY) -m pretrain demo --out $(OUT) $(ARGS)

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(RAY_ENV) $(PY) -m pytest -m "not gpu and not slow" $(ARGS)
