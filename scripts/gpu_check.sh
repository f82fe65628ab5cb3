#!/usr/bin/env bash
# The GPU check: the test suite with DODE_TEST_DEVICE=cuda, then the sampling benchmark (scripts/gpu_benchmark.py).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else gpu-check/
#
# Python: $PYTHON if set, else the first of .venv/bin/python and python3 whose torch sees a GPU, else a new
# .venv-gpu with torch==2.13.0 from PyPI. Packages it lacks go into .venv-gpu (made with --system-site-packages,
# so an existing CUDA torch is kept): from the wheels in $DODE_WHEELS on a machine without network, else from
# PyPI. The Inception FID test runs only with torch-fidelity and the weights (DODE_INCEPTION_WEIGHTS=file, or
# network); it is skipped otherwise. Writes pytest.log, junit.xml, benchmark.json, benchmark.md and a summary gpu_check.md into OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has_cuda() { "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then echo "$candidate"; return; fi
    done
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q torch==2.13.0 >&2
    echo .venv-gpu/bin/python
}

# import name -> what pip installs
missing_packages() {
    "$1" - <<'EOF'
import importlib.util
needed = {"diffusers": "diffusers", "torchmetrics": "torchmetrics", "sklearn": "scikit-learn", "scipy": "scipy",
          "pandas": "pandas", "seaborn": "seaborn", "matplotlib": "matplotlib", "tqdm": "tqdm",
          "safetensors": "safetensors", "tabulate": "tabulate", "PIL": "pillow", "pytest": "pytest"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
EOF
}

python=$(pick_python)
missing=$(missing_packages "$python")
if [[ -n "$missing" ]]; then
    echo "installing into .venv-gpu: $missing" >&2
    [[ -x .venv-gpu/bin/python ]] || "$python" -m venv --system-site-packages .venv-gpu
    python=.venv-gpu/bin/python
    if [[ -n "${DODE_WHEELS:-}" ]]; then
        "$python" -m pip install -q --no-index --no-deps "$DODE_WHEELS"/*.whl
    else
        # shellcheck disable=SC2086  # one word per package
        "$python" -m pip install -q $missing
    fi
    missing=$(missing_packages "$python")
    [[ -z "$missing" ]] || { echo "still missing: $missing" >&2; exit 1; }
fi
has_cuda "$python" || { echo "no GPU visible to $python's torch; this check is for a GPU machine" >&2; exit 1; }

"$python" - >"$out/gpu_check.md" <<'EOF'
import platform, torch
print("# GPU check\n")
print(f"- GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
EOF

status=0
DODE_TEST_DEVICE=cuda "$python" -m pytest -q -p no:cacheprovider tests --junitxml="$out/junit.xml" \
    2>&1 | tee "$out/pytest.log" || status=$?
"$python" scripts/gpu_benchmark.py --device cuda --out "$out" || status=$?
{
    echo "- tests (DODE_TEST_DEVICE=cuda): $(tail -n 1 "$out/pytest.log")"
    echo
    if [[ -f "$out/benchmark.md" ]]; then cat "$out/benchmark.md"; fi
} >>"$out/gpu_check.md"
cat "$out/gpu_check.md"
exit "$status"
