"""The reference solution of the probability-flow ODE, by an adaptive high-order solver (scipy).

Independent of every diffusers scheduler: in the variance-exploding state x = x_t / sqrt(abar) and
u = log sigma, the ODE is dx/du = sigma * eps(x, sigma). It is integrated with an embedded Runge-Kutta
method at tight tolerances from the first training noise level down to the last (t = 0), followed by
the final denoising jump x - sigma_min * eps that every solver's last step makes to sigma = 0.
On ``gmm-digits``, whose eps is exact, this is the exact ODE solution up to the tolerance.

For a flow-matching model (``gmm-digits-flow``) the ODE is its own, dx/ds = v(x, s) in the flow level s, from
s = 1 (pure noise) down to the first training level, then the same final jump x - s_min * v.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

from ..util.runtime import resolve_device
from .schedule import as_prediction_type, is_flow, level_to_timestep, sigma_to_timestep, training_sigmas
from .sampling import check_batch_size, seeded_noise


def _model_dtype(model) -> torch.dtype:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.float32 if tensor is None else tensor.dtype


@torch.no_grad()
def solve_ode(model, num_samples: int, *, seed: int = 0, batch_size: int | None = None, rtol: float = 1e-7,
              atol: float = 1e-7, method: str = "RK45", device="auto", progress: bool = True) -> torch.Tensor:
    """Samples from the noise of seeds seed, seed + 1, ... by an adaptive ODE solver; (num_samples, *shape).

    Starts, like the solvers in ``dode.SOLVERS``, from x_T = noise at the last training timestep (a flow model's:
    s = 1).
    """
    batch_size = check_batch_size(num_samples if batch_size is None else batch_size)
    device = resolve_device(device)
    flow = is_flow(model.scheduler_config)
    if not flow:
        model = as_prediction_type(model, "epsilon")  # the ODE below is written in eps
    model.to(device)
    dtype = _model_dtype(model)
    levels = training_sigmas(model.scheduler_config)
    log_sigmas = np.log(levels)

    def output(x: np.ndarray, level: float, shape) -> torch.Tensor:
        """eps at the variance-exploding state x (diffusion), or the velocity at x (flow), at noise level ``level``."""
        if flow:
            t = torch.tensor(float(level_to_timestep(level, model.scheduler_config)), device=device)
            return model(torch.from_numpy(x).reshape(shape).to(device, dtype), t).double().cpu()
        t = torch.tensor(float(sigma_to_timestep(level, log_sigmas)), device=device)
        x_t = torch.from_numpy(x).reshape(shape).to(device, dtype) / np.sqrt(1 + level**2)
        return model(x_t, t).double().cpu()

    # diffusion: dx/du = sigma eps in u = log sigma, from the VE state; flow: dx/ds = v from the noise itself
    span = (levels[-1], levels[0]) if flow else (log_sigmas[-1], log_sigmas[0])
    scale = 1.0 if flow else np.sqrt(1 + levels[-1] ** 2)
    out = []
    starts = range(0, num_samples, batch_size)
    for start in tqdm(starts, desc="exact ODE", disable=not progress or len(starts) < 2):
        noise = seeded_noise(model.sample_shape, min(batch_size, num_samples - start), seed + start).double()
        shape = noise.shape

        def rhs(u, x):
            if flow:
                return output(x, u, shape).flatten().numpy()
            sigma = float(np.exp(u))
            return (sigma * output(x, sigma, shape)).flatten().numpy()

        solution = solve_ivp(rhs, span, (noise * scale).flatten().numpy(), method=method, rtol=rtol, atol=atol)
        if not solution.success:
            raise RuntimeError(f"the reference ODE solve failed: {solution.message}")
        x_min = solution.y[:, -1]  # then the final jump to clean, as every solver's last step makes it
        x0 = torch.from_numpy(x_min).reshape(shape) - levels[0] * output(x_min, levels[0], shape)
        out.append(x0.float())
    return torch.cat(out)
