"""Generation on several processes with torch.distributed: fit once, shard seeds by whole batches, gather.

    torchrun --nproc_per_node=4 -m dode.tools.distributed --model unet-digits --solver ddim --nfe 5 \\
        --num-samples 50000 --batch-size 500 --reference stats.npz --features digits --out run/

Rank 0 fits the lambdas (``dode.distill``) and broadcasts the fitted scheduler, so every rank samples with the
same lambdas. Each
rank draws a contiguous run of whole batches of the single-process run, so the gathered samples equal
``dode.sample(model, scheduler, nfe, num_samples, seed=seed, batch_size=batch_size)`` bit for bit (same device
type): every batch is the very batch one process would draw. Rank 0 gathers the samples and computes one
Frechet distance. Without torchrun (no ``WORLD_SIZE``) everything runs in this one process.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.distill import distill
from .provenance import provenance
from ..evaluation.metrics import FEATURES, frechet_distance
from ..models.registry import load_model
from ..util.runtime import resolve_device
from ..core.sampling import AUTOCAST_DTYPES, check_batch_size, positive_int, sample
from ..core.scheduler import DODEScheduler
from ..core.solvers import SOLVERS


def shard(num_samples: int, batch_size: int, rank: int, world_size: int) -> range:
    """The sample indices ``rank`` draws: a contiguous run of whole batches of ``batch_size``, the batches
    split as evenly as possible over ``world_size`` ranks (a rank may get none)."""
    positive_int(num_samples, "num_samples")
    check_batch_size(batch_size)
    positive_int(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
    num_batches = -(-num_samples // batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return range(min(first * batch_size, num_samples), min(last * batch_size, num_samples))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distill_once(model, solver: str, nfe: int, **distill_kwargs) -> DODEScheduler:
    """``dode.distill`` on rank 0 only; every rank returns rank 0's fitted scheduler (broadcast)."""
    rank, world = rank_and_world()
    payload = [distill(model, solver, nfe, **distill_kwargs) if rank == 0 else None]
    if world > 1:
        if rank == 0:
            payload[0].set_timesteps()  # its tensors on the CPU for the trip; sampling sets them again
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def sample_sharded(model, solver_or_scheduler, nfe: int, num_samples: int, *, seed: int = 0, batch_size: int = 100,
                   device="auto", autocast=None, progress: bool = False) -> torch.Tensor | None:
    """``dode.sample`` split over the ranks by whole batches; the samples in seed order on rank 0, else None."""
    rank, world = rank_and_world()
    part = shard(num_samples, batch_size, rank, world)
    if len(part):
        x = sample(model, solver_or_scheduler, nfe, len(part), seed=seed + part.start, batch_size=batch_size,
                   device=device, autocast=autocast, progress=progress and rank == 0)
    else:
        x = torch.empty(0, *model.sample_shape)
    parts = gather_to_rank0(x)
    return None if parts is None else torch.cat(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dode.tools.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gmm-digits", help="model name, diffusers folder or hub id")
    parser.add_argument("--solver", default="ddim", choices=SOLVERS)
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--base", action="store_true", help="sample with the base solver (no D-ODE fit)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1000, help="sample k uses seed + k")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--fit-batch-size", type=int, default=100)
    parser.add_argument("--fit-seed", type=int, default=0)
    parser.add_argument("--teacher", default="10", help="C (teacher steps per student step) or 'fine'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None)
    parser.add_argument("--reference", help="reference for one Frechet distance: .npz statistics or image folder")
    parser.add_argument("--features", choices=FEATURES, default="pixel")
    parser.add_argument("--out", required=True, help="folder for samples.pt, run.json and the fitted scheduler")
    return parser


def _init_process_group(device: str) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA, one GPU per local rank); this rank's device."""
    device = resolve_device(device)
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv=None) -> dict | None:
    """The command line; returns rank 0's run record (None on the other ranks)."""
    args = _parser().parse_args(argv)
    began = time.perf_counter()
    device = _init_process_group(args.device)
    try:
        rank, world = rank_and_world()
        model = load_model(args.model, device=device)
        scheduler = args.solver
        if not args.base:
            teacher = "fine" if args.teacher == "fine" else int(args.teacher)
            scheduler = distill_once(model, args.solver, args.nfe, batch_size=args.fit_batch_size,
                                     seed=args.fit_seed, teacher=teacher, device=device)
        samples = sample_sharded(model, scheduler, args.nfe, args.num_samples, seed=args.seed,
                                 batch_size=args.batch_size, device=device, autocast=args.autocast, progress=True)
        lambdas = gather_to_rank0(None if args.base else scheduler.lambdas)
        if rank != 0:
            return None
        return _write_outputs(args, samples, scheduler, lambdas, world, time.perf_counter() - began)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _write_outputs(args, samples, scheduler, lambdas_per_rank, world: int, seconds: float) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(samples, out / "samples.pt")
    if not args.base:
        scheduler.save_pretrained(out / "scheduler")
    record = provenance(vars(args), seconds)  # wall time until the samples were gathered
    record.update({
        "world_size": world,
        "shards": [[p.start, p.stop] for p in (shard(args.num_samples, args.batch_size, k, world) for k in range(world))],
        "lambdas_per_rank": lambdas_per_rank,
        "frechet_distance": frechet_distance(samples, args.reference, args.features) if args.reference else None,
    })
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
