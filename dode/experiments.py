"""Experiments: the paper's grid (solver x NFE x base | D-ODE) evaluated on one model, plus provenance."""
from __future__ import annotations

import copy
import json
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .fit import STARTS, Validation, distill, refine_fit
from .runtime import machine, resolve_device
from .metrics import feature_statistics, frechet_distance, rmse
from .ode import solve_ode
from .parameters import PAPER_NFES
from .sampling import prepare_scheduler, sample
from .scheduler import DODEScheduler, make_scheduler
from .solvers import GRID_SOLVERS, SOLVERS, get_solver
from .teacher import Teacher
from .variants import REFINED_VARIANTS, REFINEMENTS, VARIANTS, suffix


def output_dir(out_dir=None) -> Path:
    """The folder a notebook writes into: ``out_dir``, or a fresh temporary folder when None."""
    path = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dode-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def possible(solver: str, nfe: int) -> bool:
    try:
        get_solver(solver).steps_for(nfe)
    except ValueError:
        return False
    return True


def _names(value, name: str, valid, empty: bool = False) -> list:
    """A list of names from ``valid``; a single name (papermill's ``-p solvers deis``) is a one-element list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, e.g. {[valid[0]]!r}; got {value!r} (papermill: pass lists as "
                         f"YAML, -y '{name}: [{valid[0]}]')")
    unknown = [v for v in value if v not in valid]
    if unknown or not (value or empty):
        raise ValueError(f"{name}: unknown {unknown!r} (or none given); valid: {', '.join(map(str, valid))}")
    return list(value)


def _positive_ints(value, name: str, empty: bool = False) -> list:
    """A list of positive integers; a single integer (``-p nfes 4``) is a one-element list."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not (value or empty) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(f"{name} must be a list of positive integers, e.g. [3, 5]; got {value!r} (papermill: "
                         f"pass lists as YAML, -y '{name}: [3, 5]')")
    return list(value)


def _seeds(value, name: str) -> list:
    """A non-empty list of distinct seeds (integers >= 0); a single integer is a one-element list."""
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ValueError(f"{name} must be a list of distinct integers >= 0, e.g. [0, 100, 200]; got {value!r}")
    return list(value)


def _teacher_value(value, name: str):
    if value == "fine" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        return value
    raise ValueError(f"{name} must be an integer C >= 2 (DDIM steps per student step) or 'fine', got {value!r}")


def _model_name(value) -> str:
    from .models import MODELS

    name = str(value)
    if name in MODELS or Path(name).expanduser().exists() or "/" in name:
        return name  # an embedded model, a folder, or a hub id (load_model says at once if it cannot be had)
    raise ValueError(f"model_name: unknown model {name!r}; valid: {', '.join(MODELS)}, a diffusers UNet2DModel "
                     "folder, or a hub id such as 'google/ddpm-cifar10-32'")


def _metrics(value, name: str) -> list:
    from .metrics import FEATURES

    return _names(value, name, [f"fd_{f}" for f in FEATURES] + ["rmse_exact"])


def _spacing(value):
    from .solvers import SPACINGS

    if value is None or value == "auto" or value in SPACINGS:
        return value
    raise ValueError(f"spacing: unknown {value!r}; valid: None (each solver's paper spacing), 'auto', "
                     f"{', '.join(SPACINGS)}")


def _checks():
    from .fit import CRITERIA
    from .metrics import FEATURES

    solvers = lambda value, name: list(SOLVERS) if value == "all" else _names(value, name, SOLVERS)  # noqa: E731
    return {
        "model_name": lambda v, n: _model_name(v),
        "models": lambda v, n: [_model_name(m) for m in ([v] if isinstance(v, str) else v)],
        "solvers": solvers, "matching_solvers": solvers, "refine_solvers": solvers, "learned_solvers": solvers,
        "seed_solvers": solvers,
        "learned_starts": lambda v, n: _positive_ints(v, n)[0], "learned_iterations": lambda v, n: _positive_ints(v, n)[0],
        "fit_seeds": _seeds,
        "solver": lambda v, n: _names(v, n, SOLVERS)[0] if isinstance(v, str) else _names(v, n, SOLVERS),
        "pca_solver": lambda v, n: _names([v], n, SOLVERS)[0],
        "nfes": _positive_ints, "grid_nfes": _positive_ints, "batch_sizes": _positive_ints,
        "learned_nfes": lambda v, n: _positive_ints(v, n, empty=True),
        "nfe": lambda v, n: _positive_ints([v] if not isinstance(v, (list, tuple)) else v, n)[0],
        "features": lambda v, n: _names(v, n, FEATURES),
        "criteria": lambda v, n: _names(v, n, CRITERIA, empty=True),
        "metric": lambda v, n: _metrics([v], n)[0], "metrics": _metrics,
        "teacher": _teacher_value, "refine_teacher": _teacher_value,
        "teacher_scales": lambda v, n: [_teacher_value(t, n) for t in ([v] if not isinstance(v, (list, tuple)) else v)],
        "spacing": lambda v, n: _spacing(v),
        "device": lambda v, n: (resolve_device(v), v)[1],
        "num_threads": lambda v, n: v,
    }


