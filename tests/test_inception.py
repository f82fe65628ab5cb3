"""Inception FID: input conversion, where the weights come from, the errors offline or without torch-fidelity,
and (where torch-fidelity and the weights are there) FID against torch-fidelity's own network and scipy."""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import scipy.linalg
import torch

import dode
from dode import metrics
from dode.models import ModelNotFoundError

DEVICE = os.environ.get("DODE_TEST_DEVICE", "cpu")


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No weights anywhere: no env var, an empty torch hub folder, and no network."""
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "_url_reachable", lambda url, timeout=3.0: False)
    return tmp_path / "torch" / "hub" / "checkpoints" / metrics.INCEPTION_FILE


@pytest.fixture
def fake_weights(tmp_path):
    path = tmp_path / "inception.pth"
    path.write_bytes(b"stand-in")
    return path


def test_inception_input_is_rounded_uint8_rgb():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0]).reshape(1, 1, 1, 7)
    expected = np.clip(np.rint((x.numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    got = metrics._inception_input(x)
    assert got.dtype == torch.uint8 and got.shape == (1, 3, 1, 7)
    for channel in range(3):  # grey images become RGB with three equal channels
        np.testing.assert_array_equal(got[:, channel : channel + 1].numpy(), expected)
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(metrics._inception_input(rgb), metrics.to_uint8(rgb))


def test_weights_from_argument_env_or_hub_cache(no_weights, fake_weights, monkeypatch):
    assert metrics.inception_weights(fake_weights) == str(fake_weights)
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(fake_weights))
    assert metrics.inception_weights() == str(fake_weights)
    monkeypatch.delenv(metrics.INCEPTION_ENV)
    no_weights.parent.mkdir(parents=True)
    no_weights.write_bytes(b"stand-in")  # where torch hub's download would land
    assert metrics.inception_weights() == str(no_weights)


def test_named_weights_file_must_exist(no_weights, tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="missing.pth.*weights-inception-2015-12-05"):
        metrics.inception_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path / "missing-too.pth"))
    with pytest.raises(ModelNotFoundError, match="missing-too.pth"):
        dode.frechet_distance(torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8), features="inception")


def test_offline_without_weights_says_where_to_put_them(no_weights):
    """The weights are resolved before torch-fidelity is needed, so this error shows here too."""
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with pytest.raises(ModelNotFoundError) as err:
        dode.frechet_distance(x, -x, features="inception")
    message = str(err.value)
    for part in (metrics.INCEPTION_FILE, metrics.INCEPTION_URL, str(no_weights.parent), metrics.INCEPTION_ENV):
        assert part in message


def test_without_torch_fidelity_says_how_to_install(fake_weights, monkeypatch):
    monkeypatch.setattr(metrics, "_TORCH_FIDELITY_AVAILABLE", False)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with pytest.raises(ModuleNotFoundError, match=r'pip install "dode\[inception\]".*torchvision'):
        dode.frechet_distance(x, -x, features="inception", inception_weights=fake_weights)


def test_inception_rejects_other_channel_counts(no_weights):
    with pytest.raises(ValueError, match="1 or 3"):
        dode.frechet_distance(torch.zeros(4, 2, 8, 8), torch.ones(4, 2, 8, 8), features="inception")
    with pytest.raises(ValueError, match="1 or 3"):
        dode.frechet_distance(torch.zeros(4, 64), torch.ones(4, 64), features="inception")


def test_reachability_check_answers_at_once_on_this_machine():
    """A refused connection is 'unreachable' without waiting; a listening socket is reachable."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert metrics._url_reachable(f"https://127.0.0.1:{port}/weights.pth")
    began = time.perf_counter()
    assert not metrics._url_reachable(f"https://127.0.0.1:{port}/weights.pth")  # closed now: refused
    assert time.perf_counter() - began < 1.0


def _inception_available() -> str | None:
    """Why the real Inception FID cannot run here, or None when it can."""
    if not metrics._TORCH_FIDELITY_AVAILABLE:
        return "torch-fidelity is not installed (pip install 'dode[inception]')"
    try:
        metrics.inception_weights()
    except ModelNotFoundError as err:
        return str(err)
    return None


@pytest.mark.skipif(_inception_available() is not None, reason=str(_inception_available()))
def test_inception_fid_matches_torch_fidelity_features_and_scipy():
    """Against torch-fidelity's Inception-v3 on the same uint8 images and scipy's sqrtm. The images are
    299 x 299 already, so neither resize (torchmetrics antialiased, torch-fidelity TensorFlow-like) changes them."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(40, 1, 299, 299, generator=gen) * 2 - 1
    b = (torch.rand(40, 1, 299, 299, generator=gen) * 1.5 - 1).clamp(-1, 1)
    got = dode.frechet_distance(a, b, features="inception", device=DEVICE)
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], metrics.inception_weights()).to(DEVICE)

    def stats(x):
        with torch.no_grad():
            features = network(metrics.to_uint8(x).repeat(1, 3, 1, 1).to(DEVICE))[0].double().cpu().numpy()
        return features.mean(0), np.cov(features, rowvar=False)

    (mu_a, s_a), (mu_b, s_b) = stats(a), stats(b)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * np.real(scipy.linalg.sqrtm(s_a @ s_b)))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-3)
    rgb = dode.frechet_distance(a.repeat(1, 3, 1, 1), b, features="inception", device=DEVICE)
    assert rgb == pytest.approx(got, rel=1e-6)  # grey images count as RGB with equal channels
