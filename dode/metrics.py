"""Sample quality: Frechet distance (torchmetrics) in a feature space, and RMSE between paired samples."""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

FEATURES = ("pixel", "digits")


class PixelFeatures(nn.Module):
    """The identity feature map: a sample's pixels as one flat vector."""

    def forward(self, x):
        return x.flatten(1).double()


def _feature_module(features: str, sample_shape):
    if features == "pixel":
        return PixelFeatures()
    if features == "digits":
        if tuple(sample_shape) != (1, 8, 8):
            raise ValueError(f"features='digits' needs 8x8 digits of shape (1, 8, 8), got {tuple(sample_shape)}")
        from .features import DigitsFeatures

        return DigitsFeatures()
    raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor, features: str = "pixel",
                     batch_size: int = 1000) -> float:
    """Frechet distance between the Gaussians fitted to the features of ``samples`` and ``reference``.

    ``features="pixel"``: the raw pixels (FD in pixel space). ``features="digits"``: the penultimate layer
    of the shipped digits classifier (``dode.features``), i.e. FD-digits, for 8x8 digits in [-1, 1].
    Computed with torchmetrics' FrechetInceptionDistance given the feature module, in float64.
    """
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape")
    if min(len(samples), len(reference)) < 2:
        raise ValueError("a Frechet distance needs at least two samples on each side")
    shape = tuple(samples.shape[1:])
    metric = FrechetInceptionDistance(feature=_feature_module(features, shape), input_img_size=shape,
                                      reset_real_features=True)
    metric.set_dtype(torch.float64)
    for data, real in ((reference, True), (samples, False)):
        for chunk in torch.split(data.double(), batch_size):
            metric.update(chunk, real=real)
    return float(metric.compute())


def rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square difference of paired samples (same seeds), over every pixel of every sample."""
    if samples.shape != reference.shape:
        raise ValueError(f"rmse needs paired samples of one shape, got {tuple(samples.shape)} and {tuple(reference.shape)}")
    return float(torch.sqrt(torch.mean((samples.double() - reference.double()) ** 2)))
