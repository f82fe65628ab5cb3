"""``make bench``: the toolkit's numbers, measured side by side in one run and written to results/benchmarks.md.

Five parts, one function each, each returning a table (a pandas DataFrame):

1. ``quality``: every solver x NFE on gmm-digits, base and D-ODE against the exact-ODE floor.
2. ``index_matching``: D-DDIM fitted to index-matched targets (the paper's public code) against time-aligned ones.
3. ``distillation_cost``: where the fitting time goes, as NFE, teacher scale C and batch size grow, and what one
   shared fine-grid teacher saves.
4. ``sampling_overhead``: DODEScheduler against its bare base scheduler, wall time and peak memory.
5. ``scaling``: wall time and memory against the number of samples and the batch size.

Timings are medians over rounds in which every configuration runs once, in an order rotated by one each round
(``interleaved``), so that slow spells of a shared machine hit every configuration alike; ratios are taken
within a round. Memory is measured two ways (``peak_tensor_bytes``, ``peak_rss_bytes``), each saying what it sees.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import sys
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from diffusers import DDIMScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .distill import distill
from .experiments import (PAPER_NFES, evaluate_grid, evaluate_scheduler, evaluation_data, gap_summary, possible,
                          provenance)
from .grids import TimeGrid
from .models import load_model
from .plots import quality_vs_nfe, short_number, solver_label
from .sampling import sample
from .solvers import SOLVERS, make_scheduler
from .teacher import Teacher

PARTS = ("quality", "index_matching", "distillation_cost", "sampling_overhead", "scaling")
#: glibc gives every allocation of at least this many bytes its own mapping, returned to the system when freed
MMAP_THRESHOLD = 64 * 1024
#: the distillation every cost sweep varies one knob of: NFE 5, C = 10, 100 samples
BASE_FIT = {"nfe": 5, "teacher": 10, "batch_size": 100}


@dataclass(frozen=True)
class Sizes:
    """How much each part measures. ``FULL`` is ``make bench``; ``QUICK`` is a smoke run of every code path."""

    rounds: int = 3
    solvers: tuple = SOLVERS
    nfes: tuple = PAPER_NFES
    quality_samples: int = 2000
    reference_samples: int = 10_000
    cost_models: tuple = ("gmm-digits", "unet-digits")
    cost_scales: tuple = (2, 5, 10, 20)
    cost_batch_sizes: tuple = (25, 100, 400)
    eval_samples: tuple = (("gmm-digits", 2000), ("unet-digits", 1000))
    overhead_samples: int = 1000
    overhead_nfe: int = 10
    overhead_rounds: int = 5
    scaling_nfe: int = 10
    scaling_samples: tuple = (1000, 10_000, 50_000)
    scaling_batch: int = 1000
    scaling_batch_sizes: tuple = (100, 1000, 10_000)


FULL = Sizes()
QUICK = Sizes(rounds=2, solvers=("ddim", "heun"), nfes=(3, 5), quality_samples=100, reference_samples=1000,
              cost_scales=(2, 10), cost_batch_sizes=(25, 100), eval_samples=(("gmm-digits", 100), ("unet-digits", 100)),
              overhead_samples=100, overhead_nfe=5, overhead_rounds=2, scaling_nfe=5, scaling_samples=(200, 1000),
              scaling_batch=100, scaling_batch_sizes=(50, 100, 500))


# -- measuring --------------------------------------------------------------------------------------------------

def interleaved(cases: dict[str, Callable[[], dict | None]], rounds: int, *, clock=time.perf_counter,
                progress: bool = True, desc: str = "") -> pd.DataFrame:
    """Run every case once per round, ``rounds`` times, the order rotated by one each round.

    One row per run: ``case``, ``round``, ``seconds`` (by ``clock``), plus whatever dict the case returns.
    """
    names = list(cases)
    rows = []
    with tqdm(total=rounds * len(names), desc=desc, disable=not progress) as bar:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                began = clock()
                extra = cases[name]() or {}
                rows.append({"case": name, "round": r, "seconds": clock() - began, **extra})
                bar.update()
    return pd.DataFrame(rows)


def call(fn, *args, **kwargs) -> Callable[[], None]:
    """A case for ``interleaved``: ``fn(*args, **kwargs)``, its result discarded."""
    def run():
        fn(*args, **kwargs)
    return run


def round_ratios(runs: pd.DataFrame, numerator: str, denominator: str) -> pd.Series:
    """Seconds of case ``numerator`` over those of ``denominator``, round by round (same round, same conditions)."""
    wide = runs.pivot(index="round", columns="case", values="seconds")
    return wide[numerator] / wide[denominator]


def spread(values: pd.Series, name: str) -> dict:
    """Median, min and max of repeated measurements as ``{name: median, name_min: .., name_max: ..}``."""
    return {name: float(values.median()), f"{name}_min": float(values.min()), f"{name}_max": float(values.max())}


class TensorMemory(NamedTuple):
    peak: int  # most bytes of tensor storage allocated during the call and alive at one time
    retained: int  # of those, the bytes still alive when the call returned (its result included)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an aten op creates, until the storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _freed(self, key: int, nbytes: int):
        self.live -= nbytes
        self._tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()  # one Python object per storage, for the storage's lifetime
                key = id(storage)
                if key not in self._tracked and storage.nbytes():
                    self._tracked.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_tensor_bytes(fn, *args, **kwargs) -> TensorMemory:
    """Peak bytes of torch tensor storage allocated by ``fn(*args, **kwargs)`` and alive at one time (in process).

    Seen: every tensor an aten op returns, whatever the device. Not seen: scratch memory inside a kernel, memory
    of other libraries (numpy), Python objects, the allocator's own caching. Deterministic for a given call.
    """
    with _LiveTensorBytes() as counter:
        result = fn(*args, **kwargs)
        retained = counter.live
    del result
    return TensorMemory(counter.peak, retained)


def _status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def _rss_child(fn, args, kwargs, threads: int, warmup) -> int:
    torch.set_num_threads(threads)
    if warmup is not None:
        warmup()
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark (Linux >= 4.0)
    start = _status_bytes("VmRSS")
    fn(*args, **kwargs)
    return _status_bytes("VmHWM") - start


def peak_rss_bytes(fn, *args, threads: int = 1, warmup: Callable | None = None, **kwargs) -> int:
    """Peak resident memory of a fresh process during ``fn(*args, **kwargs)``, above its resident memory at the start.

    The arguments are unpickled, and ``warmup()`` is run (a picklable callable, e.g. a small version of the call, so
    that first-use costs such as library code paged in are not counted), before the high-water mark is reset.
    glibc's mmap threshold is fixed at ``MMAP_THRESHOLD`` in the child: every allocation that large is its own
    mapping and leaves the resident set when freed, so the figure follows live memory, not allocator caching.
    Seen: everything the process touches (tensors, kernel scratch, numpy, Python objects); smaller allocations
    reuse heap the warm-up left, so about 0.5 MB is noise. Linux only.
    """
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the child's glibc at start-up
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_rss_child, fn, args, kwargs, threads, warmup).result()
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before


# -- 1. quality against the limit ------------------------------------------------------------------------------

def quality_table(results: pd.DataFrame, floor: float) -> pd.DataFrame:
    """Per solver and NFE: pixel FD of base and D-ODE, the floor, their ratio, the fraction of the base-to-floor
    gap D-ODE closes, and RMSE to the exact ODE solution (from ``evaluate_scheduler`` rows)."""
    fd = gap_summary(results, floor, "fd_pixel").rename(columns={"base": "fd_base", "dode": "fd_dode",
                                                                 "ratio": "fd_ratio"})
    error = gap_summary(results, 0.0, "rmse_exact")[["solver", "nfe", "base", "dode", "ratio"]]
    error = error.rename(columns={"base": "rmse_base", "dode": "rmse_dode", "ratio": "rmse_ratio"})
    table = fd.merge(error, on=["solver", "nfe"])
    table["floor"] = floor
    columns = ["solver", "nfe", "fd_base", "fd_dode", "floor", "fd_ratio", "gap_closed", "rmse_base", "rmse_dode",
               "rmse_ratio"]
    return table[columns].reset_index(drop=True).rename_axis(columns=None)


@lru_cache(maxsize=2)
def _gmm_evaluation(num_samples: int, reference_samples: int, progress: bool):
    model = load_model("gmm-digits")
    return model, evaluation_data(model, num_samples, reference_samples=reference_samples, progress=progress)


def quality(sizes: Sizes = FULL, progress: bool = True) -> pd.DataFrame:
    """Every solver x NFE on gmm-digits (C = 10 teacher per fit), scored on held-out seeds: ``quality_table``."""
    model, data = _gmm_evaluation(sizes.quality_samples, sizes.reference_samples, progress)
    results = evaluate_grid(model, data, solvers=sizes.solvers, nfes=sizes.nfes, teacher=10, progress=progress)
    return quality_table(results, data.floor["pixel"])


# -- 2. against the paper's index matching --------------------------------------------------------------------

def index_target_offset(model, nfe: int, scale: int) -> float:
    """Largest gap, in training timesteps, between an index-matched target and the student state it is fitted to.

    The targets are every C-th state of DDIM's original grid with C x NFE steps (diffusers' "leading" spacing);
    the student is our DDIM on its paper spacing (leading, from t = T - T / NFE: a different start from the teacher's
    T - T / (C NFE)). The final, clean state is aligned in both and left out.
    """
    student = make_scheduler("ddim", model)
    student.set_timesteps(nfe)
    teacher = DDIMScheduler.from_config(model.scheduler_config, timestep_spacing="leading", steps_offset=0)
    teacher.set_timesteps(scale * nfe)
    target_times = teacher.timesteps[scale::scale][: nfe - 1].double()
    return float((target_times - student.timesteps[1:].double()).abs().max())


def index_matching(sizes: Sizes = FULL, progress: bool = True, scale: int = 10) -> pd.DataFrame:
    """``quality_table`` for D-DDIM fitted to time-aligned targets and to index-matched ones (C = ``scale``)."""
    model, data = _gmm_evaluation(sizes.quality_samples, sizes.reference_samples, progress)
    base, fitted = [], {"time-aligned": [], "index-matched": []}
    for nfe in tqdm(sizes.nfes, desc="D-DDIM: time- and index-matched", disable=not progress):
        base.append({"solver": "ddim", "variant": "base", "nfe": nfe,
                     **evaluate_scheduler(model, "ddim", nfe, data)})
        teachers = {"time-aligned": scale, "index-matched": Teacher(model, grid=scale, match="index")}
        for targets, teacher in teachers.items():
            scheduler = distill(model, "ddim", nfe, teacher=teacher, guard=False)
            fitted[targets].append({"solver": "ddim", "variant": "dode", "nfe": nfe,
                                    **evaluate_scheduler(model, scheduler, nfe, data)})
    tables = []
    for targets, rows in fitted.items():
        table = quality_table(pd.DataFrame(base + rows), data.floor["pixel"])
        table.insert(1, "targets", targets)
        table["target_offset"] = [index_target_offset(model, n, scale) if targets == "index-matched" else 0.0
                                  for n in table["nfe"]]
        tables.append(table)
    return pd.concat(tables, ignore_index=True).sort_values(["nfe", "targets"], ascending=[True, False],
                                                            ignore_index=True)


# -- 3. distillation cost --------------------------------------------------------------------------------------

SPLIT = ("teacher", "student", "trial_steps", "lstsq")


def _fit_case(model, solver: str, nfe: int, teacher, batch_size: int):
    def run():
        info = distill(model, solver, nfe, teacher=teacher, batch_size=batch_size, guard=False).fit_info
        return {**{f"{k}_seconds": info["seconds_split"][k] for k in SPLIT}, "teacher_nfe": info["teacher_nfe"]}
    return run


def _sweeps(sizes: Sizes) -> list[tuple[str, str, int, int, int]]:
    """(sweep, solver, nfe, C, batch size): each sweep varies one knob of ``BASE_FIT``."""
    nfe, scale, batch = BASE_FIT["nfe"], BASE_FIT["teacher"], BASE_FIT["batch_size"]
    return ([("NFE", "ddim", n, scale, batch) for n in sizes.nfes]
            + [("teacher C", "ddim", nfe, c, batch) for c in sizes.cost_scales]
            + [("batch size", "ddim", nfe, scale, b) for b in sizes.cost_batch_sizes]
            + [("solver", s, nfe, scale, batch) for s in sizes.solvers if possible(s, nfe)])


def _grid_fits(model, sizes: Sizes, teacher_for: Callable[[], object]) -> dict:
    """Fit every solver x NFE once, each with ``teacher_for()``'s teacher; totals over the fits."""
    teacher = teacher_for()
    fitted = [distill(model, s, n, teacher=teacher, guard=False) for s in sizes.solvers for n in sizes.nfes if possible(s, n)]
    fits = [f.fit_info for f in fitted]
    starts = set()
    for scheduler in fitted:  # a grid that starts lower (leading) starts from pure noise there: another ODE solution
        scheduler.set_timesteps(scheduler.num_inference_steps)
        starts.add(round(TimeGrid.of(scheduler).start, 4))
    return {
        "fits": len(fits),
        "start_levels": len(starts),
        "teacher_nfe": sum(f["teacher_nfe"] for f in fits),
        # a fit whose teacher spent more evaluations than the fit has targets started a whole teacher run
        "teacher_runs": sum(f["teacher_nfe"] > f["nfe"] for f in fits),
        **{f"{k}_seconds": sum(f["seconds_split"][k] for f in fits) for k in SPLIT},
    }


