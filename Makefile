# A fresh clone needs only Python 3.11+: `make run` starts everything, `make test` runs the tests.
# PostgreSQL and Redis come from DATABASE_URL / REDIS_URL, else embedded ones start under .data/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after each install: pyproject.toml newer than it means dependencies changed.
STAMP := $(VENV)/.installed
PORT ?= 8501
WORKERS ?= 2
HOST ?= 127.0.0.1
PYTEST_ARGS ?=
# Embedded services for tests live apart from the console's (.data), so tests never flush its queue.
TEST_DATA_DIR ?= .data/test
# The fault soak (bench/soak.py): its seed and how many minutes faults are injected.
SEED ?= 1
MINUTES ?= 2

.PHONY: help install run test lint browser demo-data stop clean-data bench soak

help:
	@echo "make run       start PostgreSQL, Redis, workers and the console (PORT=$(PORT) WORKERS=$(WORKERS))"
	@echo "make test      run the tests (PYTEST_ARGS='-k services -x' to pass options)"
	@echo "make lint      ruff + mypy"
	@echo "make browser   install Debian's chromium for the browser tests when missing"
	@echo "make demo-data regenerate data/ (the demo catalog's sources)"
	@echo "make stop      stop embedded services a crashed run left behind"
	@echo "make soak      seeded fault soak on its own servers (SEED=$(SEED) MINUTES=$(MINUTES)); exit 1 with evidence"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed; found: $$($(PYTHON) --version 2>&1). Try PYTHON=python3.12 make ..."; exit 1; }
	$(PYTHON) -m venv $(VENV) || \
		{ rm -rf $(VENV); echo "python3 -m venv failed: on Debian/Ubuntu, apt-get install python3-venv"; exit 1; }

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test,local,lineage,auth]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dataloader up --port $(PORT) --workers $(WORKERS) --host $(HOST)

test: $(STAMP)
	$(PY) -m devstack.services --data-dir $(TEST_DATA_DIR) run -- $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

browser:
	sh scripts/ensure_chromium.sh

demo-data: $(STAMP)
	$(PY) scripts/gen_demo_data.py --out data

stop: $(STAMP)
	$(PY) -m devstack.services stop
	$(PY) -m devstack.services --data-dir $(TEST_DATA_DIR) stop

clean-data: stop
	rm -rf .data data

# Everything issue 18 asks to report: the engine's stages (small batches paired with the loop at the same size,
# the fixed cost per batch against bench/small_before.json), worker memory at 10M records (about 20 minutes,
# merged into the same report), object storage, and the console at scale. About an hour on 2 cores.
bench: $(STAMP)
	$(PY) bench/engine.py --before bench/small_before.json
	$(PY) bench/engine.py --stages memory_10m --merge bench/.data/results.json --before bench/small_before.json
	$(PY) bench/objstore.py
	$(PY) bench/console_scale.py

soak: $(STAMP)
	$(PY) bench/soak.py --seed $(SEED) --minutes $(MINUTES)
