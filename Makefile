# dode: the two commands people need are `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build of torch, pinned so that pip never pulls a multi-GB CUDA build
# here; pyproject.toml keeps an open range for users who bring their own.
TORCH  ?= torch==2.13.0

.PHONY: setup notebook-filter test reproduce verify bench guard-reference count-interpolation learned-rows models lab clean test-inception

setup: $(STAMP) notebook-filter

# Notebooks stay output-free in git whatever JupyterLab saves: .gitattributes sends notebooks/*.ipynb (not the
# executed copies in results/) through nbstripout when they are staged; this registers that filter in this clone.
notebook-filter:
	@if git rev-parse --git-dir > /dev/null 2>&1; then \
	    git config filter.nbstripout.clean "'$(abspath $(PY))' -m nbstripout --keep-id" && \
	    git config filter.nbstripout.smudge cat && \
	    git config filter.nbstripout.required true; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# CITATION.cff's validator (tests/test_docs.py), without its jsonschema<4 pin (pyproject.toml says why)
	$(PY) -m pip install --quiet --no-deps "cffconvert==2.0.0"
	touch $(STAMP)

NOTEBOOKS := $(wildcard notebooks/*.ipynb)

# One pytest run over tests/ and (nbval) every notebook, spread over one worker per core (TEST_WORKERS), each on one
# torch thread; --dist loadfile keeps a notebook's cells, in order, on one worker (one kernel).
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")

test: setup
	DODE_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 tests $(if $(NOTEBOOKS),--nbval-lax $(NOTEBOOKS))

# Runs every notebook not already run on this machine (results/.state.json, untracked), then compares every
# number it wrote with the one it replaced (results/verification.md). FORCE=1 reruns everything; ARGS passes
# more options (python -m dode.tools.reproduce --help), e.g. ARGS="--only 05_ablations-gmm-digits" (a partial run: it
# reports in results/verification-partial.md and leaves the full run's record alone).
reproduce: setup
	$(PY) -m dode.tools.reproduce --results results $(if $(FORCE),--force) $(ARGS)

# Reruns into build/verify and compares with the committed results/ (left as they are); fails on a difference beyond
# a relative 1e-3 (what the tables print), or with ARGS="--rtol 1e-6" beyond rounding; the report names both machines.
# ARGS="--only 01_quickstart-gmm-digits" verifies a subset.
verify: setup
	$(PY) -m dode.tools.reproduce --results results --verify $(ARGS)

# Benchmarks (distillation cost, sampling overhead, scaling; quality is make reproduce's) into results/benchmarks.md
# and results/benchmarks/*.csv|json; ~27 min on 2 CPU cores. Fails if a target is missed (the message names it).
# ARGS passes more options (python -m dode.tools.benchmarks --help), e.g. ARGS="--only scaling" or ARGS="--quick --out /tmp/b".
bench: setup
	$(PY) -m dode.tools.benchmarks --out results $(ARGS)

# The guard's decisions against a cheap validation reference and the 1000-step one, every solver x NFE of both
# embedded models (results/guard_reference.md, results/guard_reference/); ~10 min on 2 CPU cores.
# ARGS="--models gmm-digits" for one model, ARGS="--report-only" to rewrite the report from the saved table.
guard-reference: setup
	DODE_NUM_THREADS=1 $(PY) -m dode.tools.guard_reference --out results $(ARGS)

# Lambdas for step counts without a fit, interpolated over the noise level, against the base and the count's own fit
# (results/count_interpolation.md; seconds).
count-interpolation: setup
	DODE_NUM_THREADS=1 $(PY) -m dode.tools.count_interpolation --out results $(ARGS)

# unet-digits' learned-grid rows (the grid alone, joint lambdas, both) at NFE 3-10, which make reproduce holds at NFE 5
# only: notebook 02 with make reproduce's parameters, its solvers in two runs at once (results/learned_rows.md,
# results/learned_rows/), the grid refinements weighing a moment term at 0, 1 and 4 (--moments), every choice on 500
# validation seeds (--validation-size); about 90 min on 2 CPU cores; the shards and the schedulers they save stay in
# build/learned_rows. ARGS="--report-only" rewrites the report from the saved rows; ARGS="--solvers ddim unipc" runs a
# part of them (python -m dode.tools.learned_rows --out build/x runs its shards in build/x/learned_rows-work).
learned-rows: setup
	$(PY) -m dode.tools.learned_rows --out results $(ARGS)

# Retrain the shipped unet-digits and digits-classifier weights (dode/models/weights/), refit the gmm-digits mixture and
# report how far the refit is from the shipped one (ARGS="-p replace_mixture True" replaces it); ~10 min on 2 CPU cores.
models: setup
	mkdir -p results/notebooks
	$(PY) -m papermill notebooks/train_unet_digits.ipynb results/notebooks/train_unet_digits.ipynb -p num_threads 0 $(ARGS)

# LAB_ARGS passes options to JupyterLab, e.g. LAB_ARGS="--allow-root --no-browser --ip=0.0.0.0" in a container.
lab: setup
	$(VENV)/bin/jupyter lab notebooks $(LAB_ARGS)

# Inception FID for real, in an environment of its own (several GB; not part of `make test`): PyPI's torchvision
# does not import beside .venv's CPU torch, so this pins a torch/torchvision pair that does. The tests run against
# stand-in weights made afresh each time (torch-fidelity's InceptionV3 with random weights, scripts/inception_standin.py)
# under the file name the weights lookup expects; no weights are committed.
INCEPTION_VENV  := .venv-inception
INCEPTION_PY    := $(INCEPTION_VENV)/bin/python
INCEPTION_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(INCEPTION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(INCEPTION_VENV)
	echo '*' > $(INCEPTION_VENV)/.gitignore
	$(INCEPTION_PY) -m pip install --quiet --upgrade pip
	$(INCEPTION_PY) -m pip install --quiet $(INCEPTION_TORCH)
	$(INCEPTION_PY) -m pip install --quiet -e ".[dev,inception]"
	$(INCEPTION_PY) -c "import torchvision, torch_fidelity"
	touch $@

test-inception: $(INCEPTION_VENV)/.installed
	rm -rf $(INCEPTION_VENV)/torch-home
	$(INCEPTION_PY) scripts/inception_standin.py $(INCEPTION_VENV)/torch-home/hub/checkpoints
	# the real-network tests would skip without torch-fidelity or weights: make that an error here
	TORCH_HOME=$(abspath $(INCEPTION_VENV)/torch-home) $(INCEPTION_PY) -c \
	    "from dode import metrics; assert metrics._TORCH_FIDELITY_AVAILABLE; print(metrics.inception_weights())"
	TORCH_HOME=$(abspath $(INCEPTION_VENV)/torch-home) $(INCEPTION_PY) -m pytest -q tests/test_inception.py tests/test_metrics.py

clean:
	rm -rf $(VENV) $(INCEPTION_VENV) .pytest_cache build
