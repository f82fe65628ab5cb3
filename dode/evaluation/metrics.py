"""Sample quality: Frechet distances (torchmetrics) in a feature space, reference statistics, RMSE.

Feature spaces: ``"pixel"`` (raw pixels), ``"digits"`` (FD-digits, ``dode.evaluation.features``) and ``"inception"``
(FID: the 2048 Inception-v3 pool features of torchmetrics' copy of torch-fidelity's network, resized as
torch-fidelity does, so the features equal torch-fidelity's). Either side of a Frechet distance is a tensor of
samples, a folder of images, or an ``.npz`` file of statistics ``mu`` and ``sigma`` (the format of the widely
shared FID statistics; ``save_statistics`` writes one).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import _compute_fid
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from ..util.hub import ModelNotFoundError
from ..util.hub import url_reachable as _url_reachable  # a name of its own here, so tests can go offline
from ..util.runtime import resolve_device

FEATURES = ("pixel", "digits", "inception")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: torch-fidelity's Inception-v3 weights (converted from TensorFlow's FID network), as torchmetrics loads them
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = Path(urlparse(INCEPTION_URL).path).name
INCEPTION_ENV = "DODE_INCEPTION_WEIGHTS"
#: images per Inception forward on the CPU: peak memory grows about 10 MB per image (1.9 GB RSS in all at 50)
INCEPTION_CPU_BATCH = 50


class PixelFeatures(nn.Module):
    """The identity feature map: a sample's pixels as one flat vector."""

    def forward(self, x):
        return x.flatten(1).double()


# -- images: [-1, 1] floats <-> uint8, PNG folders ------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 0..255 (rounded, clipped), the usual way generated samples are saved."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images back to float32 in [-1, 1]; ``to_uint8(from_uint8(u))`` is ``u``."""
    return images.float() / 127.5 - 1


def _inception_input(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [-1, 1] as torchmetrics' Inception takes them: uint8 RGB (gray repeated)."""
    return to_uint8(x).expand(-1, 3, -1, -1)


def save_images(samples: torch.Tensor, folder: str | os.PathLike) -> list[Path]:
    """Write samples (N, 1 or 3, H, W) in [-1, 1] as PNG files 000000.png, ... into ``folder``."""
    if samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"save_images needs images (N, 1 or 3, H, W), got shape {tuple(samples.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(samples) - 1)))  # equal-width names sort in sample order
    paths = []
    for k, image in enumerate(to_uint8(samples).permute(0, 2, 3, 1).numpy()):
        paths.append(folder / f"{k:0{width}d}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(paths[-1])
    return paths


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (PNG, JPEG) in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {str(folder)!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path) -> torch.Tensor:
    """One image as uint8 (C, H, W): grayscale stays one channel, anything else becomes RGB."""
    with Image.open(path) as image:
        array = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    return torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)


def _image_batches(files: list[Path], batch_size: int):
    """Batches of float images in [-1, 1] read from ``files``; every image must have the first one's shape."""
    shape = _read_image(files[0]).shape
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            images.append(_read_image(path))
            if images[-1].shape != shape:
                raise ValueError(f"{path} has shape {tuple(images[-1].shape)}, the first image {tuple(shape)}")
        yield from_uint8(torch.stack(images))


def load_images(folder: str | os.PathLike) -> torch.Tensor:
    """Every image of ``folder`` (sorted by name) as float32 (N, C, H, W) in [-1, 1]."""
    return torch.cat(list(_image_batches(image_files(folder), 1000)))


# -- Inception weights -------------------------------------------------------------------------------------------
def inception_weights(path: str | os.PathLike | None = None) -> str | None:
    """The Inception weights file to load, or None when torchmetrics may download it (network reachable).

    Looked for in order: ``path``, the environment variable ``DODE_INCEPTION_WEIGHTS``, torch hub's
    ``checkpoints`` folder (where a download lands). Raises ``ModelNotFoundError`` saying where to put the
    file when there is none and no network.
    """
    given = path or os.environ.get(INCEPTION_ENV)
    if given:
        given = Path(given).expanduser()
        if not given.is_file():
            raise ModelNotFoundError(f"no Inception weights file {str(given)!r} ({INCEPTION_FILE} from {INCEPTION_URL})")
        return str(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    if not _url_reachable(INCEPTION_URL):
        raise ModelNotFoundError(
            f"the Inception weights {INCEPTION_FILE} are not here and {urlparse(INCEPTION_URL).hostname} is "
            f"unreachable (offline?). Download {INCEPTION_URL} on a machine with network access, then put the file "
            f"into {cached.parent} (torch hub's checkpoints folder) or point {INCEPTION_ENV} (or "
            "inception_weights=) at it."
        )
    return None


def _inception_network(inception_weights_path) -> nn.Module:
    """torchmetrics' Inception-v3 (2048 pool features) resizing as torch-fidelity and TF-Inception do."""
    weights = inception_weights(inception_weights_path)  # before torch-fidelity, so each error shows on its own
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            'features="inception" needs torch-fidelity: pip install "dode[inception]". It brings torchvision, '
            "which must match your torch build (same version line, same CPU or CUDA flavour)."
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:  # antialias=False: torch-fidelity's TensorFlow-1-like bilinear resize, not torchmetrics' default
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], weights, antialias=False)
    except Exception as err:
        if weights is None:  # the download failed: torch hub's own error says why
            raise
        raise ValueError(
            f"{weights!r} does not hold Inception weights: expected torch-fidelity's {INCEPTION_FILE} "
            f"({INCEPTION_URL}), a state dict of its InceptionV3 saved with torch.save ({type(err).__name__}: {err})"
        ) from err