def check_parameters(**parameters):
    """A notebook's parameters, checked and normalised before any work; every notebook calls it first.

    A scalar where a list is expected is a one-element list (papermill hands ``-p nfes 4`` over as an int and
    ``-p solvers deis`` as a string); an unknown solver, model, spacing, feature, metric or criterion, a device
    this machine lacks, or a value of the wrong kind is a ValueError that names what is valid. ``num_threads``
    is applied (``dode.runtime.use_threads``: one thread unless asked otherwise). With ``solvers`` (or
    ``solver``) and ``nfes`` (or ``nfe``), the solver x NFE cells a solver cannot make exactly are returned in
    ``skipped`` (solver, nfe, reason) and printed; none possible at all is a ValueError.

    Returns a namespace with every parameter given, normalised, plus ``skipped`` and ``num_threads`` (in use).
    """
    from types import SimpleNamespace

    from .runtime import use_threads

    checks = _checks()
    unknown = sorted(set(parameters) - set(checks))
    if unknown:
        raise TypeError(f"check_parameters does not know {unknown}; it checks {', '.join(sorted(checks))}")
    checked = {name: checks[name](value, name) for name, value in parameters.items()}
    checked["num_threads"] = use_threads(parameters.get("num_threads"))
    solvers = checked.get("solvers", [checked["solver"]] if isinstance(checked.get("solver"), str) else None)
    nfes = checked.get("nfes", [checked["nfe"]] if "nfe" in checked else None)
    skipped = []
    if solvers is not None and nfes is not None:
        for solver in solvers:
            for nfe in nfes:
                try:
                    get_solver(solver).steps_for(nfe)
                except ValueError as err:
                    skipped.append({"solver": solver, "nfe": nfe, "reason": str(err)})
        if len(skipped) == len(solvers) * len(nfes):
            raise ValueError("no solver x NFE cell can run: " + "; ".join(s["reason"] for s in skipped))
        for cell in skipped:
            print(f"skipped {cell['solver']} at NFE {cell['nfe']}: {cell['reason']}")
    return SimpleNamespace(**checked, skipped=skipped)


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
                       batch_size: int | None = None, device="auto") -> dict:
    """Frechet distance per feature space and RMSE to the reference solution, for one solver or DODEScheduler."""
    began = time.perf_counter()
    x = sample(model, scheduler, nfe, len(data.exact), seed=seed, batch_size=batch_size, device=device,
               progress=False)
    row = {f"fd_{f}": frechet_distance(x, data.statistics.get(f, data.reference), features=f) for f in features}
    row["rmse_exact"] = rmse(x, data.exact)
    row["total_variance"] = float(x.flatten(1).var(0).sum())
    row["sample_seconds"] = time.perf_counter() - began
    return row


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
        teacher = Teacher(model, batch_size=fit_batch_size, seed=fit_seed, grid=teacher, device=device)

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
            validation_features="pixel", known=None):
    """``evaluate_scheduler``'s row, plus each validation criterion (``val_rmse``, ``val_fd``) on request
    (``known``: criteria already scored by ``distill``)."""
    row = evaluate_scheduler(model, scheduler, nfe, data, seed=seed, features=features, batch_size=batch_size,
                             device=device)
    for criterion in criteria:
        if criterion in (known or {}):
            row[f"val_{criterion}"] = known[criterion]
        else:
            row[f"val_{criterion}"] = Validation(model, validation, criterion, device, validation_features)(
                scheduler, nfe=nfe)
    return row


