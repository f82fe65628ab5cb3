"""Would more validation seeds make the guard keep unet-digits' learned rows only where the table's metric agrees?

The guard keeps D-ODE on a learned grid where it validates better than greedy D-ODE auto and the grid alone: by the
Frechet distance, in the model's metric's features, of 100 validation seeds' final samples against those seeds' ODE
solution. The table scores 500 other seeds against 5000 reference samples. This samples the three rows of every cell
that ``make learned-rows`` fitted (``--schedulers``: the folders its shards wrote, default its work folder) on
``max(--sizes)`` validation seeds, scores the first n of them for each n in ``--sizes`` (digits and pixel features),
and by the mean squared distance to each seed's own solution (pixels; the digits classifier's
features: ``<features>_mse<n>``), and then plays the guard's last choice with each criterion: of greedy D-ODE auto, the grid alone and D-ODE on a learned
grid, the one that validates best. It counts, by the table's metric (``--rows``), in how many cells that choice is
below greedy auto, equal to it (auto chosen), at or below the grid alone and below the best base. Each of ``--jobs``
processes takes every other cell, one torch thread each.

    python scripts/validation_seeds.py --out build/validation_seeds.csv
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import pandas as pd

from workers import spread

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("dode-auto", "learned-grid", "dode-learned")


def score(model_name: str, folders: list, cells: list, sizes: list) -> pd.DataFrame:
    """In this process: every row of ``cells`` sampled on the first max(sizes) validation seeds and scored."""
    import torch

    import dode
    from dode.core.distill import VALIDATION_SEED
    from dode.core.reference import reference_solution
    from dode.core.sampling import sample
    from dode.evaluation.features import DigitsFeatures
    from dode.evaluation.metrics import feature_statistics, frechet_distance

    torch.set_num_threads(1)
    model = dode.load_model(model_name)
    largest = max(sizes)
    solution = reference_solution(model, VALIDATION_SEED, largest, device="cpu", progress=False).samples
    features = ("digits", "pixel")
    statistics = {(n, f): feature_statistics(solution[:n], f, device="cpu") for n in sizes for f in features}
    embed = DigitsFeatures().double()  # FD-digits' own feature map
    rows = []
    for solver, nfe in cells:
        for variant in ROWS:
            found = [Path(f) / f"{solver}-nfe{nfe}-{variant}" for f in folders]
            found = [p for p in found if p.is_dir()]
            if not found:
                continue
            scheduler = dode.DODEScheduler.from_pretrained(found[0])
            x = sample(model, scheduler, scheduler.nfe, largest, seed=VALIDATION_SEED, device="cpu", progress=False)
            row = {"solver": solver, "nfe": nfe, "variant": variant}
            row.update({f"{f}{n}": frechet_distance(x[:n], statistics[(n, f)], features=f, device="cpu")
                        for n in sizes for f in features})
            # per seed: the mean squared distance to the seed's own solution, in pixels and in the digits features
            distance = {"pixel": ((x - solution) ** 2).flatten(1).mean(1),
                        "digits": ((embed(x.double()) - embed(solution.double())) ** 2).mean(1)}
            row.update({f"{f}_mse{n}": float(distance[f][:n].mean()) for n in sizes for f in features})
            rows.append(row)
    return pd.DataFrame(rows)


def guard_by(scores: pd.DataFrame, table: pd.DataFrame, criterion: str) -> dict:
    """The guard's last choice by ``criterion`` in every cell, counted against the table's metric (``table``: one
    column per variant, rows per solver and NFE)."""
    wide = scores.pivot_table(index=["solver", "nfe"], columns="variant", values=criterion)
    pick = wide[list(ROWS)].apply(lambda row: row.dropna().idxmin(), axis=1)
    test = table.reindex(pick.index)
    value = pd.Series([test.at[i, p] for i, p in pick.items()], index=pick.index)
    return {"criterion": criterion, "cells": len(value), "below_auto": int((value < test["dode-auto"]).sum()),
            "auto_chosen": int((pick == "dode-auto").sum()),
            "at_or_below_grid": int(((value <= test["learned-grid"]) | test["learned-grid"].isna()).sum()),
            "below_best": int((value < test["best-base"]).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-digits")
    parser.add_argument("--rows", type=Path, default=ROOT / "results" / "learned_rows" / "unet-digits.csv")
    parser.add_argument("--schedulers", nargs="+",
                        default=[str(ROOT / "build" / "learned_rows" / "unet-digits" / "shard-*" / "out" /
                                     "unet-digits" / "schedulers")])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 500, 1000])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = pd.read_csv(args.rows)
    cells = sorted({(s, int(n)) for s, n in rows.loc[rows.variant == "dode-learned", ["solver", "nfe"]].values})
    folders = sorted(f for pattern in args.schedulers for f in glob.glob(pattern))
    if not folders:
        raise SystemExit(f"no scheduler folders at {args.schedulers}: run make learned-rows first")
    if args.worker is not None:  # one share of the cells, as CSV on stdout
        k, jobs = args.worker
        score(args.model, folders, cells[k::jobs], args.sizes).to_csv(sys.stdout, index=False)
        return 0
    base = [sys.executable, __file__, "--model", args.model, "--rows", str(args.rows), "--sizes",
            *map(str, args.sizes), "--schedulers", *args.schedulers]
    scores = spread(base, args.jobs)
    from dode.models.registry import get_model

    metric = get_model(args.model).metric  # the table's
    table = rows.pivot_table(index=["solver", "nfe"], columns="variant", values=metric)
    criteria = [f"{f}{kind}{n}" for kind in ("", "_mse") for f in ("digits", "pixel") for n in args.sizes]
    summary = pd.DataFrame([guard_by(scores, table, c) for c in criteria])
    print(summary.to_markdown(index=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(args.out, index=False)
        summary.to_csv(args.out.with_name(args.out.stem + "-summary.csv"), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
