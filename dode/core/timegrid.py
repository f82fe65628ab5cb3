"""The time grid as a value: where a scheduler, after ``set_timesteps``, evaluates the model and puts its states.

``TimeGrid.of(scheduler)`` reads a scheduler once, right after ``set_timesteps`` (and ``set_grid``); everything
downstream (the teacher's targets, the fit, trajectories, the refinement) takes that value instead of probing
scheduler state again. Noise levels are sigma = sqrt((1 - abar) / abar), in float64.

Two kinds of schedulers:

- schedulers with a ``sigmas`` array (DPM-Solver, DEIS, UniPC, Heun, Euler): the state after evaluation k is
  at ``sigmas[k + 1]``; these read every level from that array, which ``set_grid`` may move;
- DDIM and PLMS (integer timesteps, no ``sigmas``): evaluation k at timestep t steps to t - T // n, whatever
  the spacing put next (with "linspace" the two differ: diffusers' own arithmetic, kept as it is); PLMS's
  warm-up (its second evaluation) lands on the timestep it is evaluated at. Below t = 0 the state is clean.

Sigma-space schedulers (Heun, Euler) hold x0 + sigma * noise; every comparison happens in the DDPM convention
x_t = sqrt(abar) x0 + sqrt(1 - abar) noise (``TimeGrid.to_ddpm``). Flow schedulers (a flow-matching model's) have
flow levels s in [0, 1] and states (1 - s) x0 + s noise, compared as they are (``to_ddpm`` leaves them).

Where the model is evaluated and where the update puts the state can differ: on its sigma spacings (karras,
exponential, beta, lu) diffusers computes continuous noise levels for the update but hands the model an integer
timestep (DPM-Solver-2, DPM-Solver++, DEIS and UniPC round or truncate it), whose level is another one.
``TimeGrid.evaluated`` is the level at the model's time input, ``TimeGrid.states`` the update's;
``TimeGrid.level_gap`` measures the difference. ``dode.core.solvers.set_grid`` given a ``TimeGrid`` reproduces both
(a named spacing, bit for bit); given levels alone (explicit and learned grids), it evaluates the model at exactly
those levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

from .schedule import timestep_to_level

#: schedulers whose states are x0 + sigma * noise, whatever their first noise level (``init_noise_sigma`` is that
#: level, below 1 for a grid that starts below sigma = 1)
_SIGMA_SPACE = (EulerDiscreteScheduler, HeunDiscreteScheduler)


@dataclass(frozen=True)
class TimeGrid:
    """The noise levels of one sampling run: its start and the state after each model evaluation."""

    #: the model's time input at each evaluation (as the scheduler hands it over)
    timesteps: tuple
    #: noise level of the initial state
    start: float
    #: noise level of the state each evaluation's ``step`` returns, shape (nfe,); the last is the final sample's
    after: np.ndarray
    #: the initial state is ``noise * init_noise_sigma``
    init_noise_sigma: float
    #: states are x0 + sigma * noise (Heun, Euler) rather than DDPM states
    sigma_space: bool
    #: noise level at the model's time input at each evaluation, shape (nfe,): sigma(t), log-linear between the
    #: training timesteps (diffusers' own map); where the model is really evaluated
    evaluated: np.ndarray

    @classmethod
    def of(cls, scheduler) -> "TimeGrid":
        """The grid of a scheduler (or a DODEScheduler) after its ``set_timesteps``."""
        base = getattr(scheduler, "base_scheduler", scheduler)
        timesteps = base.timesteps
        if timesteps is None:
            raise ValueError(f"{type(base).__name__} has no timesteps yet: call set_timesteps first")
        n = len(timesteps)
        init = float(torch.as_tensor(getattr(base, "init_noise_sigma", 1.0)).detach())  # FlowMatch: none, 1
        evaluated = timestep_to_level(timesteps.detach().double().cpu().numpy(), base.config)
        sigmas = getattr(base, "sigmas", None)
        if torch.is_tensor(sigmas) and len(sigmas) == n + 1:
            levels = sigmas.detach().double().cpu().numpy()  # detached: a learned grid's carry a graph
            return cls(tuple(timesteps.tolist()), float(levels[0]), levels[1:].copy(), init,
                       isinstance(base, _SIGMA_SPACE) or init > 1.0, evaluated)
        # integer-timestep DDPM schedulers (DDIM, PLMS): x_t at the timestep, and t - T // n after each step
        t = timesteps.long().cpu().numpy()
        previous = t - base.config.num_train_timesteps // base.num_inference_steps
        if isinstance(base, PNDMScheduler) and n > 1 and base.config.skip_prk_steps:
            previous[1] = t[1]  # the warm-up's second evaluation lands on its own timestep
        alphas = base.alphas_cumprod.double().cpu().numpy()
        final = float(getattr(base, "final_alpha_cumprod", torch.tensor(alphas[0])))

        def sigma(step):
            abar = alphas[step] if step >= 0 else final
            return float(np.sqrt((1 - abar) / abar))

        return cls(tuple(timesteps.tolist()), sigma(int(t[0])), np.array([sigma(int(p)) for p in previous]),
                   init, False, evaluated)

    @property
    def nfe(self) -> int:
        return len(self.after)

    @property
    def states(self) -> np.ndarray:
        """The noise level of every state: the initial one, then one after each evaluation (nfe + 1,)."""
        return np.concatenate([[self.start], self.after])

    @property
    def steps(self) -> np.ndarray:
        """The distinct noise levels the update steps from, one per step, descending (Heun's second stage
        re-evaluates the level its first stage stepped to): what ``set_grid`` and ``DODEScheduler.grid`` take. The
        model is evaluated there too except where diffusers rounds its timestep (``evaluated``, ``level_gap``)."""
        return self.states[:-1][self._firsts()]

    @property
    def step_timesteps(self) -> tuple:
        """The model's time input at the first evaluation of each step (``timesteps`` at ``steps``)."""
        return tuple(t for t, first in zip(self.timesteps, self._firsts()) if first)

    @property
    def level_gap(self) -> float:
        """The largest relative distance between the level the model is evaluated at and the level of the state
        the update steps from, over the evaluations: 0 where the model sees exactly the update's levels."""
        return float(np.max(np.abs(self.evaluated / self.states[:-1] - 1.0)))

    def _firsts(self) -> np.ndarray:
        """Which evaluations begin a step (their level differs from the one before)."""
        levels = self.states[:-1]
        return np.concatenate([[True], np.abs(np.diff(levels)) > 1e-9 * levels[:-1]])

    @property
    def initial_scale(self) -> float:
        """The initial state ``noise * init_noise_sigma`` is ``noise * initial_scale`` in the DDPM convention."""
        return self.init_noise_sigma / (float(np.sqrt(1 + self.start**2)) if self.sigma_space else 1.0)

    def to_ddpm(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """A state of this scheduler at noise level ``sigma`` in the DDPM convention."""
        return x / float(np.sqrt(1.0 + float(sigma) ** 2)) if self.sigma_space else x
