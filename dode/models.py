"""Models (testbeds): every model is an eps-predictor ``model(x_t, t) -> eps`` on a DDPM schedule.

A model carries ``sample_shape`` (C, H, W), ``scheduler_config`` (the DDPM-style noise schedule every
diffusers scheduler is built from) and ``name``. ``load_model`` returns one by name, folder or hub id.
"""
from __future__ import annotations

import functools
import os
import socket
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

#: Weights trained by this project and shipped with the package (``make models`` retrains them).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def training_sigmas(scheduler_config: dict) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) at every training timestep t, in float64."""
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_timestep(sigma, log_sigmas: np.ndarray):
    """The (fractional) training timestep of noise level sigma: log-sigma is linear between timesteps, the map
    diffusers' sigma-space schedulers use (``_sigma_to_t``)."""
    return np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas)))


def timestep_to_sigma(t, log_sigmas: np.ndarray):
    """The inverse of ``sigma_to_timestep``."""
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


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
        t = torch.as_tensor(t, dtype=torch.float64, device=self.log_sigmas.device).clamp(0, len(self.log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - low
        return torch.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1])

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


class DiffusersEpsModel(nn.Module):
    """A diffusers ``UNet2DModel`` seen through the common interface ``model(x_t, t) -> eps``."""

    def __init__(self, unet, scheduler_config: dict, name: str):
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        channels, size = unet.config.in_channels, unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.sample_shape = (channels, *size)
        self.name = name

    def forward(self, x_t, t):
        return self.unet(x_t, t).sample


class ModelNotFoundError(OSError):
    """A model name, folder or hub id that cannot be loaded."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without network, fail in seconds, not after minutes of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_unet(name_or_path: str, **kwargs):
    """A UNet2DModel from a pipeline layout (unet/) or a bare UNet layout."""
    from diffusers import UNet2DModel

    kwargs.setdefault("low_cpu_mem_usage", False)  # the default wants `accelerate`, and says so at length
    try:
        return UNet2DModel.from_pretrained(name_or_path, subfolder="unet", **kwargs)
    except (OSError, ValueError):
        return UNet2DModel.from_pretrained(name_or_path, **kwargs)


def _load_diffusers(name_or_path: str) -> DiffusersEpsModel:
    from diffusers import DDPMScheduler

    is_local = Path(name_or_path).expanduser().exists()
    if is_local:
        name_or_path = str(Path(name_or_path).expanduser())
        try:
            unet = _load_unet(name_or_path)
        except Exception as err:
            raise ModelNotFoundError(f"{name_or_path!r} is not a loadable diffusers UNet2DModel folder: {err}") from err
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not an embedded model ({', '.join(MODELS)}), "
            "not an existing folder, and not a hub id of the form 'owner/name'"
        )
    else:
        try:  # a copy in the local hub cache needs no network
            unet = _load_unet(name_or_path, local_files_only=True)
        except Exception:
            unet = None
        if unet is None:
            advice = (
                f"Download it on a machine with network access (e.g. `huggingface-cli download {name_or_path} "
                "--local-dir ./my-model`), copy the folder here and call dode.load_model('./my-model'). "
                f"(No local folder named {name_or_path!r} exists either.)"
            )
            if not _hub_reachable():
                raise ModelNotFoundError(f"cannot download {name_or_path!r}: the Hugging Face hub is unreachable "
                                         f"(offline?). {advice}")
            try:
                unet = _load_unet(name_or_path)
            except Exception as err:  # huggingface_hub raises several kinds; all mean "could not get it"
                raise ModelNotFoundError(f"could not download {name_or_path!r} ({type(err).__name__}: {err}). "
                                         f"{advice}") from err
    schedule = dict(DDPM_SCHEDULE)
    for sub in ("scheduler", None):
        try:
            schedule = dict(DDPMScheduler.load_config(name_or_path, subfolder=sub, local_files_only=True))
            break
        except Exception:  # no scheduler config there: try the next place, else keep the DDPM default
            continue
    return DiffusersEpsModel(unet, schedule, name_or_path)


def load_unet_digits(folder: str | os.PathLike = WEIGHTS_DIR / "unet-digits") -> DiffusersEpsModel:
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
    """Load a model by name (``"gmm-digits"``, ``"unet-digits"``), local diffusers UNet2DModel folder or hub id."""
    name = str(name_or_path)
    if name == "gmm-digits":
        model = gmm_digits()
    elif name == "unet-digits":
        model = load_unet_digits()
    else:
        model = _load_diffusers(name)
    return model.to(resolve_device(device)).eval()
