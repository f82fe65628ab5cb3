"""The FD-digits feature space: a small CNN digits classifier whose penultimate layer gives the features.

The shipped weights live in ``dode/weights/digits-classifier/`` (``model.safetensors`` + ``config.json``);
``make models`` retrains them (``dode.tools.training.train_classifier``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..util.hub import ModelNotFoundError
from ..util.runtime import WEIGHTS_DIR

CLASSIFIER_DIR = WEIGHTS_DIR / "digits-classifier"


class DigitsClassifier(nn.Module):
    """conv(32) - conv(64) - pool - conv(64) - pool - linear(``feature_dim``) - linear(10) on 8x8 digits in [-1, 1].

    ``features(x)`` is the penultimate layer before its ReLU, the FD-digits feature vector (after the ReLU
    some units are always 0 on the digits, which makes the feature covariance singular).
    """

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 2 * 2, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike = CLASSIFIER_DIR) -> "DigitsClassifier":
        """Load a folder written by ``save_pretrained`` (default: the shipped weights), in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            model = cls(**json.loads((folder / "config.json").read_text()))
            model.load_state_dict(load_file(folder / "model.safetensors"))
        except Exception as err:  # missing file, bad JSON, truncated safetensors, wrong shapes
            raise ModelNotFoundError(
                f"the digits classifier in {str(folder)!r} is missing or corrupt ({type(err).__name__}: {err}); "
                "`make models` retrains it"
            ) from err
        return model.eval()


class DigitsFeatures(nn.Module):
    """The FD-digits feature map: penultimate classifier features, float64.

    ``dode.evaluation.metrics`` casts the classifier to float64 (``.double()``); inputs follow its dtype.
    """

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = (classifier or DigitsClassifier.from_pretrained()).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.to(self.classifier.head[1].weight.dtype)).double()
