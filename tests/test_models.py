"""Tests of dode.models.registry against independent computations (closed forms, Monte Carlo, diffusers itself)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, HeunDiscreteScheduler
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import dode
from dode.core.schedule import DDPM_SCHEDULE
from dode.models.testbeds import GaussianMixtureDenoiser


# ----------------------------------------------------------------------------------------------------------
# helpers: independent reference implementations
# ----------------------------------------------------------------------------------------------------------
def random_spd(rng: np.random.Generator, dim: int, low: float = 0.05, high: float = 2.0) -> np.ndarray:
    """A random SPD matrix with eigenvalues spread over [low, high]."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.linspace(low, high, dim)) @ q.T


def gaussian_posterior_mean_torch(mu, cov, y, sigma):
    """mu + S (S + sigma^2 I)^-1 (y - mu), rows of y, float64, with torch.linalg.solve."""
    mu, cov, y = (torch.as_tensor(a, dtype=torch.float64) for a in (mu, cov, y))
    a = cov + sigma**2 * torch.eye(cov.shape[0], dtype=torch.float64)
    return mu + (cov @ torch.linalg.solve(a, (y - mu).T)).T


def mixture_posterior_mean_np(weights, means, covs, y, sigma):
    """E[x0 | x0 + sigma n = y] for a Gaussian mixture, with scipy's multivariate normal densities."""
    weights, means, covs, y = (np.asarray(a, dtype=np.float64) for a in (weights, means, covs, y))
    dim = means.shape[1]
    out = np.zeros_like(y)
    for b, yb in enumerate(y):
        log_lik = np.array([
            np.log(w) + multivariate_normal(m, c + sigma**2 * np.eye(dim)).logpdf(yb)
            for w, m, c in zip(weights, means, covs)
        ])
        resp = np.exp(log_lik - logsumexp(log_lik))
        comps = [m + c @ np.linalg.solve(c + sigma**2 * np.eye(dim), yb - m) for m, c in zip(means, covs)]
        out[b] = np.einsum("k,kd->d", resp, np.array(comps))
    return out


def ddpm_alphas_cumprod(config) -> np.ndarray:
    return DDPMScheduler.from_config(config).alphas_cumprod.double().numpy()


# ----------------------------------------------------------------------------------------------------------
# GaussianMixtureDenoiser: denoiser
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_gaussian():
    rng = np.random.default_rng(0)
    dim = 6
    mu = rng.standard_normal(dim)
    cov = random_spd(rng, dim, 0.01, 3.0)
    model = GaussianMixtureDenoiser([1.0], mu[None], cov[None], (1, 2, 3))
    return model, mu, cov


@pytest.fixture(scope="module")
def three_gaussians():
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[0.0, 0.0], [2.0, 0.5], [0.5, 2.0]])
    covs = np.array([
        [[0.30, 0.10], [0.10, 0.20]],
        [[0.15, -0.05], [-0.05, 0.40]],
        [[0.25, 0.00], [0.00, 0.10]],
    ])
    model = GaussianMixtureDenoiser(weights, means, covs, (1, 1, 2))
    return model, weights, means, covs


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_single_gaussian_denoise_matches_closed_form(single_gaussian, sigma):
    model, mu, cov = single_gaussian
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.as_tensor(mu).reshape(1, 1, 2, 3) + x0 + sigma * torch.randn(5, 1, 2, 3, generator=gen, dtype=torch.float64)
    got = model.denoise(y, sigma)
    assert got.shape == y.shape
    expected = gaussian_posterior_mean_torch(mu, cov, y.reshape(5, -1), sigma).reshape(y.shape)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_single_gaussian_denoise_per_sample_sigmas(single_gaussian):
    """A vector of sigmas, one per sample, denoises each sample at its own noise level."""
    model, mu, cov = single_gaussian
    sigmas = [0.05, 1.0, 30.0]
    y = torch.randn(3, 1, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    got = model.denoise(y, torch.tensor(sigmas, dtype=torch.float64))
    for b, s in enumerate(sigmas):
        expected = gaussian_posterior_mean_torch(mu, cov, y[b].reshape(1, -1), s).reshape(1, 2, 3)
        torch.testing.assert_close(got[b], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.01, 0.7, 150.0])
