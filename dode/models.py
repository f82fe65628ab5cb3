"""Models (testbeds): every model is ``model(x_t, t) -> output`` on a DDPM-style discrete noise schedule.

A model carries ``sample_shape`` (C, H, W), ``scheduler_config`` (the noise schedule every diffusers scheduler is
built from, and ``prediction_type``: what the output is, ``epsilon``, ``v_prediction`` or ``sample``) and
``name``. The output goes to the scheduler unchanged, as in a diffusers pipeline, so D-ODE corrects the output in
the model's own parametrisation; ``as_prediction_type`` converts it exactly to another one.
``load_model`` returns a model by name, folder or hub id.
"""
from __future__ import annotations

import functools
import os
import socket
import warnings
from pathlib import Path
from typing import NamedTuple

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

MODELS = ("gmm-digits", "unet-digits")

#: What a model's output can be (``scheduler_config["prediction_type"]``), as diffusers' schedulers name it.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: The scheduler-config keys that belong to the model (its noise schedule and output); the rest (clipping, spacing,
#: solver order, ...) belongs to the solver, which ``dode.solvers`` configures.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")

#: Weights trained by this project and shipped with the package (``make models`` retrains them).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else the CPU; a device this machine does not have is a ValueError
    that says so (rather than torch's assertion deep inside the first model call)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N' ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} asked for, but this torch build sees no CUDA GPU "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='auto' "
                             "or 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but Apple's MPS backend is not available here; use 'cpu'")
    return device


#: the environment variable that sets dode's torch threads (``use_threads``)
THREADS_ENV = "DODE_NUM_THREADS"


def use_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU threads for dode's tiny models, and return the count in use.

    The embedded models run 30-80x slower with torch's default thread count on a machine with other work (their
    operations are too small to split), so: ``num_threads`` when given, else ``$DODE_NUM_THREADS``, else torch's
    own choice when ``$OMP_NUM_THREADS`` is set (the usual way to ask), else 1. ``load_model`` calls it for the
    embedded models; the notebooks call it with their ``num_threads`` parameter.
    """
    if num_threads is None and os.environ.get(THREADS_ENV):
        num_threads = os.environ[THREADS_ENV]
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        num_threads = 1
    try:
        num_threads = int(num_threads)
    except (TypeError, ValueError):
        num_threads = 0
    if num_threads < 1:
        raise ValueError(f"num_threads (or ${THREADS_ENV}) must be a positive integer, got {num_threads!r}")
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def check_prediction_type(prediction_type) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; dode handles {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def schedule_config(config) -> dict:
    """The noise schedule and prediction type in a diffusers scheduler config (``SCHEDULE_KEYS``), DDPM defaults
    for missing keys; ValueError for what dode cannot handle."""
    config = dict(config)
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("zero-terminal-SNR schedules (rescale_betas_zero_snr=True) are not supported: their last "
                         "noise level is infinite")
    schedule = {**DDPM_SCHEDULE, **{key: config[key] for key in SCHEDULE_KEYS if config.get(key) is not None}}
    check_prediction_type(schedule["prediction_type"])
    return schedule


def training_sigmas(scheduler_config: dict) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) at every training timestep t, in float64 (a new array each call)."""
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


def load_digits_data() -> np.ndarray:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled from 0..16 to [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float64)
    return (images / 8.0 - 1.0)[:, None]


class Mixture(NamedTuple):
    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor


