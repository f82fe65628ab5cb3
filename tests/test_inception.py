"""Inception FID: input conversion, where the weights come from, the errors offline or without torch-fidelity,
the shape rules and batching (with a small stand-in network, everywhere), and, where torch-fidelity and weights
are there (`make test-inception` makes stand-in weights), features and FID against torch-fidelity's own
extractor and FID, and scipy."""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import scipy.linalg
import torch

import dode
from dode.evaluation import metrics
from dode.models.registry import ModelNotFoundError

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


# -- shape rules, batching and one network per call, with a small stand-in for the Inception network ------------
class PooledPixels(torch.nn.Module):
    """Stands in for the Inception network: uint8 RGB (N, 3, H, W) of any size to 48 features (4x4 mean pools)."""

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return torch.nn.functional.adaptive_avg_pool2d(x.double(), 4).flatten(1)


@pytest.fixture
def pooled_network(monkeypatch):
    """features="inception" through PooledPixels, recording each network built and each batch's size."""
    record = {"built": 0, "batches": []}

    def build(weights):
        record["built"] += 1
        network = PooledPixels()
        network.register_forward_pre_hook(lambda module, args: record["batches"].append(len(args[0])))
        return network

    monkeypatch.setattr(metrics, "_inception_network", build)
    return record


def pooled_statistics(x: torch.Tensor):
    """Mean and covariance of PooledPixels' features, computed here: uint8 as to_uint8 rounds (in float32), grey
    repeated."""
    images = np.clip(np.rint((x.numpy() + np.float32(1)) * np.float32(127.5)), 0, 255).astype(np.float64)
    images = np.repeat(images, 3 // images.shape[1], axis=1)
    n, c, h, w = images.shape
    features = images.reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(n, -1)
    return features.mean(0), np.cov(features, rowvar=False)


def closed_form(mu1, sigma1, mu2, sigma2) -> float:
    root = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))


def test_grey_and_rgb_of_any_size_one_network_per_call_bounded_batches(pooled_network):
    """Tensors follow the rule folders and .npz files follow: each side any size, 1 or 3 channels (grey as RGB
    with three equal channels). One network serves both sides; the CPU batches hold INCEPTION_CPU_BATCH images."""
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(250, 3, 32, 32, generator=gen) * 2 - 1
    grey = torch.rand(130, 1, 16, 16, generator=gen) * 1.6 - 1
    got = dode.frechet_distance(grey, rgb, features="inception", device="cpu")
    expected = closed_form(*pooled_statistics(grey), *pooled_statistics(rgb))
    assert expected > 100.0
    assert got == pytest.approx(expected, rel=1e-8)  # eigenvalues against sqrtm, grey's covariance singular
    assert pooled_network["built"] == 1
    size = metrics.INCEPTION_CPU_BATCH
    assert pooled_network["batches"] == [len(b) for n in (130, 250) for b in torch.arange(n).split(size)]
    assert dode.frechet_distance(grey.expand(-1, 3, -1, -1), rgb, features="inception", device="cpu") == got
    pooled_network["batches"].clear()
    dode.frechet_distance(grey, rgb, features="inception", batch_size=64, device="cpu")  # an explicit size wins
    assert max(pooled_network["batches"]) == 64 and pooled_network["built"] == 3  # one per call


def test_folders_tensors_and_statistics_agree_without_rebuilding(pooled_network, tmp_path):
    gen = torch.Generator().manual_seed(1)
    grey = torch.rand(60, 1, 8, 8, generator=gen) * 2 - 1
    rgb = torch.rand(50, 3, 12, 12, generator=gen) * 2 - 1
    metrics.save_images(grey, tmp_path / "grey")
    from_tensors = dode.frechet_distance(grey, rgb, features="inception", device="cpu")
    assert dode.frechet_distance(tmp_path / "grey", rgb, features="inception", device="cpu") == from_tensors
    metrics.save_statistics(tmp_path / "rgb.npz", *metrics.feature_statistics(rgb, "inception", device="cpu"))
    built = pooled_network["built"]
    assert dode.frechet_distance(tmp_path / "grey", tmp_path / "rgb.npz", features="inception") == pytest.approx(
        from_tensors, rel=1e-12)
    assert dode.frechet_distance(tmp_path / "rgb.npz", tmp_path / "rgb.npz", features="inception") < 1e-6
    assert pooled_network["built"] == built + 1  # statistics on both sides need no network at all


def test_pixel_features_still_need_one_shape(pooled_network):
    with pytest.raises(ValueError, match="one shape"):
        dode.frechet_distance(torch.zeros(4, 1, 8, 8), torch.zeros(4, 3, 8, 8), features="pixel")
    assert pooled_network["built"] == 0


