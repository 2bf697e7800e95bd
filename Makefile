# Two commands on a fresh machine: `make bench` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lock-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Caches and run outputs stay out of the repo and out of $HOME surprises.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_DIR ?= $(CURDIR)/results
export WANDB_SILENT ?= true
export RAY_USAGE_STATS_ENABLED := 0
# bash with pipefail: a filtered pip still fails the target when pip fails
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# A machine's pip config may list index folders that lack some packages; pip then warns once per package and
# folder ("Location ... is ignored"), noise that hides the lines that matter. Only those lines are dropped.
PIP_NOISE := is ignored: it is neither a file nor a directory

.PHONY: setup bench test test-fast shards clean browser gpu-check gpu-wheels

setup: $(STAMP)

# The venv is rebuilt only when the lock or the project metadata changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	touch $(STAMP)

shards: setup
	$(BIN)/python -m bench shards make digits

bench: setup shards
	$(BIN)/python -m bench sweep tune_spaces/smoke.yaml --results results/smoke --overwrite

# Headless Debian chromium for the leaderboard page test (tests/test_leaderboard.py); installed once.
browser:
	@command -v chromium >/dev/null 2>&1 || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "warning: could not install chromium; the leaderboard page test will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The prepared device check (docs/perf.md): on a lent GPU machine's bare image, with .wheels carried; no venv.
gpu-check:
	bash scripts/gpu_check.sh --out $${OUT:-gpu_check}

# The wheels it installs there (run here, with the registry).
gpu-wheels:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) bash scripts/gpu_wheels.sh .wheels

clean:
	rm -rf results shards .cache .pytest_cache
