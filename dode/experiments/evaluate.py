"""Experiments: the paper's grid (solver x NFE x base | D-ODE) evaluated on one model. The notebooks' parameter
checks are in ``checks``, the summaries of a results table in ``summary``, provenance in ``dode.tools.provenance``."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.distill import STARTS, distill, distillation, final_targets, refine_fit
from ..core.guard import Judge, best_factor
from ..evaluation.metrics import feature_statistics, frechet_distance, rmse
from ..core.ode import solve_ode
from .parameters import PAPER_NFES
from ..core.sampling import prepare_scheduler, sample
from ..core.scheduler import DODEScheduler, make_scheduler
from ..core.solvers import SOLVERS, get_solver
from ..core.teacher import Teacher
from ..core.refine import REFINEMENTS
from .checks import possible
from .variants import REFINED_VARIANTS, VARIANTS


class EvaluationData(NamedTuple):
    """What samples are judged against: a reference distribution, and the reference solution of each seed."""

    reference: torch.Tensor  # samples of the target distribution, for Frechet distances
    exact: torch.Tensor  # the ODE solution of evaluation seeds seed, seed + 1, ... (same order as samples)
    floor: dict  # Frechet distance of ``exact`` to ``reference`` per feature space: the best any solver can do
    description: str
    statistics: dict = {}  # (mu, sigma) of ``reference`` per feature space, computed once


def evaluation_data(model, num_samples: int, *, seed: int = 1000, reference_samples: int = 10_000,
                    features=("pixel",), fine_nfe: int = 1000, device="auto", progress: bool = True) -> EvaluationData:
    """Reference data for a model.

    A model with an exact sampler (``sample_data``, as gmm-digits) is judged against its own data distribution,
    and each seed against the exact ODE solution (``dode.solve_ode``). Any other model is judged against its
    fine-solver samples (DDIM with ``fine_nfe`` steps) of the same seeds, for both.
    """
    if hasattr(model, "sample_data"):
        reference = model.sample_data(reference_samples, seed=10**6)
        exact = solve_ode(model, num_samples, seed=seed, device=device, progress=progress)
        description = (f"{reference_samples} samples of the data distribution; exact ODE (scipy RK45, "
                       "rtol = atol = 1e-7) of the same seeds")
    else:
        exact = sample(model, "ddim", fine_nfe, num_samples, seed=seed, batch_size=500, device=device,
                       progress=progress, spacing="trailing")  # from the top training timestep
        reference = exact
        description = f"{fine_nfe}-step DDIM samples of the same seeds (reference distribution and solution)"
    statistics = {f: feature_statistics(reference, f, device=device) for f in features}
    floor = {f: frechet_distance(exact, statistics[f], features=f) if reference is not exact else 0.0
             for f in features}
    return EvaluationData(reference, exact, floor, description, statistics)


def evaluate_scheduler(model, scheduler, nfe: int, data: EvaluationData, *, seed: int = 1000, features=("pixel",),
                       batch_size: int | None = None, device="auto", samples: list | None = None) -> dict:
    """Frechet distance per feature space and RMSE to the reference solution, for one solver or DODEScheduler (the
    samples appended to ``samples``, where given)."""
    began = time.perf_counter()
    x = sample(model, scheduler, nfe, len(data.exact), seed=seed, batch_size=batch_size, device=device,
               progress=False)
    row = {**frechet_distances(x, data, features), "rmse_exact": rmse(x, data.exact),
           "total_variance": float(x.flatten(1).var(0).sum()), "sample_seconds": time.perf_counter() - began}
    if samples is not None:
        samples.append(x)
    return row


def frechet_distances(x: torch.Tensor, data: EvaluationData, features) -> dict:
    """``{"fd_<f>": ...}``: the Frechet distance of samples ``x`` to the reference distribution, per feature space."""
    return {f"fd_{f}": frechet_distance(x, data.statistics.get(f, data.reference), features=f) for f in features}


def evaluate_grid(model, data: EvaluationData | None = None, *, solvers=SOLVERS, nfes=PAPER_NFES, seed: int = 1000,
                  fit_batch_size: int = 100, fit_seed: int = 0, teacher=10, guard: bool = False, spacing=None,
                  validation: Teacher | None = None, features=("pixel",), batch_size: int | None = None,
                  num_samples: int | None = None, decode=None, reference=None, fid_features: str = "inception",
                  autocast: str | None = None, samples: dict | None = None, keep: int = 16, save_dir=None,
                  device="auto", progress: bool = True) -> pd.DataFrame:
    """One row per (solver, NFE, variant): the base ("base") and its D-ODE fit ("dode"). NFEs a solver cannot make
    are skipped. Each fitted DODEScheduler is saved under ``save_dir/<solver>-nfe<k>`` when ``save_dir`` is given.

    The fit: ``distill`` on ``fit_batch_size`` seeds from ``fit_seed`` against ``teacher`` (C, ``"fine"``: one
    fine run shared by every cell, or a ``Teacher``), with ``spacing`` and the ``guard`` (default off: the paper's
    greedy fit) validated on ``validation``'s seeds. ``fit_seconds`` is its wall time.

    With ``data`` (``evaluation_data``), each row holds ``evaluate_scheduler``'s scores (in ``features``) on its
    seeds, and the D-ODE row ``fit_rmse_teacher``, the RMSE of the final samples to the teacher's on the fitting
    batch, beside the held-out scores; ``lambdas`` rounded to 6 decimals.

    Without ``data`` (a pretrained model, judged by FID): ``num_samples`` samples per row from seeds ``seed``, ...
    (in batches of ``batch_size``, model calls in ``autocast``), mapped to images by ``decode`` (default: the
    model's own ``decode`` where it has one, as latent models do, else none); ``fid`` is their Frechet distance in
    ``fid_features`` to ``reference`` (``.npz`` statistics, an image folder, samples or (mu, sigma); None: NaN);
    ``sample_seconds`` and ``fid_seconds`` time both per row; ``lambdas`` in full. When ``samples`` is a dict, the
    first ``keep`` images of each row go into ``samples[solver, nfe, variant]``.
    """
    if data is None and num_samples is None:
        raise ValueError("evaluate_grid needs data (evaluation_data) or num_samples (a pretrained model's FID)")
    if decode is None:
        decode = getattr(model, "decode", lambda images: images)  # latents -> images in [-1, 1]
    jobs = [(s, n) for s in solvers for n in nfes if possible(s, n)]
    if not isinstance(teacher, Teacher):
        teacher = Teacher(model, batch_size=fit_batch_size, seed=fit_seed, substeps=teacher, device=device)

    def fid_row(scheduler, nfe):
        began = time.perf_counter()
        images = decode(sample(model, scheduler, nfe, num_samples, seed=seed, batch_size=batch_size, device=device,
                               autocast=autocast, progress=False))
        sample_seconds = time.perf_counter() - began
        fid = float("nan") if reference is None else frechet_distance(images, reference, features=fid_features,
                                                                  device=device)
        return images, {"fid": fid, "sample_seconds": sample_seconds,
                        "fid_seconds": time.perf_counter() - began - sample_seconds}

    rows = []
    for solver, nfe in tqdm(jobs, desc=f"{getattr(model, 'name', 'model')}: solver x NFE", disable=not progress):
        if data is not None:
            rows.append({"solver": solver, "variant": "base", "nfe": nfe, "fit_seconds": 0.0, "lambdas": "",
                         **evaluate_scheduler(model, solver, nfe, data, seed=seed, features=features,
                                              batch_size=batch_size, device=device)})
        began = time.perf_counter()
        fitted = distill(model, solver, nfe, spacing=spacing, guard=guard, teacher=teacher, validation=validation,
                         device=device, progress=False)  # guard=False: the paper's greedy fit
        seconds = time.perf_counter() - began
        if save_dir is not None:
            fitted.save_pretrained(Path(save_dir) / f"{solver}-nfe{nfe}")
        if data is not None:
            rows.append({"solver": solver, "variant": "dode", "nfe": nfe, "fit_seconds": seconds,
                         "lambdas": json.dumps([round(v, 6) for v in fitted.lambdas]),
                         "fit_rmse_teacher": fitting_rmse(model, fitted, teacher, device=device),
                         **evaluate_scheduler(model, fitted, nfe, data, seed=seed, features=features,
                                              batch_size=batch_size, device=device)})
            continue
        for variant, scheduler in (("base", solver), ("dode", fitted)):
            images, scores = fid_row(scheduler, nfe)
            rows.append({"solver": solver, "variant": variant, "nfe": nfe, **scores,
                         "fit_seconds": seconds if variant == "dode" else 0.0,
                         "lambdas": json.dumps(fitted.lambdas) if variant == "dode" else ""})
            if samples is not None:
                samples[solver, nfe, variant] = images[:keep]
    return pd.DataFrame(rows)


def _scores(model, scheduler, nfe, data, *, seed, features, batch_size, device, validation=None, criteria=(),
            validation_features="pixel", known=None, samples=None):
    """``evaluate_scheduler``'s row, plus each validation criterion (``val_rmse``, ``val_fd``) on request
    (``known``: criteria already scored by ``distill``)."""
    row = evaluate_scheduler(model, scheduler, nfe, data, seed=seed, features=features, batch_size=batch_size,
                             device=device, samples=samples)
    for criterion in criteria:
        if criterion in (known or {}):
            row[f"val_{criterion}"] = known[criterion]
        else:
            row[f"val_{criterion}"] = Judge(model, validation, criterion, device, validation_features)(
                scheduler, nfe=nfe)
    return row


def _complete(row: dict, x: torch.Tensor, data: EvaluationData, features) -> None:
    """Add the Frechet distances in ``features`` that a sweep row (scored in its metric's space alone) lacks, from its
    samples ``x``, in ``features`` order before ``rmse_exact`` (the columns of a row scored in full); their time goes
    into ``sample_seconds``."""
    missing = [f for f in features if f"fd_{f}" not in row]
    if not missing:
        return
    began = time.perf_counter()
    scored = {**{f"fd_{f}": row.get(f"fd_{f}") for f in features}, **frechet_distances(x, data, missing)}
    items = [(k, v) for k, v in row.items() if not k.startswith("fd_")]
    at = next(i for i, (k, _) in enumerate(items) if k == "rmse_exact")
    row.clear()
    row.update([*items[:at], *scored.items(), *items[at:]])
    row["sample_seconds"] += time.perf_counter() - began


def evaluate_spacings(model, data: EvaluationData, *, solvers=SOLVERS, nfes=PAPER_NFES, seed: int = 1000,
                      fit_teacher: Teacher, validation: Teacher, metric: str = "fd_pixel", learned_nfes=(),
                      learned_solvers=SOLVERS, learned_starts: int = STARTS, learned_iterations: int = 20,
                      refine_teacher: Teacher | None = None, criteria=(), features=("pixel",),
                      validation_features: str | None = None, learned_moments=(0.0,),
                      batch_size: int | None = None, save_dir=None, device="auto",
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every solver x spacing x NFE, base and D-ODE, and what a user gets from each choice; (results, sweep).

    For each solver and NFE, ``distill(spacing="auto")`` fits every spacing the solver supports (greedy, on
    ``fit_teacher``'s batch) and judges them on ``validation``'s seeds. ``sweep`` holds one row per spacing and
    variant ("base": lambda = 0; "dode": the greedy lambdas, unguarded) scored on the evaluation data, with the
    validation criteria in ``criteria`` ("rmse", "fd") beside them. ``results`` holds the table rows
    (``dode.experiments.variants.VARIANTS``): the base on the paper's spacing, the best base by ``metric`` on the evaluation data
    (what a user who tunes diffusers' spacing gets), the paper's greedy D-ODE on the paper's spacing, D-ODE with
    ``spacing="auto"`` (guarded), and at ``learned_nfes`` for ``learned_solvers`` the refinements
    (``dode.experiments.variants.REFINED_VARIANTS``, as ``distill(refine=...)`` makes them: from an auto fit on
    ``refine_teacher``'s batch, the table's own where that teacher teaches as ``fit_teacher`` does, against
    ``refine_teacher``, from ``learned_starts`` starting spacings, at most ``learned_iterations`` Rprop iterations,
    each kept only where it validates better than what it replaces by the guard's margin; ``fit_seconds`` counts
    that auto fit):
    the base solver on a learned grid (lambdas 0), D-ODE auto with its lambdas refined jointly, and D-ODE with
    lambdas and grid learned together (grids only for ``GRID_SOLVERS``). ``learned_moments``: the grid refinements'
    moment weights (``refine_fit``'s ``moment_weights``: 0 the squared distance alone; several, the guard choosing:
    the first unless another validates better by the margin), and then a grid row's ``moment_weight`` is the one
    kept, empty where the refinement was not.
    Validation Frechet distances are in ``validation_features`` (default: the feature space of ``metric``).
    A sweep row is scored in ``metric``'s feature space (and by RMSE); the other ``features`` only where the row is
    also a table row (a feature network on every sweep row was most of the sweep's time: on gmm-digits FD-digits
    costs 1 s per 2000 samples). Fitted schedulers go to ``save_dir/<solver>-nfe<k>-<variant>``.
    """
    if validation_features is None:
        validation_features = metric.removeprefix("fd_") if metric.startswith("fd_") else "pixel"
    score = dict(seed=seed, features=features, batch_size=batch_size, device=device)
    swept = dict(score, features=[f for f in features if f"fd_{f}" == metric])  # a sweep row's
    jobs = [(s, n) for s in solvers for n in nfes if possible(s, n)]
    sweep, results = [], []
    for solver, nfe in tqdm(jobs, desc=f"{getattr(model, 'name', 'model')}: solver x NFE", disable=not progress):
        began = time.perf_counter()
        found = distillation(model, solver, nfe, spacing="auto", teacher=fit_teacher, validation=validation,
                             features=validation_features, device=device, progress=False)
        auto = found.scheduler
        auto_seconds = time.perf_counter() - began
        criterion, chosen, shrink = found.judge.criterion, found.kept.label, found.factor
        cells, drawn = {}, []
        for candidate in found.candidates:
            spacing = candidate.label
            base = make_scheduler(solver, model, spacing)
            greedy = DODEScheduler(make_scheduler(solver, model, spacing), candidate.fit.lambdas,
                                   auto.num_inference_steps)
            for variant, scheduler in (("base", base), ("dode", greedy)):
                row = {"solver": solver, "nfe": nfe, "spacing": spacing, "variant": variant,
                       "paper_spacing": spacing == get_solver(solver).default_spacing,
                       # the common factor of the lambdas that validated best (the line search's, where it ran)
                       "shrink": best_factor(candidate.scores) if variant == "dode" else None,
                       "fit_seconds": candidate.seconds if variant == "dode" else 0.0,
                       "chosen": spacing == chosen,
                       "validation_features": validation_features,
                       "lambdas": json.dumps([round(v, 6) for v in candidate.fit.lambdas]) if variant == "dode" else "",
                       **_scores(model, scheduler, nfe, data, validation=validation, criteria=criteria,
                                 validation_features=validation_features, **swept, samples=drawn,
                                 known={criterion: candidate.scores[0.0 if variant == "base" else 1.0]})}
                sweep.append(row)
                cells[spacing, variant] = (row, scheduler, drawn.pop())
        paper = get_solver(solver).default_spacing
        bases = [cells[s, "base"][0] for s, v in cells if v == "base"]
        best = min(bases, key=lambda r: r[metric])
        for key in ((paper, "base"), (best["spacing"], "base"), (paper, "dode"), (chosen, "dode")):
            _complete(cells[key][0], cells[key][2], data, features)  # the sweep rows that are table rows too
        auto_row = dict(cells[chosen, "dode"][0]) if shrink == 1.0 else {
            "spacing": chosen, **_scores(model, auto, nfe, data, **score)}
        # each fitted row: (its scores, its scheduler, how it was fitted: shrink, fit_seconds, kept, validation)
        fits = {"base": (cells[paper, "base"][0], None, None), "best-base": (best, None, None),
                "dode": (cells[paper, "dode"][0], cells[paper, "dode"][1], (None, 0.0, None, None)),
                "dode-auto": (auto_row, auto, (shrink, auto_seconds, None, found.score))}
        if nfe in learned_nfes and solver in learned_solvers:
            # what distill(refine=...) does: the refinements start from an auto fit on their own teacher (the table's
            # auto fit where that is the same batch and teacher); each row's fit_seconds counts that fit
            start, start_seconds = found, auto_seconds
            if refine_teacher is not None and not _same_teacher(refine_teacher, fit_teacher):
                began = time.perf_counter()
                start = distillation(model, solver, nfe, spacing="auto", teacher=refine_teacher,
                                     validation=validation, features=validation_features, device=device,
                                     progress=False)
                start_seconds = time.perf_counter() - began
            # the grid alone and the joint lambdas: starts of "joint+timesteps" (their cost counted there too; the
            # other modes ignore them)
            made = {}
            for variant in REFINED_VARIANTS:
                mode = VARIANTS[variant].refine
                if REFINEMENTS[mode].timesteps and not get_solver(solver).takes_grid:
                    continue
                with start.sharing():  # as distill's refined_scheduler: the targets the fits had
                    refined = refine_fit(model, start, start.teacher, mode, judge=start.judge,
                                         targets=start.kept.fit.targets, starts=learned_starts,
                                         max_iterations=learned_iterations, grid_alone=made.get("timesteps"),
                                         joint=made.get("joint"), progress=False,
                                         moment_weights=learned_moments if REFINEMENTS[mode].timesteps else (0.0,))
                made[mode] = refined
                spacing = "learned" if refined.kept and REFINEMENTS[mode].timesteps else refined.spacing
                # which objective made a grid row, where the guard chose among several (none where it was not kept)
                weighed = ({"moment_weight": refined.record["moment_weight"] if refined.kept else None}
                           if REFINEMENTS[mode].timesteps and len(learned_moments) > 1 else {})
                fits[variant] = ({"spacing": spacing, **weighed,
                                  **_scores(model, refined.scheduler, nfe, data, **score)},
                                 refined.scheduler,
                                 (start.factor, start_seconds + refined.seconds, refined.kept, refined.score))
        for variant, (row, fitted, how) in fits.items():
            out = {key: row[key] for key in row if key not in ("variant", "paper_spacing", "chosen", "shrink")}
            out.update(solver=solver, nfe=nfe, variant=variant, spacing=row["spacing"])
            if fitted is not None:
                out.update(lambdas=json.dumps([round(v, 6) for v in fitted.lambdas]),
                           grid=json.dumps(fitted.grid and [round(v, 6) for v in fitted.grid]),
                           **dict(zip(("shrink", "fit_seconds", "kept", "validation"), how)))
                if save_dir is not None:
                    fitted.save_pretrained(Path(save_dir) / f"{solver}-nfe{nfe}-{variant}")
            results.append(out)
    return pd.DataFrame(results), pd.DataFrame(sweep)


def _same_teacher(a: Teacher, b: Teacher) -> bool:
    """Whether two teachers teach the same: the same noise batch, substeps, matching and precision."""
    return all(getattr(a, key) == getattr(b, key) for key in ("batch_size", "seed", "substeps", "match", "precision"))


def fitting_rmse(model, scheduler, teacher: Teacher, device="auto", target: str = "teacher") -> float:
    """RMSE of a fitted scheduler's final samples on the teacher's (fitting) batch to the teacher's final samples
    (``target="teacher"``), or to the batch's reference solution (``"reference"``: what a learned grid is fitted to,
    ``dode.core.distill.final_targets``)."""
    x = sample(model, scheduler, scheduler.nfe, teacher.batch_size, seed=teacher.seed, device=device, progress=False)
    if target == "reference":
        return rmse(x, final_targets(model, teacher)[-1])
    if target != "teacher":
        raise ValueError(f"target must be 'teacher' or 'reference', got {target!r}")
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(probe.num_inference_steps)
    return rmse(x, teacher.targets(probe)[-1])


def teacher_distances(model, scheduler, nfe: int, teacher: Teacher, device="auto") -> pd.DataFrame:
    """RMSE between a solver's states and the teacher's at the same noise levels, step by step, on the
    teacher's noise batch (the fitting batch, or held-out seeds with a teacher built on them)."""
    _, trajectory = sample(model, scheduler, nfe, teacher.batch_size, seed=teacher.seed, device=device,
                           return_trajectory=True, progress=False)
    prepared, steps = prepare_scheduler(model, scheduler, nfe)
    prepared.set_timesteps(steps)
    targets = teacher.targets(prepared)
    return pd.DataFrame({
        "evaluation": range(1, nfe + 1),
        "sigma": trajectory.sigmas[1:].numpy(),
        "rmse_teacher": [rmse(trajectory.states[k + 1], targets[k]) for k in range(nfe)],
    })
