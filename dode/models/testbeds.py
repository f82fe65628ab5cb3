"""The ``gmm-digits`` testbed: a Gaussian mixture fitted to scikit-learn's 8x8 digits, whose eps-prediction (and so
whose probability-flow ODE) is exact. ``load_digits_data`` is the data both embedded models are built from.
``gmm-digits-flow`` is the same mixture as a rectified flow (``GaussianMixtureFlow``): its velocity is exact.

The fitted mixture is shipped (``dode/weights/gmm-digits/mixture.safetensors``, float64): scikit-learn's EM runs on
numpy's BLAS, whose last bits depend on the CPU kernel and thread count, so a refit on every machine would be a
slightly different testbed on each. ``refit_digits_mixture`` (``make models``) fits it again and says how far the
refit is from the shipped file.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..util.runtime import WEIGHTS_DIR
from ..core.schedule import DDPM_SCHEDULE, FLOW_SCHEDULE, interpolated_sigma, training_sigmas

#: The shipped gmm-digits mixture, and the settings of the fit that made it (``gmm_digits``' defaults).
MIXTURE_FILE = WEIGHTS_DIR / "gmm-digits" / "mixture.safetensors"
MIXTURE_SETTINGS = {"n_components": 10, "reg_covar": 1e-2, "random_state": 0}


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
    posterior mean E[x0 | y] = sum_k r_k(y) (mu_k + S_k (S_k + sigma^2 I)^-1 (y - mu_k)) = y - sigma^2 sum_k
    r_k(y) (S_k + sigma^2 I)^-1 (y - mu_k) is computed in float64 through the eigendecomposition
    S_k = U_k diag(d_k) U_k^T (``noise_direction``); it does not depend on which basis U_k the eigensolver picks
    inside a repeated eigenvalue. The eps-prediction is sigma times that sum, with no difference of near-equal
    terms at small sigma. Draws from the data (``sample_data``) go through the
    Cholesky factor, which is unique: an eigenvector basis would turn with the last bit of the covariance where
    eigenvalues repeat (the ``reg_covar`` floor on constant pixels), and the same seed would draw other samples
    on another CPU. Fractional timesteps use the log-sigma interpolation that diffusers' sigma-space schedulers
    invert (``_sigma_to_t``).
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
        self.register_buffer("cholesky", torch.linalg.cholesky(covariances))  # S_k = L_k L_k^T, unique
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

    def noise_direction(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """sum_k r_k(y) (S_k + sigma^2 I)^-1 (y - mu_k), minus the score of the noisy data at y = x0 + sigma * noise,
        for y of shape (B, D), float64: E[x0 | y] = y - sigma^2 times it (Tweedie), E[noise | y] = sigma times it.
        ``sigma``: one level for the whole batch (one element), or one per sample (B,). One level, as a sampler's
        step has, takes one batched product: the precision (S_k + sigma^2 I)^-1 = U_k diag(1 / (d_k + sigma^2)) U_k^T
        is formed once per call; per-sample levels go through U_k and back (twice the products)."""
        if sigma.numel() == 1:
            var = self.eigvals + sigma.reshape(()) ** 2  # (K, D)
            precision = torch.matmul(self.eigvecs / var[:, None, :], self.eigvecs.transpose(1, 2))  # (K, D, D)
            offset = y[None] - self.means[:, None, :]  # (K, B, D)
            direction = torch.matmul(offset, precision)  # (S_k + sigma^2 I)^-1 (y - mu_k), the precision symmetric
            quadratic, log_det = (offset * direction).sum(-1), torch.log(var).sum(-1)[:, None]
        else:
            var = self.eigvals[:, None, :] + sigma[None, :, None] ** 2  # (K, B, D)
            z = torch.matmul(y[None] - self.means[:, None, :], self.eigvecs)  # rows of U_k^T (y - mu_k): (K, B, D)
            direction = torch.matmul(z / var, self.eigvecs.transpose(1, 2))
            quadratic, log_det = (z**2 / var).sum(-1), torch.log(var).sum(-1)
        resp = torch.softmax(torch.log(self.weights)[:, None] - 0.5 * (log_det + quadratic), dim=0)  # (K, B)
        return (resp[..., None] * direction).sum(0)

    def posterior_mean(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma * noise = y] for y of shape (B, D) and sigma of shape (B,) or one element, float64."""
        return y - sigma.reshape(-1, 1) ** 2 * self.noise_direction(y, sigma)

    def denoise(self, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """D(x, sigma) = E[x0 | x] for a state in the variance-exploding convention x = x0 + sigma * noise."""
        batch = x_ve.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x_ve.device).reshape(-1)
        mean = self.posterior_mean(x_ve.reshape(batch, -1).double(), sigma)
        return mean.reshape(x_ve.shape)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = self.sigma(t).reshape(-1)  # one level for the batch, or one per sample
        scale = torch.sqrt(1 + sigma**2).reshape(-1, *[1] * (x_t.dim() - 1))
        x_ve = x_t.double() * scale
        eps = sigma.reshape(-1, 1) * self.noise_direction(x_ve.reshape(x_t.shape[0], -1), sigma)
        return eps.reshape(x_t.shape).to(x_t.dtype)

    @torch.no_grad()
    def sample_data(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n exact draws from the mixture, shape (n, *sample_shape); seeded, on the CPU, float32 unless asked."""
        gen = torch.Generator().manual_seed(seed)
        comps = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=gen)
        noise = torch.randn(n, self.means.shape[1], generator=gen, dtype=torch.float64)
        x = self.means.cpu()[comps] + torch.einsum("nij,nj->ni", self.cholesky.cpu()[comps], noise)
        return x.to(dtype).reshape(n, *self.sample_shape)


class GaussianMixtureFlow(GaussianMixtureDenoiser):
    """The same Gaussian mixture as a rectified flow (flow matching, as SD3 and Flux are trained): its velocity is
    exact.

    For x_s = (1 - s) x0 + s eps (s in [0, 1], x0 from the mixture, eps standard normal), the state is a mixture of
    N((1 - s) mu_k, (1 - s)^2 S_k + s^2 I), and the velocity the ODE dx/ds = v(x, s) follows is
    v = E[eps - x0 | x_s] = (x_s - E[x0 | x_s]) / s, with E[x0 | x_s, k] = mu_k + (1 - s) S_k ((1 - s)^2 S_k +
    s^2 I)^-1 (x_s - (1 - s) mu_k), computed in float64 through the eigendecomposition of S_k (finite at s = 1,
    pure noise). The time input is diffusers' flow convention, t = s * num_train_timesteps (SD3's transformer
    gets the scheduler's timesteps, its ``shift`` already applied to s); ``scheduler_config["prediction_type"]``
    is ``"flow_prediction"``. Draws from the data (``sample_data``) are gmm-digits' own.
    """

    def __init__(self, weights, means, covariances, sample_shape, scheduler_config=None, name="gmm-flow"):
        super().__init__(weights, means, covariances, sample_shape, scheduler_config or FLOW_SCHEDULE, name)

    def level(self, t) -> torch.Tensor:
        """The flow level s = t / num_train_timesteps of (fractional) timesteps t, float64."""
        return torch.as_tensor(t, dtype=torch.float64, device=self.means.device) / float(
            self.scheduler_config["num_train_timesteps"])

    def flow_posterior_mean(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[x0 | (1 - s) x0 + s eps = x] for x of shape (B, D) and s of shape (B,), float64."""
        a = (1 - s)[None, :, None]
        var = a**2 * self.eigvals[:, None, :] + s[None, :, None] ** 2  # (K, B, D)
        z = torch.matmul(x[None] - a * self.means[:, None, :], self.eigvecs)  # U_k^T (x - a mu_k): (K, B, D)
        log_resp = torch.log(self.weights)[:, None] - 0.5 * (torch.log(var).sum(-1) + (z**2 / var).sum(-1))
        resp = torch.softmax(log_resp, dim=0)  # (K, B)
        shrunk = torch.matmul(z * (a * self.eigvals[:, None, :] / var), self.eigvecs.transpose(1, 2))
        return torch.einsum("kb,kbd->bd", resp, self.means[:, None, :] + shrunk)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        batch = x_t.shape[0]
        s = self.level(t).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        x = x_t.reshape(batch, -1).double()
        velocity = (x - self.flow_posterior_mean(x, s)) / s[:, None]
        return velocity.reshape(x_t.shape).to(x_t.dtype)


@functools.lru_cache(maxsize=4)
def _fit_digits_mixture(n_components: int, reg_covar: float, random_state: int) -> Mixture:
    from sklearn.mixture import GaussianMixture

    data = load_digits_data().reshape(-1, 64)
    gm = GaussianMixture(n_components, covariance_type="full", reg_covar=reg_covar, random_state=random_state)
    gm.fit(data)
    return Mixture(*(torch.from_numpy(a) for a in (gm.weights_, gm.means_, gm.covariances_)))


def load_mixture(path: str | Path = MIXTURE_FILE) -> Mixture:
    """The mixture saved by ``save_mixture`` (float64 tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mixture file {str(path)!r}; `make models` (or dode.models.testbeds.save_mixture("
                                "refit_digits_mixture().refit)) writes it")
    tensors = load_file(path)
    return Mixture(*(tensors[name] for name in Mixture._fields))


def save_mixture(mixture: Mixture, path: str | Path = MIXTURE_FILE) -> Path:
    """Write a mixture as float64 safetensors, with the fit's settings as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.double().contiguous() for name, t in zip(Mixture._fields, mixture)}
    save_file(tensors, path, metadata={k: str(v) for k, v in MIXTURE_SETTINGS.items()})
    return path


class MixtureRefit(NamedTuple):
    refit: Mixture
    shipped: Mixture
    max_abs: dict  # {"weights" | "means" | "covariances": largest absolute difference, refit against shipped}


def refit_digits_mixture(path: str | Path = MIXTURE_FILE) -> MixtureRefit:
    """Fit the gmm-digits mixture again (scikit-learn's EM, ``MIXTURE_SETTINGS``) and compare it with the one in
    ``path``: on the CPU that made the shipped file the two are identical; elsewhere they differ in the last bits."""
    refit = _fit_digits_mixture(**MIXTURE_SETTINGS)
    shipped = load_mixture(path)
    max_abs = {name: float((a - b).abs().max()) for name, a, b in zip(Mixture._fields, refit, shipped)}
    return MixtureRefit(refit, shipped, max_abs)


def gmm_digits(n_components: int = 10, reg_covar: float = 1e-2, random_state: int = 0) -> GaussianMixtureDenoiser:
    """The ``gmm-digits`` testbed: a full-covariance Gaussian mixture fitted to the 8x8 digits in [-1, 1].

    With the default settings (``MIXTURE_SETTINGS``) the shipped fit (``MIXTURE_FILE``), the same on every machine;
    other settings fit afresh (a few seconds of EM, cached per process). Every call returns a fresh module.
    """
    settings = {"n_components": n_components, "reg_covar": reg_covar, "random_state": random_state}
    params = load_mixture() if settings == MIXTURE_SETTINGS else _fit_digits_mixture(**settings)
    return GaussianMixtureDenoiser(*params, (1, 8, 8), DDPM_SCHEDULE, "gmm-digits")


def gmm_digits_flow(shift: float = 1.0) -> GaussianMixtureFlow:
    """The ``gmm-digits-flow`` testbed: gmm-digits' shipped mixture as a rectified flow (``GaussianMixtureFlow``),
    the same data distribution, sampled by flow solvers; ``shift``: its samplers' default shift (SD3's is 3.0)."""
    config = {**FLOW_SCHEDULE, "shift": float(shift)}
    return GaussianMixtureFlow(*load_mixture(), (1, 8, 8), config, "gmm-digits-flow")
