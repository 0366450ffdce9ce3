# elinspect — `make help` lists the targets. `make train` and `make test` set everything
# up on a fresh machine (a .venv with the pinned dependencies) before they run.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "elinspect needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install elinspect with its dev tools (once)

train: install ## train and test the default job (SeMaCNN on the real ELPV cells); ARGS="key=value ..."
	$(PY) -m elinspect.train $(ARGS)

test: install ## run the test suite (without the slow tests); ARGS="-k name ..."
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install ## run only the slow tests
	$(PY) -m pytest -m slow $(ARGS)

test-all: install ## run every test
	$(PY) -m pytest $(ARGS)

lint: install ## ruff: lint and check formatting
	$(VENV)/bin/ruff check elinspect tests experiments
	$(VENV)/bin/ruff format --check elinspect tests experiments

format: install ## ruff: fix what can be fixed and format
	$(VENV)/bin/ruff check --fix elinspect tests experiments
	$(VENV)/bin/ruff format elinspect tests experiments

sweep: install ## a small multirun: two losses × two seeds, 2 epochs each, at 64 px
	$(PY) -m elinspect.train -m loss=ce,focal seed=1,2 trainer.max_epochs=2 data.image_size=64 $(ARGS)

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP) ## benchmarks (detectors + PVEL-AD loader, B-A attention, PaDiM vs anomalib, GAN-AE steps, Hydra launchers); each prints its table
	$(PY) experiments/bench_detection.py --repeats 8 --out experiments/results/bench_detection.md
	$(PY) experiments/bench_attention.py
	$(PY) experiments/bench_padim.py --limit 1131
	$(PY) experiments/bench_padim.py --limit 1131 --backbone efficientnet_lite0 --layers 1 2 3 --weights imagenet
	$(PY) experiments/bench_padim.py --limit 256 --fit-doubling --test-limit 64
	$(PY) experiments/bench_ganae.py --out experiments/results/bench_ganae.md
	$(PY) experiments/bench_launchers.py --out experiments/results/bench_launchers.md

WHEELHOUSE := wheelhouse
$(WHEELHOUSE)/.stamp: $(STAMP)
	$(PY) experiments/gpu_check.py --build-wheelhouse $(WHEELHOUSE)
	touch $@

wheelhouse: $(WHEELHOUSE)/.stamp ## the py3.12 wheels a lent GPU machine lacks (carried by make gpu-check's device call)

gpu-check: install ## GPU checks: pytest -m gpu and a throughput table; DRY=1: the same on the CPU at tiny sizes
ifdef DRY
	$(PY) experiments/gpu_check.py --dry --out $(or $(OUT),$(CURDIR)/logs/gpu_check_dry) $(ARGS)
else
	$(PY) experiments/gpu_check.py --device-call
	$(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA here: paste the device call above on a session holding a GPU machine, or use DRY=1")'
	$(PY) experiments/gpu_check.py $(ARGS)
endif

clean: ## remove caches and build files (keeps logs/ and .venv)
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-all: clean ## also remove .venv and every run under logs/
	rm -rf $(VENV) logs

.PHONY: wheelhouse gpu-check help install train test test-slow test-all lint format sweep bench clean clean-all
