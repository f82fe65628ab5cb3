"""What a newcomer stumbles on first: notebook parameters, devices this machine lacks, threads, nfe=1, the README's
quickstart."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dode
from dode.experiments import checks, parameters
from dode.experiments.checks import check_parameters
from dode.models.registry import use_threads

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")


@pytest.mark.parametrize("bad, words", [
    (dict(nfes="[3, 5]"), "-y 'nfes: \\[3, 5\\]'"),
    (dict(nfes=[3, 0]), "positive integers"),
    (dict(nfes=[]), "positive integers"),
    (dict(solvers=["deis", "rk4"]), "unknown \\['rk4'\\].*valid: ddim, pndm, ipndm"),
    (dict(solvers="dies"), "unknown \\['dies'\\]"),
    (dict(features=["pixels"]), "features: unknown.*pixel, digits, inception"),
    (dict(criteria=["mse"]), "criteria: unknown"),
    (dict(metric="fd_pixels"), "metric: unknown.*fd_pixel"),
    (dict(model_name="gmm"), "unknown model 'gmm'; valid: gmm-digits, unet-digits"),
    (dict(spacing="karas"), "spacing: unknown 'karas'"),
    (dict(teacher=1), "integer C >= 2"),
    (dict(solvers=["heun"], nfes=[4]), "no solver x NFE cell can run: solver 'heun' cannot make exactly 4"),
    (dict(solver="pndm", nfe=2), "no solver x NFE cell can run"),
])
def test_bad_parameters_fail_at_once_with_what_is_valid(bad, words):
    with pytest.raises(ValueError, match=words):
        check_parameters(**bad)


def test_scalars_are_one_element_lists_and_impossible_cells_are_reported(capsys):
    p = check_parameters(solvers="deis", nfes=4, features="pixel", criteria=[], metric="fd_pixel")
    assert (p.solvers, p.nfes, p.features, p.criteria, p.skipped) == (["deis"], [4], ["pixel"], [], [])
    p = check_parameters(solvers="all", nfes=[3, 4])
    assert p.solvers == list(dode.SOLVERS)
    assert {(c["solver"], c["nfe"]) for c in p.skipped} == {("heun", 4)}  # Heun makes odd NFE only
    assert "possible NFE: 1, 3, 5" in p.skipped[0]["reason"]
    assert "skipped heun at NFE 4: solver 'heun' cannot make exactly 4" in capsys.readouterr().out
    assert check_parameters(teacher_scales=[2, "fine"], learned_nfes=[]).teacher_scales == [2, "fine"]
    with pytest.raises(TypeError, match="does not know \\['nfe_list'\\]"):
        check_parameters(nfe_list=[3])


@NO_CUDA
def test_a_device_this_machine_lacks_is_a_clear_error(gmm):
    words = "device 'cuda' asked for, but this torch build sees no CUDA GPU"
    for call in (lambda: dode.load_model("gmm-digits", device="cuda"), lambda: dode.distill(gmm, "ddim", 4, device="cuda"),
                 lambda: dode.sample(gmm, "ddim", 4, 2, device="cuda", progress=False),
                 lambda: check_parameters(device="cuda")):
        with pytest.raises(ValueError, match=words):
            call()
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        dode.models.registry.resolve_device("gpu")
    assert dode.models.registry.resolve_device("auto") == torch.device("cpu")


def test_distill_refuses_a_single_evaluation(gmm):
    with pytest.raises(ValueError, match="needs at least 2 model evaluations; got nfe=1"):
        dode.distill(gmm, "ddim", 1)


@pytest.fixture
def restore_threads(monkeypatch):
    threads = torch.get_num_threads()
    for name in ("DODE_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    torch.set_num_threads(threads)


def test_one_thread_unless_asked_otherwise(restore_threads):
    if os.cpu_count() < 2:
        pytest.skip("needs two cores to tell one thread from two")
    torch.set_num_threads(2)
    dode.load_model("gmm-digits", device="cpu")  # the embedded models default to one thread
    assert torch.get_num_threads() == 1
    assert use_threads(2) == 2 and torch.get_num_threads() == 2  # asked for
    restore_threads.setenv("DODE_NUM_THREADS", "2")
    torch.set_num_threads(1)
    assert use_threads() == 2 and torch.get_num_threads() == 2
    restore_threads.delenv("DODE_NUM_THREADS")
    restore_threads.setenv("OMP_NUM_THREADS", "2")  # the usual way to ask: torch's own choice is left alone
    torch.set_num_threads(2)
    dode.load_model("gmm-digits", device="cpu")
    assert torch.get_num_threads() == 2
    assert check_parameters(num_threads=1).num_threads == 1 and torch.get_num_threads() == 1
    for bad in (0, "two"):
        with pytest.raises(ValueError, match="positive integer"):
            use_threads(bad)


def test_the_readme_quickstart_runs_as_written_and_writes_nothing_where_it_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k not in ("DODE_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code + "\nimport torch; print('threads', torch.get_num_threads())"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
    printed = done.stdout.strip().splitlines()
    assert printed[-1] == "threads 1"
    # what the README says it prints is what it prints (on this kind of machine; the numbers are rounded)
    shown = re.search(r"It prints .*?\n\n```text\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert printed[:-1] == shown


# -- the experiment parameters (dode/experiments/parameters.py; the notebooks' cells: tests/test_notebook_parameters.py)
@pytest.mark.parametrize("notebook, profile", [(n, p) for n, values in parameters.REPRODUCE.items()
                                               for p in (values if n == "02_distill_solvers" else [None])])
def test_make_reproduce_passes_only_parameters_the_notebook_has_and_valid_ones(notebook, profile):
    values = parameters.reproduce(notebook, profile)
    assert set(values) <= set(parameters.DEFAULTS[notebook])
    checkable = {k: v for k, v in values.items() if k in checks._checks()}
    checks.check_parameters(**checkable)  # raises on a wrong one
    profiles = {m.profile for m in dode.models.registry.MODELS.values() if m.profile is not None}
    assert profiles <= set(parameters.REPRODUCE["02_distill_solvers"])
