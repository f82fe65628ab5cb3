"""The base solvers: diffusers schedulers configured as in the paper, counted in NFE.

A new solver is one entry in ``_SOLVERS``: the scheduler class, its settings, and how many model
evaluations (NFE) one ``set_timesteps(n)`` costs. Nothing else in the package is solver-specific.
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
           paper="DPM-Solver"),
    Solver("dpm_solver_pp_2m", DPMSolverMultistepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", timestep_spacing="trailing", final_sigmas_type="zero"),
           paper="DPM-Solver++"),
    Solver("deis", DEISMultistepScheduler,
           dict(solver_order=3, timestep_spacing="trailing"), paper="DEIS"),
    # Heun: two evaluations per step except the last (an Euler step to sigma = 0), 2n - 1 NFE.
    Solver("heun", HeunDiscreteScheduler,
           dict(use_karras_sigmas=True, timestep_spacing="linspace"),
           nfe_of_steps=lambda steps: 2 * steps - 1, paper="EDM"),
    Solver("unipc", UniPCMultistepScheduler,
           dict(solver_order=2, solver_type="bh2", timestep_spacing="trailing", final_sigmas_type="zero"),
           paper="UniPC"),
]

#: the solver names, in the order of the paper's tables
SOLVERS: tuple[str, ...] = tuple(s.name for s in _SOLVERS)
_BY_NAME = {s.name: s for s in _SOLVERS}


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
