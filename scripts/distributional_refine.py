"""Would a distributional term in the refinement's objective keep unet-digits' learned rows below greedy auto?

An experiment, not the package's method. ``dode.core.refine``'s grid objective is the squared distance of the final
samples to each seed's ODE solution; ``--weights`` adds, with weight w, a moment-matching term in the FD-digits
features (the classifier's penultimate layer): the squared distance between the feature means and between the
feature covariances of the student's final samples and of the solutions, over the fitting batch. Both terms are
divided by their value at the first evaluation of the cell, so w = 1 weighs them alike there; w = 0 is the package's
objective. Each cell is ``dode.distill(unet-digits, solver, nfe, refine="joint+timesteps")`` as notebook 02's
``make reproduce`` run fits it (the C = 10 teacher on 100 seeds, one start, at most 30 iterations, validation in the
digits features), scored with greedy D-ODE auto (the same fit's) by FD-digits of 1000 held-out seeds (from
3,000,000) against their own ODE solution. Each of ``--jobs`` processes takes every other cell.

    python scripts/distributional_refine.py --weights 0 1 --out build/distributional_refine.csv
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from workers import spread

#: the cells where make learned-rows' D-ODE on a learned grid missed a check (results/learned_rows.md)
CELLS = ("ipndm:4", "deis:4", "unipc:4", "unipc:6", "dpm_solver_pp_2m:8", "unipc:5")
SEED = 3_000_000
SAMPLES = 1000


def _patched_loss(weight: float, classifier, scale: dict):
    """A replacement for ``dode.core.refine._loss``: the package's, plus ``weight`` times the moment term on the
    final objective, each term over its first value (``scale``, reset per cell)."""
    import torch

    from dode.core import refine

    original = refine._loss

    def moments(x):
        f = classifier.features(x.double())
        centred = f - f.mean(0)
        return f.mean(0), centred.T @ centred / (len(f) - 1)

    def loss(states, targets, objective):
        squared = original(states, targets, objective)
        if objective != "final" or weight == 0:
            return squared
        mu, sigma = moments(states[-1])
        mu_t, sigma_t = moments(targets[-1].to(states[-1].device))
        term = torch.sum((mu - mu_t) ** 2) + torch.sum((sigma - sigma_t) ** 2)
        scale.setdefault("squared", float(squared.detach()))
        scale.setdefault("moments", float(term.detach()))
        return squared / scale["squared"] + weight * term / scale["moments"]

    return loss


def run(cells: list, weights: list) -> pd.DataFrame:
    import torch

    import dode
    from dode.core import refine
    from dode.core.distill import distillation, refined_scheduler
    from dode.core.reference import reference_solution
    from dode.core.sampling import sample
    from dode.evaluation.features import DigitsClassifier
    from dode.evaluation.metrics import feature_statistics, frechet_distance

    torch.set_num_threads(1)
    model = dode.load_model("unet-digits")
    classifier = DigitsClassifier.from_pretrained().double()
    for p in classifier.parameters():
        p.requires_grad_(False)
    solution = reference_solution(model, SEED, SAMPLES, device="cpu", progress=False).samples
    statistics = feature_statistics(solution, "digits", device="cpu")

    def held_out(scheduler):
        x = sample(model, scheduler, scheduler.nfe, SAMPLES, seed=SEED, device="cpu", progress=False)
        return frechet_distance(x, statistics, features="digits", device="cpu")

    rows, original = [], refine._loss
    for cell in cells:
        solver, nfe = cell.split(":")
        for weight in weights:
            scale: dict = {}
            refine._loss = _patched_loss(weight, classifier, scale)
            try:
                found = distillation(model, solver, int(nfe), spacing="auto", batch_size=100, teacher=10,
                                     features="digits", progress=False)
                auto = found.scheduler
                learned = refined_scheduler(model, found, "joint+timesteps", iterations=30, starts=1,
                                            progress=False)
            finally:
                refine._loss = original
            record = learned.fit_info["refine"]
            rows.append({"cell": cell, "weight": weight, "auto": held_out(auto), "learned": held_out(learned),
                         "kept": record.get("kept"), "validation": record.get("validation"),
                         "validation_auto": found.score})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        k, jobs = args.worker
        run(args.cells[k::jobs], args.weights).to_csv(sys.stdout, index=False)
        return 0
    base = [sys.executable, __file__, "--cells", *args.cells, "--weights", *map(str, args.weights)]
    table = spread(base, args.jobs)
    table["below_auto"] = table["learned"] < table["auto"]
    print(table.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
