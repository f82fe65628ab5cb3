"""What a user gets from ``dode.distill(model, solver, nfe, refine="joint+timesteps")`` with every other argument at
its default, scored on held-out seeds as notebook 02 scores its table (gmm-digits: pixel FD of 2000 samples from
seed 1000 against 10,000 samples of the data distribution).

Each cell is fitted in one of ``--jobs`` fresh processes (one torch thread each); the table gives the held-out FD,
the validation score the guard saw, the fit's seconds and, for gmm-digits, the limit of issue 25 (NFE 3: 0.35,
NFE 4: 0.12, NFE 5-10: 0.11, Heun NFE 5: 0.2) and whether the cell meets it.

    python scripts/default_refine.py --out build/default_refine.csv          # every grid solver, NFE 3-10
    python scripts/default_refine.py --cells ddim:3 heun:5 --set teacher=10   # another setting against the defaults
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pandas as pd

NFES = (3, 4, 5, 6, 8, 10)


def limit(solver: str, nfe: int) -> float:
    """Issue 25's held-out pixel FD limit of a gmm-digits cell."""
    if solver == "heun":
        return 0.2 if nfe == 5 else float("nan")
    return {3: 0.35, 4: 0.12}.get(nfe, 0.11)


def all_cells() -> list:
    from dode.core.solvers import GRID_SOLVERS
    from dode.experiments.checks import possible

    return [f"{s}:{n}" for s in GRID_SOLVERS for n in NFES if possible(s, n)]


def fit(model_name: str, cells: list, settings: dict, validation: int | None = None) -> list:
    """In this process: each cell's held-out scores (``evaluate_scheduler``) and its fit's record; ``validation``:
    that many validation seeds from ``VALIDATION_SEED`` instead of distill's default 100."""
    import time

    import torch

    import dode
    from dode.core.distill import VALIDATION_SEED
    from dode.experiments.evaluate import evaluate_scheduler, evaluation_data

    torch.set_num_threads(1)
    model = dode.load_model(model_name)
    data = evaluation_data(model, 2000, reference_samples=10_000, progress=False)
    if validation is not None:
        settings = {**settings, "validation": dode.Teacher(model, batch_size=validation, seed=VALIDATION_SEED,
                                                           substeps="fine")}
    rows = []
    for cell in cells:
        solver, nfe = cell.split(":")
        began = time.perf_counter()
        fitted = dode.distill(model, solver, int(nfe), refine="joint+timesteps", progress=False, **settings)
        seconds = time.perf_counter() - began
        info = fitted.fit_info
        rows.append({"solver": solver, "nfe": int(nfe), **evaluate_scheduler(model, fitted, int(nfe), data),
                     "validation": info["refine"].get("validation"), "kept": info["refine"].get("kept"),
                     "teacher": info["teacher"], "fit_seconds": seconds,
                     # with several refine_moments: the weight the guard kept, and each weight's validation
                     "moment_weight": info["refine"].get("moment_weight"),
                     "moment_validations": json.dumps([round(e["validation"], 5) for e in
                                                       info["refine"].get("moment_weights", [])])})
    return rows


def in_processes(call: str, cells: list, jobs: int) -> pd.DataFrame:
    """The rows of ``call`` (Python that, with ``cells`` bound to a list of "solver:nfe", evaluates to a list of
    JSON-able rows; this folder importable) run on ``cells`` split over ``jobs`` fresh one-thread processes."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"cells = sys.argv[1].split(','); print(json.dumps({call}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    parts = [cells[i::jobs] for i in range(jobs) if cells[i::jobs]]
    procs = [subprocess.Popen([sys.executable, "-c", code, ",".join(p)], env=env, stdout=subprocess.PIPE, text=True)
             for p in parts]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a fit failed (exit codes {[p.returncode for p in procs]})")
    return pd.DataFrame([row for out in outputs for row in json.loads(out.strip().splitlines()[-1])])


def run(model_name: str, cells: list, settings: dict, jobs: int, validation: int | None = None) -> pd.DataFrame:
    table = in_processes(f"__import__('default_refine').fit({model_name!r}, cells, {settings!r}, {validation!r})",
                         cells, jobs)
    table = table.sort_values(["solver", "nfe"], ignore_index=True)
    if model_name == "gmm-digits":
        table["limit"] = [limit(s, n) for s, n in zip(table.solver, table.nfe)]
        table["met"] = table.fd_pixel <= table.limit
    return table


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gmm-digits")
    parser.add_argument("--cells", nargs="+", default=None, help="solver:nfe ... (default: every grid solver, NFE 3-10)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="distill arguments other than the defaults (JSON values)")
    parser.add_argument("--validation", type=int, default=None, help="validation seeds (default: distill's 100)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table here (CSV)")
    args = parser.parse_args(argv)
    settings = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    table = run(args.model, args.cells or all_cells(), settings, args.jobs, args.validation)
    columns = [c for c in ("solver", "nfe", "fd_pixel", "limit", "met", "validation", "kept", "teacher",
                           "fit_seconds", "moment_weight", "moment_validations") if c in table]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "met" in table:
        judged = table[table.limit.notna()]
        print(f"met: {int(judged.met.sum())} of {len(judged)} cells")
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
