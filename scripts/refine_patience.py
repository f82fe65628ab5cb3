"""Early stopping of a refinement on the validation seeds (``refine_fit(..., patience=...)``): what each patience
costs and gets on gmm-digits, for the default call's ``"joint+timesteps"`` refinement (from ``spacing="auto"``, the
fine teacher, three starts, float32).

For each cell one distillation is made, then refined once per patience ("none": the checks choose the iterate but
never stop the run). The table gives the validation score the guard saw, the held-out pixel FD (2000 seeds from
1000 against 10,000 samples of the data distribution, as notebook 02 scores), the model evaluations (times samples)
of the refinement with its special cases, and its seconds.

    python scripts/refine_patience.py --cells unipc:10 deis:8 ddim:4 dpm_solver_pp_2m:10 --patience none 5 2
"""
from __future__ import annotations

import argparse
import time

import pandas as pd


def measure(cells: list, patiences: list) -> pd.DataFrame:
    import torch

    import dode
    from dode.core.distill import distillation, refine_fit
    from dode.experiments.evaluate import evaluate_scheduler, evaluation_data

    torch.set_num_threads(1)
    model = dode.load_model("gmm-digits")
    data = evaluation_data(model, 2000, reference_samples=10_000, progress=False)
    rows = []
    for cell in cells:
        solver, nfe = cell.split(":")
        found = distillation(model, solver, int(nfe), spacing="auto", teacher="fine", progress=False)
        for patience in patiences:
            began = time.perf_counter()
            with found.sharing():
                refined = refine_fit(model, found, found.teacher, "joint+timesteps", judge=found.judge,
                                     targets=found.kept.fit.targets, starts=3, patience=patience, progress=False)
            seconds = time.perf_counter() - began
            record = refined.record
            evaluations = record["sample_evaluations"] + sum(record[k]["sample_evaluations"]
                                                             for k in ("grid_alone", "joint") if k in record)
            rows.append({"solver": solver, "nfe": int(nfe), "patience": "none" if patience is None else patience,
                         "validation": refined.score,
                         "fd_pixel": evaluate_scheduler(model, refined.scheduler, int(nfe), data)["fd_pixel"],
                         "sample_evaluations": evaluations, "seconds": seconds})
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["unipc:10", "deis:8", "ddim:4", "dpm_solver_pp_2m:10"])
    parser.add_argument("--patience", nargs="+", default=["none", "5", "2"])
    parser.add_argument("--out", default=None, help="also write the table here (CSV)")
    args = parser.parse_args(argv)
    patiences = [None if p == "none" else int(p) for p in args.patience]
    table = measure(args.cells, patiences)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
