"""Sample quality: Frechet distances (torchmetrics) in a feature space, reference statistics, RMSE.

Feature spaces: ``"pixel"`` (raw pixels), ``"digits"`` (FD-digits, ``dode.features``) and ``"inception"``
(FID: torchmetrics' Inception-v3 pool features, 2048 of them). Either side of a Frechet distance is a tensor of
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
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from .models import ModelNotFoundError, resolve_device
from .models import url_reachable as _url_reachable  # a name of its own here, so tests can go offline

FEATURES = ("pixel", "digits", "inception")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: torch-fidelity's Inception-v3 weights (converted from TensorFlow's FID network), as torchmetrics loads them
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = Path(urlparse(INCEPTION_URL).path).name
INCEPTION_ENV = "DODE_INCEPTION_WEIGHTS"


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


def _inception_metric(inception_weights_path) -> FrechetInceptionDistance:
    weights = inception_weights(inception_weights_path)  # before torch-fidelity, so each error shows on its own
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            'features="inception" needs torch-fidelity: pip install "dode[inception]". It brings torchvision, '
            "which must match your torch build (same version line, same CPU or CUDA flavour)."
        )
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)


# -- statistics ------------------------------------------------------------------------------------------------
def _metric(features: str, sample_shape: tuple, inception_weights_path):
    """(torchmetrics FID metric holding the feature network, function preparing a float batch for it)."""
    if features == "inception":
        if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
            raise ValueError(f"Inception features need images of shape (1 or 3, H, W), got {sample_shape}")
        return _inception_metric(inception_weights_path), _inception_input
    if features == "digits":
        if sample_shape != (1, 8, 8):
            raise ValueError(f"features='digits' needs 8x8 digits of shape (1, 8, 8), got {sample_shape}")
        from .features import DigitsFeatures

        module = DigitsFeatures()
    else:
        module = PixelFeatures()
    metric = FrechetInceptionDistance(feature=module, input_img_size=sample_shape)
    metric.set_dtype(torch.float64)
    return metric, torch.Tensor.double


def _batches(samples, batch_size: int):
    """(number of samples, iterator over float batches) for a tensor of samples or a folder of images."""
    if isinstance(samples, torch.Tensor):
        if samples.dim() < 2:
            raise ValueError(f"samples must be (N, ...) with one sample per row, got shape {tuple(samples.shape)}")
        return len(samples), iter(torch.split(samples, batch_size))
    files = image_files(samples)
    return len(files), _image_batches(files, batch_size)


def _check_features(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")


def feature_statistics(samples, features: str = "pixel", *, batch_size: int = 1000, inception_weights=None,
                       device="auto") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): mean and unbiased covariance (float64) of the features of ``samples``.

    ``samples`` is a tensor (N, ...) or a folder of images (read as [-1, 1]). Features are extracted by
    torchmetrics' FrechetInceptionDistance in batches of ``batch_size`` on ``device``.
    """
    _check_features(features)
    count, batches = _batches(samples, batch_size)
    if count < 2:
        raise ValueError(f"feature statistics need at least two samples, got {count}")
    device = resolve_device(device)
    metric = prepare = None
    for batch in batches:
        if metric is None:
            metric, prepare = _metric(features, tuple(batch.shape[1:]), inception_weights)
            metric.to(device)
        metric.update(prepare(batch.to(device)), real=True)
    n = int(metric.real_features_num_samples)
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


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


def _statistics(source, features: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of samples (tensor, image folder), given as a (mu, sigma) pair, or read from an ``.npz`` file."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"statistics are a (mu, sigma) pair, got a tuple of {len(source)}")
        return _checked_statistics(*source, "the given statistics")
    if not isinstance(source, torch.Tensor) and Path(source).suffix == ".npz":
        return load_statistics(source)
    return feature_statistics(source, features, **kwargs)


def frechet_distance(samples, reference, features: str = "pixel", batch_size: int = 1000, *,
                     inception_weights=None, device="auto") -> float:
    """Frechet distance between the Gaussians fitted to the features of ``samples`` and ``reference``.

    Each side is a tensor of samples, a folder of images in [-1, 1] as PNG/JPEG, or statistics computed in the same
    feature space: an ``.npz`` of ``mu`` and ``sigma``, or a ``(mu, sigma)`` pair (``feature_statistics``), which
    saves recomputing a fixed reference's features for every comparison. ``features``: ``"pixel"`` (FD in
    pixel space), ``"digits"`` (FD-digits: the shipped digits classifier, 8x8 digits in [-1, 1]) or
    ``"inception"`` (FID: images of any size, 1 or 3 channels; Inception weights as in ``inception_weights``).
    Features by torchmetrics' FrechetInceptionDistance, distance by its closed form, in float64.
    """
    _check_features(features)
    tensors = isinstance(samples, torch.Tensor) and isinstance(reference, torch.Tensor)
    if tensors and samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape")
    kwargs = dict(batch_size=batch_size, inception_weights=inception_weights, device=device)
    mu, sigma = _statistics(samples, features, **kwargs)
    mu_ref, sigma_ref = _statistics(reference, features, **kwargs)
    if len(mu) != len(mu_ref):
        raise ValueError(f"the two sides have {len(mu)} and {len(mu_ref)} features: statistics from another "
                         f"feature space than features={features!r}?")
    as_tensors = (torch.from_numpy(a) for a in (mu_ref, sigma_ref, mu, sigma))
    return float(_compute_fid(*as_tensors))


def rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square difference of paired samples (same seeds), over every pixel of every sample."""
    if samples.shape != reference.shape:
        raise ValueError(f"rmse needs paired samples of one shape, got {tuple(samples.shape)} and {tuple(reference.shape)}")
    return float(torch.sqrt(torch.mean((samples.double() - reference.double()) ** 2)))
