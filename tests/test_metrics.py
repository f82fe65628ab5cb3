"""Tests of dode.metrics against an independent numpy/scipy Frechet distance and RMSE."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import dode


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
