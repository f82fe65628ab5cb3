# dode: the two commands people need are `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build of torch, pinned so that pip never pulls a multi-GB CUDA build
# here; pyproject.toml keeps an open range for users who bring their own.
TORCH  ?= torch==2.13.0

.PHONY: setup test reproduce bench models lab clean

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

# FORCE=1 reruns notebooks whose parameters and code have not changed; ARGS passes more options
# (python -m dode.reproduce --help), e.g. ARGS="--only 05_ablations-gmm-digits".
reproduce: setup
	$(PY) -m dode.reproduce --results results $(if $(FORCE),--force) $(ARGS)

# Benchmarks (quality against the exact ODE, index matching, distillation cost, sampling overhead, scaling) into
# results/benchmarks.md, results/benchmarks/*.csv|json and results/figures/bench_*.png; ~12 min on 2 CPU cores.
# ARGS passes more options (python -m dode.benchmarks --help), e.g. ARGS="--only scaling" or ARGS="--quick --out /tmp/b".
bench: setup
	$(PY) -m dode.benchmarks --out results $(ARGS)

# Retrain the shipped unet-digits and digits-classifier weights (dode/weights/); ~10 min on 2 CPU cores.
models: setup
	mkdir -p results/notebooks
	$(PY) -m papermill notebooks/train_unet_digits.ipynb results/notebooks/train_unet_digits.ipynb

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache
