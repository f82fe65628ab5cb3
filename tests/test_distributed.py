"""Multi-process generation (dode.tools.distributed): the seed shards, and a real 2-process torchrun (gloo, CPU)
against the one-process ``dode.sample`` and ``dode.frechet_distance``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dode
from dode.evaluation import metrics
from dode.tools.distributed import shard

REPO = Path(__file__).resolve().parents[1]


def batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """The (first, last + 1) sample of each batch dode.sample draws for samples start..stop - 1."""
    return [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]


@pytest.mark.parametrize("num_samples, batch_size, world_size",
                         [(200, 50, 2), (201, 50, 3), (10, 4, 5), (7, 100, 2), (1000, 7, 4), (5, 1, 1)])
def test_shards_are_the_single_process_batches(num_samples, batch_size, world_size):
    parts = [shard(num_samples, batch_size, rank, world_size) for rank in range(world_size)]
    drawn = [b for part in parts for b in batches(part.start, part.stop, batch_size)]
    assert drawn == batches(0, num_samples, batch_size)  # same batches, in seed order, each once
    counts = [len(batches(p.start, p.stop, batch_size)) for p in parts]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("args", [(0, 10, 0, 2), (10, 0, 0, 2), (10, 5, 2, 2), (10, 5, -1, 2), (10, 5, 0, 0)])
def test_shard_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        shard(*args)


@pytest.fixture(scope="module")
def torchrun(gmm, tmp_path_factory):
    """``torchrun --standalone --nproc_per_node=2 -m dode.tools.distributed`` on gmm-digits, D-DDIM at NFE 5."""
    folder = tmp_path_factory.mktemp("torchrun")
    reference = folder / "reference.npz"
    metrics.save_statistics(reference, *metrics.feature_statistics(gmm.sample_data(1000, seed=1)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dode.tools.distributed", "--model", "gmm-digits", "--solver", "ddim", "--nfe", "5",
               "--num-samples", "200", "--batch-size", "60", "--seed", "1000", "--reference", str(reference),
               "--device", "cpu", "--out", str(folder / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = folder / "run"
    record = json.loads((run / "run.json").read_text())
    return record, torch.load(run / "samples.pt"), dode.DODEScheduler.from_pretrained(run / "scheduler"), reference


def test_every_rank_uses_rank0s_lambdas(gmm, validation, torchrun):
    record, _, scheduler, _ = torchrun
    assert record["world_size"] == 2 and record["shards"] == [[0, 120], [120, 200]]  # 60, 60 | 60, 20
    first, second = record["lambdas_per_rank"]
    assert first == second == scheduler.lambdas  # broadcast: exactly equal
    # the same fit as one process (the sums may round differently with another thread count), guard included
    one_process = dode.distill(gmm, "ddim", 5, validation=validation)
    assert scheduler.lambdas == pytest.approx(one_process.lambdas, rel=1e-9, abs=1e-12)
    assert scheduler.fit_info["validation"]["shrink"] == one_process.fit_info["validation"]["shrink"]


def test_gathered_samples_and_fd_equal_one_process(gmm, torchrun):
    record, samples, scheduler, reference = torchrun
    one_process = dode.sample(gmm, scheduler, 5, 200, seed=1000, batch_size=60, progress=False)
    assert torch.equal(samples, one_process)
    assert not torch.equal(samples, dode.sample(gmm, "ddim", 5, 200, seed=1000, batch_size=60, progress=False))
    assert record["frechet_distance"] == pytest.approx(dode.frechet_distance(one_process, reference), rel=1e-12)
