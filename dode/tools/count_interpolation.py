"""Can fits at some step counts serve a count they were not fitted for? (issue 26's optional interpolation)

``python -m dode.tools.count_interpolation --out results`` fits the paper's greedy D-ODE (``guard=False``, the
paper's spacing) of each solver at NFE 3, 5 and 10 on gmm-digits, and at NFE 4, 6 and 8 samples three ways: the
base solver, the fit for that count itself, and lambdas interpolated from the two neighbouring fits over the noise
level (``interpolated_lambdas``). Each is scored by pixel FD against the reference solution of the same held-out
seeds. It writes ``count_interpolation.csv`` and ``count_interpolation.md``, with the verdict: an interpolation is
worth offering only if it is no worse than the base in every cell. The rule:

    lambda_i (i >= 1) at the target grid's i-th evaluation level s_i = (1 - w) f_a(log s_i) + w f_b(log s_i),

where f_c interpolates count c's (log noise level of evaluation j, lambda_j), j >= 1, linearly (constant beyond its
ends), a < n < b are the neighbouring fitted counts and w = (n - a) / (b - a); lambda_0 = 0.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.distill import _grid, _student, distill
from ..core.reference import reference_solution
from ..core.sampling import sample
from ..core.scheduler import DODEScheduler
from ..core.solvers import get_solver
from ..evaluation.metrics import frechet_distance
from ..models.registry import load_model
from .provenance import provenance

FITTED = (3, 5, 10)
TARGETS = (4, 6, 8)
SOLVERS = ("ddim", "ipndm", "dpm_solver_pp_2m", "deis", "unipc")
SEED = 2_000_000  # held out: neither the fitting batch (0-99) nor the validation seeds (500000-500099)
SAMPLES = 500


def evaluation_levels(scheduler: DODEScheduler) -> np.ndarray:
    """The noise level of the state each model evaluation of ``scheduler`` sees (nfe,)."""
    return _grid(scheduler, "cpu").states[:-1]


def interpolated_lambdas(fits: dict, levels: np.ndarray, nfe: int) -> list:
    """Lambdas for a run whose evaluations see ``levels`` (nfe,), from ``fits`` ({nfe: (levels, lambdas)} of
    fitted counts), by the rule in the module docstring."""
    counts = sorted(fits)
    if nfe in fits:
        return list(fits[nfe][1])
    below = [c for c in counts if c < nfe]
    above = [c for c in counts if c > nfe]
    a, b = (below[-1] if below else above[0]), (above[0] if above else below[-1])
    w = 0.0 if a == b else (nfe - a) / (b - a)
    x = np.log(levels[1:])

    def curve(count):
        fitted_levels, lambdas = fits[count]
        order = np.argsort(np.log(fitted_levels[1:]))
        return np.interp(x, np.log(fitted_levels[1:])[order], np.asarray(lambdas[1:], dtype=float)[order])

    return [0.0, *((1 - w) * curve(a) + w * curve(b)).tolist()]


def study(model, solvers=SOLVERS, progress: bool = True) -> pd.DataFrame:
    reference = reference_solution(model, SEED, SAMPLES, progress=progress).samples
    rows = []
    for name in tqdm(solvers, desc="count interpolation", disable=not progress):
        solver = get_solver(name)
        fits = {}
        for n in FITTED:
            fitted = distill(model, name, n, guard=False, progress=False)
            fits[n] = (evaluation_levels(fitted), fitted.lambdas)
        for n in TARGETS:
            base = _student(model, solver, n, solver.default_spacing)
            own = distill(model, name, n, guard=False, progress=False)
            lambdas = interpolated_lambdas(fits, evaluation_levels(base), n)
            guess = DODEScheduler(base.base_scheduler, lambdas, base.num_inference_steps, spacing=base.spacing)
            scores = {what: frechet_distance(sample(model, s, n, SAMPLES, seed=SEED, progress=False), reference)
                      for what, s in (("base", base), ("fitted", own), ("interpolated", guess))}
            rows.append({"solver": name, "nfe": n, "spacing": solver.default_spacing, **scores,
                         "interpolated_lambdas": " ".join(f"{v:.3g}" for v in lambdas),
                         "fitted_lambdas": " ".join(f"{v:.3g}" for v in own.lambdas)})
    frame = pd.DataFrame(rows)
    frame["interpolated_no_worse_than_base"] = frame.interpolated <= frame.base
    return frame


def report(frame: pd.DataFrame, seconds: float) -> str:
    worse = frame[~frame.interpolated_no_worse_than_base]
    verdict = ("no worse than the base in every cell" if worse.empty else
               f"worse than the base in {len(worse)} of {len(frame)} cells ("
               + ", ".join(f"{r.solver} NFE {r.nfe}: {r.interpolated:.3g} against {r.base:.3g}"
                           for r in worse.itertuples()) + ")")
    table = frame[["solver", "nfe", "spacing", "base", "fitted", "interpolated"]].to_markdown(index=False, floatfmt=".4g")
    return (f"# Lambdas for step counts without a fit: interpolation over the noise level\n\n"
            f"Written by `python -m dode.tools.count_interpolation --out results` in {seconds:.0f} s; do not edit by "
            f"hand. gmm-digits, greedy fits (`guard=False`, the paper's spacing, batch 100, C = 10) at NFE "
            f"{', '.join(map(str, FITTED))}; at NFE {', '.join(map(str, TARGETS))} the base, that count's own fit, "
            f"and the lambdas interpolated from the neighbouring fits (`dode/tools/count_interpolation.py`), each "
            f"scored by pixel FD against the reference solution of {SAMPLES} held-out seeds from {SEED}.\n\n"
            f"**Verdict: the interpolation is {verdict}.** "
            + ("So `DODEScheduler` offers none: a count without a fit raises.\n\n" if not worse.empty else
               "It could be offered as an option.\n\n")
            + table + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    frame = study(load_model("gmm-digits", device="cpu"))
    seconds = time.perf_counter() - began
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "count_interpolation.csv", index=False)
    (out / "count_interpolation.md").write_text(report(frame, seconds))
    parameters = {"model": "gmm-digits", "fitted": FITTED, "targets": TARGETS, "solvers": SOLVERS, "seed": SEED,
                  "samples": SAMPLES, "torch_threads": 1}
    (out / "count_interpolation.json").write_text(json.dumps(provenance(parameters, seconds), indent=2) + "\n")
    print(f"wrote {out / 'count_interpolation.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
