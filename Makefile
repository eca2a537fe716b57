# RetFormer: every target sets up what it needs (venv, project, Fashion-MNIST) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RETFORMER := $(VENV)/bin/retformer
WORKDIR ?= work
# The extras of the last install are remembered (.venv/.extras): a later `make test` must not put
# faiss-cpu beside the faiss-gpu of `make setup EXTRAS=gpu,dev`.
DEFAULT_EXTRAS := cpu,dev
SAVED_EXTRAS := $(shell cat $(VENV)/.extras 2>/dev/null)
EXTRAS ?= $(or $(SAVED_EXTRAS),$(DEFAULT_EXTRAS))
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
KB ?= fmnist_world
DATASET ?= fmnist_lt
EXPERIMENT ?= demo
RUN ?=
SET ?=
SCHEDULER ?=
# A cluster manifest for the Dask stages (manifests/clusters/: local, slurm, slurm_gpu) or its path.
CLUSTER ?=
# `make train NPROC=4`: train with 4 processes under torchrun (one per GPU; gloo on the CPU); only rank
# 0's output is shown.
NPROC ?=
# Pass `SET="train.epochs=3 k=8"` to override manifest values from make.
SET_ARGS := $(foreach s,$(SET),--set $(s))
SCHED_ARGS := $(if $(SCHEDULER),--scheduler $(SCHEDULER),)
CLUSTER_ARGS := $(if $(CLUSTER),--cluster $(CLUSTER),)
COMMON := --workdir $(WORKDIR)
# Where the Dask stages run (embed, index, neighbors, download, demo): shards and train take no cluster.
DASK_ARGS := $(SCHED_ARGS) $(CLUSTER_ARGS)
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: help setup data demo noisy test test-all docs-img lint shards download embed index neighbors train evaluate bench-embed bench-index bench-index-grow bench-kb-update bench-neighbors bench-trainer bench-gpu clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# A new venv takes ~7 GB (the pinned torch 2.14.1 is a CUDA 13 build): with less free space than this,
# setup stops with one line before pip does, instead of pip's OSError half-way through an install.
VENV_MIN_FREE_GB ?= 8

# Reinstalled when pyproject.toml changes or other extras are asked for (FORCE).
$(VENV)/.installed: pyproject.toml $(if $(filter-out $(SAVED_EXTRAS),$(EXTRAS)),FORCE,)
	@test -x $(PY) || { \
	  at="$(abspath $(VENV))"; while [ ! -d "$$at" ]; do at=$$(dirname "$$at"); done; \
	  free=$$(df -Pk "$$at" 2>/dev/null | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ -n "$$free" ] && [ "$$free" -lt $(VENV_MIN_FREE_GB) ]; then \
	    echo "setup: $(VENV) needs about 7 GB (torch 2.14.1 is a CUDA build) and its filesystem has $$free GB free; free some space (VENV_MIN_FREE_GB=$(VENV_MIN_FREE_GB))" >&2; \
	    exit 1; \
	  fi; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	@# faiss-cpu and faiss-gpu-cu12 both provide `faiss`: drop the one the extras do not ask for.
	@$(PY) -m pip uninstall -y -q $(if $(findstring gpu,$(EXTRAS)),faiss-cpu,faiss-gpu-cu12) 2>/dev/null || true
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@echo "$(EXTRAS)" > $(VENV)/.extras
	@touch $@

FORCE:

setup: $(VENV)/.installed  ## create the virtualenv and install the project

data:  ## install Debian's dataset-fashion-mnist when its IDX files are missing
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || exit 1; \
	else \
	  echo "Fashion-MNIST not found: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
	  echo "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in $(FMNIST_DIR) (or FMNIST_DIR=...)"; \
	  exit 1; \
	fi

# `make demo SEEDS=3`: every trained method with 3 seeds (mean ± sd, paired bootstrap), and the noisy-label
# sets too (NOISY=0 leaves them out; NOISY=1 adds them to a one-seed demo).
SEEDS ?= 1
NOISY ?=
NOISY_ARGS := $(if $(filter 1,$(NOISY)),--noisy,$(if $(filter 0,$(NOISY)),--no-noisy,))
# `make demo QUICK=1`: a smoke run (digits-LT, small grids, ~2 min on 2 cores), said so in its output.
QUICK ?=
QUICK_ARGS := $(if $(filter 1,$(QUICK)),--quick,)
demo: setup data  ## the whole chain on the dev sets: tables + work/demo/results.json (SEEDS=3, NOISY=1)
	$(RETFORMER) demo $(COMMON) $(DASK_ARGS) $(SET_ARGS) --seeds $(SEEDS) $(NOISY_ARGS) $(QUICK_ARGS)

noisy: setup data  ## the noisy-label sets alone (fmnist_lt_noisy, fmnist_lt_noisy_asym), every method, SEEDS
	$(RETFORMER) demo $(COMMON) $(DASK_ARGS) $(SET_ARGS) --seeds $(SEEDS) \
	  --dataset fmnist_lt_noisy --kb fmnist_world --dataset fmnist_lt_noisy_asym --kb fmnist_world

# Test tiers (README "Tests"): `make test` is the default tier, `make test-all` adds the tests marked
# slow (kill-matrix cases beyond one, full reruns) and system (SLURM, torchrun, Chromium, several
# interpreters) as a second pytest run, so CI's `make test-all` runs the README's `make test` first.
# The default tier runs on TEST_WORKERS pytest-xdist processes (auto: one per CPU core; 0: in this process),
# one test file per worker (`--dist loadfile`: a file's module fixtures are built once); every test already
# runs torch on one thread (tests/conftest.py), so 2 cores run it in ~3 min instead of ~5.5.
TEST_WORKERS ?= auto
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q
test: setup data  ## the default test tier, <= 5 min on 2 cores (offline: models from installed packages only)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not slow and not system"

# The slow and system tiers stay in one process: on xdist workers the CLI-built workspace twin
# (tests/test_workspace_build.py) once differed from the in-process one (README "Development").
test-all: test  ## every test: the default tier, then the slow and system tiers (CI)
	$(PYTEST) -m "slow or system"

# `make docs-img RUN=<run name or folder>`: the pictures of that run (README's: the demo's fmnist_lt run);
# without RUN, of the small demo-like run the test builds.
SCREENSHOT_RUN := $(if $(RUN),RETFORMER_SCREENSHOT_RUN=$(abspath $(if $(findstring /,$(RUN)),$(RUN),$(WORKDIR)/runs/$(RUN))),)
docs-img: setup data  ## regenerate docs/img/browser.png and report.png in headless Chromium (RUN=<run>: of that run)
	RETFORMER_SCREENSHOT_DIR=$(CURDIR)/docs/img $(SCREENSHOT_RUN) $(PYTEST) tests/test_browse_page.py

lint: setup  ## ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

shards: setup  ## build KB shards (make shards KB=...)
	$(RETFORMER) shards --kb $(KB) $(COMMON) $(SET_ARGS)

download: setup  ## download a KB with img2dataset (make download KB=... [RETRY=1])
	$(RETFORMER) download --kb $(KB) $(COMMON) $(DASK_ARGS) $(SET_ARGS) $(if $(RETRY),--retry-failed,)

embed: setup  ## embed a KB (make embed KB=...)
	$(RETFORMER) embed --kb $(KB) $(COMMON) $(DASK_ARGS) $(SET_ARGS)

index: setup  ## build + recall-check the KB index (make index KB=...)
	$(RETFORMER) index --kb $(KB) $(COMMON) $(DASK_ARGS) $(SET_ARGS)

neighbors: setup  ## top-k neighbor tables (make neighbors DATASET=... KB=...)
	$(RETFORMER) neighbors --dataset $(DATASET) --kb $(KB) $(COMMON) $(DASK_ARGS) $(SET_ARGS)

train: setup  ## train + evaluate an experiment (make train DATASET=... KB=... EXPERIMENT=... [NPROC=4])
	$(if $(NPROC),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) --local-ranks-filter 0 -m retformer.pipelines.cli,$(RETFORMER)) train --dataset $(DATASET) --kb $(KB) --experiment $(EXPERIMENT) $(COMMON) $(SET_ARGS)

