"""The ablations of ``notebooks/05_ablations``: one function per part, each returning the table the notebook writes.

Every part fits the paper's greedy D-ODE (on each solver's paper spacing, unguarded: ``guard=False``) under one
change and scores it on the held-out evaluation seeds of ``data`` (``dode.experiments.evaluate.evaluation_data``):

1. ``teacher_scale``: the teacher (C DDIM steps per student step, or ``"fine"``);
2. ``distillation_batch_size``: the distillation batch size, over several fitting batches;
3. ``index_matching``: targets at the student's noise levels against targets matched by index;
4. ``generalisation``: the distance to the teacher on the fitting batch against held-out seeds;
5. ``refinement``: the greedy fit against each refinement mode (``dode.experiments.variants.REFINEMENTS``), unguarded;
6. ``seed_spread`` (and ``seed_summary``): a learned grid refitted on each fitting batch.

Everything is seeded: the same arguments give the same numbers (timings aside).
"""
from __future__ import annotations

import pandas as pd

from .checks import possible
from .evaluate import EvaluationData, evaluate_scheduler, fitting_rmse, teacher_distances
from ..core.distill import VALIDATION_SEED, distill, distillation, refine_fit
from ..core.guard import Judge
from ..core.solvers import get_solver
from ..core.teacher import Teacher
from ..core.refine import REFINEMENTS

#: part 2's fitting batches: repeat r starts at seed ``FIT_SEED_STEP * r``
FIT_SEED_STEP = 10_000
#: part 5's refinement modes, in registry order; those that learn a grid only for solvers that take one
#: (``Solver.takes_grid``)
REFINE_MODES = tuple(REFINEMENTS)


def _score(model, scheduler, nfe: int, data: EvaluationData, seed: int, device, **labels) -> dict:
    """``labels``, then ``evaluate_scheduler``'s row on the held-out seeds, then the lambdas (3 decimals)."""
    return {**labels, **evaluate_scheduler(model, scheduler, nfe, data, seed=seed, device=device),
            "lambdas": [round(v, 3) for v in scheduler.lambdas]}


def teacher_scale(model, data: EvaluationData, solver: str, nfe: int, teacher_scales, *, seed: int = 1000,
                  device="auto") -> pd.DataFrame:
    """Part 1: one greedy fit per teacher in ``teacher_scales`` (an integer C or ``"fine"``; the default fitting
    batch, 100 seeds from 0), scored on held-out seeds; the ``teacher`` column holds ``str(C)``."""
    return pd.DataFrame([
        _score(model, distill(model, solver, nfe, teacher=c, guard=False, device=device), nfe, data, seed, device,
               teacher=str(c))
        for c in teacher_scales])


def distillation_batch_size(model, data: EvaluationData, solver: str, nfe: int, batch_sizes, fit_repeats: int, *,
               seed: int = 1000, device="auto") -> pd.DataFrame:
    """Part 2: a greedy fit per batch size and fitting batch (``fit_repeats`` of them per size, from seeds
    0, 10000, 20000, ...: ``fit_seed``), scored on held-out seeds."""
    return pd.DataFrame([
        _score(model, distill(model, solver, nfe, batch_size=b, seed=FIT_SEED_STEP * r, guard=False, device=device),
               nfe, data, seed, device, batch_size=b, fit_seed=FIT_SEED_STEP * r)
        for b in batch_sizes for r in range(fit_repeats)])


def index_matching(model, data: EvaluationData, solvers, nfe: int, *, seed: int = 1000,
                   device="auto") -> pd.DataFrame:
    """Part 3: per solver (those that can make ``nfe``), greedy fits against a C = 10 DDIM teacher whose targets
    are matched by noise level (``"time-matched"``) and by index (``"index-matched"``, as the paper's public code
    does), then every solver's base (``"none (base)"``, no lambdas)."""
    solvers = [s for s in solvers if possible(s, nfe)]
    return pd.DataFrame([
        _score(model, distill(model, s, nfe, teacher=Teacher(model, substeps=10, match=match, device=device), guard=False),
               nfe, data, seed, device, solver=s, targets=f"{match}-matched")
        for s in solvers for match in ("time", "index")
    ] + [{"solver": s, "targets": "none (base)", **evaluate_scheduler(model, s, nfe, data, seed=seed, device=device)}
         for s in solvers])


def generalisation(model, solver: str, nfe: int, *, seed: int = 1000, device="auto") -> pd.DataFrame:
    """Part 4: the per-step RMSE to a C = 10 teacher (``teacher_distances``) of the base and of the greedy fit on
    the fitting batch (100 seeds from 0), on that batch and on 100 held-out seeds from ``seed``."""
    fitting = Teacher(model, batch_size=100, seed=0, substeps=10, device=device)
    heldout = Teacher(model, batch_size=100, seed=seed, substeps=10, device=device)
    fit = distill(model, solver, nfe, teacher=fitting, guard=False)
    return pd.concat([
        teacher_distances(model, scheduler, nfe, t, device=device).assign(seeds=seeds, variant=variant)
        for seeds, t in (("fitting batch (0-99)", fitting), (f"held out ({seed}-{seed + 99})", heldout))
        for variant, scheduler in (("base", solver), ("dode", fit))
    ])


