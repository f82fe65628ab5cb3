"""Refinement (beyond the paper): all lambdas together, the time grid alone, or both, through the whole run.

The paper fits each lambda greedily against the teacher's state after its own step. Here the greedy lambdas
are only the start (``dode.variants.REFINEMENTS``): "joint" moves every lambda to minimise the mean squared distance of the
student's states to the teacher's; "timesteps" moves only the noise levels of the grid, every lambda held at 0
(the base solver on a learned grid: the learned-grid methods without D-ODE); "joint+timesteps" moves both. With
a grid the objective is the final samples' distance (the moving states have no fixed targets). The optimiser is
L-BFGS over the distillation batch. The network is frozen but differentiated through: the gradient with respect
to the lambdas comes from autograd through every model evaluation and scheduler step. The grid enters the
scheduler's coefficients and the model's time input, which diffusers computes outside autograd, so its gradient
is a finite difference (one extra student run per grid parameter). DDIM's grid is learned on its exact grid form
(``dode.scheduler.to_grid_form``: iPNDM of order 1).

Every level of the grid moves. The first may only come down (``u = log(first / start) <= 0``: above it the
noise is the schedule's own); the rest are parametrised so that the grid stays strictly descending between the
first level and the smallest training noise level: the gaps between consecutive log-levels are ``softmax([z, 0])``
of that span, so any ``z`` is a valid grid (``z`` is kept in a box so that no two levels merge in float32).
Several starts and the never-worse guard on validation seeds are ``dode.fit.refine_fit``'s.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

from .schedule import training_sigmas
from .scheduler import DODEScheduler, to_grid_form
from .grids import TimeGrid
from .sampling import integrate
from .solvers import GRID_SOLVERS, solver_of
from .variants import REFINEMENTS

_FD_STEP = 1e-4  # finite-difference step in the grid parameters z
_MIN_GAP = 0.02  # smallest share of the log-sigma span between two grid levels at the start
#: the first level may come down from its start (never up: noise above it is the schedule's own) by at most this
#: share of the log-span to the smallest training level
_FIRST_SPAN = 0.75
_Z_BOUND = 8.0  # |z| bound: no gap is below about e^-16 of another, so the levels stay distinct in float32


def grid_from_params(z: np.ndarray, first: float, lowest: float) -> np.ndarray:
    """The descending grid [first, ...] whose log-level gaps are softmax([z, 0]) of log(first / lowest)."""
    gaps = np.exp(np.append(z, 0.0) - np.max(np.append(z, 0.0)))
    gaps /= gaps.sum()
    return np.exp(np.log(first) - np.cumsum(np.concatenate([[0.0], gaps[:-1]])) * np.log(first / lowest))


def params_from_grid(grid: np.ndarray, lowest: float) -> np.ndarray:
    """The ``z`` of ``grid_from_params``; gaps under ``_MIN_GAP`` of the span are widened to it."""
    positions = np.log(grid[0] / np.append(grid, lowest)) / np.log(grid[0] / lowest)
    gaps = np.maximum(np.diff(positions), _MIN_GAP)
    return np.clip(np.log(gaps[:-1] / gaps[-1]), -_Z_BOUND, _Z_BOUND)


def _student_states(model, dode: DODEScheduler, noise: torch.Tensor, lambdas, grid) -> list[torch.Tensor]:
    """The student's state after every model evaluation (DDPM convention) from ``noise``, with the given lambdas
    (floats or tensors, lambda_0 included) and grid; differentiable where autograd is on."""
    dode.grid = None if grid is None else [float(s) for s in grid]
    _, states = integrate(model, dode, dode.num_inference_steps, noise, record=True, lambdas=lambdas,
                          grad=torch.is_grad_enabled())
    return states[1:]


def _loss(states, targets, objective: str) -> torch.Tensor:
    """Mean squared distance to the teacher: of the final samples, or averaged over every state."""
    pairs = list(zip(states, targets))[-1:] if objective == "final" else list(zip(states, targets))
    return sum(torch.mean((x.double() - y.double().to(x.device)) ** 2) for x, y in pairs) / len(pairs)


def optimise(model, dode: DODEScheduler, noise: torch.Tensor, targets: torch.Tensor, *, timesteps: bool = False,
           lambdas: bool = True, objective: str = "final", max_iterations: int = 50,
           progress: bool = True) -> DODEScheduler:
    """A copy of ``dode`` whose lambdas (``lambdas``) and grid (``timesteps``) minimise the mean squared distance of
    the student's states from ``noise`` to the teacher's ``targets`` (nfe, batch, ...; DDPM convention), starting
    from ``dode``'s. ``objective``: "all" (every state against its target, the sum the greedy fit minimises one
    step at a time) or "final" (the final samples only; the one choice with ``timesteps``, whose moving states
    have no fixed targets). At most ``max_iterations`` L-BFGS iterations and twice as many objective evaluations
    (line searches included). ``lambdas=False`` holds the lambdas at their start (with a zero start: a learned grid
    alone, the base solver's). DDIM's grid is learned on its grid form (``dode.scheduler.to_grid_form``). Never
    returns a worse fit than its start: the best point L-BFGS visits is kept."""
    solver = solver_of(dode)
    if timesteps and not solver.takes_grid:
        raise ValueError(f"{solver.name} cannot take a custom time grid; solvers that can: {', '.join(GRID_SOLVERS)}")
    if objective not in ("all", "final") or (timesteps and objective != "final"):
        raise ValueError(f"objective must be 'all' or 'final' ('final' with timesteps), got {objective!r}")
    if not (lambdas or timesteps):
        raise ValueError("nothing to refine: lambdas=False needs timesteps=True")
    began = time.perf_counter()
    form = to_grid_form(dode) if timesteps else dode
    student = copy.deepcopy(form)
    student.set_timesteps(student.num_inference_steps, device=noise.device)
    start_grid = np.asarray(student.grid if student.grid is not None else TimeGrid.of(student).steps,
                            dtype=np.float64)
    lowest = float(training_sigmas(model.scheduler_config)[0])
    n_lam = dode.nfe - 1 if lambdas else 0
    fixed = list(student.lambdas)
    x0 = np.array(student.lambdas[1:] if lambdas else [], dtype=np.float64)
    top = start_grid[0]
    if timesteps:  # u = log(first level / its start) <= 0, then the gaps below it
        x0 = np.concatenate([x0, [0.0], params_from_grid(start_grid, lowest)])

    def unpack(theta):  # (every lambda, lambda_0 = 0 included; the grid)
        grid = grid_from_params(theta[n_lam + 1:], top * np.exp(theta[n_lam]), lowest) if timesteps else student.grid
        return ([0.0, *theta[:n_lam]] if lambdas else fixed), grid

    frozen = [p for p in model.parameters() if p.requires_grad] if hasattr(model, "parameters") else []
    with torch.no_grad():  # the start as given (with timesteps, x0's grid has its smallest gaps widened)
        start = _loss(_student_states(model, student, noise, student.lambdas, student.grid), targets,
                      objective).item()
    best = {"loss": start, "theta": None}
    history = []

    def value_and_gradient(theta):
        try:
            value, gradient = _value_and_gradient(theta)
        except FloatingPointError:  # the student blew up (NaN or inf) at a shifted point
            value, gradient = math.inf, None
        if not math.isfinite(value):  # a line-search trial too far out: L-BFGS backs off from an infinite value
            value, gradient = math.inf, np.zeros(len(theta))
        history.append(value)
        if value < best["loss"]:
            best.update(loss=value, theta=theta.copy())
        bar.set_postfix(mse=f"{value:.3g}", refresh=False)
        bar.update()
        return value, gradient

    def _value_and_gradient(theta):
        moved_lambdas, grid = unpack(theta)
        gradient = []
        if lambdas:  # d loss / d lambda by autograd through the whole run
            lam = torch.tensor(moved_lambdas[1:], dtype=torch.float64, requires_grad=True)
            with torch.enable_grad():
                loss = _loss(_student_states(model, student, noise, [0.0, *lam], grid), targets, objective)
                loss.backward()
            gradient.append(lam.grad.numpy().copy())
        else:
            with torch.no_grad():
                loss = _loss(_student_states(model, student, noise, moved_lambdas, grid), targets, objective)
        value = loss.item()
        with torch.no_grad():
            for i in range(n_lam, len(theta)):
                # the first level's u is bounded above by 0 (its start): a backward difference stays inside
                step = -_FD_STEP if i == n_lam else _FD_STEP
                shifted = theta.copy()
                shifted[i] += step
                moved = _loss(_student_states(model, student, noise, *unpack(shifted)), targets, objective).item()
                gradient.append([(moved - value) / step])
        gradient = np.concatenate(gradient)
        return (value, gradient) if np.isfinite(gradient).all() else (math.inf, None)

    for p in frozen:
        p.requires_grad_(False)
    try:
        with tqdm(desc=f"refining {solver.name}", disable=not progress, unit="eval") as bar:
            bounds = [(None, None)] * n_lam + ([(-_FIRST_SPAN * np.log(top / lowest), 0.0)] if timesteps else []) \
                + [(-_Z_BOUND, _Z_BOUND)] * (len(x0) - n_lam - (1 if timesteps else 0))
            result = scipy.optimize.minimize(value_and_gradient, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                             options={"maxiter": max_iterations, "maxfun": 2 * max_iterations})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    found, grid = (student.lambdas, student.grid) if best["theta"] is None else unpack(best["theta"])
    # its own base (set_grid changes it): the grid form's, where the grid was learned on it
    refined = DODEScheduler(copy.deepcopy(form.base_scheduler), found, dode.num_inference_steps,
                            copy.deepcopy(dode.fit_info), grid=None if grid is None else list(grid))
    refined.fit_info["refine"] = {
        "mode": mode_of(timesteps=timesteps, lambdas=lambdas),
        "objective": f"mean squared distance to the teacher, {objective} states",
        "mse_start": start,
        "mse_refined": best["loss"],
        "iterations": int(result.nit),
        "evaluations": len(history),
        "student_runs": len(history) * (1 + len(x0) - n_lam),
        "seconds": time.perf_counter() - began,
        "optimizer_message": str(result.message),
        "history": history,  # the objective at every evaluation, in order
    }
    return refined


def mode_of(*, timesteps: bool, lambdas: bool) -> str:
    """The ``REFINEMENTS`` name of what a refinement moves."""
    return next(name for name, o in REFINEMENTS.items() if o.timesteps == timesteps and o.lambdas == lambdas)
