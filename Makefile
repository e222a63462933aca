# make test: create a virtualenv unless one is active, install torch==2.13.0 (CPU wheel) then the
# project, run the tests. make demo: the main job on the embedded default (local Ray, CPU, synthetic data).
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo clean

$(VENV)/bin/python:
	@if [ -z "$$VIRTUAL_ENV" ]; then python3 -m venv $(VENV); fi

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m cluster.demo

clean:
	rm -rf runs out .pytest_cache