def distillation_cost(sizes: Sizes = FULL, progress: bool = True) -> pd.DataFrame:
    """Wall time of ``distill`` split into teacher, student, trial steps and least-squares solves, next to the time
    to sample the evaluation set at the same NFE; per model and sweep (NFE, teacher C, batch size, solver).

    Rows with sweep "all fits" fit every solver x NFE of gmm-digits once with a C = 10 teacher per fit, and once
    with one fine-grid ``Teacher`` shared by all fits (totals; ``teacher_runs`` counts whole teacher runs,
    ``start_levels`` the distinct noise levels the fits' grids start from).
    """
    eval_samples = dict(sizes.eval_samples)
    tables = []
    for model_name in sizes.cost_models:
        model = load_model(model_name)
        sweeps = _sweeps(sizes)
        configs = sorted({c[1:] for c in sweeps}, key=str)
        samplers = {}
        for solver, nfe in sorted({c[:2] for c in configs}):  # lambdas for sampling (C = 2 is enough for timing);
            samplers[solver, nfe] = distill(model, solver, nfe, teacher=2, guard=False)  # also warms every code path up
        cases = {f"fit {c}": _fit_case(model, *c) for c in configs}
        cases.update({f"sample {k}": call(sample, model, samplers[k], k[1], eval_samples[model_name], progress=False)
                      for k in samplers})
        runs = interleaved(cases, sizes.rounds, progress=progress, desc=f"{model_name}: distillation cost")
        runs["other_seconds"] = runs["seconds"] - runs[[f"{k}_seconds" for k in SPLIT]].sum(axis=1)
        runs["lstsq_share"] = runs["lstsq_seconds"] / runs["seconds"]
        medians = runs.groupby("case").median(numeric_only=True)
        for sweep, solver, nfe, scale, batch in sweeps:
            fit = medians.loc[f"fit {(solver, nfe, scale, batch)}"]
            tables.append({"model": model_name, "sweep": sweep, "solver": solver, "nfe": nfe, "teacher": str(scale),
                           "batch_size": batch, "fits": 1, "teacher_runs": 1, "fit_seconds": fit["seconds"],
                           **{f"{k}_seconds": fit[f"{k}_seconds"] for k in (*SPLIT, "other")},
                           "lstsq_share": fit["lstsq_share"], "teacher_nfe": int(fit["teacher_nfe"]),
                           "eval_samples": eval_samples[model_name],
                           "sample_seconds": medians.loc[f"sample {(solver, nfe)}", "seconds"]})
    model = load_model("gmm-digits")
    grid = interleaved({"C=10 per fit": lambda: _grid_fits(model, sizes, lambda: 10),
                        "fine, shared": lambda: _grid_fits(model, sizes, lambda: Teacher(model, grid="fine"))},
                       sizes.rounds, progress=progress, desc="gmm-digits: one teacher per fit or one shared")
    for teacher, runs in grid.groupby("case", sort=False):
        row = runs.median(numeric_only=True)
        tables.append({"model": "gmm-digits", "sweep": "all fits", "solver": "all", "nfe": None, "teacher": teacher,
                       "batch_size": BASE_FIT["batch_size"], "fits": int(row["fits"]),
                       "teacher_runs": int(row["teacher_runs"]), "start_levels": int(row["start_levels"]),
                       "fit_seconds": row["seconds"],
                       **{f"{k}_seconds": row[f"{k}_seconds"] for k in SPLIT},
                       "other_seconds": row["seconds"] - sum(row[f"{k}_seconds"] for k in SPLIT),
                       "lstsq_share": row["lstsq_seconds"] / row["seconds"], "teacher_nfe": int(row["teacher_nfe"])})
    return pd.DataFrame(tables)


