"""Experiments: the paper's grid (solver x NFE x base | D-ODE) evaluated on one model, plus provenance."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .distill import distill
from .metrics import frechet_distance, rmse
from .sampling import sample
from .solvers import SOLVERS, get_solver

PAPER_NFES = (3, 4, 5, 6, 8, 10)


def possible(solver: str, nfe: int) -> bool:
    try:
        get_solver(solver).steps_for(nfe)
    except ValueError:
        return False
    return True


def evaluate_grid(model, reference, exact, *, solvers=SOLVERS, nfes=PAPER_NFES, seed: int = 1000,
                  fit_batch_size: int = 100, fit_seed: int = 0, teacher=10, batch_size: int | None = None,
                  save_dir=None, device="auto", progress: bool = True) -> pd.DataFrame:
    """One row per (solver, NFE, variant): Frechet distance to ``reference`` and RMSE to ``exact``.

    ``exact`` holds the reference ODE solutions of the evaluation seeds seed, seed + 1, ... (its length is the
    number of samples). NFEs a solver cannot make are skipped. Each fitted DODEScheduler is saved under
    ``save_dir/<solver>-nfe<k>`` when ``save_dir`` is given.
    """
    num_samples = len(exact)
    jobs = [(s, n) for s in solvers for n in nfes if possible(s, n)]
    rows = []
    for solver, nfe in tqdm(jobs, desc=f"{getattr(model, 'name', 'model')}: solver x NFE", disable=not progress):
        began = time.perf_counter()
        fitted = distill(model, solver, nfe, batch_size=fit_batch_size, seed=fit_seed, teacher=teacher, device=device)
        fit_seconds = time.perf_counter() - began
        if save_dir is not None:
            fitted.save_pretrained(Path(save_dir) / f"{solver}-nfe{nfe}")
        for variant, scheduler in (("base", solver), ("dode", fitted)):
            began = time.perf_counter()
            x = sample(model, scheduler, nfe, num_samples, seed=seed, batch_size=batch_size, device=device,
                       progress=False)
            rows.append({
                "solver": solver, "variant": variant, "nfe": nfe,
                "fd": frechet_distance(x, reference), "rmse_exact": rmse(x, exact),
                "lambdas": json.dumps([round(v, 6) for v in fitted.lambdas]) if variant == "dode" else "",
                "fit_seconds": fit_seconds if variant == "dode" else 0.0,
                "sample_seconds": time.perf_counter() - began,
            })
    return pd.DataFrame(rows)


def gap_summary(results: pd.DataFrame, floor: float, metric: str = "fd") -> pd.DataFrame:
    """Per solver and NFE: base, D-ODE, their ratio, and the fraction of the base-to-floor gap D-ODE closes."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric).reset_index()
    wide["ratio"] = wide["dode"] / wide["base"]
    wide["gap_closed"] = (wide["base"] - wide["dode"]) / (wide["base"] - floor)
    order = {s: i for i, s in enumerate(SOLVERS)}
    return wide.sort_values(["solver", "nfe"], key=lambda c: c.map(order) if c.name == "solver" else c)


def provenance(parameters: dict, seconds: float) -> dict:
    """Where a result came from: parameters, package versions, git commit, machine, wall time."""
    packages = {}
    for name in ("dode", "torch", "diffusers", "torchmetrics", "numpy", "scipy", "scikit-learn", "pandas"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "parameters": parameters,
        "packages": packages,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "wall_seconds": round(seconds, 1),
    }