def refinement(model, data: EvaluationData, solvers, nfe: int, *, refine_teacher=10, seed: int = 1000,
               device="auto") -> tuple[pd.DataFrame, dict]:
    """Part 5: per solver (those that can make ``nfe``), the greedy fit against a ``refine_teacher`` teacher
    (C or ``"fine"``, on 100 seeds from 0), then each refinement of it (``refine_fit``, unguarded: "joint", and
    for ``GRID_SOLVERS`` "timesteps" and "joint+timesteps"), then the base.

    Returns (table, fits): one row per solver and fit ("greedy", each mode, "none (base)") with the held-out
    scores, the fitting batch's RMSE to the teacher's final samples (``fit_rmse_teacher``) and to its reference
    solution (``fit_rmse_reference``, what a learned grid is fitted to), the refinement's optimiser iterations and
    seconds, the lambdas and the grid; ``fits[solver, label]`` is each fitted scheduler.
    """
    solvers = [s for s in solvers if possible(s, nfe)]
    fit_teacher = Teacher(model, batch_size=100, seed=0, substeps=refine_teacher, device=device)
    rows, fits = [], {}
    for s in solvers:
        greedy = distillation(model, s, nfe, teacher=fit_teacher, guard=False, device=device)
        modes = list(REFINE_MODES) if get_solver(s).takes_grid else ["joint"]
        # unguarded: no validation
        refined = {"greedy": None, **{mode: refine_fit(model, greedy, fit_teacher, mode) for mode in modes}}
        for label, refinement in refined.items():
            fits[s, label] = fitted = greedy.scheduler if refinement is None else refinement.scheduler
            rows.append({"solver": s, "fit": label,
                         **evaluate_scheduler(model, fitted, nfe, data, seed=seed, device=device),
                         "fit_rmse_teacher": fitting_rmse(model, fitted, fit_teacher, device=device),
                         "fit_rmse_reference": fitting_rmse(model, fitted, fit_teacher, device, "reference"),
                         "iterations": 0 if refinement is None else refinement.iterations,
                         "refine_seconds": 0.0 if refinement is None else refinement.seconds,
                         "lambdas": [round(v, 3) for v in fitted.lambdas],
                         "grid": fitted.grid and [round(v, 4) for v in fitted.grid]})
        rows.append({"solver": s, "fit": "none (base)",
                     **evaluate_scheduler(model, s, nfe, data, seed=seed, device=device)})
    return pd.DataFrame(rows), fits


def seed_spread(model, data: EvaluationData, solvers, nfe: int, fit_seeds, *, learned_starts: int = 3,
                learned_iterations: int = 20, seed: int = 1000, device="auto") -> pd.DataFrame:
    """Part 6: per solver (``GRID_SOLVERS`` that can make ``nfe``) and fitting batch (100 seeds from each of
    ``fit_seeds``), D-ODE as ``02_distill_solvers`` fits it: the auto fit (C = 10 teacher, guarded on 100 fine
    validation seeds from ``VALIDATION_SEED``), then lambdas and grid learned together (``"joint+timesteps"``
    against the fine teacher of the batch, from ``learned_starts`` starting spacings, at most
    ``learned_iterations`` Rprop iterations, kept only where it validates better by the guard's margin). One row per
    solver, batch and variant ("dode-auto", "dode-learned") with the held-out scores, ``kept`` and ``fit_seconds``."""
    validation = Teacher(model, batch_size=100, seed=VALIDATION_SEED, substeps="fine", device=device)
    solvers = [s for s in solvers if get_solver(s).takes_grid and possible(s, nfe)]
    rows = []
    for s in solvers:
        for fit_seed in fit_seeds:
            fitting = Teacher(model, batch_size=100, seed=fit_seed, substeps=10, device=device)
            auto = distillation(model, s, nfe, spacing="auto", teacher=fitting, validation=validation, device=device,
                                progress=False)
            fine = Teacher(model, batch_size=100, seed=fit_seed, substeps="fine", device=device)
            learned = refine_fit(model, auto, fine, "joint+timesteps", judge=Judge(model, validation, "fd", device),
                                 starts=learned_starts, max_iterations=learned_iterations, progress=False)
            for variant, scheduler in (("dode-auto", auto.scheduler), ("dode-learned", learned.scheduler)):
                rows.append({"solver": s, "fit_seed": fit_seed, "variant": variant,
                             **evaluate_scheduler(model, scheduler, nfe, data, seed=seed, device=device),
                             "kept": learned.kept if variant == "dode-learned" else None,
                             "fit_seconds": learned.seconds if variant == "dode-learned" else auto.seconds})
    return pd.DataFrame(rows)


def seed_summary(by_seed: pd.DataFrame, metric: str = "fd_pixel") -> pd.DataFrame:
    """Part 6's spread per solver and variant (in ``seed_spread``'s order): the median, min and max of ``metric``
    over the fitting batches, and ``range_over_median`` ((max - min) / median)."""
    spread = by_seed.groupby(["solver", "variant"], sort=False)[metric].agg(["median", "min", "max"])
    spread["range_over_median"] = (spread["max"] - spread["min"]) / spread["median"]
    return spread