class GaussianMixtureDenoiser(nn.Module):
    """A Gaussian mixture as a diffusion model: its eps-prediction is exact.

    For data x0 ~ sum_k w_k N(mu_k, S_k) and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the scaled
    state y = x_t / sqrt(abar_t) = x0 + sigma_t eps is a mixture of N(mu_k, S_k + sigma_t^2 I), and the
    posterior mean E[x0 | y] = sum_k r_k(y) (mu_k + S_k (S_k + sigma^2 I)^-1 (y - mu_k)) is computed in
    float64 through the eigendecomposition S_k = U_k diag(d_k) U_k^T. Fractional timesteps use the
    log-sigma interpolation that diffusers' sigma-space schedulers invert (``_sigma_to_t``).
    """

    def __init__(self, weights, means, covariances, sample_shape, scheduler_config=None, name="gmm"):
        super().__init__()
        weights, means, covariances = (torch.as_tensor(a, dtype=torch.float64) for a in (weights, means, covariances))
        eigvals, eigvecs = torch.linalg.eigh(covariances)
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("covariances", covariances)
        self.register_buffer("eigvals", eigvals.clamp_min(0.0))
        self.register_buffer("eigvecs", eigvecs)
        self.sample_shape = tuple(sample_shape)
        self.scheduler_config = dict(scheduler_config or DDPM_SCHEDULE)
        self.register_buffer("log_sigmas", torch.from_numpy(np.log(training_sigmas(self.scheduler_config))))
        self.name = name

    @property
    def mixture(self) -> Mixture:
        """The mixture in data space: ``weights`` (K), ``means`` (K x D), ``covariances`` (K x D x D)."""
        return Mixture(self.weights, self.means, self.covariances)

    def sigma(self, t) -> torch.Tensor:
        """Noise level sigma(t), log-linear between training timesteps, float64."""
        return interpolated_sigma(t, self.log_sigmas)

    def posterior_mean(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma * noise = y] for y of shape (B, D) and sigma of shape (B,), float64."""
        var = self.eigvals[:, None, :] + sigma[None, :, None] ** 2  # (K, B, D)
        z = torch.matmul(y[None] - self.means[:, None, :], self.eigvecs)  # rows of U_k^T (y - mu_k): (K, B, D)
        log_resp = torch.log(self.weights)[:, None] - 0.5 * (torch.log(var).sum(-1) + (z**2 / var).sum(-1))
        resp = torch.softmax(log_resp, dim=0)  # (K, B)
        shrunk = torch.matmul(z * (self.eigvals[:, None, :] / var), self.eigvecs.transpose(1, 2))  # (K, B, D)
        return torch.einsum("kb,kbd->bd", resp, self.means[:, None, :] + shrunk)

    def denoise(self, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """D(x, sigma) = E[x0 | x] for a state in the variance-exploding convention x = x0 + sigma * noise."""
        batch = x_ve.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x_ve.device).reshape(-1).expand(batch)
        mean = self.posterior_mean(x_ve.reshape(batch, -1).double(), sigma)
        return mean.reshape(x_ve.shape)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = self.sigma(t).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x_t.shape[0])
        scale = torch.sqrt(1 + sigma**2).reshape(-1, *[1] * (x_t.dim() - 1))
        x_ve = x_t.double() * scale
        eps = (x_ve - self.denoise(x_ve, sigma)) / sigma.reshape(scale.shape)
        return eps.to(x_t.dtype)

    @torch.no_grad()
    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact draws from the mixture, shape (n, *sample_shape); seeded, float32 on the CPU."""
        gen = torch.Generator().manual_seed(seed)
        comps = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=gen)
        noise = torch.randn(n, self.means.shape[1], generator=gen, dtype=torch.float64)
        roots = self.eigvecs.cpu() * self.eigvals.cpu().sqrt()[:, None, :]  # U_k diag(sqrt d_k)
        x = self.means.cpu()[comps] + torch.einsum("nij,nj->ni", roots[comps], noise)
        return x.float().reshape(n, *self.sample_shape)


@functools.lru_cache(maxsize=4)
def _fit_digits_mixture(n_components: int, reg_covar: float, random_state: int):
    from sklearn.mixture import GaussianMixture

    data = load_digits_data().reshape(-1, 64)
    gm = GaussianMixture(n_components, covariance_type="full", reg_covar=reg_covar, random_state=random_state)
    gm.fit(data)
    return gm.weights_, gm.means_, gm.covariances_


def gmm_digits(n_components: int = 10, reg_covar: float = 1e-2, random_state: int = 0) -> GaussianMixtureDenoiser:
    """The ``gmm-digits`` testbed: a full-covariance Gaussian mixture fitted to the 8x8 digits in [-1, 1].

    The fit (a few seconds of EM) is cached per process; every call returns a fresh module.
    """
    params = _fit_digits_mixture(n_components, reg_covar, random_state)
    return GaussianMixtureDenoiser(*params, (1, 8, 8), DDPM_SCHEDULE, "gmm-digits")


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


class DiffusersModel(nn.Module):
    """A diffusers UNet as a dode model: ``model(x_t, t)`` is the UNet's output, of the prediction type in
    ``scheduler_config`` (the checkpoint's), handed to the scheduler unchanged as a diffusers pipeline does."""

    def __init__(self, unet, scheduler_config, name: str):
        super().__init__()
        self.unet = unet
        self.scheduler_config = schedule_config(scheduler_config)
        channels, size = unet.config.in_channels, unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.sample_shape = (channels, *size)
        self.name = name

    def forward(self, x_t, t, **conditioning):
        """The UNet at (x_t, t), in its own dtype; ``conditioning`` (e.g. ``encoder_hidden_states``) goes to it."""
        return self.unet(x_t.to(self.unet.dtype), t, **conditioning).sample.to(x_t.dtype)


class ModelNotFoundError(OSError):
    """A model name, folder or hub id that cannot be loaded."""


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection within ``timeout`` seconds (offline: fail fast)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without network, fail in seconds, not after minutes of retries."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and url_reachable(constants.ENDPOINT, timeout)


