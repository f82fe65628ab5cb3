"""Tests of dode.evaluation.metrics against an independent numpy/scipy Frechet distance and RMSE."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import dode
from dode.evaluation import metrics


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), unbiased covariances, on flattened samples."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb)
    root = np.real(root)
    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * root))


def gaussian_samples(rng, n, mean_shift, scale, shape=(1, 4, 4)):
    dim = int(np.prod(shape))
    mix = rng.standard_normal((dim, dim)) * scale / np.sqrt(dim)
    x = mean_shift + rng.standard_normal((n, dim)) @ mix.T
    return torch.from_numpy(x.reshape(n, *shape))


@pytest.fixture(scope="module")
def two_sets():
    rng = np.random.default_rng(0)
    a = gaussian_samples(rng, 500, rng.standard_normal(16) * 0.5, 1.0)
    b = gaussian_samples(rng, 500, rng.standard_normal(16) * 0.5, 2.0)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frechet_distance_matches_scipy(two_sets, dtype):
    a, b = (x.to(dtype) for x in two_sets)
    expected = reference_frechet(a.double().numpy(), b.double().numpy())
    assert expected > 1.0  # the sets are clearly different
    got = dode.frechet_distance(a, b, features="pixel")
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments
    assert dode.frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_unequal_sizes_and_batches(two_sets):
    """Different numbers of samples per side; the result does not depend on the feature batch size."""
    a, b = two_sets
    a = a[:317]
    expected = reference_frechet(a.numpy(), b.numpy())
    assert dode.frechet_distance(a, b, batch_size=64) == pytest.approx(expected, rel=1e-6)
    assert dode.frechet_distance(a, b, batch_size=7) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_known_shift():
    """Same set shifted by a constant vector c: the covariances agree, so FD = ||c||^2."""
    rng = np.random.default_rng(1)
    a = gaussian_samples(rng, 400, 0.0, 1.5, shape=(2, 3, 2))
    shift = torch.from_numpy(rng.standard_normal((1, 2, 3, 2)))
    expected = float((shift**2).sum())
    assert dode.frechet_distance(a + shift, a) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_to_itself_is_zero(two_sets):
    a, _ = two_sets
    assert abs(dode.frechet_distance(a, a.clone())) < 1e-6


def test_negative_rounding_is_clamped_to_zero():
    """Identical sides with fewer samples than pixels: the covariances are singular, and the closed form rounds
    below 0 (the square roots of the zero eigenvalues come out near 1e-7, not 0). The distance is 0.0."""
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = metrics.feature_statistics(x)
    raw = float(metrics._compute_fid(*(torch.from_numpy(a) for a in (mu, sigma, mu, sigma))))
    assert -1e-6 * np.trace(sigma) < raw < 0
    assert dode.frechet_distance(x, x.clone()) == 0.0
    assert dode.frechet_distance(x, (mu, sigma)) == 0.0


def test_frechet_distance_unknown_features():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match="pixel"):
        dode.frechet_distance(x, x + torch.randn(4, 1, 2, 2), features="inception-v3-nonexistent")


def test_frechet_distance_mismatched_shapes():
    with pytest.raises(ValueError):
        dode.frechet_distance(torch.randn(10, 1, 4, 4), torch.randn(10, 1, 4, 5))
    with pytest.raises(ValueError):
        dode.frechet_distance(torch.randn(10, 16), torch.randn(10, 1, 4, 4))


def test_rmse_matches_numpy():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((7, 3, 5, 5))
    b = a + rng.standard_normal((7, 3, 5, 5)) * 0.3 + 0.1
    expected = np.sqrt(np.mean((a - b) ** 2))
    got = dode.rmse(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12)
    # float32 inputs: the same up to float32 rounding of the inputs
    got32 = dode.rmse(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got32 == pytest.approx(np.sqrt(np.mean((a.astype(np.float32).astype(np.float64)
                                                   - b.astype(np.float32).astype(np.float64)) ** 2)), rel=1e-12)
    assert dode.rmse(torch.from_numpy(a), torch.from_numpy(a)) == 0.0


def test_rmse_mismatched_shapes():
    with pytest.raises(ValueError):
        dode.rmse(torch.zeros(3, 1, 2, 2), torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError):
        dode.rmse(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2))


# -- reference statistics (.npz) and image folders -----------------------------------------------------------
def closed_form_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's matrix square root."""
    root = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))