def test_one_level_for_the_batch_agrees_with_a_level_per_sample(three_gaussians, sigma):
    """The denoiser's two paths: one level for the batch (the precision formed once) and one per sample (through
    the eigenbasis and back) give the same noise direction and eps, and so the same gradient in sigma: the one a
    learned grid follows."""
    model = three_gaussians[0]
    y = torch.randn(7, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * (1 + sigma)
    one = torch.tensor([sigma], dtype=torch.float64, requires_grad=True)
    each = torch.full((7,), sigma, dtype=torch.float64, requires_grad=True)
    a, b = model.noise_direction(y, one), model.noise_direction(y, each)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(one.grad, each.grad.sum().reshape(1), rtol=1e-10, atol=1e-15)
    # and the eps-prediction at one timestep for the batch against one per sample (the same level each)
    x_t = y.reshape(7, 1, 1, 2) / float(np.sqrt(1 + sigma**2))
    torch.testing.assert_close(model(x_t, torch.tensor(321.5)), model(x_t, torch.full((7,), 321.5)),
                               rtol=1e-12, atol=1e-14)


def test_the_noise_direction_differentiates_as_finite_differences_say(three_gaussians):
    """d eps / d sigma of the one-level path against central differences (float64)."""
    model = three_gaussians[0]
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    torch.autograd.gradcheck(lambda s: model.noise_direction(y, s) * s, (torch.tensor([0.8], dtype=torch.float64,
                                                                                         requires_grad=True),))


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_mixture_denoise_matches_monte_carlo_posterior(three_gaussians, sigma):
    """E[x0 | y] by self-normalised importance sampling of x0 from the prior, weighted by N(y; x0, sigma^2 I).

    The self-normalised estimator's standard error (delta method) is
    sqrt(sum_i w_i^2 (x0_i - E)^2) / sum_i w_i per coordinate; the test allows 5 standard errors
    (two-sided p ~ 6e-7 per coordinate) and checks that the standard error is small enough (< 0.01)
    for the comparison to be meaningful: the mixture's posterior mean differs from each single
    component's posterior mean at the chosen points by more than 0.1.
    """
    model, weights, means, covs = three_gaussians
    rng = np.random.default_rng(123)
    n = 1_000_000
    comps = rng.choice(len(weights), size=n, p=weights)
    chol = np.linalg.cholesky(covs)
    x0 = means[comps] + np.einsum("nij,nj->ni", chol[comps], rng.standard_normal((n, 2)))

    ys = np.array([[1.0, 0.3], [0.4, 1.1], [1.2, 1.2], [0.8, -0.2], [1.0, 1.0]])
    got = model.denoise(torch.as_tensor(ys).reshape(-1, 1, 1, 2), sigma).reshape(-1, 2).numpy()
    exact = mixture_posterior_mean_np(weights, means, covs, ys, sigma)
    for b, y in enumerate(ys):
        log_w = -0.5 * ((x0 - y) ** 2).sum(1) / sigma**2
        w = np.exp(log_w - log_w.max())
        est = (w[:, None] * x0).sum(0) / w.sum()
        se = np.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0)) / w.sum()
        assert np.all(se < 0.01), se
        np.testing.assert_array_less(np.abs(got[b] - est), 5 * se + 1e-12)
    # the points sit where more than one component matters: a single-component answer would be far off
    singles = np.stack([mixture_posterior_mean_np([1.0], means[k:k + 1], covs[k:k + 1], ys, sigma) for k in range(3)])
    assert np.all(np.abs(singles - exact[None]).max(-1) > 0.1)
    # and the second, exact implementation agrees to rounding
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# GaussianMixtureDenoiser: eps-parametrisation on the DDPM schedule
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, {**DDPM_SCHEDULE, "num_train_timesteps": 500, "beta_end": 0.012}],
                         ids=["ddpm", "custom"])
