"""Numbers that do not depend on the machine: the same seeds give the same numbers under other BLAS kernels and
thread counts, as on another CPU (docs/design.md, "Conventions"; docs/reproducing.md, "Numbers on any machine").

tests/fingerprint.py runs load, data draws, a greedy fit, sampling, Frechet distances and RMSE on both embedded
models; each setting below runs it in a fresh process and must print what the default prints, to a relative
``RTOL``. The tables print three significant digits, so ``RTOL`` is a hundred times finer than what they show;
rounding across kernels moves these numbers by about 1e-7 (the unet's float32 arithmetic), while the draws
through an eigenvector basis, which turns with the last bit of the covariance, moved the Frechet distances by 1 %.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

FINGERPRINT = Path(__file__).with_name("fingerprint.py")
#: a hundredth of the tables' printed precision (three significant digits)
RTOL = 1e-5


def _has_avx2() -> bool:
    try:
        return " avx2 " in f" {Path('/proc/cpuinfo').read_text().split('flags', 2)[1].splitlines()[0]} "
    except (OSError, IndexError):
        return False


#: (name, environment); the first is the default every other one is compared with. torch's threads are a runtime
#: setting: the default process also computes every number on two threads (``_run``'s ``threads``).
SETTINGS = [
    ("default: OpenBLAS on 2 threads, torch on 1", {"OPENBLAS_NUM_THREADS": "2"}),
    ("OpenBLAS on 1 thread", {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}),
    ("numpy's OpenBLAS on its Haswell kernel", {"OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"}),
    ("torch's MKL and oneDNN on AVX2", {"OPENBLAS_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                         "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    # a CPU without AVX2 as torch sees it: its scalar (unvectorised) kernels, MKL and oneDNN on SSE4
    ("torch's scalar kernels, MKL and oneDNN on SSE4", {"OPENBLAS_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default",
                                                        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                                        "ONEDNN_MAX_CPU_ISA": "SSE41"}),
]


def _run(extra: dict, threads=("1",)) -> dict:
    """{torch threads: {name: number}} from a fresh process under ``extra``, on each of ``threads``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "MKL_", "ONEDNN_", "OMP_", "ATEN_"))
           or k == "OPENBLAS_L2_SIZE"}
    if os.environ.get("OPENBLAS_CORETYPE"):  # set by this machine's image for its CPU: keep it unless overridden
        env["OPENBLAS_CORETYPE"] = os.environ["OPENBLAS_CORETYPE"]
    env.update(extra)
    done = subprocess.run([sys.executable, str(FINGERPRINT), *threads], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = {t: {} for t in threads}
    for line in done.stdout.splitlines():
        label, value = line.split("\t")
        prefix, name = label.split(": ", 1)
        out[prefix.removeprefix("torch threads ")][name] = float(value)
    return out


def differences(base: dict, other: dict, rtol: float = RTOL) -> list[str]:
    """The numbers of ``other`` that differ from ``base``'s beyond ``rtol`` (relative to the larger), as text."""
    out = [f"{name}: missing" for name in base if name not in other]
    for name, a in base.items():
        b = other.get(name, a)
        if not (a == b or abs(a - b) <= rtol * max(abs(a), abs(b)) or (math.isnan(a) and math.isnan(b))):
            out.append(f"{name}: {a!r} against {b!r} (relative {abs(a - b) / max(abs(a), abs(b)):.1e})")
    return out


def test_the_comparison_sees_a_difference_in_the_printed_digits_and_forgives_rounding():
    base = {"fd": 0.9213616822, "lambda": 1.266402219, "zero": 0.0}
    assert differences(base, dict(base)) == []
    assert differences(base, {**base, "lambda": 1.266402219 * (1 + 3e-7)}) == []
    assert differences(base, {**base, "fd": 0.9600807576}) == ["fd: 0.9213616822 against 0.9600807576 "
                                                                "(relative 4.0e-02)"]
    assert differences(base, {"fd": 0.9213616822, "zero": 0.0}) == ["lambda: missing"]


@pytest.fixture(scope="module")
def default_numbers():
    return _run(SETTINGS[0][1], threads=("1", "2"))


def test_numbers_do_not_depend_on_torchs_threads(default_numbers):
    assert len(default_numbers["1"]) >= 20
    assert differences(default_numbers["1"], default_numbers["2"]) == []


@pytest.mark.parametrize("name, extra", SETTINGS[1:], ids=[name for name, _ in SETTINGS[1:]])
def test_numbers_do_not_depend_on_blas_kernel_or_threads(default_numbers, name, extra):
    if "OPENBLAS_CORETYPE" in extra and not _has_avx2():
        pytest.skip("this CPU has no AVX2: OpenBLAS's Haswell kernel would not run")
    if "OPENBLAS_CORETYPE" in extra and os.environ.get("OPENBLAS_CORETYPE"):
        pytest.skip(f"this machine sets OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} for its CPU")
    assert differences(default_numbers["1"], _run(extra)["1"]) == [], name
