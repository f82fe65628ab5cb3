"""The base solvers: diffusers schedulers configured as in the paper, counted in NFE.

A new solver is one entry in ``_SOLVERS``: the scheduler class, its settings, how many model
evaluations (NFE) one ``set_timesteps(n)`` costs, and whether its steps read their noise levels from
``scheduler.sigmas`` (then ``set_grid`` can give it any time grid). Nothing else in the package is
solver-specific.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)


@dataclass(frozen=True)
class Solver:
    """A base solver: a diffusers scheduler class with fixed settings and its NFE <-> steps map."""

    name: str
    scheduler_class: type
    settings: dict = field(default_factory=dict)
    #: model evaluations made by ``set_timesteps(steps)``
    nfe_of_steps: Callable[[int], int] = lambda steps: steps
    min_steps: int = 1
    paper: str = ""
    #: its ``step`` reads every noise level from ``scheduler.sigmas``, so ``set_grid`` can move them
    custom_grid: bool = False

    def steps_for(self, nfe: int) -> int:
        """The ``num_inference_steps`` that costs exactly ``nfe`` model evaluations (ValueError if none)."""
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
            raise TypeError(f"nfe must be an integer, got {nfe!r}")
        possible = [s for s in range(self.min_steps, nfe + 1) if self.nfe_of_steps(s) == nfe]
        if not possible:
            smallest = self.nfe_of_steps(self.min_steps)
            valid = sorted({self.nfe_of_steps(s) for s in range(self.min_steps, self.min_steps + 6)})
            hint = f"NFE must be at least {smallest}" if nfe < smallest else f"possible NFE: {', '.join(map(str, valid))}, ..."
            raise ValueError(f"solver {self.name!r} cannot make exactly {nfe} model evaluations ({hint})")
        return possible[0]


_SOLVERS = [
    Solver("ddim", DDIMScheduler,
           dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"), paper="DDIM"),
    # PLMS: the warm-up evaluates the first timestep twice, so n steps cost n + 1 NFE.
    Solver("pndm", PNDMScheduler,
           dict(skip_prk_steps=True, set_alpha_to_one=True, timestep_spacing="trailing"),
           nfe_of_steps=lambda steps: steps + 1, min_steps=2, paper="PNDM"),
    Solver("dpm_solver_2", DPMSolverSinglestepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero"),
           paper="DPM-Solver", custom_grid=True),
    Solver("dpm_solver_pp_2m", DPMSolverMultistepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", timestep_spacing="trailing", final_sigmas_type="zero"),
           paper="DPM-Solver++", custom_grid=True),
    Solver("deis", DEISMultistepScheduler,
           dict(solver_order=3, timestep_spacing="trailing"), paper="DEIS", custom_grid=True),
    # Heun: two evaluations per step except the last (an Euler step to sigma = 0), 2n - 1 NFE.
    Solver("heun", HeunDiscreteScheduler,
           dict(use_karras_sigmas=True, timestep_spacing="linspace"),
           nfe_of_steps=lambda steps: 2 * steps - 1, paper="EDM", custom_grid=True),
    Solver("unipc", UniPCMultistepScheduler,
           dict(solver_order=2, solver_type="bh2", timestep_spacing="trailing", final_sigmas_type="zero"),
           paper="UniPC", custom_grid=True),
]

#: the solver names, in the order of the paper's tables
SOLVERS: tuple[str, ...] = tuple(s.name for s in _SOLVERS)
_BY_NAME = {s.name: s for s in _SOLVERS}
#: the solvers whose time grid ``set_grid`` can move (``refine="joint+timesteps"``)
GRID_SOLVERS: tuple[str, ...] = tuple(s.name for s in _SOLVERS if s.custom_grid)


def get_solver(name: str) -> Solver:
    if isinstance(name, Solver):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


def solver_of(scheduler) -> Solver:
    """The solver a (possibly D-ODE wrapped) scheduler instance belongs to, found by its class."""
    base = getattr(scheduler, "base_scheduler", scheduler)
    for solver in _SOLVERS:
        if type(base) is solver.scheduler_class:
            return solver
    raise ValueError(
        f"no NFE rule for {type(base).__name__}; supported schedulers: "
        + ", ".join(s.scheduler_class.__name__ for s in _SOLVERS)
    )


def make_scheduler(name: str, model, **overrides):
    """A diffusers scheduler for solver ``name`` on ``model``'s noise schedule, as the paper configures it."""
    solver = get_solver(name)
    config = {**model.scheduler_config, **solver.settings, **overrides}
    return solver.scheduler_class.from_config(config)


