# make test: create a virtualenv unless one is active, install torch==2.13.0 (CPU wheel) then the
# project, run the tests. make demo: the main job on the embedded default (local Ray, CPU, synthetic data).
# make gpu-check: the prepared GPU check (export/gpu_check.py).
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
TORCH_SPEC ?= torch==2.13.0
# gpu-check runs where a GPU machine already has CUDA torch (and no network to install anything): the venv's
# python when there is one, else the machine's.
GPU_PY ?= $(if $(VIRTUAL_ENV),python,$(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3))

.PHONY: install lint test test-fast demo gpu-check clean

$(VENV)/bin/python:
	@if [ -z "$$VIRTUAL_ENV" ]; then python3 -m venv $(VENV); fi

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"

# ruff (configured in pyproject.toml): no finding allowed; .ci/run runs it before the tests
lint: install
	$(PY) -m ruff check .

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m cluster.demo

# every GPU figure into one JSON ($$OUT/gpu_check.json when OUT is set), < 8 minutes, each section in its own
# interpreter under a hard time limit; exits 1 when a section failed, 2 without a GPU
gpu-check:
	$(GPU_PY) -m export.gpu_check

clean:
	rm -rf runs out .pytest_cache
