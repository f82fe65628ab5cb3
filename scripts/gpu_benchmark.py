"""Sampling throughput of a CIFAR-10-sized DDPM UNet: base DDIM against D-DDIM, float32 against autocast.

The network is diffusers' UNet2DModel in the configuration of google/ddpm-cifar10-32 (35.7 M parameters) with
random weights: throughput does not depend on the weights. It is saved with DDPM's schedule and loaded back by
``dode.load_model``, as any UNet folder is. Timing is ``make bench``'s harness (``dode.tools.benchmarks.interleaved``):
after one warm-up run of each variant, every repeat runs each variant once, in an order rotated each repeat; the
table gives the median, and D-DDIM's time over DDIM's of the same precision within a repeat (median over repeats).
Writes benchmark.json and benchmark.md.

    python scripts/gpu_benchmark.py --out results/benchmark          # on a GPU
    python scripts/gpu_benchmark.py --small --device cpu --out /tmp/b   # a quick check anywhere
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

import dode
from dode.tools.benchmarks import interleaved, round_ratios

#: google/ddpm-cifar10-32's UNet2DModel configuration
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)


def cifar10_model(device: str):
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_UNET)
    parameters = sum(p.numel() for p in unet.parameters())
    if abs(parameters - 35.7e6) > 0.1e6:
        raise RuntimeError(f"expected the 35.7 M parameters of ddpm-cifar10-32, built {parameters}")
    with tempfile.TemporaryDirectory() as folder:  # a bare UNet folder with its scheduler config (DDPM's schedule)
        unet.save_pretrained(folder)
        DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_config(folder)
        model = dode.load_model(folder, device=device)
    model.name = "ddpm-cifar10-32 (random weights)"
    return model


def benchmark(device: str, nfe: int, num_samples: int, batch_size: int, repeats: int) -> dict:
    model = cifar10_model(device)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    steps = dode.get_solver("ddim").steps_for(nfe)
    lambdas = [0.0] + [0.3] * (nfe - 1)  # nonzero: the correction is computed at every evaluation
    schedulers = {"ddim": "ddim", "d-ddim": dode.DODEScheduler(dode.make_scheduler("ddim", model), lambdas, steps)}
    precisions = ["float32", "bfloat16"] + (["float16"] if cuda else [])
    samples = {}

    def case(name: str, precision: str, num: int):
        def run():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            samples[name, precision] = dode.sample(  # returns on the CPU: the GPU work is done
                model, schedulers[name], nfe, num, seed=0, batch_size=batch_size, device=device,
                autocast=None if precision == "float32" else precision, progress=False)
            return {"peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        return run

    variants = [(name, precision) for name in schedulers for precision in precisions]
    # warm-up (kernels, allocator, cuDNN choices), then the interleaved repeats
    interleaved({f"{n} {p}": case(n, p, min(batch_size, num_samples)) for n, p in variants}, 1, progress=False)
    clock = (lambda: (torch.cuda.synchronize(), time.perf_counter())[1]) if cuda else time.perf_counter
    runs = interleaved({f"{n} {p}": case(n, p, num_samples) for n, p in variants}, repeats, clock=clock,
                       progress=False)
    rows = []
    for name, precision in variants:
        measured = runs[runs["case"] == f"{name} {precision}"]
        seconds = float(measured["seconds"].median())
        rows.append({
            "scheduler": name, "precision": precision, "seconds": round(seconds, 4),
            "samples_per_second": round(num_samples / seconds, 2),
            "time_ratio_to_ddim": round(float(round_ratios(runs, f"{name} {precision}", f"ddim {precision}").median()), 4),
            "peak_memory_mib": round(measured["peak_bytes"].max() / 2**20, 1) if cuda else None,
            "rmse_to_float32": round(dode.rmse(samples[name, precision], samples[name, "float32"]), 5),
        })
    return {
        "model": model.name, "parameters": sum(p.numel() for p in model.parameters()), "nfe": nfe,
        "num_samples": num_samples, "batch_size": batch_size, "repeats": repeats, "lambdas": lambdas,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    head = (f"{result['model']}, {result['parameters'] / 1e6:.1f} M parameters, NFE {result['nfe']}, "
            f"{result['num_samples']} samples in batches of {result['batch_size']}, median of {result['repeats']} "
            f"interleaved repeats (time / DDIM's: within a repeat, same precision), on {result['device']} (torch {result['torch']}, TF32 {result['tf32']})\n\n")
    lines = ["| scheduler | precision | samples/s | seconds | time / DDIM's | peak GPU memory (MiB) | RMSE to float32 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scheduler']} | {r['precision']} | {r['samples_per_second']} | {r['seconds']} | "
              f"{r['time_ratio_to_ddim']} | "
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
    result = benchmark(args.device, args.nfe, args.num_samples, args.batch_size, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
