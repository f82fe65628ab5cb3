"""Peak memory and time of one Inception FID: N random 32 x 32 RGB samples against .npz reference statistics.

    python scripts/fid_memory.py --samples 10000 [--batch-size B] [--device cpu] [--threads 1]

Needs torch-fidelity and Inception weights (real, or scripts/inception_standin.py's under TORCH_HOME /
DODE_INCEPTION_WEIGHTS). The reference statistics come from --reference-samples other random images and are
saved to an .npz first, as a fixed reference (cifar10-train.npz) would be. Prints one JSON line: peak resident
memory of this process (ru_maxrss) after the reference and after the FID, peak GPU memory on CUDA, wall times,
the batch size used.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--reference-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="default: dode's size for the device")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dode.evaluation import metrics
    from dode.util.runtime import resolve_device

    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    samples = torch.rand(args.samples, 3, 32, 32, generator=gen) * 2 - 1
    reference = torch.rand(args.reference_samples, 3, 32, 32, generator=gen) * 1.6 - 0.8
    record = {"samples": args.samples, "reference_samples": args.reference_samples, "device": str(device),
              "threads": args.threads, "weights": metrics.inception_weights(),
              "batch_size": metrics._FeatureMap("inception", device=device).batch_size(args.batch_size),
              "peak_rss_gb_start": round(peak_rss_gb(), 3)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reference.npz"
        began = time.perf_counter()
        metrics.save_statistics(path, *metrics.feature_statistics(reference, "inception", batch_size=args.batch_size,
                                                                  device=device))
        record["reference_s"] = round(time.perf_counter() - began, 1)
        record["peak_rss_gb_after_reference"] = round(peak_rss_gb(), 3)
        began = time.perf_counter()
        record["fid"] = metrics.frechet_distance(samples, path, "inception", args.batch_size, device=device)
        record["fid_s"] = round(time.perf_counter() - began, 1)
    record["images_per_s"] = round(args.samples / record["fid_s"], 2)
    record["peak_rss_gb"] = round(peak_rss_gb(), 3)
    if device.type == "cuda":
        record["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
