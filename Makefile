# dode: the two commands people need are `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build of torch, pinned so that pip never pulls a multi-GB CUDA build
# here; pyproject.toml keeps an open range for users who bring their own.
TORCH  ?= torch==2.13.0

.PHONY: setup test reproduce lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

NOTEBOOKS := $(wildcard notebooks/*.ipynb)

test: setup
	$(PY) -m pytest -q tests
ifneq ($(NOTEBOOKS),)
	$(PY) -m pytest -q --nbval-lax $(NOTEBOOKS)
endif

reproduce: setup
	$(PY) -m dode.reproduce --out results $(ARGS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache
