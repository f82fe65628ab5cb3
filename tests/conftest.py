import numpy as np
import pytest
import torch

import dode
from dode.models.registry import GaussianMixtureDenoiser


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The whole suite on one torch thread: tiny models run fastest so, and the runs stay comparable on a busy
    machine (the repository's ``one_thread`` fixture does the same per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    """A tiny random UNet2DModel (8x8, one channel) for diffusers pipelines, seeded; one per test module."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.fixture(scope="session")
def gmm():
    return dode.load_model("gmm-digits", device="cpu")


@pytest.fixture(scope="session")
def validation(gmm):
    """``distill``'s default validation set on gmm-digits (100 seeds from VALIDATION_SEED):
    ``distill(gmm, ..., validation=validation)`` gives exactly what ``distill(gmm, ...)`` gives (the reference of
    those seeds is computed once per process either way, ``dode.core.reference``)."""
    from dode.core.distill import VALIDATION_SEED

    return dode.Teacher(gmm, batch_size=100, seed=VALIDATION_SEED, substeps="fine")


class WrappedModel(torch.nn.Module):
    """Another model behind the same interface, counting its calls; ``alter(output, call)`` may change outputs."""

    def __init__(self, model, alter=None):
        super().__init__()
        self.model, self.alter, self.calls = model, alter, 0
        self.sample_shape, self.scheduler_config = model.sample_shape, model.scheduler_config

    def forward(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        return out if self.alter is None else self.alter(out, self.calls)


@pytest.fixture
def wrap():
    return WrappedModel


class GaussianODE:
    """A one-component 'mixture': x0 ~ N(mu, S). Its probability-flow ODE has a closed form."""

    def __init__(self, dim=4, seed=0, shape=(1, 2, 2)):
        rng = np.random.default_rng(seed)
        a = rng.normal(size=(dim, dim))
        self.mu = rng.normal(size=dim) * 0.5
        self.cov = a @ a.T / dim + 0.5 * np.eye(dim)
        self.model = GaussianMixtureDenoiser([1.0], self.mu[None], self.cov[None], shape)
        self.shape = shape

    def ve_state(self, x_start_ve, sigma_start, sigma):
        """x(sigma) = mu + (S + sigma^2)^(1/2) (S + sigma_T^2)^(-1/2) (x_T - mu), float64, shape (N, D)."""
        d, u = np.linalg.eigh(self.cov)
        gain = u @ np.diag(np.sqrt((d + sigma**2) / (d + sigma_start**2))) @ u.T
        return self.mu + (x_start_ve - self.mu) @ gain.T

    def ddpm_state(self, noise, init_scale_ddpm, sigma_start, sigma):
        """Closed-form state in the DDPM convention from an initial DDPM state noise * init_scale_ddpm."""
        flat = noise.reshape(len(noise), -1).double().numpy()
        x_ve = flat * init_scale_ddpm * np.sqrt(1 + sigma_start**2)
        out = self.ve_state(x_ve, sigma_start, sigma) / np.sqrt(1 + sigma**2)
        return torch.from_numpy(out).reshape(noise.shape)


@pytest.fixture(scope="session")
def gaussian():
    return GaussianODE()