def _inception_batch_size(device: torch.device) -> int:
    """Images per Inception forward: ``INCEPTION_CPU_BATCH`` on the CPU; on a GPU what half its free memory holds
    at about 12 MB an image (activations at 299 x 299 in float32), between 16 and 500."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(500, max(16, free // 2 // 12_000_000)))
    return INCEPTION_CPU_BATCH


# -- features and statistics -------------------------------------------------------------------------------------
class _FeatureMap:
    """One call's feature network on ``device``, built on first use and shared by every side of the call.

    Calling it maps a float batch (B, ...) in [-1, 1] to features (B, D). It checks each side's sample shape: pixel
    features need one shape throughout, FD-digits (1, 8, 8), Inception (1 or 3, H, W), any H and W per side.
    """

    def __init__(self, features: str, inception_weights=None, device="auto"):
        if features not in FEATURES:
            raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")
        self.features, self.weights, self.device = features, inception_weights, resolve_device(device)
        self.network = self.shape = None

    def batch_size(self, requested: int | None) -> int:
        if requested is not None:
            return requested
        return _inception_batch_size(self.device) if self.features == "inception" else 1000

    def check(self, sample_shape: tuple) -> None:
        if self.features == "inception":
            if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
                raise ValueError(f"Inception features need images of shape (1 or 3, H, W), got {sample_shape}")
        elif self.features == "digits":
            if sample_shape != (1, 8, 8):
                raise ValueError(f"features='digits' needs 8x8 digits of shape (1, 8, 8), got {sample_shape}")
        elif self.shape is not None and sample_shape != self.shape:
            raise ValueError(f"features='pixel' compares samples of one shape; got {self.shape} and {sample_shape}")
        self.shape = self.shape or sample_shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.network is None:
            if self.features == "inception":
                self.network = _inception_network(self.weights)
            elif self.features == "digits":
                from .features import DigitsFeatures

                self.network = DigitsFeatures().double()
            else:
                self.network = PixelFeatures()
            self.network.to(self.device).eval()
        batch = batch.to(self.device)
        with torch.no_grad():
            return self.network(_inception_input(batch) if self.features == "inception" else batch.double())


def _feature_batches(samples, feature_map: _FeatureMap, batch_size: int | None):
    """(number of samples, iterator over feature batches) of a tensor of samples or a folder of images."""
    size = feature_map.batch_size(batch_size)
    if isinstance(samples, torch.Tensor):
        if samples.dim() < 2:
            raise ValueError(f"samples must be (N, ...) with one sample per row, got shape {tuple(samples.shape)}")
        feature_map.check(tuple(samples.shape[1:]))
        return len(samples), map(feature_map, torch.split(samples, size))
    files = image_files(samples)
    feature_map.check(tuple(_read_image(files[0]).shape))
    return len(files), map(feature_map, _image_batches(files, size))


def extract_features(samples, features: str = "pixel", *, batch_size: int | None = None, inception_weights=None,
                     device="auto") -> torch.Tensor:
    """The features (N, D) of ``samples`` (a tensor (N, ...) or a folder of images, read as [-1, 1]), on the CPU.

    Inception features are float32 (as the network computes them), pixel and FD-digits features float64.
    """
    _, batches = _feature_batches(samples, _FeatureMap(features, inception_weights, device), batch_size)
    return torch.cat([batch.cpu() for batch in batches])


def _moments(samples, feature_map: _FeatureMap, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    count, batches = _feature_batches(samples, feature_map, batch_size)
    if count < 2:
        raise ValueError(f"feature statistics need at least two samples, got {count}")
    total = gram = 0
    for batch in batches:  # sums in float64, as torchmetrics' FrechetInceptionDistance keeps them
        batch = batch.double()
        total = total + batch.sum(0)
        gram = gram + batch.T @ batch
    mu = total / count
    sigma = (gram - count * torch.outer(mu, mu)) / (count - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_statistics(samples, features: str = "pixel", *, batch_size: int | None = None, inception_weights=None,
                       device="auto") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): mean and unbiased covariance (float64) of the features of ``samples``.

    ``samples`` is a tensor (N, ...) or a folder of images (read as [-1, 1]). Features are extracted in batches of
    ``batch_size`` on ``device``; by default 1000, and for Inception a size for the device (``INCEPTION_CPU_BATCH``
    on the CPU, from the free memory on a GPU), which bounds the memory.
    """
    return _moments(samples, _FeatureMap(features, inception_weights, device), batch_size)


