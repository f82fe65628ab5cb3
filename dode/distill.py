"""Distillation: fit one lambda per model evaluation so the student follows the teacher (DESIGN.md, section 1).

Go through the student's evaluations in order. For evaluation i, with x0 = step(o_i) and
v = step(o_i + (o_i - o_{i-1})) - x0, the state after the step is x0 + lambda v (every scheduler is affine
in its model output), so the lambda closest to the teacher's state at the same time is the
one-dimensional least-squares solution lambda_i = <target - x0, v> / <v, v>. Apply it, step, go on.

``refine="joint"`` / ``"joint+timesteps"`` (beyond the paper, ``dode.refine``) then moves all lambdas together,
and optionally the time grid, to bring the student's final samples closer to the teacher's.
"""
from __future__ import annotations

import copy
import time

import torch

from . import __version__
from .metrics import rmse
from .models import resolve_device
from .refine import MODE_OPTIONS, MODES, refine as refine_jointly
from .sampling import check_batch_size, integrate
from .scheduler import DODEScheduler
from .solvers import GRID_SOLVERS, get_solver, make_scheduler, state_sigmas, to_ddpm_state
from .teacher import Teacher


def least_squares_lambda(x_base: torch.Tensor, x_unit: torch.Tensor, target: torch.Tensor) -> float:
    """argmin_lambda ||x_base + lambda (x_unit - x_base) - target||^2, summed over the batch in float64."""
    v = (x_unit.double() - x_base.double()).flatten()
    r = (target.double().to(v.device) - x_base.double()).flatten()
    vv = torch.dot(v, v)
    return 0.0 if vv == 0 else float(torch.dot(r, v) / vv)


def _trial_step(dode: DODEScheduler, k: int, lam: float, output, t, x) -> torch.Tensor:
    """The state ``step`` would return with lambda_k = lam, computed on a copy (step mutates state)."""
    trial = copy.deepcopy(dode)
    trial.lambdas[k] = lam
    return trial.step(output, t, x).prev_sample


def distill(model, solver, nfe: int, *, batch_size: int | None = None, seed: int | None = None, teacher=10,
            device="auto", refine: str | None = None, refine_iterations: int = 50,
            progress: bool = True) -> DODEScheduler:
    """Fit the D-ODE lambdas of ``solver`` at ``nfe`` model evaluations on one batch; returns a DODEScheduler.

    The fitting batch is ``batch_size`` samples (default 100) from seeds ``seed``, ``seed + 1``, ... (default 0).
    ``teacher``: an integer C (DDIM with each student step split into C steps, the paper's choice, default 10),
    ``"fine"`` (every training timestep), or a ``dode.Teacher`` to share one teacher run between fits (its
    noise batch is then the fitting batch).

    ``refine``: None (the paper's greedy fit), ``"joint"`` (then all lambdas together, against the teacher's
    state after every step, at most ``refine_iterations`` L-BFGS iterations) or ``"joint+timesteps"`` (lambdas
    and the noise level of every step but the first, against the teacher's final samples; only for the solvers
    in ``dode.solvers.GRID_SOLVERS``).
    """
    solver = get_solver(solver)
    if refine not in MODES:
        raise ValueError(f"refine must be one of {MODES}, got {refine!r}")
    if refine == "joint+timesteps" and solver.name not in GRID_SOLVERS:
        raise ValueError(
            f"refine='joint+timesteps' cannot learn a time grid for {solver.name}: its diffusers scheduler steps on "
            f"integer timesteps. Use refine='joint', or one of: {', '.join(GRID_SOLVERS)}"
        )
    steps = solver.steps_for(nfe)
    device = resolve_device(device)
    model.to(device)
    if isinstance(teacher, Teacher):
        if batch_size not in (None, teacher.batch_size) or seed not in (None, teacher.seed):
            raise ValueError(
                f"the given Teacher fixes batch_size={teacher.batch_size}, seed={teacher.seed}; "
                f"got batch_size={batch_size}, seed={seed}"
            )
        if teacher.model is not model:
            raise ValueError("the given Teacher was built for another model")
    else:
        batch_size = check_batch_size(100 if batch_size is None else batch_size)
        teacher = Teacher(model, batch_size=batch_size, seed=seed or 0, grid=teacher, device=device)

    began = time.perf_counter()
    dode = DODEScheduler(make_scheduler(solver.name, model), [0.0] * nfe, steps)
    dode.set_timesteps(steps, device=device)
    teacher_nfe = teacher.nfe
    targets = teacher.targets(dode)
    teacher_nfe = teacher.nfe - teacher_nfe
    seconds = {"teacher": time.perf_counter() - began, "trial_steps": 0.0, "lstsq": 0.0}
    sigmas = state_sigmas(dode)
    before, after = [], []  # RMSE to the teacher after each step: lambda = 0 and fitted

    def fit(k, output, t, x):
        clock = time.perf_counter()
        x_base = to_ddpm_state(_trial_step(dode, k, 0.0, output, t, x), sigmas[k], dode)
        x_unit = to_ddpm_state(_trial_step(dode, k, 1.0, output, t, x), sigmas[k], dode) if k > 0 else x_base
        seconds["trial_steps"] += time.perf_counter() - clock
        clock = time.perf_counter()
        if k > 0:
            dode.lambdas[k] = least_squares_lambda(x_base, x_unit, targets[k])
        seconds["lstsq"] += time.perf_counter() - clock
        x_fit = x_base + dode.lambdas[k] * (x_unit - x_base)
        before.append(rmse(x_base.cpu(), targets[k]))
        after.append(rmse(x_fit.cpu(), targets[k]))

    student_began = time.perf_counter()
    integrate(model, dode, steps, teacher.noise.to(device), before_step=fit)
    # the student's own evaluations and steps (and RMSE bookkeeping): its run less trial steps and solves
    seconds["student"] = time.perf_counter() - student_began - seconds["trial_steps"] - seconds["lstsq"]
    dode.fit_info = {
        "solver": solver.name,
        "nfe": nfe,
        "num_inference_steps": steps,
        "teacher": teacher.label,
        "batch_size": teacher.batch_size,
        "seed": teacher.seed,
        "model": getattr(model, "name", type(model).__name__),
        "teacher_nfe": teacher_nfe,
        "rmse_to_teacher_base": before,
        "rmse_to_teacher_fitted": after,
        "seconds": time.perf_counter() - began,
        # wall time split: the teacher's run, the student's evaluations, trial steps, least-squares solves
        "seconds_split": seconds,
        "dode_version": __version__,
    }
    if refine is not None:
        dode = refine_jointly(model, dode, teacher.noise.to(device), targets, **MODE_OPTIONS[refine],
                              max_iterations=refine_iterations, progress=progress)
    return dode

