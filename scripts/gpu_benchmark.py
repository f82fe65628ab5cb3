"""Sampling throughput of a CIFAR-10-sized DDPM UNet: base DDIM against D-DDIM, float32 against autocast.

The network is diffusers' UNet2DModel in the configuration of google/ddpm-cifar10-32 (35.7 M parameters) with
random weights: throughput does not depend on the weights. Variants are timed interleaved (one run of each per
repeat), after one warm-up run each; the table gives the median. Writes benchmark.json and benchmark.md.

    python scripts/gpu_benchmark.py --out results/benchmark          # on a GPU
    python scripts/gpu_benchmark.py --small --device cpu --out /tmp/b   # a quick check anywhere
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

import dode
from dode.models import DDPM_SCHEDULE, DiffusersModel, resolve_device

#: google/ddpm-cifar10-32's UNet2DModel configuration
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)


def cifar10_model(device: torch.device) -> DiffusersModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_UNET)
    parameters = sum(p.numel() for p in unet.parameters())
    if abs(parameters - 35.7e6) > 0.1e6:
        raise RuntimeError(f"expected the 35.7 M parameters of ddpm-cifar10-32, built {parameters}")
    return DiffusersModel(unet, DDPM_SCHEDULE, "ddpm-cifar10-32 (random weights)").to(device).eval()


def run_once(model, scheduler, nfe, num_samples, batch_size, device, autocast) -> tuple[torch.Tensor, float, int | None]:
    """(samples, seconds, peak GPU memory in bytes or None on the CPU) of one sampling run."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    x = dode.sample(model, scheduler, nfe, num_samples, seed=0, batch_size=batch_size, device=device,
                    autocast=autocast, progress=False)  # returns on the CPU: the GPU work is done
    seconds = time.perf_counter() - began
    return x, seconds, torch.cuda.max_memory_allocated() if cuda else None


def benchmark(device, nfe: int, num_samples: int, batch_size: int, repeats: int) -> dict:
    model = cifar10_model(device)
    steps = dode.get_solver("ddim").steps_for(nfe)
    lambdas = [0.0] + [0.3] * (nfe - 1)  # nonzero: the correction is computed at every evaluation
    schedulers = {"ddim": "ddim", "d-ddim": dode.DODEScheduler(dode.make_scheduler("ddim", model), lambdas, steps)}
    precisions = [None, "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    variants = [(s, p) for s in schedulers for p in precisions]
    runs = {v: [] for v in variants}
    samples = {}
    for variant in variants:  # warm-up: kernels, allocator, cuDNN choices
        run_once(model, schedulers[variant[0]], nfe, min(batch_size, num_samples), batch_size, device, variant[1])
    for _ in range(repeats):
        for variant in variants:
            samples[variant], seconds, peak = run_once(model, schedulers[variant[0]], nfe, num_samples, batch_size,
                                                       device, variant[1])
            runs[variant].append((seconds, peak))
    rows = []
    for (name, precision), measured in runs.items():
        seconds = statistics.median(s for s, _ in measured)
        peaks = [p for _, p in measured if p is not None]
        rows.append({
            "scheduler": name, "precision": precision or "float32", "seconds": round(seconds, 4),
            "samples_per_second": round(num_samples / seconds, 2),
            "peak_memory_mib": round(max(peaks) / 2**20, 1) if peaks else None,
            "rmse_to_float32": round(dode.rmse(samples[name, precision], samples[name, None]), 5),
        })
    return {
        "model": model.name, "parameters": sum(p.numel() for p in model.parameters()), "nfe": nfe,
        "num_samples": num_samples, "batch_size": batch_size, "repeats": repeats, "lambdas": lambdas,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    head = (f"{result['model']}, {result['parameters'] / 1e6:.1f} M parameters, NFE {result['nfe']}, "
            f"{result['num_samples']} samples in batches of {result['batch_size']}, median of {result['repeats']} "
            f"interleaved repeats, on {result['device']} (torch {result['torch']}, TF32 {result['tf32']})\n\n")
    lines = ["| scheduler | precision | samples/s | seconds | peak GPU memory (MiB) | RMSE to float32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['scheduler']} | {r['precision']} | {r['samples_per_second']} | {r['seconds']} | "
              f"{r['peak_memory_mib'] if r['peak_memory_mib'] is not None else '-'} | {r['rmse_to_float32']} |"
              for r in result["rows"]]
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="2 samples in one batch, 1 repeat (a quick check on the CPU)")
    parser.add_argument("--out", default="benchmark", help="folder for benchmark.json and benchmark.md")
    args = parser.parse_args(argv)
    if args.small:
        args.num_samples, args.batch_size, args.repeats = 2, 2, 1
    result = benchmark(resolve_device(args.device), args.nfe, args.num_samples, args.batch_size, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
