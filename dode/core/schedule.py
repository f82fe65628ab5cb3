"""The noise schedule and the model's output: the maths every layer above builds on.

Every model is ``model(x_t, t) -> output`` on a DDPM-style discrete noise schedule, described by a diffusers
scheduler config (``SCHEDULE_KEYS``, ``prediction_type``), or a flow-matching model (``is_flow``: SD3, Flux and the
``gmm-digits-flow`` testbed). Here: the schedule's noise levels and their map to (fractional) timesteps, and the
exact conversion between prediction types (``as_prediction_type``). Imports nothing from dode.

The noise level of a state: on a DDPM schedule sigma = sqrt((1 - abar) / abar) (the state x_t = sqrt(abar) x0 +
sqrt(1 - abar) eps); for a flow model the flow sigma s in [0, 1] of diffusers' flow schedulers (the state x_t =
(1 - s) x0 + s eps, the model's output the velocity eps - x0, its time input t = s * num_train_timesteps, whatever
the sampler's ``shift``). ``training_sigmas``, ``level_to_timestep``, ``timestep_to_level`` and
``differentiable_level_timestep`` take either kind of config and give that kind's levels.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

#: The DDPM schedule of the paper's models (linear betas, 1000 steps).
DDPM_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}

#: What a model's output can be (``scheduler_config["prediction_type"]``), as diffusers' schedulers name it.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: The prediction type of a flow-matching model (its output is the velocity eps - x0), as diffusers names it.
FLOW_PREDICTION = "flow_prediction"
#: The schedule of a flow-matching model: training levels s = t / 1000 for t = 1 ... 1000 (those of diffusers'
#: ``FlowMatchEulerDiscreteScheduler`` at shift 1), and the sampler's default ``shift`` (SD3's is 3.0).
FLOW_SCHEDULE = {"num_train_timesteps": 1000, "prediction_type": FLOW_PREDICTION, "shift": 1.0}
#: The scheduler-config keys that belong to the model (its noise schedule and output); the rest (clipping, spacing,
#: solver order, ...) belongs to the solver, which ``dode.core.solvers`` configures.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")

def check_prediction_type(prediction_type) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; dode handles {', '.join(PREDICTION_TYPES)} "
                         f"(and {FLOW_PREDICTION!r} for flow-matching models, which convert to none of those)")
    return prediction_type


def is_flow(config) -> bool:
    """Whether a model's or scheduler's config is a flow-matching one: ``prediction_type="flow_prediction"``, flow
    sigmas (DPM-Solver and UniPC's ``use_flow_sigmas``), or a config with a ``shift`` (diffusers' FlowMatch
    schedulers, whose configs name no prediction type)."""
    config = dict(config)
    return (config.get("prediction_type") == FLOW_PREDICTION or bool(config.get("use_flow_sigmas"))
            or ("shift" in config and "beta_start" not in config))


def schedule_config(config) -> dict:
    """The noise schedule and prediction type in a diffusers scheduler config (``SCHEDULE_KEYS``), DDPM defaults
    for missing keys; for a flow-matching config (``is_flow``), its training steps and ``"flow_prediction"``.
    ValueError for what dode cannot handle."""
    config = dict(config)
    if is_flow(config):
        return {"num_train_timesteps": int(config.get("num_train_timesteps") or 1000),
                "prediction_type": FLOW_PREDICTION}
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("zero-terminal-SNR schedules (rescale_betas_zero_snr=True) are not supported: their last "
                         "noise level is infinite")
    schedule = {**DDPM_SCHEDULE, **{key: config[key] for key in SCHEDULE_KEYS if config.get(key) is not None}}
    check_prediction_type(schedule["prediction_type"])
    return schedule


def training_sigmas(scheduler_config: dict) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) at every training timestep t, in float64 (a new array each call),
    ascending; for a flow-matching config the flow levels t / T, t = 1 ... T."""
    if is_flow(scheduler_config):
        count = schedule_config(scheduler_config)["num_train_timesteps"]
        return np.arange(1, count + 1, dtype=np.float64) / count
    schedule = tuple((key, _hashable(scheduler_config[key])) for key in SCHEDULE_KEYS if key in scheduler_config)
    return _training_sigmas(schedule).copy()


def _hashable(value):
    return tuple(value) if isinstance(value, (list, np.ndarray)) else value


@functools.lru_cache(maxsize=32)
def _training_sigmas(schedule: tuple) -> np.ndarray:
    # cached: the refinement moves a grid (and so asks for these) thousands of times per fit
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(dict(schedule)).alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_timestep(sigma, log_sigmas: np.ndarray):
    """The (fractional) training timestep of noise level sigma: log-sigma is linear between timesteps, the map
    diffusers' sigma-space schedulers use (``_sigma_to_t``)."""
    return np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas)))