# KB only when given (`make evaluate RUN=r KB=other`), not its fmnist_world default.
EVAL_KB := $(if $(filter command line environment,$(origin KB)),--kb $(KB),)
evaluate: setup  ## print a run's results (make evaluate RUN=...; default: the latest); KB=K: evaluate it with KB K
	$(RETFORMER) evaluate $(if $(RUN),--run $(RUN),) $(EVAL_KB) --workdir $(WORKDIR) $(if $(EVAL_KB),$(DASK_ARGS) $(SET_ARGS),)

bench-index: setup  ## index benchmark (BENCHMARKS.md)
	$(PY) bench/bench_index.py --n 100000 1000000 --d 512 $(if $(BENCH_PARTS),--parts $(BENCH_PARTS)) $(if $(BENCH_NEIGHBORS),--neighbors-record $(BENCH_NEIGHBORS)) --out bench/results/index.json

clean:  ## remove the workspace (keeps the venv)
	rm -rf $(WORKDIR)

bench-embed: setup  ## embed benchmark: end-to-end vs bare encoder forward, per encoder (BENCHMARKS.md)
	$(PY) bench/bench_embed.py --out bench/results/embed.json

bench-index-grow: setup  ## grow an index in place (+10% rows at 200k) vs rebuild it: time, recall, Flat neighbours (BENCHMARKS.md)
	$(PY) bench/bench_index_grow.py --n 200000 --d 512 --kinds auto flat --out bench/results/index_grow.json

bench-kb-update: setup data  ## demo data: train with a thinned KB, evaluate with it grown in place / an irrelevant KB; vs rebuild + retrain (README)
	$(PY) bench/bench_kb_update.py --workdir /tmp/kb_update --out bench/results/kb_update.json

bench-neighbors: setup  ## neighbors stage vs bare faiss search; the self-match lookup once vs per slice (BENCHMARKS.md)
	$(PY) bench/bench_neighbors.py --out bench/results/neighbors.json

bench-trainer: setup data  ## the demo experiment's trainer vs its bare compute, per method (BENCHMARKS.md; QUICK=1)
	$(PY) bench/bench_trainer.py --workdir $(WORKDIR) $(if $(QUICK),--quick,) --out bench/results/trainer.json

bench-gpu: setup  ## GPU checks, one table: ViT-B-16 embed, faiss-gpu index, AMP fine-tune step (EXTRAS=gpu,dev; QUICK=1)
	bash bench/gpu_check.sh $(if $(QUICK),--quick,) --out bench/results/gpu