# -- 4. sampling overhead --------------------------------------------------------------------------------------

class TimedModel(torch.nn.Module):
    """A model that adds up the wall time of its own calls in ``seconds``: the rest of a run is the sampler's."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0
        self.sample_shape, self.scheduler_config = model.sample_shape, model.scheduler_config

    def forward(self, x, t):
        began = time.perf_counter()
        out = self.model(x, t)
        self.seconds += time.perf_counter() - began
        return out


def _timed_sampling(model: TimedModel, scheduler, nfe: int, num: int):
    def run():
        model.seconds = 0.0
        sample(model, scheduler, nfe, num, progress=False)
        return {"model_seconds": model.seconds}
    return run


def sampling_overhead(sizes: Sizes = FULL, progress: bool = True) -> pd.DataFrame:
    """DODEScheduler against its bare base scheduler on unet-digits: wall time (median of per-round ratios) and
    peak tensor memory of one ``sample`` call (``peak_tensor_bytes``), against one model output tensor.

    NFE is ``sizes.overhead_nfe``, or the largest below it that the solver can make (Heun: odd NFE only). The time
    outside the model calls is the sampler's own (loop, scheduler, D-ODE); ``own_extra`` is what D-ODE adds to it,
    as a share of the base wall time (median over rounds). A control row (``control`` True) times a second base
    scheduler of the first solver against the first: the noise of the ratio.
    """
    model = load_model("unet-digits")
    num = sizes.overhead_samples
    schedulers = {}
    for solver in sizes.solvers:
        nfe = max(n for n in range(1, sizes.overhead_nfe + 1) if possible(solver, n))
        # lambdas fitted with a C = 2 teacher: their values do not change the cost of sampling
        schedulers[solver] = nfe, make_scheduler(solver, model), distill(model, solver, nfe, teacher=2, guard=False)
    timed = TimedModel(model)
    cases = {f"{solver} {variant}": _timed_sampling(timed, scheduler, nfe, num)
             for solver, (nfe, *pair) in schedulers.items() for variant, scheduler in zip(("base", "dode"), pair)}
    control, (control_nfe, *_) = next(iter(schedulers.items()))
    cases[f"{control} control"] = _timed_sampling(timed, make_scheduler(control, model), control_nfe, num)
    runs = interleaved(cases, sizes.overhead_rounds, progress=progress, desc=f"unet-digits: overhead ({num} samples)")
    runs["own_seconds"] = runs["seconds"] - runs["model_seconds"]
    seconds, own = (runs.groupby("case")[column].median() for column in ("seconds", "own_seconds"))

    def timing(numerator: str, denominator: str) -> dict:
        wide = runs.pivot(index="round", columns="case", values=["seconds", "own_seconds"])
        own_extra = (wide["own_seconds"][numerator] - wide["own_seconds"][denominator]) / wide["seconds"][denominator]
        return {"base_seconds": seconds[denominator], "dode_seconds": seconds[numerator],
                "base_own_seconds": own[denominator], "dode_own_seconds": own[numerator],
                **spread(round_ratios(runs, numerator, denominator), "time_ratio"), "own_extra": own_extra.median()}

    with torch.no_grad():
        output = model(torch.zeros(1, *model.sample_shape), torch.tensor(0))
    output_bytes = num * output.numel() * output.element_size()  # one model output for the whole batch
    rows = [{"solver": control, "control": True, "nfe": control_nfe, "samples": num,
             **timing(f"{control} control", f"{control} base")}]
    for solver, (nfe, base, dode_scheduler) in tqdm(schedulers.items(), desc="peak memory", disable=not progress):
        memory = {variant: peak_tensor_bytes(sample, model, scheduler, nfe, num, progress=False)
                  for variant, scheduler in (("base", base), ("dode", dode_scheduler))}
        rows.append({"solver": solver, "control": False, "nfe": nfe, "samples": num,
                     **timing(f"{solver} dode", f"{solver} base"),
                     "base_peak_bytes": memory["base"].peak, "dode_peak_bytes": memory["dode"].peak,
                     "extra_peak_bytes": memory["dode"].peak - memory["base"].peak,
                     "extra_retained_bytes": memory["dode"].retained - memory["base"].retained,
                     "output_bytes": output_bytes})
    return pd.DataFrame(rows[1:] + rows[:1])


# -- 5. scaling ------------------------------------------------------------------------------------------------

def scaling(sizes: Sizes = FULL, progress: bool = True) -> pd.DataFrame:
    """D-DDIM sampling on gmm-digits against the number of samples (sweep "samples", fixed batch) and the batch size
    (sweep "batch size", the middle number of samples): wall time, peak tensor memory (``peak_tensor_bytes``) and
    peak resident memory of a fresh process (``peak_rss_bytes``), next to the size of the returned samples."""
    model = load_model("gmm-digits")
    nfe = sizes.scaling_nfe
    scheduler = distill(model, "ddim", nfe, guard=False)
    middle = sorted(sizes.scaling_samples)[len(sizes.scaling_samples) // 2]
    sweeps = ([("samples", n, sizes.scaling_batch) for n in sizes.scaling_samples]
              + [("batch size", middle, b) for b in sizes.scaling_batch_sizes])
    configs = sorted({c[1:] for c in sweeps})

    def draw(num, batch):
        return sample(model, scheduler, nfe, num, batch_size=batch, progress=False)

    runs = interleaved({str(c): call(draw, *c) for c in configs}, sizes.rounds, progress=progress,
                       desc="gmm-digits: scaling")
    sample_bytes = draw(1, 1).element_size() * int(np.prod(model.sample_shape))
    measured = {}
    for num, batch in tqdm(configs, desc="peak memory", disable=not progress):
        seconds = runs.loc[runs["case"] == str((num, batch)), "seconds"]
        measured[num, batch] = {
            **spread(seconds, "seconds"), "seconds_per_1k": seconds.median() * 1000 / num,
            "tensor_peak_bytes": peak_tensor_bytes(draw, num, batch).peak,
            "rss_peak_bytes": peak_rss_bytes(sample, model, scheduler, nfe, num, batch_size=batch, progress=False,
                                             threads=torch.get_num_threads(),
                                             warmup=partial(sample, model, scheduler, nfe, batch, progress=False)),
            "output_bytes": sample_bytes * num}
    table = pd.DataFrame([{"sweep": sweep, "samples": num, "batch_size": batch, "nfe": nfe, **measured[num, batch]}
                          for sweep, num, batch in sweeps])
    table["tensor_working_bytes"] = table["tensor_peak_bytes"] - table["output_bytes"]
    table["rss_working_bytes"] = table["rss_peak_bytes"] - table["output_bytes"]
    return table


# -- targets, report and figures -------------------------------------------------------------------------------

def loglog_slope(x, y) -> float:
    """Slope of log y against log x (least squares): 1 for y proportional to x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def targets(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The issue's targets, each computed from the tables at hand: part, target, measured, met."""
    rows = []
    cost = tables.get("distillation_cost")
    if cost is not None:
        fits = cost[cost["sweep"] != "all fits"]
        worst = fits.loc[fits["lstsq_share"].idxmax()]
        rows.append(("distillation_cost", "least-squares solves < 5 % of distillation time",
                     f"at most {worst['lstsq_share']:.2%} ({worst['model']}, {worst['sweep']} sweep, {worst['solver']}, "
                     f"NFE {int(worst['nfe'])}, C {worst['teacher']}, batch {worst['batch_size']})",
                     bool(fits["lstsq_share"].max() < 0.05)))
        shared = cost[(cost["sweep"] == "all fits") & (cost["teacher"] == "fine, shared")]
        if len(shared):
            shared = shared.iloc[0]
            starts = int(shared["start_levels"]) if pd.notna(shared.get("start_levels")) else 1
            rows.append(("distillation_cost", "one fine-grid teacher run per starting noise level serves every solver "
                         "and NFE (a grid that starts lower, such as leading, starts from pure noise there)",
                         f"{shared['teacher_runs']} whole teacher runs for {starts} starting levels, "
                         f"{shared['teacher_nfe']} teacher NFE for {shared['fits']} fits",
                         bool(shared["teacher_runs"] == starts)))
    overhead = tables.get("sampling_overhead")
    if overhead is not None:
        overhead = overhead[~overhead["control"]]
        worst = overhead.loc[overhead["time_ratio"].idxmax()]
        rows.append(("sampling_overhead", "DODEScheduler at most 2 % slower than its base scheduler",
                     f"median time ratio at most {worst['time_ratio']:.3f} ({worst['solver']}); D-ODE's own work "
                     f"outside the model calls at most {overhead['own_extra'].max():.2%} of the base wall time",
                     bool(overhead["time_ratio"].max() <= 1.02)))
        worst = overhead.loc[overhead["extra_peak_bytes"].idxmax()]
        rows.append(("sampling_overhead", "at most one extra output tensor of peak memory",
                     f"at most {worst['extra_peak_bytes']:,.0f} B extra ({worst['solver']}); "
                     f"one output tensor {worst['output_bytes']:,.0f} B",
                     bool((overhead["extra_peak_bytes"] <= overhead["output_bytes"]).all())))
    scale = tables.get("scaling")
    if scale is not None:
        fixed = scale[scale["sweep"] == "samples"].sort_values("samples")
        batch = fixed["batch_size"].iloc[0]
        slope = loglog_slope(fixed["samples"], fixed["seconds"])
        rows.append(("scaling", "wall time linear in the number of samples (log-log slope within 0.1 of 1)",
                     f"slope {slope:.3f} over {fixed['samples'].min():,}-{fixed['samples'].max():,} samples",
                     bool(abs(slope - 1) <= 0.1)))
        growth = fixed["tensor_working_bytes"].iloc[-1] - fixed["tensor_working_bytes"].iloc[0]
        one_batch = fixed["output_bytes"].iloc[0] / fixed["samples"].iloc[0] * batch
        rows.append(("scaling", "no memory growth past one batch (peak less the returned samples)",
                     f"{growth:,.0f} B more at {fixed['samples'].max():,} than at {fixed['samples'].min():,} samples; "
                     f"one batch of samples {one_batch:,.0f} B", bool(growth <= one_batch)))
    return pd.DataFrame(rows, columns=["part", "target", "measured", "met"])


def machine() -> dict:
    """CPU model, core count, torch threads and load average of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def run_part(part: str, sizes: Sizes, out: Path, command: str, progress: bool = True) -> pd.DataFrame:
    """Run one part; write ``out/benchmarks/<part>.csv`` and its record (``.json``: provenance, load, wall time)."""
    began, load_before = time.perf_counter(), machine()["load_average"]
    table = globals()[part](sizes, progress=progress)
    seconds = time.perf_counter() - began
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / f"{part}.csv", index=False)
    record = provenance(asdict(sizes), seconds)
    record.update(part=part, command=command, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  machine={**record["machine"], **machine(), "load_average_before": load_before})
    (folder / f"{part}.json").write_text(json.dumps(record, indent=2) + "\n")
    return table


def load_tables(out: Path) -> tuple[dict, dict]:
    """Every part's table and record found under ``out/benchmarks``."""
    folder = out / "benchmarks"
    tables = {p: pd.read_csv(folder / f"{p}.csv") for p in PARTS if (folder / f"{p}.csv").is_file()}
    records = {p: json.loads((folder / f"{p}.json").read_text()) for p in tables}
    return tables, records


def _kib(x) -> str:
    return f"{x / 1024:,.0f} KiB" if abs(x) < 10 * 2**20 else f"{x / 2**20:,.1f} MiB"


def _md(table: pd.DataFrame, floatfmt: str = ".3g") -> str:
    return table.to_markdown(index=False, floatfmt=floatfmt)


def figures(tables: dict, out: Path) -> list[Path]:
    """``bench_<part>.png`` under ``out/figures`` for every part at hand; returns their paths."""
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = folder / f"bench_{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    if "quality" in tables:
        q = tables["quality"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        # green is good: a ratio below 1, a gap closed above 0
        for ax, (column, title, colors) in zip(axes, (
                ("fd_ratio", "pixel FD, D-ODE / base", dict(cmap="RdYlGn_r", vmin=0, vmax=2)),
                ("gap_closed", "share of the base-to-floor gap closed", dict(cmap="RdYlGn", vmin=-1, vmax=1)),
                ("rmse_ratio", "RMSE to exact ODE, D-ODE / base", dict(cmap="RdYlGn_r", vmin=0, vmax=2)))):
            grid = q.pivot(index="solver", columns="nfe", values=column)
            grid = grid.reindex([s for s in SOLVERS if s in grid.index])
            grid.index = [solver_label(s) for s in grid.index]
            # two significant digits below 0.1, so that a ratio of 0.004 does not print as 0.00
            sns.heatmap(grid, annot=grid.map(short_number), fmt="", annot_kws={"fontsize": 9}, ax=ax, cbar=False,
                        yticklabels=ax is axes[0], **colors)
            ax.set(title=title, xlabel="NFE", ylabel="")
        save(fig, "quality")
        long = q.melt(id_vars=["solver", "nfe"], value_vars=["fd_base", "fd_dode"], var_name="variant",
                      value_name="fd_pixel")
        long["variant"] = long["variant"].str.removeprefix("fd_")
        grid = quality_vs_nfe(long, "fd_pixel", floor=float(q["floor"].iloc[0]))
        grid.figure.suptitle("gmm-digits: pixel FD to the mixture, each solver on the paper's spacing")
        save(grid.figure, "quality_vs_nfe")
    if "index_matching" in tables:
        m = tables["index_matching"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, metric, label in ((axes[0], "fd", "pixel FD to the mixture"), (axes[1], "rmse", "RMSE to exact ODE")):
            first = m[m["targets"] == "time-aligned"]
            ax.plot(first["nfe"], first[f"{metric}_base"], "k--", marker="o", label="DDIM")
            for targets, rows in m.groupby("targets"):
                ax.plot(rows["nfe"], rows[f"{metric}_dode"], marker="o", label=f"D-DDIM, {targets}")
            if metric == "fd":
                ax.axhline(m["floor"].iloc[0], color="grey", ls=":", label="exact-ODE floor")
            ax.set(yscale="log", xlabel="NFE", ylabel=label)
        axes[0].legend(fontsize=8)
        save(fig, "index_matching")
    if "distillation_cost" in tables:
        c = tables["distillation_cost"]
        c = c[c["sweep"] != "all fits"].astype({"nfe": int})
        sweeps = list(dict.fromkeys(c["sweep"]))
        models = list(dict.fromkeys(c["model"]))
        fig, axes = plt.subplots(len(models), len(sweeps), figsize=(3.4 * len(sweeps), 3.2 * len(models)),
                                 squeeze=False)
        colors = dict(zip((*SPLIT, "other"), sns.color_palette(n_colors=5)))
        parts = {"teacher": "fit: teacher", "student": "fit: student", "trial_steps": "fit: trial steps",
                 "lstsq": "fit: least-squares solves", "other": "fit: other"}
        for i, model in enumerate(models):
            for j, sweep in enumerate(sweeps):
                ax, rows = axes[i, j], c[(c["model"] == model) & (c["sweep"] == sweep)]
                knob = {"NFE": "nfe", "teacher C": "teacher", "batch size": "batch_size", "solver": "solver"}[sweep]
                labels = [solver_label(v) if knob == "solver" else str(v) for v in rows[knob]]
                bottom = np.zeros(len(rows))
                for part in (*SPLIT, "other"):
                    ax.bar(labels, rows[f"{part}_seconds"], bottom=bottom, color=colors[part], label=parts[part])
                    bottom += rows[f"{part}_seconds"].to_numpy()
                ax.plot(labels, rows["sample_seconds"], "k*", ms=9, label="sampling the evaluation set")
                ax.set(title=f"{model}: {sweep}", ylabel="seconds" if j == 0 else "")
                if sweep == "solver":
                    plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
        fig.tight_layout()
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=6, bbox_to_anchor=(0.5, 0))
        save(fig, "distillation_cost")
    if "sampling_overhead" in tables:
        o = tables["sampling_overhead"].copy()
        o["solver"] = o["solver"].map(solver_label)
        o.loc[o["control"], "solver"] += "\n(control)"
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        err = np.vstack([o["time_ratio"] - o["time_ratio_min"], o["time_ratio_max"] - o["time_ratio"]])
        axes[0].bar(o["solver"], o["time_ratio"] - 1, yerr=err, capsize=3,
                    color=["grey" if c else "C0" for c in o["control"]], label="wall time")
        axes[0].plot(o["solver"], o["own_extra"], "D", color="C1", label="D-ODE's own work (outside the model)")
        axes[0].axhline(0.02, color="red", ls="--", label="target: +2 %")
        axes[0].axhline(0, color="black", lw=0.8)
        axes[0].set(ylabel="D-ODE / base wall time - 1", title="time (median, min-max over rounds)")
        axes[0].legend(fontsize=8)
        m, x = o[~o["control"]], np.arange((~o["control"]).sum())
        axes[1].bar(x - 0.2, m["extra_peak_bytes"] / 1024, width=0.4, label="extra peak")
        axes[1].bar(x + 0.2, m["extra_retained_bytes"] / 1024, width=0.4, label="extra retained after sampling")
        axes[1].set_xticks(x, m["solver"])
        axes[1].axhline(m["output_bytes"].iloc[0] / 1024, color="red", ls="--", label="one output tensor")
        axes[1].set(ylabel="KiB", title="tensor memory, D-ODE less base")
        axes[1].legend(fontsize=8)
        for ax in axes:
            plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
        save(fig, "sampling_overhead")
    if "scaling" in tables:
        s = tables["scaling"]
        fixed, by_batch = s[s["sweep"] == "samples"], s[s["sweep"] == "batch size"]
        batch = fixed["batch_size"].iloc[0]
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        axes[0].plot(fixed["samples"], fixed["seconds"], "o-", label="measured (median)")
        axes[0].plot(fixed["samples"], fixed["seconds"].iloc[0] * fixed["samples"] / fixed["samples"].iloc[0], "k:",
                     label="linear from the smallest")
        axes[0].set(xscale="log", yscale="log", xlabel="samples", ylabel="seconds", title=f"time, batch {batch}")
        axes[1].plot(fixed["samples"], fixed["tensor_peak_bytes"] / 2**20, "o-", label="tensor peak")
        axes[1].plot(fixed["samples"], fixed["rss_peak_bytes"] / 2**20, "s-", label="process RSS peak")
        axes[1].plot(fixed["samples"], fixed["tensor_working_bytes"] / 2**20, "o--", color="C0",
                     label="tensor peak less returned samples")
        axes[1].plot(fixed["samples"], fixed["output_bytes"] / 2**20, "k:", label="returned samples")
        axes[1].set(xscale="log", xlabel="samples", ylabel="MiB", title=f"memory, batch {batch}")
        axes[2].plot(by_batch["batch_size"], by_batch["tensor_peak_bytes"] / 2**20, "o-", label="tensor peak")
        axes[2].plot(by_batch["batch_size"], by_batch["rss_peak_bytes"] / 2**20, "s-", label="process RSS peak")
        twin = axes[2].twinx()
        twin.plot(by_batch["batch_size"], by_batch["seconds"], "^--", color="grey", label="seconds")
        twin.set_ylabel("seconds")
        axes[2].set(xscale="log", xlabel="batch size", ylabel="MiB",
                    title=f"{by_batch['samples'].iloc[0]:,} samples against batch size")
        for ax, ticks in ((axes[0], fixed["samples"]), (axes[1], fixed["samples"]), (axes[2], by_batch["batch_size"])):
            ax.set_xticks(ticks, [f"{v:,}" for v in ticks])
            ax.minorticks_off()
        for ax in axes:
            ax.legend(fontsize=8)
        twin.legend(fontsize=8, loc="center right")
        save(fig, "scaling")
    return written


def _section_quality(q: pd.DataFrame) -> list[str]:
    lower_fd, lower_rmse = int((q["fd_ratio"] < 1).sum()), int((q["rmse_ratio"] < 1).sum())
    mid = q[q["nfe"].between(4, 6)]
    return [
        f"Pixel Frechet distance to the mixture (exact-ODE floor **{q['floor'].iloc[0]:.3f}**), ratio D-ODE / base, "
        "share of the base-to-floor gap that D-ODE closes, and RMSE to the exact ODE solution of the same seeds. "
        f"D-ODE has the lower FD in {lower_fd} of {len(q)} cells and the lower RMSE in {lower_rmse} of {len(q)}; "
        f"at NFE 4-6 the median ratio is {mid['fd_ratio'].median():.2f} and the median gap closed "
        f"{mid['gap_closed'].median():.0%}.",
        "", _md(q.drop(columns="floor"), ".3f"), "",
        "![quality](figures/bench_quality.png)", "", "![quality against NFE](figures/bench_quality_vs_nfe.png)"]


def _section_index(m: pd.DataFrame) -> list[str]:
    wide = m.pivot(index="nfe", columns="targets", values="fd_dode")
    return [
        "D-DDIM fitted with a C = 10 teacher whose targets are matched by time (ours: teacher states at the student's "
        "own noise levels) or by index (the paper's public code: every C-th state of DDIM's original grid with "
        "C x NFE steps, which does not contain the student's times). `target_offset`: the largest distance, in "
        "training timesteps, between a target and the student state it is fitted to. Index-matched / time-aligned "
        "pixel FD: " + ", ".join(f"{r:.2f} (NFE {n})" for n, r in (wide["index-matched"] / wide["time-aligned"]).items())
        + ".",
        "", _md(m.drop(columns=["solver", "floor"]), ".3f"), "",
        "![index matching](figures/bench_index_matching.png)"]


def _section_cost(c: pd.DataFrame) -> list[str]:
    show = ["sweep", "solver", "nfe", "teacher", "batch_size", "fit_seconds", "teacher_seconds", "student_seconds",
            "trial_steps_seconds", "lstsq_seconds", "other_seconds", "lstsq_share", "teacher_nfe", "eval_samples",
            "sample_seconds"]
    lines = ["`distill` wall time (median over rounds) split into the teacher's run, the student's own evaluations, "
             "the trial steps (two scheduler steps on copies per evaluation) and the least-squares solves; `other` is "
             "the rest (teacher set-up, noise). `sample_seconds`: sampling the evaluation set (`eval_samples`) with "
             "the D-ODE scheduler at the same NFE. Each sweep varies one knob of NFE 5, C = 10, batch 100 (DDIM)."]
    for model, rows in c[c["sweep"] != "all fits"].groupby("model", sort=False):
        lines += ["", f"**{model}**", "", _md(rows[show].astype({"nfe": int, "eval_samples": int}), ".3g")]
    grid = c[c["sweep"] == "all fits"]
    if len(grid):
        lines += ["", "Every solver x NFE fitted once on gmm-digits, with its own C = 10 teacher per fit or with one "
                  "fine-grid `Teacher` (every training timestep) shared by all fits; totals over the fits. "
                  "`teacher_runs`: fits that had to start a whole teacher run.", "",
                  _md(grid[["teacher", "fits", "teacher_runs", "teacher_nfe", "fit_seconds", "teacher_seconds",
                            "student_seconds", "trial_steps_seconds", "lstsq_seconds", "lstsq_share"]], ".3g")]
    return lines + ["", "![distillation cost](figures/bench_distillation_cost.png)"]


def _section_overhead(o: pd.DataFrame) -> list[str]:
    show = o[["solver", "nfe", "samples", "base_seconds", "dode_seconds", "time_ratio", "time_ratio_min",
              "time_ratio_max", "base_own_seconds", "dode_own_seconds", "own_extra"]].copy()
    show.loc[o["control"], "solver"] += " (control: base again / base)"
    for column in ("base_peak_bytes", "dode_peak_bytes", "extra_peak_bytes", "extra_retained_bytes", "output_bytes"):
        show[column.removesuffix("_bytes")] = o[column].map(_kib, na_action="ignore").fillna("")
    return [
        "unet-digits, every solver, one `sample` call of all samples in one batch, base scheduler against "
        "DODEScheduler (same instance types, made before timing). `time_ratio`: D-ODE / base within each round, "
        "median (min, max) over rounds. `*_own_seconds`: the run less its model calls (the loop, the scheduler, "
        "D-ODE's correction); `own_extra`: D-ODE's own less base's, as a share of the base wall time (median over "
        "rounds): the overhead without the noise of the model calls. Memory: `peak_tensor_bytes` (torch storage "
        "alive at once during the call; deterministic); `extra_retained`: tensor memory D-ODE still holds after the "
        "call; `output`: one model output tensor. Heun makes odd NFE only, so it runs at the largest odd NFE below "
        "the others'. The control row times a second bare scheduler against the first: the spread of a ratio that "
        "should be 1.",
        "", _md(show, ".4g"), "", "![sampling overhead](figures/bench_sampling_overhead.png)"]


def _section_scaling(s: pd.DataFrame) -> list[str]:
    show = s[["sweep", "samples", "batch_size", "nfe", "seconds", "seconds_min", "seconds_max",
              "seconds_per_1k"]].copy()
    for column in ("tensor_peak_bytes", "tensor_working_bytes", "rss_peak_bytes", "rss_working_bytes", "output_bytes"):
        show[column.removesuffix("_bytes")] = s[column].map(_kib)
    return [
        "D-DDIM on gmm-digits. `working` = peak less the returned samples (`output`). Two memory measures: `tensor` "
        "(`peak_tensor_bytes`: torch storage alive at once, in process) and `rss` (`peak_rss_bytes`: peak resident "
        "memory of a fresh process during the call above its start, glibc mmap threshold 64 KiB so freed tensors "
        "leave the resident set; includes numpy, Python and kernel scratch, about 0.5 MB of noise).",
        "", _md(show, ".4g"), "", "![scaling](figures/bench_scaling.png)"]


SECTIONS = {
    "quality": ("1. Quality against the limit (gmm-digits)", _section_quality),
    "index_matching": ("2. Against the paper's index matching (D-DDIM, gmm-digits)", _section_index),
    "distillation_cost": ("3. Distillation cost", _section_cost),
    "sampling_overhead": ("4. Sampling overhead (unet-digits)", _section_overhead),
    "scaling": ("5. Scaling (gmm-digits)", _section_scaling),
}


def write_report(out: Path) -> Path:
    """Render ``out/benchmarks.md`` and the figures from every part's saved table and record."""
    tables, records = load_tables(out)
    figures(tables, out)
    verdicts = targets(tables).assign(met=lambda t: t["met"].map({True: "met", False: "**missed**"}))
    latest = max(records.values(), key=lambda r: r["finished"])
    lines = [
        "# Benchmarks", "",
        "Written by `make bench` (`python -m dode.benchmarks`; `--help` for the options); do not edit by hand. "
        "Timings are medians over rounds in which every configuration runs once, in an order rotated each round; "
        "ratios are taken within a round, in one process. Each part's table is in `benchmarks/<part>.csv`, its "
        "parameters and provenance in `benchmarks/<part>.json`.", "",
        "## Where and how", "",
        f"- command: `{latest['command']}`",
        f"- machine: {latest['machine']['cpu']}, {latest['machine']['cores']} cores, torch with "
        f"{latest['machine']['torch_threads']} thread(s); {latest['machine']['platform']}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in latest["packages"].items() if v),
        f"- git commit `{latest['git_commit']}`" + (" (with uncommitted changes)" if latest["git_dirty"] else ""),
        "", "| part | wall seconds | load average before -> after (1, 5, 15 min) | finished (UTC) | commit |",
        "|---|---|---|---|---|",
        *(f"| {p} | {r['wall_seconds']} | {r['machine']['load_average_before']} -> {r['machine']['load_average']} | "
          f"{r['finished']} | `{(r['git_commit'] or '')[:10]}` |" for p, r in records.items()),
        "", "## Targets", "", verdicts.to_markdown(index=False) if len(verdicts) else "(no part with a target run)",
    ]
    for part, table in tables.items():
        title, render = SECTIONS[part]
        lines += ["", f"## {title}", "", *render(table)]
    path = out / "benchmarks.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dode.benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="writes OUT/benchmarks.md, OUT/benchmarks/*.csv|json, OUT/figures/bench_*.png")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts; the report still shows the saved tables of the others")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path (~2 min)")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads make timings erratic); "
                             "0 keeps torch's default")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = replace(sizes, rounds=args.rounds)
    command = " ".join(["python -m dode.benchmarks", *(sys.argv[1:] if argv is None else argv)])
    for part in args.only:
        print(f"== {part}", flush=True)
        run_part(part, sizes, args.out, command, progress=not args.no_progress)
    print(f"wrote {write_report(args.out)}")


if __name__ == "__main__":
    main()