# -- the real network: torch-fidelity installed, weights found (real, or `make test-inception`'s stand-in) --------
def _inception_available() -> str | None:
    """Why the real Inception FID cannot run here, or None when it can."""
    if not metrics._TORCH_FIDELITY_AVAILABLE:
        return "torch-fidelity is not installed (pip install 'dode[inception]'; make test-inception)"
    try:
        metrics.inception_weights()
    except ModelNotFoundError as err:
        return str(err)
    return None


needs_torch_fidelity = pytest.mark.skipif(not metrics._TORCH_FIDELITY_AVAILABLE,
                                          reason="torch-fidelity is not installed (make test-inception)")
needs_inception = pytest.mark.skipif(_inception_available() is not None, reason=str(_inception_available()))


@needs_torch_fidelity
def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"stand-in")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)  # a checkpoint, but of another network
    for path in (garbage, other):
        with pytest.raises(ValueError) as err:
            dode.frechet_distance(torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8), features="inception",
                                  inception_weights=path, device="cpu")
        message = str(err.value)
        for part in (str(path), metrics.INCEPTION_FILE, "state dict"):
            assert part in message


@pytest.fixture(scope="module")
def fidelity_network():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], metrics.inception_weights()).to(DEVICE)


def fidelity_features(network, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """torch-fidelity's 2048 features of images in [-1, 1], as torch-fidelity reads saved PNGs: uint8 RGB."""
    images = metrics.to_uint8(x).repeat(1, 3 // x.shape[1], 1, 1)
    with torch.no_grad():
        return torch.cat([network(batch.to(DEVICE))[0].cpu() for batch in images.split(batch_size)])


@needs_inception
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32), (3, 299, 299)])
def test_features_equal_torch_fidelity(fidelity_network, shape):
    """Bit for bit on the CPU, resized (32 x 32) or not (299 x 299), grey or RGB, in the same batches."""
    x = torch.rand(12, *shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = metrics.extract_features(x, "inception", batch_size=6, device=DEVICE)
    theirs = fidelity_features(fidelity_network, x, batch_size=6)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (12, 2048)
    assert float(theirs.std(0).mean()) > 0.1  # features that do not vanish
    if DEVICE == "cpu":
        assert torch.equal(ours, theirs)
    else:  # two network instances may get other GPU kernels
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_inception
def test_torchmetrics_default_resize_would_differ(fidelity_network):
    """The check above can fail: torchmetrics' default (antialiased) resize gives other features at 32 x 32."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    antialiased = NoTrainInceptionV3("inception-v3-compat", ["2048"], metrics.inception_weights()).to(DEVICE)
    with torch.no_grad():
        other = antialiased(metrics.to_uint8(x).to(DEVICE)).cpu()
    assert float((other - fidelity_features(fidelity_network, x, 6)).abs().max()) > 1e-2


@needs_inception
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of singular covariances, as expected
def test_fid_equals_torch_fidelity_and_scipy(tmp_path):
    """PNG folders of 32 x 32 images, grey against RGB: our FID against torch-fidelity's calculate_metrics on the
    same folders, and against scipy's sqrtm on our features (equal to torch-fidelity's, above)."""
    import torch_fidelity

    gen = torch.Generator().manual_seed(4)
    a = torch.rand(32, 1, 32, 32, generator=gen) * 2 - 1
    b = (torch.rand(28, 3, 32, 32, generator=gen) * 1.5 - 1).clamp(-1, 1)
    metrics.save_images(a, tmp_path / "a")
    metrics.save_images(b, tmp_path / "b")
    got = dode.frechet_distance(tmp_path / "a", tmp_path / "b", features="inception", device=DEVICE)
    fidelity = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True, cuda=DEVICE.startswith("cuda"),
        feature_extractor_weights_path=metrics.inception_weights(), cache=False, save_cpu_ram=True, verbose=False,
    )["frechet_inception_distance"]

    def stats(x):
        features = metrics.extract_features(x, "inception", device=DEVICE).double().numpy()
        return features.mean(0), np.cov(features, rowvar=False)

    scipy_value = closed_form(*stats(a), *stats(b))
    assert scipy_value > 1.0
    assert got == pytest.approx(fidelity, rel=1e-6)
    assert got == pytest.approx(scipy_value, rel=1e-6)


@needs_inception
def test_identical_singular_inputs_give_zero(tmp_path):
    """Fewer samples than features: singular covariances, whose square root rounds; the distance is clamped at 0."""
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    metrics.save_images(x, tmp_path)
    mu, sigma = metrics.feature_statistics(tmp_path, "inception", device=DEVICE)
    raw = float(metrics._compute_fid(*(torch.from_numpy(a) for a in (mu, sigma, mu, sigma))))
    assert abs(raw) < 1e-4 * np.trace(sigma)  # rounding (the issue saw -0.0099 here)
    assert dode.frechet_distance(tmp_path, x, features="inception", device=DEVICE) == max(raw, 0.0)