def evaluate_spacings(model, data: EvaluationData, *, solvers=SOLVERS, nfes=PAPER_NFES, seed: int = 1000,
                      fit_teacher: Teacher, validation: Teacher, metric: str = "fd_pixel", learned_nfes=(),
                      learned_solvers=SOLVERS, learned_starts: int = STARTS, learned_iterations: int = 20,
                      refine_teacher: Teacher | None = None, criteria=(), features=("pixel",),
                      validation_features: str | None = None,
                      batch_size: int | None = None, save_dir=None, device="auto",
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every solver x spacing x NFE, base and D-ODE, and what a user gets from each choice; (results, sweep).

    For each solver and NFE, ``distill(spacing="auto")`` fits every spacing the solver supports (greedy, on
    ``fit_teacher``'s batch) and judges them on ``validation``'s seeds. ``sweep`` holds one row per spacing and
    variant ("base": lambda = 0; "dode": the greedy lambdas, unguarded) scored on the evaluation data, with the
    validation criteria in ``criteria`` ("rmse", "fd") beside them. ``results`` holds the table rows
    (``dode.variants.VARIANTS``): the base on the paper's spacing, the best base by ``metric`` on the evaluation data
    (what a user who tunes diffusers' spacing gets), the paper's greedy D-ODE on the paper's spacing, D-ODE with
    ``spacing="auto"`` (guarded), and at ``learned_nfes`` for ``learned_solvers`` the refinements
    (``dode.variants.REFINED_VARIANTS``, against ``refine_teacher``, from ``learned_starts`` starting spacings, at most
    ``learned_iterations`` L-BFGS iterations, each kept only where it validates better than what it replaces):
    the base solver on a learned grid (lambdas 0), D-ODE auto with its lambdas refined jointly, and D-ODE with
    lambdas and grid learned together (grids only for ``GRID_SOLVERS``).
    Validation Frechet distances are in ``validation_features`` (default: the feature space of ``metric``).
    Fitted schedulers go to ``save_dir/<solver>-nfe<k>-<variant>``.
    """
    if validation_features is None:
        validation_features = metric.removeprefix("fd_") if metric.startswith("fd_") else "pixel"
    score = dict(seed=seed, features=features, batch_size=batch_size, device=device)
    jobs = [(s, n) for s in solvers for n in nfes if possible(s, n)]
    sweep, results = [], []
    for solver, nfe in tqdm(jobs, desc=f"{getattr(model, 'name', 'model')}: solver x NFE", disable=not progress):
        began = time.perf_counter()
        auto = distill(model, solver, nfe, spacing="auto", teacher=fit_teacher, validation=validation,
                       features=validation_features, device=device, progress=False)
        auto_seconds = time.perf_counter() - began
        cells = {}
        for candidate in auto.fit_info["validation"]["candidates"]:
            spacing = candidate["spacing"]
            base = make_scheduler(solver, model, spacing)
            greedy = DODEScheduler(make_scheduler(solver, model, spacing), candidate["greedy_lambdas"],
                                   auto.num_inference_steps)
            for variant, scheduler in (("base", base), ("dode", greedy)):
                row = {"solver": solver, "nfe": nfe, "spacing": spacing, "variant": variant,
                       "paper_spacing": spacing == get_solver(solver).default_spacing,
                       # the common factor of the lambdas that validated best (the line search's, where it ran)
                       "shrink": float(min(candidate["scores"], key=candidate["scores"].get)) if variant == "dode" else None,
                       "fit_seconds": candidate["fit_seconds"] if variant == "dode" else 0.0,
                       "chosen": spacing == auto.fit_info["spacing"],
                       "validation_features": validation_features,
                       "lambdas": json.dumps([round(v, 6) for v in candidate["greedy_lambdas"]]) if variant == "dode" else "",
                       **_scores(model, scheduler, nfe, data, validation=validation, criteria=criteria,
                                 validation_features=validation_features, **score,
                                 known={auto.fit_info["validation"]["criterion"]:
                                        candidate["scores"]["0" if variant == "base" else "1"]})}
                sweep.append(row)
                cells[spacing, variant] = (row, scheduler)
        paper = get_solver(solver).default_spacing
        bases = [cells[s, "base"][0] for s, v in cells if v == "base"]
        best = min(bases, key=lambda r: r[metric])
        chosen = auto.fit_info["spacing"]
        shrink = auto.fit_info["validation"]["shrink"]
        auto_row = dict(cells[chosen, "dode"][0]) if shrink == 1.0 else {
            "spacing": chosen, **_scores(model, auto, nfe, data, **score)}
        fits = {"base": (cells[paper, "base"][0], None), "best-base": (best, None),
                "dode": (cells[paper, "dode"][0], cells[paper, "dode"][1]), "dode-auto": (auto_row, auto)}
        if nfe in learned_nfes and solver in learned_solvers:
            check = Validation(model, validation, auto.fit_info["validation"]["criterion"], device, validation_features)
            for variant in REFINED_VARIANTS:
                mode = VARIANTS[variant].refine
                if REFINEMENTS[mode].timesteps and solver not in GRID_SOLVERS:
                    continue
                refined = refine_fit(model, auto, refine_teacher or fit_teacher, mode, validation=check,
                                     starts=learned_starts, max_iterations=learned_iterations, progress=False)
                info = refined.fit_info["refine"]
                spacing = ("learned" if info["kept"] and REFINEMENTS[mode].timesteps
                           else refined.fit_info.get("spacing", chosen))
                fits[variant] = ({"spacing": spacing, **_scores(model, refined, nfe, data, **score)}, refined)
        for variant, (row, fitted) in fits.items():
            out = {key: row[key] for key in row if key not in ("variant", "paper_spacing", "chosen", "shrink")}
            out.update(solver=solver, nfe=nfe, variant=variant, spacing=row["spacing"])
            if fitted is not None:
                out.update(lambdas=json.dumps([round(v, 6) for v in fitted.lambdas]),
                           grid=json.dumps(fitted.grid and [round(v, 6) for v in fitted.grid]),
                           shrink=fitted.fit_info.get("validation", {}).get("shrink"),
                           fit_seconds=auto_seconds if variant == "dode-auto" else
                           fitted.fit_info.get("refine", {}).get("seconds_total", 0.0),
                           kept=fitted.fit_info.get("refine", {}).get("kept"),
                           validation=fitted.fit_info.get("refine", {}).get(
                               "validation", fitted.fit_info.get("validation", {}).get("guarded")))
                if save_dir is not None:
                    fitted.save_pretrained(Path(save_dir) / f"{solver}-nfe{nfe}-{variant}")
            results.append(out)
    return pd.DataFrame(results), pd.DataFrame(sweep)


def spacing_summary(results: pd.DataFrame, floor: float, metric: str = "fd_pixel") -> pd.DataFrame:
    """Per solver and NFE: the paper's base, the best base (and its spacing), D-ODE auto (and its spacing), the
    ratio of D-ODE auto to the best base and the share of the best base's gap to the floor it closes."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric).reset_index()
    spacing = results.pivot_table(index=["solver", "nfe"], columns="variant", values="spacing", aggfunc="first")
    wide = wide.join(spacing.add_suffix("_spacing"), on=["solver", "nfe"])
    for variant in [v for v in ("dode", "dode-auto", "dode-learned") if v in wide]:
        wide[f"{variant}_vs_best"] = wide[variant] / wide["best-base"]
        wide[f"{variant}_gap_closed"] = (wide["best-base"] - wide[variant]) / (wide["best-base"] - floor)
    order = {s: i for i, s in enumerate(SOLVERS)}
    return wide.sort_values(["solver", "nfe"], key=lambda c: c.map(order) if c.name == "solver" else c)


def criterion_correlation(sweep: pd.DataFrame, metric: str = "fd_pixel") -> pd.DataFrame:
    """How well each validation criterion ranks every solver x spacing x NFE x variant cell by ``metric``: the
    Spearman rank correlation, over all cells and within each (solver, NFE) (the choice ``auto`` makes), and
    how often the criterion's pick within a (solver, NFE) is the metric's."""
    from scipy.stats import spearmanr

    rows = []
    for column in [c for c in sweep if c.startswith("val_")]:
        finite = sweep[np.isfinite(sweep[column]) & np.isfinite(sweep[metric])]
        within, agree = [], []
        for _, cell in finite.groupby(["solver", "nfe"]):
            if len(cell) > 2:
                within.append(spearmanr(cell[column], cell[metric]).statistic)
            agree.append(cell[column].idxmin() == cell[metric].idxmin())
        rows.append({"criterion": column.removeprefix("val_"), "cells": len(finite),
                     "spearman_all": spearmanr(finite[column], finite[metric]).statistic,
                     "spearman_within_median": float(np.nanmedian(within)),
                     "picks_the_best": float(np.mean(agree))})
    return pd.DataFrame(rows)


def fitting_rmse(model, scheduler, teacher: Teacher, device="auto") -> float:
    """RMSE of a fitted scheduler's final samples to the teacher's, on the teacher's (fitting) batch."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(probe.num_inference_steps)
    x = sample(model, scheduler, scheduler.nfe, teacher.batch_size, seed=teacher.seed, device=device, progress=False)
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


def gap_summary(results: pd.DataFrame, floor: float, metric: str = "fd_pixel") -> pd.DataFrame:
    """Per solver and NFE: base, D-ODE (and its refinements, where present), the ratio to base, and the fraction
    of the base-to-floor gap each closes."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric).reset_index()
    for variant in [v for v in VARIANTS if v != "base" and v in wide]:
        wide["ratio" + suffix(variant)] = wide[variant] / wide["base"]
        wide["gap_closed" + suffix(variant)] = (wide["base"] - wide[variant]) / (wide["base"] - floor)
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
        # uncommitted changes to what produces results (the package, the notebooks, the dependencies)
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "dode", "notebooks", "pyproject.toml"],
                                    capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "parameters": parameters,
        "packages": packages,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine(),
        "wall_seconds": round(seconds, 1),
    }
