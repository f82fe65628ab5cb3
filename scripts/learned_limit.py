"""How low can D-ODE on a learned grid go at all? An oracle bound for gmm-digits cells: the refinement of
``refine="joint+timesteps"`` (every lambda and every noise level, objective: the final samples' squared distance to
the exact ODE solution) fitted to the **evaluation seeds themselves** (seeds 1000-2999 against their exact solutions,
the same samples notebook 02 scores) and run to convergence, then scored as notebook 02 scores its table (pixel FD
of those 2000 samples against 10,000 samples of the data distribution; floor 0.090, the exact solutions' own FD).

In the basin a start leads to, no fit on other seeds gets nearer these seeds' solutions by this objective:
where the bound misses issue 25's limit, more iterations or a larger fitting batch cannot meet it from that start,
only other starts (``--transplant``), another objective or another family. Where it meets the limit, the gap is the
fit's.

Starts: the table's D-ODE on a learned grid and its learned grid alone (``--schedulers``, default the committed
``results/gmm-digits/schedulers`` made by ``make reproduce``); with ``--transplant`` also every other solver's
learned grid of the same length at the same NFE, every lambda 0 (a start named ``grid:<solver>``). Each cell in one
of ``--jobs`` processes, one torch thread each.

    python scripts/learned_limit.py --out build/learned_limit.csv                      # issue 25's missed cells
    python scripts/learned_limit.py --cells ipndm:4 unipc:4 heun:5 --transplant --out build/learned_limit_more.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
#: the cells of results/gmm-digits that missed issue 25's limits at 19a24ac
MISSED = ("dpm_solver_2:4", "ipndm:4", "unipc:4", "unipc:5", "heun:5")
STARTS = ("dode-learned", "learned-grid")
SCHEDULERS = ROOT / "results" / "gmm-digits" / "schedulers"


def starts(solver: str, nfe: int, transplant: bool, folder: Path = SCHEDULERS) -> list:
    """(name, scheduler) of each start of a cell, from the saved schedulers in ``folder``."""
    import copy

    import dode

    found = [(start, dode.DODEScheduler.from_pretrained(folder / f"{solver}-nfe{nfe}-{start}")) for start in STARTS]
    if transplant:
        own = found[1][1]
        for other in sorted(folder.glob(f"*-nfe{nfe}-dode-learned")):
            name = other.name.split("-nfe")[0]
            grid = dode.DODEScheduler.from_pretrained(other).grid
            if name != solver and grid is not None and len(grid) == len(own.grid):
                found.append((f"grid:{name}", dode.DODEScheduler(copy.deepcopy(own.base_scheduler),
                                                                  [0.0] * len(own.lambdas), nfe, grid=list(grid),
                                                                  spacing=own.spacing)))
    return found


def fit(cells: list, iterations: int, batch_size: int, transplant: bool = False, folder: str = str(SCHEDULERS)) -> list:
    """In this process: each cell's oracle refinement from each start, and its scores on the evaluation seeds."""
    import torch

    import dode
    from dode.core.refine import optimise
    from dode.core.sampling import seeded_noise
    from dode.experiments.evaluate import evaluate_scheduler, evaluation_data

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from default_refine import limit

    torch.set_num_threads(1)
    model = dode.load_model("gmm-digits")
    data = evaluation_data(model, 2000, seed=1000, reference_samples=10_000, progress=False)
    noise = seeded_noise(model.sample_shape, 2000, 1000)
    targets = data.exact.to(noise.dtype).unsqueeze(0)
    rows = []
    for cell in cells:
        solver, nfe = cell.split(":")
        nfe = int(nfe)
        for start, scheduler in starts(solver, nfe, transplant, Path(folder)):
            before = evaluate_scheduler(model, scheduler, nfe, data)
            found = optimise(model, scheduler, noise, targets, timesteps=True, lambdas=True, objective="final",
                             max_iterations=iterations, tolerance=1e-9, batch_size=batch_size, progress=False)
            after = evaluate_scheduler(model, found.scheduler, nfe, data)
            rows.append({"solver": solver, "nfe": nfe, "start": start, "limit": limit(solver, nfe),
                         "fd_pixel_start": before["fd_pixel"], "fd_pixel_bound": after["fd_pixel"],
                         "rmse_start": before["rmse_exact"], "rmse_bound": after["rmse_exact"],
                         "iterations": found.iterations, "evaluations": found.evaluations,
                         "seconds": found.seconds, "message": found.message,
                         "lambdas": [round(float(v), 4) for v in found.scheduler.lambdas],
                         "grid": [round(float(v), 4) for v in (found.scheduler.grid or [])]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(MISSED), help="solver:nfe (default: the missed cells)")
    parser.add_argument("--iterations", type=int, default=300, help="L-BFGS iterations at most")
    parser.add_argument("--batch-size", type=int, default=500, help="micro-batch (the gradient is the same)")
    parser.add_argument("--transplant", action="store_true", help="also start from the other solvers' grids")
    parser.add_argument("--schedulers", type=Path, default=SCHEDULERS,
                        help="saved schedulers to start from (default: the committed results/gmm-digits/schedulers)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "learned_limit.csv")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from default_refine import in_processes

    call = (f"__import__('learned_limit').fit(cells, {args.iterations}, {args.batch_size}, {args.transplant}, "
            f"{str(args.schedulers.resolve())!r})")
    table = in_processes(call, args.cells, args.jobs)
    table = table.sort_values(["solver", "nfe", "start"], ignore_index=True)
    table["bound_meets_limit"] = table.fd_pixel_bound <= table.limit
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.drop(columns=["lambdas", "grid", "message"]).to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