def is_sigma_space(scheduler) -> bool:
    """True for schedulers whose state is x0 + sigma * noise (Heun, Euler, ...) rather than the DDPM x_t."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0


def state_sigmas(scheduler) -> torch.Tensor:
    """Noise level (sigma, float64) of the state that each model evaluation's ``step`` returns.

    ``step`` number k leaves the sample at the noise level of evaluation k + 1; the last one at sigma = 0
    (every solver here ends on the clean sample). Length: the number of model evaluations.
    """
    grid = _custom_grid(scheduler)
    if grid is not None:
        return torch.cat([torch.as_tensor(grid[1:], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    if is_sigma_space(scheduler):
        return scheduler.sigmas.double().cpu()[1 : len(scheduler.timesteps) + 1]
    alphas = scheduler.alphas_cumprod.double().cpu()
    t_next = scheduler.timesteps[1:].long().cpu()
    sigma_next = torch.sqrt((1 - alphas[t_next]) / alphas[t_next])
    return torch.cat([sigma_next, torch.zeros(1, dtype=torch.float64)])


def start_sigma(scheduler) -> float:
    """Noise level of the initial state (the first model evaluation)."""
    if is_sigma_space(scheduler):
        return float(scheduler.sigmas[0])
    if _custom_grid(scheduler) is not None:
        return float(_custom_grid(scheduler)[0])
    alpha = scheduler.alphas_cumprod.double()[int(scheduler.timesteps[0])]
    return float(torch.sqrt((1 - alpha) / alpha))


def to_ddpm_state(x: torch.Tensor, sigma, scheduler) -> torch.Tensor:
    """A scheduler's sample in the DDPM convention x_t = sqrt(abar) x0 + sqrt(1 - abar) noise.

    Sigma-space samples x0 + sigma * noise are divided by sqrt(1 + sigma^2); DDPM-style ones pass through.
    All comparisons (teacher targets, trajectories) happen in this one convention.
    """
    if not is_sigma_space(scheduler):
        return x
    return x / float(np.sqrt(1.0 + float(sigma) ** 2))


def time_grid(scheduler) -> np.ndarray:
    """The distinct noise levels (float64, descending) at which a scheduler, after ``set_timesteps``, evaluates
    the model: one per step (Heun evaluates each level but the first twice, once per stage)."""
    levels = np.concatenate([[start_sigma(scheduler)], state_sigmas(scheduler).numpy()[:-1]])
    return levels[np.concatenate([[True], np.abs(np.diff(levels)) > 1e-9 * levels[:-1]])]


def set_grid(scheduler, grid) -> None:
    """Move the noise levels of a scheduler's steps, after its ``set_timesteps``, to ``grid``.

    ``grid``: one positive noise level per step, strictly descending, as ``time_grid`` returns them; the
    final (clean) level stays the scheduler's own. The model is then called at the fractional training
    timesteps of these levels. Only for solvers with ``custom_grid`` (their steps read ``scheduler.sigmas``).
    """
    from .models import sigma_to_timestep, training_sigmas

    solver = solver_of(scheduler)
    if not solver.custom_grid:
        raise ValueError(
            f"{type(scheduler).__name__} ({solver.name}) cannot take a custom time grid: its steps use integer "
            f"timesteps; solvers that can: {', '.join(GRID_SOLVERS)}"
        )
    grid = np.asarray(grid, dtype=np.float64)
    current = time_grid(scheduler)
    if grid.shape != current.shape:
        raise ValueError(f"this schedule has {len(current)} steps, so the grid needs {len(current)} noise levels, got {grid.shape}")
    if not (np.all(grid > 0) and np.all(np.diff(grid) < 0)):
        raise ValueError(f"a time grid must be positive and strictly descending, got {grid.tolist()}")
    timesteps = sigma_to_timestep(grid, np.log(training_sigmas(scheduler.config)))
    final = float(scheduler.sigmas[-1])
    if solver.name == "heun":  # every level after the first is visited by both stages of a step
        grid, timesteps = np.repeat(grid, 2)[1:], np.repeat(timesteps, 2)[1:]
    device = scheduler.timesteps.device
    scheduler.sigmas = torch.tensor([*grid, final], dtype=torch.float32)
    scheduler.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
    if not is_sigma_space(scheduler):  # DDPM-style states: remember the levels, valid until the next set_timesteps
        scheduler.dode_grid = (np.asarray(grid, dtype=np.float64), scheduler.timesteps)


def _custom_grid(scheduler):
    """The noise levels ``set_grid`` gave a DDPM-style scheduler, unless ``set_timesteps`` has replaced them."""
    grid, timesteps = getattr(scheduler, "dode_grid", (None, None))
    return grid if timesteps is not None and timesteps is scheduler.timesteps else None