def timestep_to_sigma(t, log_sigmas: np.ndarray):
    """The inverse of ``sigma_to_timestep``."""
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def interpolated_sigma(t, log_sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps t, log-sigma linear between training timesteps: ``timestep_to_sigma`` on
    tensors, on the device of ``log_sigmas`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=log_sigmas.device).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1])


def differentiable_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """``sigma_to_timestep`` on tensors, differentiable in ``sigma`` (a learned grid's levels): the fractional
    training timestep whose log-linear interpolated noise level (``interpolated_sigma``) is ``sigma``, in the dtype of
    ``sigma``; levels outside the schedule's range are clamped to its ends, as ``np.interp`` does."""
    log_sigmas = log_sigmas.to(device=sigma.device, dtype=torch.float64)
    log_sigma = torch.log(sigma.to(torch.float64)).clamp(log_sigmas[0], log_sigmas[-1])
    low = (torch.searchsorted(log_sigmas, log_sigma.detach(), right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return (low + w).to(sigma.dtype)


def level_to_timestep(levels, config):
    """The model's (fractional) time input at noise levels ``levels`` (``sigma_to_timestep`` on a DDPM schedule;
    s * T for a flow model, as diffusers' flow schedulers hand it over)."""
    if is_flow(config):
        return np.asarray(levels, dtype=np.float64) * schedule_config(config)["num_train_timesteps"]
    return sigma_to_timestep(levels, np.log(training_sigmas(config)))


def timestep_to_level(timesteps, config):
    """The inverse of ``level_to_timestep``."""
    if is_flow(config):
        return np.asarray(timesteps, dtype=np.float64) / schedule_config(config)["num_train_timesteps"]
    return timestep_to_sigma(timesteps, np.log(training_sigmas(config)))


def differentiable_level_timestep(levels: torch.Tensor, config) -> torch.Tensor:
    """``level_to_timestep`` on tensors, differentiable in ``levels`` (a learned grid's), in their dtype."""
    if is_flow(config):
        return levels * schedule_config(config)["num_train_timesteps"]
    return differentiable_timestep(levels, torch.from_numpy(np.log(training_sigmas(config))))


def convert_prediction(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, source: str, target: str) -> torch.Tensor:
    """A model output of prediction type ``source`` as type ``target``, at the state x_t (DDPM convention) whose
    cumulative alpha is ``alpha_bar``. With x_t = a x0 + s eps (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)) and
    v = a eps - s x0, each type is affine in each other one, so the conversion is exact."""
    for name in (source, target):
        check_prediction_type(name)
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if source == "epsilon":
        eps, x0 = output, (x_t - s * output) / a
    elif source == "sample":
        eps, x0 = (x_t - a * output) / s, output
    else:
        eps, x0 = a * output + s * x_t, a * x_t - s * output
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[target]


class PredictionConverter(nn.Module):
    """``model`` with its output converted to another prediction type, in float64 (``as_prediction_type``)."""

    def __init__(self, model, prediction_type: str):
        super().__init__()
        self.model = model
        self.source = model.scheduler_config["prediction_type"]
        self.scheduler_config = {**model.scheduler_config, "prediction_type": prediction_type}
        self.sample_shape = model.sample_shape
        self.name = getattr(model, "name", type(model).__name__)
        log_sigmas = np.log(training_sigmas(model.scheduler_config))
        self.register_buffer("log_sigmas", torch.from_numpy(log_sigmas), persistent=False)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = interpolated_sigma(t, self.log_sigmas).reshape(-1, *[1] * (x_t.dim() - 1))
        output = self.model(x_t, t).double()
        target = self.scheduler_config["prediction_type"]
        return convert_prediction(output, x_t.double(), 1 / (1 + sigma**2), self.source, target).to(x_t.dtype)


def as_prediction_type(model, prediction_type: str = "epsilon") -> nn.Module:
    """``model`` seen as predicting ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``): the same
    ODE, so base solvers give the same samples, but D-ODE then corrects that parametrisation of the output.

    The model itself when it already predicts that. Fractional timesteps use the log-sigma interpolation of
    diffusers' sigma-space schedulers. Uses: ``dode.solve_ode`` (needs epsilon), PNDM (takes no ``sample``
    models), and D-ODE on epsilon for a v-prediction model (often better than on v itself).
    """
    check_prediction_type(prediction_type)
    if isinstance(model, PredictionConverter):
        model = model.model
    if model.scheduler_config["prediction_type"] == prediction_type:
        return model
    return PredictionConverter(model, prediction_type)
