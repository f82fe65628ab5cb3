"""The teacher: the same model solved with many small DDIM steps, read off at the student's own times.

DDIM (eta = 0) is the Euler method of the probability-flow ODE in sigma, so the teacher is diffusers'
``EulerDiscreteScheduler`` on an explicit sigma grid, which can hold any noise level, fractional
timesteps included. Two grids:

- ``substeps=C`` (an integer, the paper's teacher): every interval of the student's grid split into C steps,
  uniform in the training timestep. Each student times is on the grid by construction.
- ``substeps="fine"``: every training timestep. Its trajectory is computed once per start and shared by every
  solver and NFE; a student time between two grid points is reached by one Euler step from the point above.

``match="index"`` (an ablation, with an integer C) instead does what the paper's public code does: a DDIM
teacher with C x NFE steps on its own grid (DDIM's original ``range(0, T, T // (C NFE))``, which starts at
t = T - T / (C NFE), not at the student's first time), from the same noise, and every C-th state as the
target whether or not it lies at the student's time. Only the final (clean) state is then aligned.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler

from .timegrid import TimeGrid
from ..util.runtime import resolve_device
from .schedule import sigma_to_timestep, timestep_to_sigma, training_sigmas
from .sampling import integrate, seeded_noise


class Teacher:
    def __init__(self, model, *, batch_size: int = 100, seed: int = 0, substeps: int | str = 10, match: str = "time",
                 device="auto"):
        if substeps != "fine" and (isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1):
            raise ValueError(f"teacher substeps must be a positive integer C (steps per student step) or 'fine', got "
                             f"{substeps!r}")
        if match not in ("time", "index") or (match == "index" and substeps == "fine"):
            raise ValueError(f"match must be 'time', or 'index' with an integer C; got match={match!r}, substeps={substeps!r}")
        self.model = model
        self.substeps = substeps
        self.match = match
        self.batch_size = batch_size
        self.seed = seed
        self.device = resolve_device(device)
        self.noise = seeded_noise(model.sample_shape, batch_size, seed).to(self.device)
        sigmas = training_sigmas(model.scheduler_config)
        self._log_sigmas = np.log(sigmas)
        self._training_sigmas = sigmas
        self._fine_runs: dict = {}
        self.nfe = 0  # model evaluations spent so far

    def __repr__(self):
        return (f"Teacher(substeps={self.substeps!r}, match={self.match!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"nfe so far={self.nfe})")

    @property
    def label(self) -> str:
        """"fine", "C=10", or "C=10, index-matched"."""
        name = "fine" if self.substeps == "fine" else f"C={self.substeps}"
        return name + (", index-matched" if self.match == "index" else "")

    def substep_levels(self, sigmas) -> np.ndarray:
        """Split each interval of a descending sigma grid (ending at 0) into ``self.substeps`` timestep-uniform steps."""
        knots = [float(s) for i, s in enumerate(sigmas) if i == 0 or s != sigmas[i - 1]]
        grid = [knots[0]]
        for high, low in zip(knots[:-1], knots[1:]):
            t_high = sigma_to_timestep(high, self._log_sigmas)
            if low > 0:
                inner = np.linspace(t_high, sigma_to_timestep(low, self._log_sigmas), self.substeps + 1)[1:-1]
                grid += [*timestep_to_sigma(inner, self._log_sigmas), low]
            elif t_high > 1e-6:  # the last step lands on sigma = 0: refine down to t = 0, then jump to clean
                inner = np.linspace(t_high, 0.0, self.substeps)[1:]
                grid += [*timestep_to_sigma(inner, self._log_sigmas), 0.0]
            else:  # from the smallest training sigma (t = 0) the model can only make the final jump
                grid += [0.0]
        return np.asarray(grid)

    def _euler(self, x_ddpm: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
        """DDIM along ``grid`` (descending sigmas) from a DDPM-convention state; every state, DDPM convention."""
        euler = EulerDiscreteScheduler.from_config(self.model.scheduler_config)
        euler.set_timesteps(sigmas=list(grid), device=x_ddpm.device)
        x_ve = x_ddpm * float(np.sqrt(1 + grid[0] ** 2))
        _, states = integrate(self.model, euler, None, x_ve / float(euler.init_noise_sigma), record=True)
        self.nfe += len(euler.timesteps)
        return states

    def targets(self, times) -> torch.Tensor:
        """Teacher states at the noise levels of a student's states after each model evaluation.

        ``times``: the student's ``TimeGrid`` (or a scheduler after ``set_timesteps``, read once here). The teacher
        starts where the student starts (same noise, same noise level, same initial scale). Returns
        (nfe, batch, *shape) in the DDPM convention, on the CPU.
        """
        if not isinstance(times, TimeGrid):
            times = TimeGrid.of(times)
        start, scale, wanted = times.start, times.initial_scale, times.after
        x_start = self.noise * scale
        if self.match == "index":
            steps = self.substeps * len(wanted)
            leading = np.arange(0, len(self._log_sigmas), len(self._log_sigmas) // steps)[:steps][::-1]
            levels = np.append(self._training_sigmas[leading], 0.0)
            return self._euler(x_start, levels)[self.substeps :: self.substeps]
        if self.substeps != "fine":
            levels = self.substep_levels(times.states)
            states = self._euler(x_start, levels)
            index = [int(np.argmin(np.abs(levels - s))) for s in wanted]
            return states[index]
        return torch.stack([self._fine_state(x_start, start, scale, s) for s in wanted])

    def solution(self) -> torch.Tensor:
        """The ODE solution of the teacher's noise batch from pure noise at the first training noise level, on a
        fine run (every training timestep) whatever ``substeps`` is: ``dode.Reference("fine")``, the validation
        reference before the cheaper default (``dode.core.reference``). (batch, *shape), on the CPU."""
        top = float(self._training_sigmas[-1])
        return self._fine_state(self.noise, top, 1.0, 0.0)

    def _fine_state(self, x_start, start: float, scale: float, sigma: float) -> torch.Tensor:
        # One run per start, up to rounding: schedulers compute the same first sigma in float32 or float64
        # (157.407269 or 157.407272), and Heun starts at sigma_max, not sqrt(sigma_max^2 + 1), 2e-5 smaller.
        key = (float(f"{start:.6g}"), float(f"{scale:.4g}"))
        if key not in self._fine_runs:
            below = self._training_sigmas[self._training_sigmas < start * (1 - 1e-6)][::-1]
            grid = np.concatenate([[start], below, [0.0]])
            self._fine_runs[key] = (grid, self._euler(x_start, grid))
        grid, states = self._fine_runs[key]
        j = int(np.nonzero(grid >= sigma * (1 - 1e-6))[0][-1])  # the last grid point at or above sigma
        if abs(grid[j] - sigma) <= 1e-6 * max(sigma, 1e-12):
            return states[j]
        return self._euler(states[j].to(self.device), np.array([grid[j], sigma]))[-1]