def _is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def is_available(name_or_path) -> bool:
    """Whether ``load_model`` / ``dode.load_pipeline`` can get it here without waiting: an embedded model, a local
    folder, a hub id with a copy in the local cache, or any hub id while the hub answers."""
    from huggingface_hub import snapshot_download

    name = str(name_or_path)
    if name in MODELS or Path(name).expanduser().exists():
        return True
    if not _is_hub_id(name):
        return False
    try:
        snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache (huggingface_hub raises several kinds)
        return _hub_reachable()
    return True


def fetch(load, name_or_path, what: str = "diffusers UNet2DModel", loader: str = "dode.load_model"):
    """``load(path_or_id, **kwargs)`` on a local folder, else on a hub id from the local cache, else from the hub.

    Raises ``ModelNotFoundError`` at once when none has it, offline saying how to use a local folder instead
    (``loader`` names the function to pass the folder to).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        try:
            return load(str(path))
        except Exception as err:
            raise ModelNotFoundError(f"{str(path)!r} is not a loadable {what} folder: {err}") from err
    if not _is_hub_id(name):
        raise ModelNotFoundError(f"unknown model {name!r}: not an embedded model ({', '.join(MODELS)}), not an "
                                 "existing folder, and not a hub id of the form 'owner/name'")
    try:  # a copy in the local hub cache needs no network
        return load(name, local_files_only=True)
    except Exception:
        pass
    advice = (f"Download it on a machine with network access (e.g. `huggingface-cli download {name} --local-dir "
              f"./my-model`), copy the folder here and call {loader}('./my-model'). (No local folder named {name!r} "
              "exists either.)")
    if not _hub_reachable():
        raise ModelNotFoundError(f"cannot download {name!r}: the Hugging Face hub is unreachable (offline?). {advice}")
    try:
        return load(name)
    except Exception as err:  # huggingface_hub raises several kinds; all mean "could not get it"
        raise ModelNotFoundError(f"could not download {name!r} ({type(err).__name__}: {err}). {advice}") from err


def _load_unet(name_or_path: str, local_files_only: bool = False):
    """(UNet2DModel, its scheduler config or None) from a pipeline layout (unet/, scheduler/) or a bare UNet layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    # low_cpu_mem_usage: the default wants `accelerate`, and says so at length
    options = dict(local_files_only=local_files_only, low_cpu_mem_usage=False)
    try:
        unet = UNet2DModel.from_pretrained(name_or_path, subfolder="unet", **options)
    except (OSError, ValueError):
        unet = UNet2DModel.from_pretrained(name_or_path, **options)
    for subfolder in ("scheduler", None):
        try:
            return unet, DDPMScheduler.load_config(name_or_path, subfolder=subfolder, local_files_only=local_files_only)
        except OSError:  # no scheduler config there: try the next place
            continue
    return unet, None


def _load_diffusers(name_or_path: str) -> DiffusersModel:
    unet, config = fetch(_load_unet, name_or_path)
    if config is None:
        warnings.warn(f"{name_or_path!r} has no scheduler config: assuming the DDPM schedule {DDPM_SCHEDULE}",
                      stacklevel=3)
    return DiffusersModel(unet, config or DDPM_SCHEDULE, str(name_or_path))


def load_unet_digits(folder: str | os.PathLike = WEIGHTS_DIR / "unet-digits") -> DiffusersModel:
    """The ``unet-digits`` testbed from its folder (default: the shipped weights), with a clear error if broken."""
    folder = Path(folder)
    try:
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"no config.json in {str(folder)!r}")
        model = _load_diffusers(str(folder))
    except ModelNotFoundError as err:
        raise ModelNotFoundError(
            f"the unet-digits weights in {str(folder)!r} are missing or corrupt ({err}); `make models` retrains them"
        ) from err
    model.name = "unet-digits"
    return model


def load_model(name_or_path: str | os.PathLike = "gmm-digits", device: str | torch.device = "auto") -> nn.Module:
    """Load a model by name (``"gmm-digits"``, ``"unet-digits"``), local diffusers UNet2DModel folder or hub id.

    A folder is a saved pipeline (``unet/``, ``scheduler/``) or a bare UNet (``config.json``, weights and maybe
    ``scheduler_config.json``). The noise schedule and ``prediction_type`` come from the checkpoint's scheduler
    config (DDPM's linear schedule and epsilon when it has none); the model's output is the UNet's, unconverted.
    A hub id not in the local cache fails at once without network (``ModelNotFoundError``, saying what to do).
    The embedded models on the CPU set torch to one thread unless asked otherwise (``use_threads``).
    """
    name = str(name_or_path)
    device = resolve_device(device)
    if name in ("gmm-digits", "unet-digits") and device.type == "cpu":
        use_threads()  # tiny models: one thread unless asked otherwise (use_threads)
    if name == "gmm-digits":
        model = gmm_digits()
    elif name == "unet-digits":
        model = load_unet_digits()
    else:
        model = _load_diffusers(name)
    return model.to(device).eval()
