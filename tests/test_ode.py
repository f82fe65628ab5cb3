"""dode.solve_ode against the closed-form probability-flow ODE solution of a single Gaussian."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dode
from dode.core.schedule import DDPM_SCHEDULE
from dode.models.testbeds import GaussianMixtureDenoiser
from diffusers import DDPMScheduler

SHAPE = (1, 2, 2)


def schedule_sigmas(config) -> np.ndarray:
    abar = DDPMScheduler.from_config(config).alphas_cumprod.double().numpy()
    return np.sqrt((1 - abar) / abar)


def exact_ode_sample(mu, cov, noise, sigmas):
    """Exact ODE solution from x_T = noise * sqrt(1 + sigma_max^2) (VE state) down to sigma_min, then D(., sigma_min).

    For x0 ~ N(mu, S) the probability-flow ODE dx/dsigma = sigma (S + sigma^2 I)^-1 (x - mu) is solved by
    x(sigma) = mu + (S + sigma^2 I)^(1/2) (S + sigma_T^2 I)^(-1/2) (x_T - mu); in S's eigenbasis every
    coordinate scales by sqrt((d + sigma^2) / (d + sigma_T^2)). The denoiser D(x, s) = mu + S (S + s^2 I)^-1 (x - mu).
    """
    d, u = np.linalg.eigh(cov)
    s_max, s_min = sigmas[-1], sigmas[0]
    x_t = noise.reshape(len(noise), -1) * np.sqrt(1 + s_max**2)
    z = (x_t - mu) @ u
    z_min = z * np.sqrt((d + s_min**2) / (d + s_max**2))
    z_den = z_min * d / (d + s_min**2)
    return (mu + z_den @ u.T).reshape(noise.shape)


@pytest.fixture(scope="module")
def single_gaussian_ode():
    rng = np.random.default_rng(0)
    dim = int(np.prod(SHAPE))
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    cov = (q * np.array([0.003, 0.1, 0.7, 2.5])) @ q.T
    mu = rng.standard_normal(dim)
    model = GaussianMixtureDenoiser([1.0], mu[None], cov[None], SHAPE)
    return model, mu, cov


@pytest.mark.parametrize("seed", [0, 7])
def test_solve_ode_matches_closed_form(single_gaussian_ode, seed):
    model, mu, cov = single_gaussian_ode
    n = 6
    got = dode.solve_ode(model, n, seed=seed, progress=False, device="cpu")
    assert got.shape == (n, *SHAPE)
    assert got.dtype == torch.float32
    noise = np.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + k)).double().numpy()
                      for k in range(n)])
    # the noise of seed s is dode.seeded_noise's, and sample k of seed s comes from seed s + k alone
    np.testing.assert_array_equal(dode.seeded_noise(SHAPE, n, seed).double().numpy(), noise)
    expected = exact_ode_sample(mu, cov, noise, schedule_sigmas(model.scheduler_config))
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5, rtol=0)
    # the tolerance is far tighter than what the final denoising step changes (sigma_min * eps ~ 1e-2)
    sigmas = schedule_sigmas(model.scheduler_config)
    d, u = np.linalg.eigh(cov)
    z = (noise.reshape(n, -1) * np.sqrt(1 + sigmas[-1] ** 2) - mu) @ u
    without_final_jump = (mu + (z * np.sqrt((d + sigmas[0] ** 2) / (d + sigmas[-1] ** 2))) @ u.T).reshape(noise.shape)
    assert np.abs(without_final_jump - expected).max() > 1e-3


def test_solve_ode_custom_schedule(single_gaussian_ode):
    """The ODE runs over the model's own schedule (here 400 steps, a different beta_end)."""
    _, mu, cov = single_gaussian_ode
    config = {**DDPM_SCHEDULE, "num_train_timesteps": 400, "beta_end": 0.03}
    model = GaussianMixtureDenoiser([1.0], mu[None], cov[None], SHAPE, scheduler_config=config)
    got = dode.solve_ode(model, 4, seed=3, progress=False, device="cpu")
    noise = dode.seeded_noise(SHAPE, 4, 3).double().numpy()
    expected = exact_ode_sample(mu, cov, noise, schedule_sigmas(config))
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5, rtol=0)


def test_solve_ode_independent_of_batch_size(single_gaussian_ode):
    model, mu, cov = single_gaussian_ode
    n = 7
    full = dode.solve_ode(model, n, seed=2, progress=False, device="cpu")
    batched = dode.solve_ode(model, n, seed=2, batch_size=3, progress=False, device="cpu")
    assert batched.shape == full.shape == (n, *SHAPE)
    np.testing.assert_allclose(batched.numpy(), full.numpy(), atol=1e-6, rtol=0)
    # and a sub-range of seeds reproduces the corresponding rows
    tail = dode.solve_ode(model, 3, seed=6, progress=False, device="cpu")
    np.testing.assert_allclose(tail.numpy(), full[4:].numpy(), atol=1e-6, rtol=0)


def test_solve_ode_rejects_bad_batch_size(single_gaussian_ode):
    model = single_gaussian_ode[0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            dode.solve_ode(model, 3, batch_size=bad, progress=False, device="cpu")
