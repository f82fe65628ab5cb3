"""Stand-in Inception weights for testing the Inception FID where the real ones cannot be had (offline).

    python scripts/inception_standin.py FOLDER     # writes FOLDER/weights-inception-2015-12-05-6726825d.pth

torch-fidelity's exact InceptionV3 (the architecture and state-dict keys of the real weights) with random
weights. Random convolutions alone let the activations shrink or blow up layer by layer, so every BatchNorm's
running statistics are reset and re-estimated on a few random images: the 2048 pool features then neither vanish
nor saturate. Deterministic for a seed; made at test time (`make test-inception`), never committed. FID values
with these weights mean nothing; they test the pipeline: features equal torch-fidelity's, the distance equals its
closed form.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn


def standin_inception(seed: int = 0, images: int = 16, size: int = 64) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3, random weights, BatchNorm statistics from random images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:  # its constructor loads a checkpoint: hand it none to load
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
            network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    network.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            network(torch.randint(0, 256, (images // 2, 3, size, size), dtype=torch.uint8, generator=generator))
    return network.eval()


def main(argv=None) -> Path:
    from dode.evaluation.metrics import INCEPTION_FILE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help=f"where to write {INCEPTION_FILE}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    network = standin_inception(args.seed)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / INCEPTION_FILE
    torch.save(network.state_dict(), path)
    print(f"stand-in Inception weights (random, seed {args.seed}): {path}")
    return path


if __name__ == "__main__":
    main()
