"""The ``gmm-digits`` testbed: a Gaussian mixture fitted to scikit-learn's 8x8 digits, whose eps-prediction (and so
whose probability-flow ODE) is exact. ``load_digits_data`` is the data both embedded models are built from.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .schedule import DDPM_SCHEDULE, interpolated_sigma, training_sigmas


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