def test_feature_statistics_are_mean_and_covariance(two_sets):
    a, _ = two_sets
    mu, sigma = metrics.feature_statistics(a, "pixel", batch_size=123)
    flat = a.reshape(len(a), -1).numpy()
    np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def digit_sets(gmm):
    """Mixture samples against the real 8x8 digits, both (N, 1, 8, 8) in [-1, 1]."""
    from dode.models.testbeds import load_digits_data

    return gmm.sample_data(400, seed=3), torch.from_numpy(load_digits_data()).float()


@pytest.mark.parametrize("features", ["pixel", "digits"])
def test_frechet_distance_from_saved_statistics(digit_sets, features, tmp_path):
    """FD to an .npz of the reference's statistics = FD to the reference samples = scipy's closed form."""
    samples, reference = digit_sets
    path = tmp_path / "reference.npz"
    metrics.save_statistics(path, *metrics.feature_statistics(reference, features))
    from_samples = dode.frechet_distance(samples, reference, features)
    from_file = dode.frechet_distance(samples, path, features)
    mu_ref, sigma_ref = metrics.load_statistics(path)
    closed_form = closed_form_from_statistics(*metrics.feature_statistics(samples, features), mu_ref, sigma_ref)
    assert from_samples > 0.1
    assert from_file == pytest.approx(from_samples, rel=1e-9)
    assert from_file == pytest.approx(closed_form, rel=1e-6)
    with np.load(path) as data:  # the shared format: plain float64 arrays named mu and sigma
        assert sorted(data.files) == ["mu", "sigma"] and data["mu"].dtype == np.float64


def test_image_folder_round_trip(digit_sets, tmp_path):
    """PNGs hold the samples quantised to uint8; a folder scores as that quantised tensor."""
    samples, reference = digit_sets
    paths = metrics.save_images(samples, tmp_path / "png")
    assert len(paths) == len(samples) and all(p.suffix == ".png" for p in paths)
    quantised = (np.clip(np.rint((samples.numpy() + 1) * 127.5), 0, 255) / 127.5 - 1).astype(np.float32)
    loaded = metrics.load_images(tmp_path / "png")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(quantised))
    assert float((loaded - samples.clamp(-1, 1)).abs().max()) <= 0.5 / 127.5 + 1e-6  # half a grey level
    assert dode.frechet_distance(tmp_path / "png", reference) == pytest.approx(
        dode.frechet_distance(torch.from_numpy(quantised), reference), rel=1e-9)


def test_rgb_images_round_trip(tmp_path):
    rgb = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metrics.save_images(rgb, tmp_path)
    assert torch.equal(metrics.load_images(tmp_path), metrics.from_uint8(metrics.to_uint8(rgb)))


def test_bad_image_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        metrics.load_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        dode.frechet_distance(tmp_path, torch.zeros(4, 1, 8, 8))
    metrics.save_images(torch.zeros(3, 1, 8, 8), tmp_path / "mixed")
    metrics.save_images(torch.zeros(1, 1, 8, 9), tmp_path / "other")
    (tmp_path / "other" / "000000.png").rename(tmp_path / "mixed" / "zzz.png")
    with pytest.raises(ValueError, match="zzz.png has shape"):
        metrics.load_images(tmp_path / "mixed")
    with pytest.raises(ValueError, match="N, 1 or 3"):
        metrics.save_images(torch.zeros(2, 2, 4, 4), tmp_path / "two-channels")


def test_bad_statistics_files(two_sets, tmp_path):
    a, _ = two_sets
    with pytest.raises(FileNotFoundError):
        metrics.load_statistics(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        dode.frechet_distance(a, garbage)
    np.savez(tmp_path / "no-sigma.npz", mu=np.zeros(16), cov=np.eye(16))
    with pytest.raises(ValueError, match="'mu' and 'sigma'.*cov"):
        metrics.load_statistics(tmp_path / "no-sigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(16), sigma=np.eye(15))
    with pytest.raises(ValueError, match="shape"):
        metrics.load_statistics(tmp_path / "shapes.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(16, np.nan), sigma=np.eye(16))
    with pytest.raises(ValueError, match="NaN"):
        metrics.load_statistics(tmp_path / "nan.npz")
    metrics.save_statistics(tmp_path / "other-space.npz", np.zeros(64), np.eye(64))  # e.g. FD-digits statistics
    with pytest.raises(ValueError, match="16 and 64 features"):
        dode.frechet_distance(a, tmp_path / "other-space.npz")
    with pytest.raises(ValueError, match="sigma"):
        metrics.save_statistics(tmp_path / "bad.npz", np.zeros(3), np.eye(4))
