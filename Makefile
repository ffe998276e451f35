# Entry points. The first target that needs Python builds .venv from requirements.lock
# (hashed, via uv) and re-syncs it whenever the lock changes. Needs only python3.11, make, git.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := .tools/bin/uv
SYNCED := $(VENV)/.synced
export DVC_NO_ANALYTICS := 1
# dvc stages call `python`: make it the locked environment's
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0
export UV_COMPILE_BYTECODE := 1

.PHONY: help env repro seeds ablations table2 test test-all notebooks bench lab lock clean-venv

help:
	@echo "make repro      run the DVC pipeline (default profile: mini, CPU; JOBS=2 trainings at once)"
	@echo "make test       run the default test suite"
	@echo "make seeds      student + every KD method for the other seeds (after make repro)"
	@echo "make ablations  CLoCKDistill ablation variants and the untuned methods, params ablation_seeds (after make repro)"
	@echo "make table2     render results/tables/table2.{md,csv,tex} from stored metrics"
	@echo "make notebooks  execute the analysis notebooks headless (papermill; needs the runs of make repro)"
	@echo "make bench      speed/memory benchmarks -> results/bench/"
	@echo "make lab        start JupyterLab"
	@echo "make lock       re-compile requirements.lock from requirements.in"

$(UV): requirements-tools.lock
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --isolated --disable-pip-version-check --require-hashes -r requirements-tools.lock
	@touch $(UV)

$(SYNCED): requirements.lock | $(UV)
	@[ -x $(PY) ] || $(UV) venv $(VENV) --python $(PYTHON) --seed --quiet
	$(UV) pip sync --quiet --python $(PY) --require-hashes requirements.lock
	@touch $(SYNCED)

env: $(SYNCED)

# DVC runs stages one at a time; the runner takes dvc.yaml's out-of-date stages JOBS at a time
# (their own commands, then `dvc commit`); the final `dvc repro` then finds nothing to do.
JOBS ?= 2
repro: $(SYNCED)
	$(PY) -m reproduce.pipeline.parallel --jobs $(JOBS)
	$(VENV)/bin/dvc repro

seeds: $(SYNCED)
	$(PY) -m reproduce.experiments seeds

ablations: $(SYNCED)
	$(PY) -m reproduce.experiments ablations

table2: $(SYNCED)
	$(PY) -m reproduce.tables
	$(PY) -m reproduce.claim

test: $(SYNCED)
	$(PY) -m pytest -q

test-all: $(SYNCED)
	$(PY) -m pytest -q -m "slow or not slow"

notebooks: $(SYNCED)
	$(PY) -m reproduce.notebooks

bench: $(SYNCED)
	$(PY) -m reproduce.bench

lab: $(SYNCED)
	$(VENV)/bin/jupyter lab --allow-root --no-browser

lock: $(UV)
	$(UV) pip compile requirements.in -o requirements.lock --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --quiet
	$(UV) pip compile requirements-tools.in -o requirements-tools.lock --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --quiet

clean-venv:
	rm -rf $(VENV) .tools