def test_eps_prediction_matches_denoiser_integer_timesteps(single_gaussian, config):
    _, mu, cov = single_gaussian
    model = GaussianMixtureDenoiser([1.0], mu[None], cov[None], (1, 2, 3), scheduler_config=config)
    abar = ddpm_alphas_cumprod(model.scheduler_config)
    n_t = len(abar)
    assert n_t == (config or DDPM_SCHEDULE)["num_train_timesteps"]
    ts = [0, 1, 17, n_t // 2, n_t - 2, n_t - 1]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.as_tensor(mu).reshape(1, 1, 2, 3) + torch.randn(len(ts), 1, 2, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ab = torch.as_tensor(abar[ts]).reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    x_ve = x_t / ab.sqrt()
    sig = ((1 - ab) / ab).sqrt()
    den = torch.stack([
        gaussian_posterior_mean_torch(mu, cov, x_ve[b].reshape(1, -1), float(sig[b])).reshape(1, 2, 3)
        for b in range(len(ts))
    ])
    expected = (x_ve - den) / sig

    # a vector of timesteps, one per sample
    got = model(x_t, torch.tensor(ts))
    assert got.dtype == x_t.dtype and got.shape == x_t.shape
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)
    # a scalar timestep (python int and 0-d tensor) broadcasts over the batch
    for b, t in enumerate(ts):
        batch = x_t[b:b + 1].expand(2, -1, -1, -1)
        torch.testing.assert_close(model(batch, t), expected[b:b + 1].expand(2, -1, -1, -1), rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(model(batch, torch.tensor(t)), expected[b:b + 1].expand(2, -1, -1, -1),
                                   rtol=1e-8, atol=1e-9)


def test_eps_prediction_mixture_matches_independent_posterior(three_gaussians):
    model, weights, means, covs = three_gaussians
    abar = ddpm_alphas_cumprod(model.scheduler_config)
    ts = np.array([0, 50, 200, 400, 999])
    x_t = torch.randn(len(ts), 1, 1, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = model(x_t, torch.tensor(ts)).reshape(len(ts), 2).numpy()
    for b, t in enumerate(ts):
        x_ve = x_t[b].reshape(1, 2).numpy() / np.sqrt(abar[t])
        s = np.sqrt((1 - abar[t]) / abar[t])
        expected = (x_ve - mixture_posterior_mean_np(weights, means, covs, x_ve, s)) / s
        np.testing.assert_allclose(got[b], expected[0], rtol=1e-8, atol=1e-9)


def test_eps_prediction_keeps_float32(three_gaussians):
    model = three_gaussians[0]
    x_t = torch.randn(4, 1, 1, 2, generator=torch.Generator().manual_seed(5))
    out = model(x_t, torch.tensor(300))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x_t.double(), torch.tensor(300)).float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# fractional timesteps: the inverse of diffusers' _sigma_to_t
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_sigma_dtype", [np.float64, np.float32])
def test_sigma_inverts_diffusers_sigma_to_t(single_gaussian, log_sigma_dtype):
    model = single_gaussian[0]
    sched = HeunDiscreteScheduler.from_config(model.scheduler_config)
    abar = sched.alphas_cumprod.double().numpy()
    train_sigmas = np.sqrt((1 - abar) / abar)
    # log_sigmas as diffusers' set_timesteps builds it (float32 there); float64 too
    log_sigmas = np.log((((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()).astype(log_sigma_dtype)

    rng = np.random.default_rng(6)
    idx = np.array([0, 1, 5, 100, 499, 998])
    frac = rng.uniform(0.05, 0.95, size=len(idx))
    sig = np.exp((1 - frac) * np.log(train_sigmas[idx]) + frac * np.log(train_sigmas[idx + 1]))
    sig = np.concatenate([sig, np.exp(rng.uniform(np.log(train_sigmas[0]), np.log(train_sigmas[-1]), 20))])
    t = sched._sigma_to_t(sig, log_sigmas)
    assert np.any(np.abs(t - np.round(t)) > 0.01)  # really fractional
    np.testing.assert_allclose(model.sigma(torch.as_tensor(t)).numpy(), sig, rtol=1e-6)
    # and at integer timesteps sigma(t) is the training sigma
    ints = np.arange(0, len(abar), 37)
    np.testing.assert_allclose(model.sigma(torch.as_tensor(ints)).numpy(), train_sigmas[ints], rtol=1e-12)


def test_eps_prediction_at_fractional_timesteps(single_gaussian):
    """model(x_t, t) at a fractional t is the eps-prediction at sigma = diffusers' sigma of t."""
    model, mu, cov = single_gaussian
    sched = HeunDiscreteScheduler.from_config(model.scheduler_config)
    abar = sched.alphas_cumprod.double().numpy()
    log_sigmas = 0.5 * np.log((1 - abar) / abar)
    sig = np.array([0.0123, 0.37, 1.0, 4.2, 77.7])
    t = sched._sigma_to_t(sig, log_sigmas)
    x_ve = torch.as_tensor(mu).reshape(1, 1, 2, 3) + torch.randn(
        len(sig), 1, 2, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * torch.as_tensor(
        np.sqrt(1 + sig**2)).reshape(-1, 1, 1, 1)
    x_t = x_ve / torch.as_tensor(np.sqrt(1 + sig**2)).reshape(-1, 1, 1, 1)
    got = model(x_t, torch.as_tensor(t))
    for b, s in enumerate(sig):
        den = gaussian_posterior_mean_torch(mu, cov, x_ve[b].reshape(1, -1), s).reshape(1, 2, 3)
        torch.testing.assert_close(got[b], (x_ve[b] - den) / s, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# load_model: gmm-digits
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    return dode.load_model("gmm-digits", device="cpu")


def test_gmm_digits_structure(digits_model):
    model = digits_model
    assert model.sample_shape == (1, 8, 8)
    mix = model.mixture
    k = mix.weights.shape[0]
    assert k >= 2
    assert mix.means.shape == (k, 64)
    assert mix.covariances.shape == (k, 64, 64)
    assert abs(float(mix.weights.sum()) - 1.0) < 1e-10
    assert bool((mix.weights > 0).all())
    assert model.scheduler_config["num_train_timesteps"] == 1000
    # each covariance is symmetric positive definite
    assert torch.allclose(mix.covariances, mix.covariances.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(mix.covariances).min()) > 0


def test_gmm_digits_moments_equal_data_moments(digits_model):
    """A fixed point of EM reproduces the data's mean exactly and its (biased) covariance plus reg_covar * I.

    An independent property of the fit: sum_k w_k mu_k = mean of the 8x8 digits in [-1, 1] (scikit-learn's
    bundled data, scaled here separately), sum_k w_k (S_k + mu_k mu_k^T) - m m^T = cov(data) + 1e-2 I.
    """
    from sklearn.datasets import load_digits

    data = load_digits().images.reshape(-1, 64).astype(np.float64) / 8.0 - 1.0
    mix = digits_model.mixture
    w, mu, cov = (a.double().cpu().numpy() for a in mix)
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    np.testing.assert_allclose(mean, data.mean(0), atol=1e-6)
    np.testing.assert_allclose(second - np.outer(mean, mean), np.cov(data.T, bias=True) + 1e-2 * np.eye(64),
                               atol=1e-5)


def test_gmm_digits_sample_data_reproducible(digits_model):
    a = digits_model.sample_data(64, seed=11)
    b = digits_model.sample_data(64, seed=11)
    c = digits_model.sample_data(64, seed=12)
    assert a.shape == (64, 1, 8, 8) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_gmm_digits_sample_data_moments(digits_model):
    """50k draws: empirical mean and covariance within 6 standard errors of the mixture's analytic moments.

    Standard errors are estimated from the samples themselves: for the mean, std(x_i)/sqrt(n); for the
    covariance entry (i, j), std((x_i - m_i)(x_j - m_j))/sqrt(n). 6 SE over 64 + 2080 quantities keeps
    the chance of a false failure negligible while a wrong component or scale would be many SE off.
    """
    n = 50_000
    x = digits_model.sample_data(n, seed=0).reshape(n, 64).double().numpy()
    w, mu, cov = (a.double().cpu().numpy() for a in digits_model.mixture)
    mean = w @ mu
    covariance = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu)) - np.outer(mean, mean)

    emp_mean = x.mean(0)
    se_mean = x.std(0) / np.sqrt(n)
    assert np.all(np.abs(emp_mean - mean) < 6 * se_mean), np.max(np.abs(emp_mean - mean) / se_mean)

    centred = x - mean  # centred at the true mean, so E[products] = covariance exactly
    emp_cov = centred.T @ centred / n
    squares = centred**2
    se_cov = np.sqrt((squares.T @ squares / n - emp_cov**2) / n)  # std of the products x_i x_j over sqrt(n)
    z = np.abs(emp_cov - covariance) / se_cov
    assert z.max() < 6, z.max()
    # the tolerance is tight relative to the signal
    assert np.abs(emp_cov - covariance).max() < 0.05 * np.abs(covariance).max()


# ----------------------------------------------------------------------------------------------------------
# load_model: errors
# ----------------------------------------------------------------------------------------------------------
def test_unknown_embedded_name_raises():
    with pytest.raises(dode.ModelNotFoundError) as info:
        dode.load_model("no-such-model", device="cpu")
    assert "gmm-digits" in str(info.value)
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("hf_hub_offline", ["1", None])
def test_hub_id_offline_fails_fast_with_local_folder_hint(hf_hub_offline):
    """Without network, a hub id fails quickly, with a hint to use a local folder.

    Left to itself the hub client retries DNS failures with back-off (about 47 s on this machine), so
    load_model checks first that the hub answers at all. Checked in a fresh process, both with
    HF_HUB_OFFLINE=1 and without it (the latter only where the hub really is unreachable, as here and in CI).
    """
    if hf_hub_offline is None and dode.util.hub._hub_reachable():
        pytest.skip("the hub is reachable from here: the offline path cannot be exercised")
    script = textwrap.dedent("""
        import json, time, dode
        start = time.perf_counter()
        try:
            dode.load_model("google/ddpm-cifar10-32", device="cpu")
            result = {"raised": None}
        except Exception as err:
            result = {"raised": type(err).__name__, "is_mnf": isinstance(err, dode.ModelNotFoundError),
                      "message": str(err)}
        result["seconds"] = time.perf_counter() - start
        print("RESULT" + json.dumps(result))
    """)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if hf_hub_offline:
        env["HF_HUB_OFFLINE"] = hf_hub_offline
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, proc.stdout + proc.stderr
    result = json.loads(lines[-1][len("RESULT"):])
    assert result["raised"] == "ModelNotFoundError" and result["is_mnf"], result
    assert result["seconds"] < 10, result
    message = result["message"].lower()
    assert "local" in message or "folder" in message
    assert "google/ddpm-cifar10-32" in result["message"]


# ----------------------------------------------------------------------------------------------------------
# load_model: local diffusers folders
# ----------------------------------------------------------------------------------------------------------
def tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return unet.eval()


def check_loaded_unet(model, unet):
    assert model.sample_shape == (1, 8, 8)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    with torch.no_grad():
        for t in (torch.tensor([5, 500, 999]), torch.tensor(437.25)):
            expected = unet(x, t).sample
            got = model(x, t)
            assert got.shape == x.shape
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the weights are the saved ones, not a fresh initialisation
    with torch.no_grad():
        other = tiny_unet(seed=1)(x, torch.tensor(437.25)).sample
    assert not torch.allclose(got, other)


def test_local_unet_folder(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    DDPMScheduler(beta_start=2e-4, beta_end=0.031, num_train_timesteps=800).save_pretrained(tmp_path)
    model = dode.load_model(str(tmp_path), device="cpu")
    assert model.scheduler_config["beta_end"] == pytest.approx(0.031)
    assert model.scheduler_config["beta_start"] == pytest.approx(2e-4)
    assert model.scheduler_config["num_train_timesteps"] == 800
    assert not model.training
    check_loaded_unet(model, unet)
    # a pathlib.Path works as well
    assert dode.load_model(tmp_path, device="cpu").scheduler_config["beta_end"] == pytest.approx(0.031)


def test_local_pipeline_folder(tmp_path):
    """The layout of a saved DDPMPipeline: unet/ and scheduler/ subfolders."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler(beta_end=0.027).save_pretrained(tmp_path / "scheduler")
    model = dode.load_model(str(tmp_path), device="cpu")
    assert model.scheduler_config["beta_end"] == pytest.approx(0.027)
    check_loaded_unet(model, unet)


def test_local_unet_folder_without_scheduler_gets_ddpm_default(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no scheduler config: assuming the DDPM schedule"):
        model = dode.load_model(str(tmp_path), device="cpu")
    for key, value in DDPM_SCHEDULE.items():
        assert model.scheduler_config[key] == value


def test_local_folder_with_corrupt_config_raises(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(dode.ModelNotFoundError):
        dode.load_model(str(tmp_path), device="cpu")


def test_empty_local_folder_raises(tmp_path):
    with pytest.raises(dode.ModelNotFoundError):
        dode.load_model(str(tmp_path), device="cpu")


def test_scheduler_config_holds_only_the_schedule_and_prediction_type(tmp_path):
    """Solver settings of the checkpoint (clipping, spacing, variance) do not reach dode's solvers."""
    tiny_unet().save_pretrained(tmp_path)
    DDPMScheduler(beta_end=0.015, prediction_type="sample", clip_sample=True, timestep_spacing="leading",
                  variance_type="fixed_large").save_pretrained(tmp_path)
    model = dode.load_model(tmp_path, device="cpu")
    assert model.scheduler_config == {**DDPM_SCHEDULE, "beta_end": 0.015, "prediction_type": "sample"}


def test_unknown_prediction_types_are_clear_errors(tmp_path, digits_model):
    tiny_unet().save_pretrained(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError, match="'flow_prediction' \\(flow matching\\) is not supported for a UNet"):
        dode.load_model(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        dode.models.registry.as_prediction_type(digits_model, "x0")


def test_is_available(tmp_path, monkeypatch):
    assert dode.models.registry.is_available("gmm-digits") and dode.models.registry.is_available(tmp_path)
    assert not dode.models.registry.is_available("./no/such/folder")
    monkeypatch.setattr(dode.util.hub, "_hub_reachable", lambda timeout=3.0: False)
    assert not dode.models.registry.is_available("dode-tests/not-in-the-cache")


# ----------------------------------------------------------------------------------------------------------
# prediction types: one ODE through an epsilon, a v and an x0 (sample) model
# ----------------------------------------------------------------------------------------------------------
class Reparametrised(torch.nn.Module):
    """gmm-digits as a v- or x0-predictor, written out here: x_t = a x0 + s eps, v = a eps - s x0, with
    abar = 1 / (1 + sigma(t)^2) at the model's own (log-linear) sigma of a fractional timestep."""

    def __init__(self, eps_model, prediction_type):
        super().__init__()
        self.eps_model, self.prediction_type = eps_model, prediction_type
        self.sample_shape = eps_model.sample_shape
        self.scheduler_config = {**eps_model.scheduler_config, "prediction_type": prediction_type}

    def forward(self, x_t, t):
        eps = self.eps_model(x_t, t).double()
        abar = 1 / (1 + self.eps_model.sigma(t).reshape(-1, 1, 1, 1) ** 2)
        x0 = (x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        out = x0 if self.prediction_type == "sample" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return out.to(x_t.dtype)


def test_convert_prediction_between_every_pair_of_types():
    gen = torch.Generator().manual_seed(9)
    x0, eps = (torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    abar = torch.tensor([0.9999, 0.9, 0.5, 0.01, 4e-5], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
    for source, output in outputs.items():
        for target, expected in outputs.items():
            got = dode.models.registry.convert_prediction(output, x_t, abar, source, target)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_every_solver_gives_the_eps_models_samples_for_v_and_x0_models(digits_model, solver, prediction_type):
    """The scheduler converts the output itself: same ODE, same samples. Two exceptions in diffusers' PNDM: it
    takes no x0 model, and it extrapolates raw v outputs before converting them (another solver); an epsilon
    view of the model (``as_prediction_type``) gives it the eps model's samples.

    On levels that are not training timesteps diffusers hands the model a rounded (DPM-Solver++, logSNR-uniform)
    or truncated (DPM-Solver, exponential) timestep while converting at its own level: the model's conversion at
    its time and the scheduler's at its level then differ, by a few 1e-3 at the end. So the DPM-Solvers are checked
    exactly on linspace levels (integer timesteps), and on their paper spacings to that rounding."""
    model = Reparametrised(digits_model, prediction_type)
    spacing = "linspace" if solver.startswith("dpm_solver") else None
    expected = dode.sample(digits_model, solver, 5, 16, seed=3, spacing=spacing, progress=False)
    # Heun's sigma -> fractional t -> sigma round trip is float32 in diffusers: ~1e-4 at the end
    # iPNDM's fourth-order extrapolation (coefficients up to 59/24) amplifies float32 round-off: ~3e-5
    tolerance = {"heun": 1e-3, "ipndm": 1e-4}.get(solver, 1e-5)
    if solver == "pndm":
        if prediction_type == "sample":
            with pytest.raises(ValueError, match="prediction_type"):
                dode.sample(model, solver, 5, 16, seed=3, progress=False)
        else:
            assert (dode.sample(model, solver, 5, 16, seed=3, progress=False) - expected).abs().max() > 0.1
        model = dode.models.registry.as_prediction_type(model, "epsilon")
    torch.testing.assert_close(dode.sample(model, solver, 5, 16, seed=3, spacing=spacing, progress=False), expected,
                               rtol=0, atol=tolerance)
    if spacing is not None:
        paper = dode.sample(digits_model, solver, 5, 16, seed=3, progress=False)
        torch.testing.assert_close(dode.sample(model, solver, 5, 16, seed=3, progress=False), paper, rtol=0,
                                   atol=2e-2)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_distilling_an_epsilon_view_gives_the_eps_models_lambdas(digits_model, solver):
    expected = dode.distill(digits_model, solver, 5, batch_size=8, guard=False)  # the greedy fits compared
    x_expected = dode.sample(digits_model, expected, 5, 8, seed=50, progress=False)
    for prediction_type in ("v_prediction", "sample"):
        model = dode.models.registry.as_prediction_type(Reparametrised(digits_model, prediction_type), "epsilon")
        assert model.scheduler_config["prediction_type"] == "epsilon"
        fitted = dode.distill(model, solver, 5, batch_size=8, guard=False)
        np.testing.assert_allclose(fitted.lambdas, expected.lambdas, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(dode.sample(model, fitted, 5, 8, seed=50, progress=False), x_expected,
                                   rtol=0, atol=1e-3)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_dode_corrects_the_raw_output_against_the_same_teacher(digits_model, solver):
    """The teacher is one ODE whatever the parametrisation; D-ODE corrects the output the scheduler is given, so
    on a v model its lambdas are not the eps model's."""
    v_model = Reparametrised(digits_model, "v_prediction")
    scheduler = dode.make_scheduler(solver, v_model)
    scheduler.set_timesteps(dode.get_solver(solver).steps_for(5))
    targets = [dode.Teacher(m, batch_size=8).targets(scheduler) for m in (digits_model, v_model)]
    torch.testing.assert_close(targets[1], targets[0], rtol=0, atol=1e-4)
    v_lambdas = dode.distill(v_model, solver, 5, batch_size=8, guard=False).lambdas
    eps_lambdas = dode.distill(digits_model, solver, 5, batch_size=8, guard=False).lambdas
    assert np.abs(np.subtract(v_lambdas, eps_lambdas)).max() > 0.1


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_v_prediction_unet_folder_distil_sample_save_reload(tmp_path, layout):
    from diffusers import DDPMPipeline

    unet = tiny_unet()
    scheduler = DDPMScheduler(prediction_type="v_prediction", beta_end=0.015)
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
        assert {"model_index.json", "unet", "scheduler"} <= {p.name for p in tmp_path.iterdir()}
    else:
        unet.save_pretrained(tmp_path)
        scheduler.save_pretrained(tmp_path)
    model = dode.load_model(tmp_path, device="cpu")
    assert model.scheduler_config == {**DDPM_SCHEDULE, "beta_end": 0.015, "prediction_type": "v_prediction"}
    check_loaded_unet(model, unet)  # the raw (v) output
    fitted = dode.distill(model, "dpm_solver_pp_2m", 4, batch_size=8, guard=False)
    assert fitted.config.prediction_type == "v_prediction" and fitted.lambdas[1:] != [0.0] * 3
    x = dode.sample(model, fitted, 4, 6, seed=2, progress=False)
    fitted.save_pretrained(tmp_path / "d-dpm")
    reloaded = dode.DODEScheduler.from_pretrained(tmp_path / "d-dpm")
    assert reloaded.lambdas == fitted.lambdas and reloaded.config.prediction_type == "v_prediction"
    assert torch.equal(dode.sample(model, reloaded, 4, 6, seed=2, progress=False), x)
    # the same ODE through an epsilon view: the same base samples, computed by the scheduler's other branch (on
    # levels at integer timesteps: on logSNR-uniform ones diffusers rounds the model's timestep, see above)
    eps_view = dode.models.registry.as_prediction_type(model, "epsilon")
    torch.testing.assert_close(dode.sample(eps_view, "dpm_solver_pp_2m", 4, 6, seed=2, spacing="trailing",
                                           progress=False),
                               dode.sample(model, "dpm_solver_pp_2m", 4, 6, seed=2, spacing="trailing", progress=False),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_solve_ode_takes_any_prediction_type(digits_model, prediction_type):
    expected = dode.solve_ode(digits_model, 4, seed=5, progress=False)
    got = dode.solve_ode(Reparametrised(digits_model, prediction_type), 4, seed=5, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# gmm-digits is the same on every machine: a shipped fit, draws through a unique factor
# ----------------------------------------------------------------------------------------------------------
def test_gmm_digits_is_the_shipped_mixture_and_a_refit_is_the_same_mixture_up_to_rounding():
    from dode.models import testbeds

    model = testbeds.gmm_digits()
    shipped = testbeds.load_mixture()
    assert all(torch.equal(a, b) and a.dtype == torch.float64 for a, b in zip(model.mixture, shipped))
    # scikit-learn's EM here, on this machine's BLAS: the same fit to rounding on the CPU that made the file (6.7e-16
    # under another OpenBLAS kernel there). Elsewhere EM may stop an iteration earlier or later, which moves it by
    # about 5e-3; another random_state moves it by 0.1-1.6. The bound tells the two apart on any machine.
    refit = testbeds.refit_digits_mixture()
    assert max(refit.max_abs.values()) < 0.05, refit.max_abs
    # other settings still fit afresh (a registry test builds a 3-component mixture)
    assert testbeds.gmm_digits(n_components=3).weights.shape == (3,)


def test_a_missing_mixture_file_says_how_to_make_it(tmp_path):
    from dode.models import testbeds

    with pytest.raises(FileNotFoundError, match="make models"):
        testbeds.load_mixture(tmp_path / "none.safetensors")
    path = testbeds.save_mixture(testbeds.load_mixture(), tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(testbeds.load_mixture(path), testbeds.load_mixture()))


def test_gmm_digits_draws_do_not_turn_with_the_last_bits_of_the_covariances(digits_model):
    """Every component has 10-17 equal eigenvalues (the reg_covar floor on pixels constant in the data), inside which
    an eigenvector basis is arbitrary and turns with the last bit of the covariance (another CPU, BLAS kernel or
    thread count). Draws through the Cholesky factor, which is unique, move only by rounding: a relative 1e-12
    perturbation of the covariances moves the draws of a seed by less than 1e-9. Through the eigenvectors they moved
    by O(1)."""
    from dode.models.testbeds import GaussianMixtureDenoiser

    w, mu, cov = digits_model.mixture
    eigenvalues = torch.linalg.eigvalsh(cov)
    repeated = ((eigenvalues[:, 1:] - eigenvalues[:, :-1]).abs() < 1e-9).sum(1)
    assert int(repeated.min()) >= 5  # the trap is there: repeated eigenvalues in every component
    noise = torch.randn(cov.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nudged = cov * (1 + 1e-12 * (noise + noise.transpose(1, 2)) / 2)  # symmetric, relative 1e-12
    other = GaussianMixtureDenoiser(w, mu, nudged, (1, 8, 8))
    a, b = digits_model.sample_data(2000, seed=1).double(), other.sample_data(2000, seed=1).double()
    assert (a - b).abs().max() < 1e-6  # float32 draws: their rounding is the limit here
    exact = [m.sample_data(500, seed=1, dtype=torch.float64) for m in (digits_model, other)]
    assert (exact[0] - exact[1]).abs().max() < 1e-9
