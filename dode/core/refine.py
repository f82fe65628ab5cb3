"""Refinement (beyond the paper): all lambdas together, the time grid alone, or both, through the whole run.

The paper fits each lambda greedily against the teacher's state after its own step. Here the greedy lambdas
are only the start (``REFINEMENTS``): "joint" moves every lambda to minimise the mean squared distance of the
student's states to the teacher's; "timesteps" moves only the noise levels of the grid, every lambda held at 0
(the base solver on a learned grid: the learned-grid methods without D-ODE); "joint+timesteps" moves both. With
a grid the objective is the final samples' distance (the moving states have no fixed targets). The optimiser
(``OPTIMIZERS``) is Rprop over the distillation batch (``_rprop``): each parameter steps by its own step size against
its gradient's sign, so that the path depends on those signs alone and another CPU's last bits, which move the
gradient's size, leave it as it is (docs/grids-and-guard.md says what that measured). ``optimizer="lbfgs"``
(L-BFGS until an iteration gains less than ``TOLERANCE`` of the start value, the default before) fits as well but
parts with the last bits; ``optimizer="adam"`` anneals Adam's step to zero over a fixed number of iterations (an
earlier experiment for reproducible grids). The
network is frozen but differentiated through: the gradient with respect to the lambdas and to every noise level
comes from one backward pass through every model evaluation and scheduler step. The levels are one tensor in the
graph (``dode.core.solvers.set_levels``): the scheduler's coefficients are torch functions of them, and so is the
model's time input (``dode.core.schedule.differentiable_timestep``). ``gradient="fd"`` differences the grid
instead (one more student run per grid parameter: the method before, for ``make bench``'s comparison). The batch
can be split into micro-batches (the same gradient, less memory). DDIM's grid is learned on its exact grid form
(``dode.core.scheduler.to_grid_form``: iPNDM of order 1).

Every level of the grid moves. The first (``u = log(first / start)``) may go up as far as the schedule's largest
training level, where the samples' noise is, or down by a share of the span; the rest are parametrised so that the
grid stays strictly descending between the first level and the smallest training noise level: the gaps between
consecutive log-levels are ``softmax([z, 0])`` of that span, so any ``z`` is a valid grid (``z`` is kept in a box
so that no two levels merge in float32).
Several starts and the never-worse guard on validation seeds are ``dode.core.distill.refine_fit``'s.

On a float64 fitting batch (``dode.Teacher(precision="float64")``) the optimiser sees the objective and its
gradient rounded to ``ROUNDING_BITS`` bits (``rounded``): far coarser than the float64 arithmetic's own
differences between CPU kernels (about 1e-14 here), so those last bits no longer steer L-BFGS's path and line
searches. scipy's L-BFGS-B still computes its own steps on numpy's BLAS, whose kernel moves the iterates in
their last bits, and a flat valley can amplify that (docs/reproducing.md). In float32 the arithmetic's own
differences (about 1e-7) are too close to any useful rounding, so nothing is rounded there.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm

from .schedule import training_sigmas
from .scheduler import DODEScheduler, to_grid_form
from .timegrid import TimeGrid
from .sampling import integrate
from .solvers import GRID_SOLVERS, set_levels, solver_of

_FD_STEP = 1e-4  # finite-difference step in the grid parameters z
_MIN_GAP = 0.02  # smallest share of the log-sigma span between two grid levels at the start
#: the first level may come down from its start by at most this share of the log-span to the smallest training level
_FIRST_SPAN = 0.75
#: and go up from it as far as the schedule's largest training level (where the samples' noise is), less this in log:
#: held at or below its start, a refinement from a low first level (a learned grid alone, a "leading" or Karras
#: spacing) could never reach a minimum above it (scripts/learned_limit.py measured iPNDM NFE 4, UniPC NFE 4 and Heun
#: NFE 5 on gmm-digits trapped so)
_TOP_MARGIN = 1e-9
_Z_BOUND = 8.0  # |z| bound: no gap is below about e^-16 of another, so the levels stay distinct in float32
#: on a float64 fitting batch, the objective and its gradient reach the optimiser rounded to this many bits below
#: their largest entry (a relative 1e-6): L-BFGS loses nothing it uses (its tolerance is 1e-5), and what float64
#: rounding leaves between CPU kernels (about 1e-14) crosses a rounding boundary about once in 1e8 numbers
ROUNDING_BITS = 20


class Refinement(NamedTuple):
    """What a refinement (``distill(refine=mode)``) moves, and which teacher states it fits."""

    timesteps: bool  # it learns the time grid (solvers in ``dode.core.solvers.GRID_SOLVERS`` only)
    lambdas: bool  # it moves the lambdas (False: every lambda held at 0, the base solver on the learned grid)
    objective: str  # "all" (every state against its target, the greedy fit's sum) or "final" (the final samples)


#: each refinement of ``distill(refine=...)``. "timesteps" is a learned grid alone, every lambda held at 0: the base
#: solver on a learned grid (the idea of GITS, LD3, AYS)
REFINEMENTS: dict[str, Refinement] = {
    "joint": Refinement(timesteps=False, lambdas=True, objective="all"),
    "timesteps": Refinement(timesteps=True, lambdas=False, objective="final"),
    "joint+timesteps": Refinement(timesteps=True, lambdas=True, objective="final"),
}


def grid_from_params(z, first, lowest):
    """The descending grid [first, ...] whose log-level gaps are softmax([z, 0]) of log(first / lowest): numpy in,
    numpy out; tensors in, a tensor out (differentiable in ``z`` and ``first``: the refinement's levels)."""
    if not torch.is_tensor(z):
        return grid_from_params(torch.as_tensor(np.asarray(z, dtype=np.float64)),
                                torch.as_tensor(float(first), dtype=torch.float64), lowest).numpy()
    gaps = torch.softmax(torch.cat([z, z.new_zeros(1)]), dim=0)
    positions = torch.cat([gaps.new_zeros(1), torch.cumsum(gaps[:-1], dim=0)])
    return torch.exp(torch.log(first) - positions * torch.log(first / lowest))


def params_from_grid(grid: np.ndarray, lowest: float) -> np.ndarray:
    """The ``z`` of ``grid_from_params``; gaps under ``_MIN_GAP`` of the span are widened to it."""
    positions = np.log(grid[0] / np.append(grid, lowest)) / np.log(grid[0] / lowest)
    gaps = np.maximum(np.diff(positions), _MIN_GAP)
    return np.clip(np.log(gaps[:-1] / gaps[-1]), -_Z_BOUND, _Z_BOUND)


def rounded(values, bits: int = ROUNDING_BITS) -> np.ndarray:
    """``values`` (float64) rounded to the nearest multiple of 2^(e - bits), where 2^(e-1) <= their largest
    magnitude < 2^e: the same relative precision for every entry of a gradient, exactly representable, so two
    inputs that differ below that step give the same output unless they straddle a rounding boundary. Zeros and
    non-finite arrays come back unchanged."""
    values = np.asarray(values, dtype=np.float64)
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return values
    exponent = math.frexp(largest)[1] - bits
    return np.ldexp(np.round(np.ldexp(values, -exponent)), exponent)


def _student_states(model, student: DODEScheduler, noise: torch.Tensor, lambdas, grid) -> list[torch.Tensor]:
    """The student's state after every model evaluation (DDPM convention) from ``noise``, with the given lambdas
    (floats or tensors, lambda_0 included) and grid (None: its base scheduler's own; a tensor: levels that stay in
    autograd's graph, ``set_levels``); differentiable where autograd is on. The student itself is not changed: a
    shallow copy of its base scheduler runs on the grid."""
    base = copy.copy(student.base_scheduler)  # this run's: set_levels puts the graph's levels on it
    levels = grid if torch.is_tensor(grid) else None
    run = DODEScheduler(base, student.lambdas, student.num_inference_steps,
                        grid=None if grid is None or levels is not None else [float(s) for s in grid])
    run.set_timesteps(run.num_inference_steps, device=noise.device)
    if levels is not None:  # in place of the base's own levels, which it has the count of
        set_levels(base, levels)
    _, states = integrate(model, run, None, noise, record=True, lambdas=lambdas, grad=torch.is_grad_enabled())
    return states[1:]


def _loss(states, targets, objective: str) -> torch.Tensor:
    """Mean squared distance to the targets: of the final samples (to the last target), or averaged over every
    state."""
    pairs = [(states[-1], targets[-1])] if objective == "final" else list(zip(states, targets))
    return sum(torch.mean((x.double() - y.double().to(x.device)) ** 2) for x, y in pairs) / len(pairs)


#: the feature spaces of a ``MomentTerm``: the guard's Frechet-distance spaces that are cheap and differentiable
MOMENT_FEATURES = ("pixel", "digits")


class MomentTerm(NamedTuple):
    """A term of the final objective beyond the squared distance (an option: ``refine_fit(moment_weights=...)``):
    ``weight`` x ``balance`` x the squared distance between the means and between the covariances
    (``moment_distance``) of the ``features`` of the student's final samples and of the targets, over the whole
    fitting batch. The squared distance to each seed's solution rewards a sampler that lands near it on average,
    which at few steps costs spread; a Frechet distance counts spread (docs/grids-and-guard.md). ``balance``: the
    squared distance over the moment distance at the refinement's reference point (``moment_balance``), so that at
    weight 1 the two weigh alike there."""

    weight: float
    features: str = "pixel"
    balance: float = 1.0

    def record(self) -> dict:
        return {"weight": self.weight, "features": self.features, "balance": self.balance}


@functools.lru_cache(maxsize=None)
def _digits_classifier():
    """The FD-digits classifier in float64, frozen (the gradient flows through it, not into it)."""
    from ..evaluation.features import DigitsClassifier

    classifier = DigitsClassifier.from_pretrained().double().eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier


def moment_features(x: torch.Tensor, features: str) -> torch.Tensor:
    """(N, D) float64 features of samples ``x`` in ``features`` (``MOMENT_FEATURES``), differentiable in ``x``:
    the pixels, or the FD-digits classifier's penultimate layer (``dode.evaluation.features``)."""
    if features == "pixel":
        return x.double().flatten(1)
    if features == "digits":
        return _digits_classifier().to(x.device).features(x.double())
    raise ValueError(f"moment features must be one of {MOMENT_FEATURES}, got {features!r}")


def moments_of(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased covariance) of features ``f`` (N, D)."""
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def moment_distance(x: torch.Tensor, target: tuple, features: str) -> torch.Tensor:
    """|mu - mu_t|^2 + |Sigma - Sigma_t|_F^2 between the moments of ``x``'s features and ``target`` (``moments_of``
    the targets' features): zero where the two batches agree to second order, as a Frechet distance is."""
    mu, sigma = moments_of(moment_features(x, features))
    return torch.sum((mu - target[0]) ** 2) + torch.sum((sigma - target[1]) ** 2)


def moment_balance(model, scheduler: DODEScheduler, noise: torch.Tensor, targets: torch.Tensor, features: str) -> float:
    """``MomentTerm.balance`` at ``scheduler`` on the fitting batch ``noise``: its final samples' mean squared
    distance to the last of ``targets`` over their ``moment_distance`` (1 where that is 0). One run, no gradient."""
    with torch.no_grad():
        final = targets[-1].to(noise.device)
        states = _student_states(model, scheduler, noise, list(scheduler.lambdas), scheduler.grid)
        squared = float(_loss(states, [final], "final"))
        term = float(moment_distance(states[-1], moments_of(moment_features(final, features)), features))
    return squared / term if term > 0 and math.isfinite(term) else 1.0


class Optimised(NamedTuple):
    """What ``optimise`` found: the best point the optimiser visited, and how it got there."""

    scheduler: DODEScheduler
    mode: str  # the ``REFINEMENTS`` name of what moved
    objective: str  # "all" or "final" states
    mse_start: float
    mse_refined: float
    iterations: int  # the optimiser's iterations
    evaluations: int  # objective evaluations (line searches included)
    student_runs: int  # forward sampling runs of the student on the fitting batch (finite differences included)
    seconds: float
    message: str  # the optimiser's
    history: list  # the objective at every evaluation, in order
    gradient: str = "autograd"  # how d loss / d grid was had (``GRADIENTS``)
    backward_passes: int = 0  # backward passes through a whole run on the fitting batch
    optimizer: str = "lbfgs"  # which one ran (``OPTIMIZERS``)
    validation: float | None = None  # with a ``monitor``: the returned scheduler's score on it
    checks: tuple = ()  # with a ``monitor``: its score at each check, in order
    stopped_early: bool = False  # the monitor stopped the optimiser (``patience`` checks in a row, none better)
    moments: MomentTerm | None = None  # the objective's moment-matching term, where it had one

    def record(self) -> dict:
        """The refinement as ``fit_info["refine"]`` reports it."""
        objective = f"mean squared distance to the teacher, {self.objective} states"
        if self.moments is not None:
            objective += f", plus {self.moments.weight:g} x the moment distance in {self.moments.features} features"
        return {"mode": self.mode, "objective": objective,
                **({"moments": self.moments.record()} if self.moments is not None else {}),
                "mse_start": self.mse_start, "mse_refined": self.mse_refined, "iterations": self.iterations,
                "evaluations": self.evaluations, "student_runs": self.student_runs,
                "backward_passes": self.backward_passes, "gradient": self.gradient, "optimizer": self.optimizer,
                "seconds": self.seconds,
                "optimizer_message": self.message, "history": self.history,
                **({"checks": list(self.checks), "stopped_early": self.stopped_early} if self.checks else {})}


class _Objective:
    """theta -> (the mean squared distance to the teacher over its start value, its gradient) for the optimiser, with
    theta the moving lambdas (lambda_1 on) and, with ``timesteps``, u and z of the grid; remembers every value (as a
    mean squared distance) and the best point. The gradient: ``"autograd"`` (one backward pass through the run, levels
    included) or ``"fd"`` (the lambdas by autograd, each grid parameter by a forward difference: one more run each).
    ``batch_size``: the fitting batch in micro-batches of at most that many samples, each run and differentiated on its
    own and the gradients summed (the loss is a mean over samples, so the sum is exact)."""

    def __init__(self, model, student: DODEScheduler, noise, targets, objective: str, lambdas: bool,
                 timesteps: bool, start_grid: np.ndarray, lowest: float, gradient: str = "autograd",
                 batch_size: int | None = None, moments: MomentTerm | None = None):
        self.model, self.student, self.noise, self.targets, self.objective = model, student, noise, targets, objective
        self.moments, self.target_moments = moments, None
        if moments is not None:  # the targets' moments, once
            with torch.no_grad():
                self.target_moments = moments_of(moment_features(targets[-1].to(noise.device), moments.features))
        self.lambdas, self.timesteps, self.top, self.lowest = lambdas, timesteps, start_grid[0], lowest
        self.n_lam = student.nfe - 1 if lambdas else 0
        self.gradient, self.scale = gradient, 1.0
        size = len(noise) if batch_size is None else batch_size
        self.parts = [slice(i, min(i + size, len(noise))) for i in range(0, len(noise), size)]
        self.history, self.best, self.best_theta, self.bar, self.backward = [], math.inf, None, None, 0

    def unpack(self, theta):
        """(every lambda, lambda_0 = 0 included; the grid) at ``theta``: tensors for a tensor ``theta`` (in its
        graph), floats and a numpy grid for a numpy one."""
        n, tensor = self.n_lam, torch.is_tensor(theta)
        params = theta if tensor else torch.as_tensor(np.asarray(theta, dtype=np.float64))
        grid = self.student.grid
        if self.timesteps:
            grid = grid_from_params(params[n + 1:], self.top * torch.exp(params[n]), self.lowest)
            grid = grid if tensor else grid.numpy()
        lambdas = [0.0, *(params[:n] if tensor else params[:n].tolist())] if self.lambdas else list(
            self.student.lambdas)
        return lambdas, grid

    def loss(self, lambdas, grid) -> torch.Tensor:
        """The mean squared distance over the whole batch (no gradient: one run per micro-batch)."""
        return sum(self._part(lambdas, grid, part) for part in self.parts)

    def _part(self, lambdas, grid, part: slice) -> torch.Tensor:
        """A micro-batch's share of the mean squared distance (its mean, weighted by its share of the batch)."""
        states = _student_states(self.model, self.student, self.noise[part], lambdas, grid)
        weight = (part.stop - part.start) / len(self.noise)
        value = _loss(states, [t[part] for t in self.targets], self.objective) * weight
        if self.moments is not None:  # over the whole batch: one part (optimise checks)
            term = moment_distance(states[-1], self.target_moments, self.moments.features)
            value = value + self.moments.weight * self.moments.balance * term
        return value

    def __call__(self, theta):
        try:
            value, gradient = self._value_and_gradient(theta)
        except FloatingPointError:  # the student blew up (NaN or inf) at a shifted point
            value, gradient = math.inf, None
        if not (math.isfinite(value) and gradient is not None and np.isfinite(gradient).all()):
            value, gradient = math.inf, np.zeros(len(theta))  # a trial too far out: both optimisers back off from inf
        self.history.append(value)
        scaled, gradient, seen = value / self.scale, gradient / self.scale, value
        if self.noise.dtype == torch.float64 and math.isfinite(value):  # what the optimiser sees: the same anywhere
            scaled, gradient = float(rounded([scaled])[0]), rounded(gradient)
            seen = scaled * self.scale  # and the best point by it (the start is scale: 1 exactly)
        if seen < self.best:
            self.best, self.best_theta = seen, theta.copy()
        self.bar.set_postfix(mse=f"{value:.3g}", refresh=False)
        self.bar.update()
        return scaled, gradient

    def _value_and_gradient(self, theta):
        """(the mean squared distance, its gradient in theta): autograd through every micro-batch's run."""
        exact = self.gradient == "autograd"
        params = torch.tensor(theta if exact else theta[:self.n_lam], dtype=torch.float64, requires_grad=True)
        fixed = None if exact else self.unpack(theta)[1]  # "fd": the grid as numbers, differenced below
        value = 0.0
        with torch.enable_grad():
            for part in self.parts:
                lambdas, grid = self.unpack(params) if exact else ([0.0, *params] if self.lambdas else
                                                                   list(self.student.lambdas), fixed)
                loss = self._part(lambdas, grid, part)
                if params.numel():
                    loss.backward()
                    self.backward += 1
                value += loss.item()
        gradient = params.grad.numpy().copy() if params.grad is not None else np.zeros(params.numel())
        if exact:
            return value, gradient
        return value, np.concatenate([gradient, self._differences(theta, value)])

    def _differences(self, theta, value: float) -> np.ndarray:
        """d loss / d grid parameter by forward differences, one student run each (``gradient="fd"``)."""
        out = []
        with torch.no_grad():
            for i in range(self.n_lam, len(theta)):
                # the first level's u is bounded above by 0 (its start): a backward difference stays inside
                step = -_FD_STEP if i == self.n_lam else _FD_STEP
                shifted = theta.copy()
                shifted[i] += step
                out.append((self.loss(*self.unpack(shifted)).item() - value) / step)
        return np.array(out)


#: how ``optimise`` gets d loss / d grid: "autograd" (exact: one backward pass through each run, the levels a
#: tensor in the graph) or "fd" (a forward difference per grid parameter: one more student run each, the method
#: before the exact gradient, kept for ``make bench``'s comparison)
GRADIENTS = ("autograd", "fd")
#: L-BFGS stops when an iteration lowers the objective by less than this share of its start value (or at
#: ``max_iterations``): a tolerance, so that the default refinement converges
TOLERANCE = 1e-5
#: the optimisers of ``optimise``: "rprop" (``_rprop``, the default: its path depends on the gradient's signs alone,
#: so a learned grid comes out the same under another CPU's last bits, docs/grids-and-guard.md), "lbfgs" (scipy's
#: L-BFGS-B to ``TOLERANCE``, the default before: as good a fit, but its path parts with the last bits) or "adam"
#: (projected Adam, its step annealed from ``LEARNING_RATE`` to zero over exactly ``max_iterations`` iterations: an
#: earlier experiment for reproducible grids, which reached less)
OPTIMIZERS = ("rprop", "lbfgs", "adam")
OPTIMIZER = "rprop"
#: Adam's first step size, in the units of theta (lambdas; u and z of the grid), annealed on a half cosine to 0
LEARNING_RATE = 0.1
#: Rprop (``_rprop``): every parameter's first step, the largest and the smallest, in the units of theta; a step
#: grows by RPROP_FACTORS[0] while its gradient keeps its sign and shrinks by RPROP_FACTORS[1] where the sign turns;
#: the run has converged once no step is above RPROP_SETTLED
RPROP_STEP, RPROP_MAX, RPROP_MIN, RPROP_SETTLED = 2.0 ** -5, 1.0, 2.0 ** -20, 2.0 ** -12
RPROP_FACTORS = (1.2, 0.5)
#: early stopping (``Monitor``): Rprop or L-BFGS stops after this many checks on the validation seeds in a row without a
#: better score (with 2, a run stopped where a later iterate would have validated better in 3 of 6 gmm-digits cells
#: measured; with 5 in none of the 6, at 1-17 % fewer model evaluations than without stopping:
#: scripts/refine_patience.py)
PATIENCE = 5
#: several starts of a refinement (``dode.core.distill.refine_fit``) are each run this many iterations first (at
#: most a third of the refinement's, so that the best has the rest), and the one that then validates best goes on.
#: With 10, the default before, gmm-digits' DDIM NFE 4 and 5, iPNDM NFE 3 and UniPC NFE 5 went on from a start that
#: led to a worse fit than another would have; with 30 they met issue 25's limits, at 1.4 times the model evaluations
#: (docs/grids-and-guard.md, "Longer probes, measured")
PROBE_ITERATIONS = 30
#: with the guard, a refinement's long run is scored on the validation seeds every this many iterations (``Monitor``)
CHECK_EVERY = 10


def optimise(model, scheduler: DODEScheduler, noise: torch.Tensor, targets: torch.Tensor, *, timesteps: bool = False,
             lambdas: bool = True, objective: str = "final", max_iterations: int = 200,
             tolerance: float = TOLERANCE, gradient: str = "autograd", batch_size: int | None = None,
             optimizer: str = OPTIMIZER, monitor: "Monitor | None" = None, moments: MomentTerm | None = None,
             progress: bool = True) -> Optimised:
    """The lambdas (``lambdas``) and grid (``timesteps``) of ``scheduler`` that minimise the mean squared distance of
    the student's states from ``noise`` to the teacher's ``targets`` (nfe, batch, ...; DDPM convention), starting from
    ``scheduler``'s. ``objective``: "all" (every state against its target, the sum the greedy fit minimises one step at
    a time) or "final" (the final samples only; the one choice with ``timesteps``, whose moving states have no fixed
    targets). ``optimizer`` (``OPTIMIZERS``): Rprop (the default) runs until every step has settled, or
    ``max_iterations`` (one objective evaluation each, and one at the end); L-BFGS until an iteration gains less than
    ``tolerance`` of the start value, or ``max_iterations`` (and twice as many objective evaluations, line searches
    included); Adam runs exactly ``max_iterations`` iterations, its step annealed to zero (one evaluation each, and one
    at the end). ``gradient``: "autograd" (exact, the default) or "fd" (finite differences in the grid; ``GRADIENTS``).
    ``batch_size``: micro-batches of at most that many samples (bounded memory on a real network; the gradient is the
    same). ``lambdas=False`` holds the lambdas at their start (with a zero start: a learned grid alone, the base
    solver's). DDIM's grid is learned on its grid form (``dode.core.scheduler.to_grid_form``). Never returns a worse fit
    than its start: the best point the optimiser visits is kept (``Optimised.scheduler``). With a ``monitor`` (not
    Adam): early stopping on held-out seeds, the best-scoring of the start, every ``monitor.every``-th iterate and the
    best point by the objective is returned instead, and the optimiser stops once ``monitor.patience`` checks in a row
    score no better (``Monitor``). ``moments``: a moment-matching term added to the final objective (``MomentTerm``;
    over the whole batch, so no micro-batches)."""
    solver = _check_optimise(scheduler, timesteps, lambdas, objective, gradient, batch_size, tolerance, optimizer)
    _check_moments(moments, objective, batch_size, len(noise))
    began = time.perf_counter()
    form = to_grid_form(scheduler) if timesteps else scheduler
    f, x0, bounds = objective_at_start(model, form, noise, targets, objective=objective, lambdas=lambdas,
                                       timesteps=timesteps, gradient=gradient, batch_size=batch_size,
                                       moments=moments)
    student = f.student
    with torch.no_grad():  # the start as given (with timesteps, x0's grid has its smallest gaps widened)
        f.best = start = f.loss(student.lambdas, student.grid).item()
    f.scale = start if start > 0 else 1.0

    def at(theta):  # the scheduler at theta, on its own base (set_grid changes it): the grid form's, where the grid
        found, grid = (student.lambdas, student.grid) if theta is None else f.unpack(theta)  # was learned on it
        return DODEScheduler(copy.deepcopy(form.base_scheduler), found, scheduler.num_inference_steps,
                             grid=None if grid is None else list(grid), spacing=scheduler.spacing)

    if monitor is not None:
        if optimizer == "adam":
            raise ValueError("a monitor (early stopping) needs optimizer='lbfgs' or 'rprop'")
        monitor.begin(at)
    result = _minimise(model, f, x0, bounds, optimizer, max_iterations, tolerance, progress,
                       f"refining {solver.name}", monitor)
    refined, score, checks, early = at(f.best_theta), None, (), False
    if monitor is not None:
        refined, score = monitor.end(f.best_theta)
        checks, early = tuple(monitor.scores), monitor.stopped
    runs = len(f.history) * (1 if gradient == "autograd" else 1 + len(x0) - f.n_lam)
    return Optimised(refined, mode_of(timesteps=timesteps, lambdas=lambdas), objective, start, f.best,
                     int(result.nit), len(f.history), runs, time.perf_counter() - began, str(result.message),
                     f.history, gradient, f.backward // len(f.parts), optimizer, score, checks, early, moments)


def check_patience(patience, name: str = "patience") -> None:
    """A patience (``Monitor``'s, ``distill``'s ``refine_patience``) is a positive integer or None."""
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {patience!r}")


class Monitor:
    """Early stopping of ``optimise`` on held-out seeds: ``judge`` (a scheduler -> its score, lower is better: the
    never-worse guard's ``dode.core.guard.Judge``) scores the iterate every ``every`` iterations; the optimiser stops
    once ``patience`` checks in a row have not beaten the best score so far (``patience=None``: never, the checks only
    choose). At the end the best point by the objective is scored too, unless it is the last point checked, and the
    best-scoring of all is returned with its score. ``start_score``: the start's score, where the start is itself a
    candidate (a refined point continued; None: it is scored first); ``math.inf``: it is not (a refinement's own
    start, which the never-worse guard judges apart), unless nothing else was scored.

    The objective (the distance to the reference on the fitting batch) goes on falling where the held-out score has
    stopped following it: on gmm-digits 26 of 120 continued refinements validated worse at their end than where they
    were continued from (results of d2b736e), and D-DPM-Solver++ at NFE 10 (the default call) validates at 0.00014
    from its best checked iterate against 0.0115 from the best point by the objective."""

    def __init__(self, judge, every: int = CHECK_EVERY, patience: int | None = PATIENCE,
                 start_score: float | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        check_patience(patience)
        self.judge, self.every, self.patience, self.start_score = judge, every, patience, start_score
        self.scores, self.stopped = [], False

    def begin(self, at) -> None:
        """Before the first iteration: ``at`` maps theta (None: the start as given) to its scheduler."""
        self.at, self.iteration, self.misses, self.last = at, 0, 0, None
        self.best_theta = None  # None: the start
        self.best = self.start_score if self.start_score is not None else float(self.judge(at(None)))

    def __call__(self, intermediate_result) -> None:
        """scipy's callback after each iteration (``intermediate_result.x``: the iterate)."""
        self.iteration += 1
        if self.iteration % self.every:
            return
        theta = np.array(intermediate_result.x, dtype=np.float64)
        self.last = theta
        self._check(theta)
        if self.patience is not None and self.misses >= self.patience:
            self.stopped = True
            raise StopIteration

    def _check(self, theta) -> None:
        score = float(self.judge(self.at(theta)))
        self.scores.append(score)
        if score < self.best:
            self.best, self.best_theta, self.misses = score, theta, 0
        else:
            self.misses += 1

    def end(self, best_by_objective) -> tuple:
        """(the best-scoring scheduler, its score), the best point by the objective checked too."""
        if best_by_objective is not None and not (self.last is not None and np.array_equal(self.last,
                                                                                             best_by_objective)):
            self._check(np.array(best_by_objective, dtype=np.float64))
        if self.best_theta is None and math.isinf(self.best):  # nothing but the start: it is the result
            self.best = float(self.judge(self.at(None)))
        return self.at(self.best_theta), self.best


def objective_at_start(model, form: DODEScheduler, noise: torch.Tensor, targets, *, objective: str = "final",
                       lambdas: bool = True, timesteps: bool = False, gradient: str = "autograd",
                       batch_size: int | None = None,
                       moments: MomentTerm | None = None) -> tuple[_Objective, np.ndarray, list]:
    """(``optimise``'s objective, its start point theta, L-BFGS's bounds) for ``form`` (a scheduler that takes the
    grid, where ``timesteps``): the lambdas from lambda_1 on, then u = log(first level / its start), between
    -``_FIRST_SPAN`` of the log-span to the smallest training level and the schedule's largest level, and the gaps
    below it. ``make bench`` times evaluations of it."""
    student = copy.deepcopy(form)
    student.set_timesteps(student.num_inference_steps, device=noise.device)
    start_grid = np.asarray(student.grid if student.grid is not None else TimeGrid.of(student).steps,
                            dtype=np.float64)
    levels = training_sigmas(model.scheduler_config)
    lowest, highest = float(levels[0]), float(levels[-1])
    f = _Objective(model, student, noise, targets, objective, lambdas, timesteps, start_grid, lowest, gradient,
                   batch_size, moments)
    x0 = np.array(student.lambdas[1:] if lambdas else [], dtype=np.float64)
    bounds = [(None, None)] * f.n_lam
    if timesteps:
        z = params_from_grid(start_grid, lowest)
        x0 = np.concatenate([x0, [0.0], z])
        up = max(0.0, float(np.log(highest / f.top)) - _TOP_MARGIN)
        bounds += [(-_FIRST_SPAN * np.log(f.top / lowest), up)] + [(-_Z_BOUND, _Z_BOUND)] * len(z)
    return f, x0, bounds


def _check_optimise(scheduler, timesteps: bool, lambdas: bool, objective: str, gradient: str, batch_size,
                    tolerance, optimizer: str = OPTIMIZER) -> object:
    """``optimise``'s checks of its options, before any work; returns the solver."""
    solver = solver_of(scheduler)
    if timesteps and not solver.takes_grid:
        raise ValueError(f"{solver.name} cannot take a custom time grid; solvers that can: {', '.join(GRID_SOLVERS)}")
    if objective not in ("all", "final") or (timesteps and objective != "final"):
        raise ValueError(f"objective must be 'all' or 'final' ('final' with timesteps), got {objective!r}")
    if not (lambdas or timesteps):
        raise ValueError("nothing to refine: lambdas=False needs timesteps=True")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    return solver


def _check_moments(moments: MomentTerm | None, objective: str, batch_size, samples: int) -> None:
    """``optimise``'s checks of a moment-matching term."""
    if moments is None:
        return
    if objective != "final":
        raise ValueError("a moment-matching term needs objective='final' (the final samples' moments)")
    if moments.features not in MOMENT_FEATURES:
        raise ValueError(f"moment features must be one of {MOMENT_FEATURES}, got {moments.features!r}")
    if not (math.isfinite(moments.weight) and moments.weight >= 0 and math.isfinite(moments.balance)
            and moments.balance > 0):
        raise ValueError(f"a moment term needs a finite weight >= 0 and balance > 0, got {moments!r}")
    if batch_size is not None and batch_size < samples:
        raise ValueError("a moment-matching term is over the whole fitting batch: it cannot be split into "
                         f"micro-batches (batch_size {batch_size} < {samples} samples)")


def _minimise(model, f: _Objective, x0, bounds, optimizer: str, max_iterations: int, tolerance: float,
              progress: bool, desc: str, monitor: Monitor | None = None):
    """``optimizer`` ("rprop": ``_rprop``; "lbfgs": scipy's L-BFGS-B; "adam": ``_adam``) on ``f`` from ``x0``, with
    the network's parameters frozen meanwhile (the gradient flows through the network to the lambdas and levels,
    never into its weights) and a progress bar of objective evaluations."""
    frozen = [p for p in model.parameters() if p.requires_grad] if hasattr(model, "parameters") else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with tqdm(desc=desc, disable=not progress, unit="eval", total=max_iterations + 1 if optimizer == "adam"
                  else None) as f.bar:
            if optimizer == "adam":
                return _adam(f, x0, bounds, max_iterations)
            if optimizer == "rprop":
                return _rprop(f, x0, bounds, max_iterations, monitor)
            return scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds, callback=monitor,
                                           options={"maxiter": max_iterations, "maxfun": 2 * max_iterations,
                                                    "ftol": tolerance, "gtol": 1e-12})
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _adam(f: _Objective, x0, bounds, iterations: int, rate: float = LEARNING_RATE) -> scipy.optimize.OptimizeResult:
    """Projected Adam on ``f`` from ``x0``: ``iterations`` steps (beta 0.9, 0.999), the step size annealed from
    ``rate`` to 0 on a half cosine, each step clipped into ``bounds``. Near the end the steps shrink to nothing, so
    the iterates settle; two runs whose arithmetic differs in the last bits still part along nearly flat
    directions of the objective (measured in docs/reproducing.md). A step to a point where the student blows up
    (an infinite objective) is taken back and the step size halved from then on."""
    low = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    high = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    x = np.clip(np.asarray(x0, dtype=np.float64), low, high)
    m, v, shrink, previous = np.zeros_like(x), np.zeros_like(x), 1.0, None
    for k in range(1, iterations + 1):
        value, gradient = f(x)
        if not math.isfinite(value) and previous is not None:
            x, shrink = previous, shrink / 2  # back to the last finite point, with smaller steps
            continue
        m, v = 0.9 * m + 0.1 * gradient, 0.999 * v + 0.001 * gradient ** 2
        step = rate * shrink * 0.5 * (1 + math.cos(math.pi * (k - 1) / iterations))
        previous = x
        x = np.clip(x - step * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8), low, high)
    f(x)  # the last point (``f`` keeps the best it saw)
    return scipy.optimize.OptimizeResult(x=x, nit=iterations, message=f"annealed Adam: {iterations} iterations")


def _rprop(f: _Objective, x0, bounds, iterations: int, monitor: Monitor | None = None) -> scipy.optimize.OptimizeResult:
    """Rprop (iRprop-) on ``f`` from ``x0``, each step clipped into ``bounds``: every parameter moves by its own step
    against its gradient's sign; the step grows while the sign holds and shrinks where it turns (and that parameter
    rests for one iteration). The path depends on the gradient's signs alone, never on its size or on the objective's
    value: two runs whose arithmetic differs in the last bits take the same steps wherever each gradient entry is
    further from zero than that difference; a parameter whose entry is that near zero mostly sits near its optimum,
    its step shrinking, so the runs part by little (further where the objective is flat along it). Stops when no
    step is above ``RPROP_SETTLED`` (a parameter held at a bound it pushes against aside), when ``monitor`` stops it,
    or after ``iterations`` (one evaluation each, and one at the end). A point where the student blows up (an
    infinite objective) is taken back and every step halved."""
    low = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    high = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    x = np.clip(np.asarray(x0, dtype=np.float64), low, high)
    step, before, previous = np.full_like(x, RPROP_STEP), np.zeros_like(x), None
    grow, shrink = RPROP_FACTORS
    message, k = f"Rprop: {iterations} iterations", 0
    for k in range(1, iterations + 1):
        value, gradient = f(x)
        if not math.isfinite(value):
            if previous is None:
                message = "Rprop: the start is not finite"
                break
            x, step, before = previous, step / 2, np.zeros_like(x)
            continue
        sign = np.sign(gradient)
        turn = sign * before
        step = np.where(turn > 0, np.minimum(step * grow, RPROP_MAX),
                        np.where(turn < 0, np.maximum(step * shrink, RPROP_MIN), step))
        sign = np.where(turn < 0, 0.0, sign)
        previous, before = x, sign
        x = np.clip(x - sign * step, low, high)
        pinned = ((x == high) & (sign < 0)) | ((x == low) & (sign > 0))  # held at a bound it pushes against
        if monitor is not None:
            try:
                monitor(scipy.optimize.OptimizeResult(x=x))
            except StopIteration:
                message = f"Rprop: stopped early after {k} iterations"
                break
        if np.all(pinned | (step <= RPROP_SETTLED)):
            message = f"Rprop: converged after {k} iterations (every step at most {RPROP_SETTLED:g})"
            break
    f(x)  # the last point (``f`` keeps the best it saw)
    return scipy.optimize.OptimizeResult(x=x, nit=k, message=message)


def mode_of(*, timesteps: bool, lambdas: bool) -> str:
    """The ``REFINEMENTS`` name of what a refinement moves."""
    return next(name for name, o in REFINEMENTS.items() if o.timesteps == timesteps and o.lambdas == lambdas)
