"""FlowMatch Euler and Heun on the "trailing" flow grid: sigmas linspace(1, 1/n, n) before the shift.

diffusers' FlowMatch schedulers step, by default, on linspace(1, sigma_min, n) (sigma_min: 1/1000 on the model's
shift), so their last step is a jump from about 0.001 to 0, and has no config option for another grid. Flux's
pipeline instead hands ``sigmas=linspace(1, 1/n, n)`` (then the scheduler shifts them), the grid DPM-Solver++ and
UniPC's flow sigmas make too. These two subclasses make that grid on a plain ``set_timesteps(n)``, so that it is a
named spacing (``"trailing"``) that ``make_scheduler``, the best-base tables and ``spacing="auto"`` can choose, and
a pipeline drives without passing ``sigmas=``. Everything else is their parents': custom ``sigmas=`` / ``mu``
(Euler) win over the grid, and the shift applies to it as to any grid.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler


def trailing_sigmas(num_inference_steps: int) -> np.ndarray:
    """The unshifted trailing flow grid of ``num_inference_steps`` steps: linspace(1, 1/n, n), float64."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    return np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)


class TrailingFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(n)`` steps on sigmas linspace(1, 1/n, n), shifted
    (with ``mu`` under dynamic shifting) as diffusers shifts custom sigmas: Flux's pipeline grid, bit for bit."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            sigmas = trailing_sigmas(num_inference_steps)
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


class TrailingFlowMatchHeunScheduler(FlowMatchHeunDiscreteScheduler):
    """``FlowMatchHeunDiscreteScheduler`` on sigmas linspace(1, 1/n, n), shifted: each level but the first evaluated
    twice (Heun's two stages), then the Euler step to 0, as the parent lays out its own grid."""

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)
        shift = self.config.shift
        levels = trailing_sigmas(num_inference_steps)
        levels = torch.from_numpy(shift * levels / (1 + (shift - 1) * levels)).to(torch.float32)
        timesteps = levels * self.config.num_train_timesteps
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device)
        levels = torch.cat([levels, torch.zeros(1)])
        self.sigmas = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]]).to(device=device)
