# RetFormer: every target sets up what it needs (venv, project, Fashion-MNIST) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RETFORMER := $(VENV)/bin/retformer
WORKDIR ?= work
EXTRAS ?= cpu,dev
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
KB ?= fmnist_world
DATASET ?= fmnist_lt
EXPERIMENT ?= demo
RUN ?=
SET ?=
SCHEDULER ?=
# A cluster manifest for the Dask stages (manifests/clusters/: local, slurm, slurm_gpu) or its path.
CLUSTER ?=
# Pass `SET="train.epochs=3 k=8"` to override manifest values from make.
SET_ARGS := $(foreach s,$(SET),--set $(s))
SCHED_ARGS := $(if $(SCHEDULER),--scheduler $(SCHEDULER),)
CLUSTER_ARGS := $(if $(CLUSTER),--cluster $(CLUSTER),)
COMMON := --workdir $(WORKDIR) $(SCHED_ARGS) $(CLUSTER_ARGS)
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: help setup data demo test lint shards download embed index neighbors train evaluate bench-embed bench-index clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

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

demo: setup data  ## the whole chain on Fashion-MNIST-LT: table + work/demo/results.json
	$(RETFORMER) demo $(COMMON) $(SET_ARGS)

test: setup data  ## the test suite
	$(PY) -m pytest -q

lint: setup  ## ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

shards: setup data  ## build KB shards (make shards KB=...)
	$(RETFORMER) shards --kb $(KB) $(COMMON) $(SET_ARGS)

download: setup  ## download a KB with img2dataset (make download KB=... [RETRY=1])
	$(RETFORMER) download --kb $(KB) $(COMMON) $(SET_ARGS) $(if $(RETRY),--retry-failed,)

embed: setup data  ## embed a KB (make embed KB=...)
	$(RETFORMER) embed --kb $(KB) $(COMMON) $(SET_ARGS)

index: setup  ## build + recall-check the KB index (make index KB=...)
	$(RETFORMER) index --kb $(KB) $(COMMON) $(SET_ARGS)

neighbors: setup data  ## top-k neighbor tables (make neighbors DATASET=... KB=...)
	$(RETFORMER) neighbors --dataset $(DATASET) --kb $(KB) $(COMMON) $(SET_ARGS)

train: setup data  ## train + evaluate an experiment (make train DATASET=... KB=... EXPERIMENT=...)
	$(RETFORMER) train --dataset $(DATASET) --kb $(KB) --experiment $(EXPERIMENT) $(COMMON) $(SET_ARGS)

evaluate: setup  ## print the results of a run (make evaluate RUN=...; default: the latest)
	$(RETFORMER) evaluate $(if $(RUN),--run $(RUN),) --workdir $(WORKDIR)

bench-index: setup  ## index benchmark (BENCHMARKS.md)
	$(PY) bench/bench_index.py --n 100000 1000000 --d 512 $(if $(BENCH_PARTS),--parts $(BENCH_PARTS)) $(if $(BENCH_NEIGHBORS),--neighbors-record $(BENCH_NEIGHBORS)) --out bench/results/index.json

clean:  ## remove the workspace (keeps the venv)
	rm -rf $(WORKDIR)

bench-embed: setup  ## embed benchmark: end-to-end vs bare encoder forward, per encoder (BENCHMARKS.md)
	$(PY) bench/bench_embed.py --out bench/results/embed.json
