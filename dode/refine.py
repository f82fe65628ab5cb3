"""Joint refinement (beyond the paper): all lambdas together, and optionally the time grid, through the whole run.

The paper fits each lambda greedily against the teacher's state after its own step. Here the greedy lambdas
are only the start: every lambda (and, with ``timesteps=True``, every noise level of the student's grid but
the first) is moved to minimise the mean squared distance between the student's final samples and the
teacher's over the distillation batch, by L-BFGS. The network is frozen but differentiated through: the
gradient with respect to the lambdas comes from autograd through every model evaluation and scheduler step.
The grid enters the scheduler's coefficients and the model's time input, which diffusers computes outside
autograd, so its gradient is a forward finite difference (one extra student run per grid parameter).

The grid is parametrised so that it stays strictly descending between its fixed first level and the
smallest training noise level: the gaps between consecutive log-levels are ``softmax([z, 0])`` of that span,
so any ``z`` is a valid grid (``z`` is kept in a box so that no two levels merge in float32).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

from .models import training_sigmas
from .scheduler import DODEScheduler
from .grids import TimeGrid
from .sampling import integrate
from .solvers import GRID_SOLVERS, solver_of

#: each refinement of ``distill(refine=...)``: what it moves, and against which teacher states
MODE_OPTIONS = {"joint": {"timesteps": False, "objective": "all"},
                "joint+timesteps": {"timesteps": True, "objective": "final"}}
MODES = (None, *MODE_OPTIONS)
_FD_STEP = 1e-4  # finite-difference step in the grid parameters z
_MIN_GAP = 0.02  # smallest share of the log-sigma span between two grid levels at the start
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


def refine(model, dode: DODEScheduler, noise: torch.Tensor, targets: torch.Tensor, *, timesteps: bool = False,
           objective: str = "final", max_iterations: int = 50, progress: bool = True) -> DODEScheduler:
    """A copy of ``dode`` whose lambdas (and grid, with ``timesteps``) minimise the mean squared distance of the
    student's states from ``noise`` to the teacher's ``targets`` (nfe, batch, ...; DDPM convention), starting
    from ``dode``'s. ``objective``: "all" (every state against its target, the sum the greedy fit minimises one
    step at a time) or "final" (the final samples only; the one choice with ``timesteps``, whose moving states
    have no fixed targets). Never returns a worse fit than its start: the best point L-BFGS visits is kept."""
    solver = solver_of(dode)
    if timesteps and not solver.custom_grid:
        raise ValueError(f"{solver.name} cannot take a custom time grid; solvers that can: {', '.join(GRID_SOLVERS)}")
    if objective not in ("all", "final") or (timesteps and objective != "final"):
        raise ValueError(f"objective must be 'all' or 'final' ('final' with timesteps), got {objective!r}")
    began = time.perf_counter()
    student = copy.deepcopy(dode)
    student.set_timesteps(student.num_inference_steps, device=noise.device)
    start_grid = np.asarray(student.grid if student.grid is not None else TimeGrid.of(student).steps,
                            dtype=np.float64)
    lowest = float(training_sigmas(model.scheduler_config)[0])
    n_lam = dode.nfe - 1
    x0 = np.array(dode.lambdas[1:], dtype=np.float64)
    if timesteps:
        x0 = np.concatenate([x0, params_from_grid(start_grid, lowest)])

    def unpack(theta):  # (every lambda, lambda_0 = 0 included; the grid)
        grid = grid_from_params(theta[n_lam:], start_grid[0], lowest) if timesteps else student.grid
        return [0.0, *theta[:n_lam]], grid

    frozen = [p for p in model.parameters() if p.requires_grad] if hasattr(model, "parameters") else []
    with torch.no_grad():  # the start as given (with timesteps, x0's grid has its smallest gaps widened)
        start = _loss(_student_states(model, student, noise, dode.lambdas, student.grid), targets, objective).item()
    best = {"loss": start, "theta": None}
    history = []

    def value_and_gradient(theta):
        lambdas, grid = unpack(theta)
        lam = torch.tensor(lambdas[1:], dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            loss = _loss(_student_states(model, student, noise, [0.0, *lam], grid), targets, objective)
            loss.backward()
        gradient = [lam.grad.numpy().copy()]
        value = loss.item()
        with torch.no_grad():
            for i in range(n_lam, len(theta)):
                shifted = theta.copy()
                shifted[i] += _FD_STEP
                moved = _loss(_student_states(model, student, noise, *unpack(shifted)), targets, objective).item()
                gradient.append([(moved - value) / _FD_STEP])
        history.append(value)
        if value < best["loss"]:
            best.update(loss=value, theta=theta.copy())
        bar.set_postfix(mse=f"{value:.3g}", refresh=False)
        bar.update()
        return value, np.concatenate(gradient)

    for p in frozen:
        p.requires_grad_(False)
    try:
        with tqdm(desc=f"refining {solver.name}", disable=not progress, unit="eval") as bar:
            bounds = [(None, None)] * n_lam + [(-_Z_BOUND, _Z_BOUND)] * (len(x0) - n_lam)
            result = scipy.optimize.minimize(value_and_gradient, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                             options={"maxiter": max_iterations})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    lambdas, grid = (dode.lambdas, dode.grid) if best["theta"] is None else unpack(best["theta"])
    refined = DODEScheduler(copy.deepcopy(dode.base_scheduler), lambdas, dode.num_inference_steps, dode.fit_info,
                            grid=None if grid is None else list(grid))  # its own base: set_grid changes it
    refined.fit_info["refine"] = {
        "mode": "joint+timesteps" if timesteps else "joint",
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