def save_statistics(path: str | os.PathLike, mu, sigma) -> None:
    """Write ``mu`` (D,) and ``sigma`` (D, D) to an ``.npz`` file (float64), the shared FID-statistics format."""
    mu, sigma = _checked_statistics(mu, sigma, str(path))
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ``.npz`` file holding ``mu`` and ``sigma`` (written by ``save_statistics`` or any
    FID tool), as float64; a clear ValueError when the file is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no statistics file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # not a zip, truncated, pickled objects, ...
        raise ValueError(f"{str(path)!r} is not a readable .npz of statistics ({type(err).__name__}: {err})") from err
    if not {"mu", "sigma"} <= arrays.keys():
        raise ValueError(f"{str(path)!r} needs arrays 'mu' and 'sigma', it holds {sorted(arrays)}")
    return _checked_statistics(arrays["mu"], arrays["sigma"], str(path))


def _checked_statistics(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{name}: statistics need mu of shape (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def _statistics(source, feature_map: _FeatureMap, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of samples (tensor, image folder), given as a (mu, sigma) pair, or read from an ``.npz`` file."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"statistics are a (mu, sigma) pair, got a tuple of {len(source)}")
        return _checked_statistics(*source, "the given statistics")
    if not isinstance(source, torch.Tensor) and Path(source).suffix == ".npz":
        return load_statistics(source)
    return _moments(source, feature_map, batch_size)


def frechet_distance(samples, reference, features: str = "pixel", batch_size: int | None = None, *,
                     inception_weights=None, device="auto") -> float:
    """Frechet distance between the Gaussians fitted to the features of ``samples`` and ``reference``.

    Each side is a tensor of samples, a folder of images in [-1, 1] as PNG/JPEG, or statistics computed in the same
    feature space: an ``.npz`` of ``mu`` and ``sigma``, or a ``(mu, sigma)`` pair (``feature_statistics``), which
    saves recomputing a fixed reference's features for every comparison. ``features``: ``"pixel"`` (FD in
    pixel space; both sides of one shape), ``"digits"`` (FD-digits: the shipped digits classifier, 8x8 digits in
    [-1, 1]) or ``"inception"`` (FID: each side images of any size, 1 or 3 channels, grey counting as RGB with
    three equal channels; torch-fidelity's features, weights as in ``inception_weights``). The feature network is
    built once per call, for both sides; ``batch_size`` as in ``feature_statistics``.

    Distance by torchmetrics' closed form, in float64. It is never negative in exact arithmetic; a negative value
    from rounding (e.g. the matrix square root of singular covariances, fewer samples than features, identical
    sides) is returned as 0.0.
    """
    feature_map = _FeatureMap(features, inception_weights, device)
    mu, sigma = _statistics(samples, feature_map, batch_size)
    mu_ref, sigma_ref = _statistics(reference, feature_map, batch_size)
    if len(mu) != len(mu_ref):
        raise ValueError(f"the two sides have {len(mu)} and {len(mu_ref)} features: statistics from another "
                         f"feature space than features={features!r}?")
    as_tensors = (torch.from_numpy(a) for a in (mu_ref, sigma_ref, mu, sigma))
    return max(float(_compute_fid(*as_tensors)), 0.0)


def rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square difference of paired samples (same seeds), over every pixel of every sample."""
    if samples.shape != reference.shape:
        raise ValueError(f"rmse needs paired samples of one shape, got {tuple(samples.shape)} and {tuple(reference.shape)}")
    return float(torch.sqrt(torch.mean((samples.double() - reference.double()) ** 2)))
