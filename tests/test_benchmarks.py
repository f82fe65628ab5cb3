"""The benchmark logic that can be wrong: summaries, interleaving, memory measures, targets, the parts' tables."""
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

import dode
from dode import benchmarks as bench

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as `make bench` uses: on a busy machine more threads make these runs erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quality_table_ratio_and_gap_closed_by_hand():
    rows = []
    for solver, fd, err in (("heun", (1.0, 1.5), (0.4, 0.3)), ("ddim", (2.5, 1.0), (0.2, 0.1))):
        for variant, f, e in zip(("base", "dode"), fd, err):
            rows.append({"solver": solver, "variant": variant, "nfe": 5, "fd_pixel": f, "rmse_exact": e})
    table = bench.quality_table(pd.DataFrame(rows), floor=0.5)
    assert list(table.columns) == ["solver", "nfe", "fd_base", "fd_dode", "floor", "fd_ratio", "gap_closed",
                                   "rmse_base", "rmse_dode", "rmse_ratio"]
    ddim, heun = (table.set_index("solver").loc[s] for s in ("ddim", "heun"))
    assert list(table["solver"]) == ["ddim", "heun"]  # the paper's order, whatever the input order
    assert ddim["fd_ratio"] == pytest.approx(0.4) and ddim["gap_closed"] == pytest.approx(0.75)  # 1.5 of 2.0 closed
    assert heun["fd_ratio"] == pytest.approx(1.5) and heun["gap_closed"] == pytest.approx(-1.0)  # D-ODE worse
    assert ddim["rmse_ratio"] == pytest.approx(0.5) and heun["rmse_ratio"] == pytest.approx(0.75)
    assert (table["floor"] == 0.5).all()


def test_interleaved_rotates_the_order_and_ratios_pair_runs_of_one_round():
    now, calls = [0.0], []
    durations = {"a": [1.0, 5.0, 2.0], "b": [2.0, 20.0, 3.0], "c": [1.0, 1.0, 1.0]}

    def case(name):
        def run():
            calls.append(name)
            now[0] += durations[name][len([c for c in calls if c == name]) - 1]
            return {"tag": name.upper()}
        return run

    runs = bench.interleaved({n: case(n) for n in "abc"}, 3, clock=lambda: now[0], progress=False)
    assert calls == list("abc" "bca" "cab")
    assert runs.groupby("case")["seconds"].median().to_dict() == {"a": 2.0, "b": 3.0, "c": 1.0}
    assert (runs["tag"] == runs["case"].str.upper()).all()
    ratios = bench.round_ratios(runs, "b", "a")
    assert list(ratios) == [2.0, 4.0, 1.5]  # per round: the slow spell of round 1 hit both
    assert bench.spread(ratios, "r") == {"r": 2.0, "r_min": 1.5, "r_max": 4.0}


def test_peak_tensor_bytes_counts_live_storage_once_per_storage():
    def work():
        small = torch.ones(MiB // 4)  # 1 MiB
        big = torch.ones(MiB)  # 4 MiB, while `small` is alive
        views = big.view(-1), big[::2]  # no new storage
        del small, big, views
        return torch.zeros(2)  # 8 bytes, alive at the end

    assert bench.peak_tensor_bytes(work) == (5 * MiB, 8)


def test_peak_tensor_bytes_grows_by_a_tensor_held_through_a_sampling_call(gmm):
    def sampling(extra: int):
        held = torch.ones(extra // 4)
        dode.sample(gmm, "ddim", 3, 50, progress=False)
        return held

    without, with_extra = (bench.peak_tensor_bytes(sampling, n) for n in (4, 3 * MiB + 4))
    assert with_extra.peak - without.peak == 3 * MiB
    assert with_extra.retained - without.retained == 3 * MiB


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_bytes_sees_a_known_allocation_and_not_the_warmup():
    warmup = partial(torch.ones, 128 * MiB, dtype=torch.uint8)  # run before the high-water mark is reset
    peak = bench.peak_rss_bytes(torch.ones, 64 * MiB, dtype=torch.uint8, warmup=warmup)
    assert abs(peak - 64 * MiB) < 2 * MiB  # not 128 MiB: the warm-up is not counted


def scaling_table(seconds, working):
    samples = [1000, 10_000, 50_000]
    return pd.DataFrame({"sweep": "samples", "samples": samples, "batch_size": 1000, "seconds": seconds,
                         "output_bytes": [256 * n for n in samples], "tensor_working_bytes": working})


def test_targets_are_computed_from_the_tables():
    cost = pd.DataFrame([
        {"model": "m", "sweep": "NFE", "solver": "ddim", "nfe": 5, "teacher": "10", "batch_size": 100,
         "lstsq_share": 0.01, "teacher_runs": 1, "teacher_nfe": 50, "fits": 1},
        {"model": "m", "sweep": "solver", "solver": "heun", "nfe": 5, "teacher": "10", "batch_size": 100,
         "lstsq_share": 0.06, "teacher_runs": 1, "teacher_nfe": 21, "fits": 1},
        {"model": "m", "sweep": "all fits", "solver": "all", "nfe": None, "teacher": "fine, shared",
         "batch_size": 100, "lstsq_share": 0.9, "teacher_runs": 3, "start_levels": 3, "teacher_nfe": 1010, "fits": 38},
    ])
    overhead = pd.DataFrame({"solver": ["ddim", "pndm", "ddim"], "control": [False, False, True],
                             "time_ratio": [1.01, 0.99, 1.5], "own_extra": [0.001, 0.0, 0.0],
                             "extra_peak_bytes": [0, 256, None],
                             "output_bytes": [256, 256, None]})
    met = bench.targets({"distillation_cost": cost, "sampling_overhead": overhead,
                         "scaling": scaling_table([1.0, 10.0, 50.0], [5000, 5000, 5100])})["met"]
    assert list(met) == [False, True, True, True, True, True]  # heun's 6 % solve share; control row ignored
    assert "heun" in bench.targets({"distillation_cost": cost})["measured"].iloc[0]
    cost.loc[2, "teacher_runs"] = 4  # a second run from one of the starts: the shared teacher did not serve
    assert not bench.targets({"distillation_cost": cost})["met"].iloc[1]
    slow = bench.targets({"scaling": scaling_table([1.0, 14.0, 90.0], [5000, 5000, 5000 + 256_001])})
    assert list(slow["met"]) == [False, False]  # slope 1.16; working memory grew by more than one batch


def test_index_target_offset_by_hand(gmm):
    # student DDIM (the paper's leading spacing) at NFE 5: 800, 600, 400, 200, 0, its states after each step at
    # 600, 400, 200, 0; DDIM's original 50-step grid: 980, 960, ..., 0, every 10th state: 780, 580, 380, 180 -> 180
    # timesteps each. NFE 3: 666, 333, 0 (states at 333, 0) against 957 - 330 = 627 and 297 (33 apart) -> 297.
    assert bench.index_target_offset(gmm, 5, 10) == 180
    assert bench.index_target_offset(gmm, 3, 10) == 297


TINY = replace(bench.QUICK, rounds=1, solvers=("ddim", "heun"), nfes=(3, 5), quality_samples=20,
               reference_samples=200, cost_models=("gmm-digits",), cost_scales=(2,), cost_batch_sizes=(25,),
               eval_samples=(("gmm-digits", 20),), overhead_samples=20, overhead_nfe=4)


def test_quick_quality_and_index_matching_tables():
    quality = bench.quality(TINY, progress=False)
    assert list(zip(quality["solver"], quality["nfe"])) == [("ddim", 3), ("ddim", 5), ("heun", 3), ("heun", 5)]
    assert quality[["fd_base", "fd_dode", "rmse_base", "rmse_dode"]].gt(0).all().all()
    matching = bench.index_matching(TINY, progress=False)
    assert list(zip(matching["nfe"], matching["targets"])) == [
        (3, "time-aligned"), (3, "index-matched"), (5, "time-aligned"), (5, "index-matched")]
    assert list(matching["target_offset"]) == [0, 297, 0, 180]
    ddim = quality[quality["solver"] == "ddim"].reset_index(drop=True)
    time_aligned = matching[matching["targets"] == "time-aligned"].reset_index(drop=True)
    pd.testing.assert_frame_equal(time_aligned[ddim.columns], ddim)  # the same fit, the same held-out seeds


def test_quick_distillation_cost_accounts_teacher_evaluations():
    cost = bench.distillation_cost(replace(TINY, solvers=("ddim",)), progress=False)
    sweeps = cost[cost["sweep"] != "all fits"]
    assert list(zip(sweeps["sweep"], sweeps["nfe"], sweeps["teacher"], sweeps["batch_size"])) == [
        ("NFE", 3, "10", 100), ("NFE", 5, "10", 100), ("teacher C", 5, "2", 100), ("batch size", 5, "10", 25),
        ("solver", 5, "10", 100)]
    # C teacher steps per student step, but the last: leading DDIM evaluates last at t = 0, which only jumps to clean
    assert list(sweeps["teacher_nfe"]) == [21, 41, 9, 41, 41]
    parts = sweeps[[f"{k}_seconds" for k in (*bench.SPLIT, "other")]].sum(axis=1)
    assert parts.to_numpy() == pytest.approx(sweeps["fit_seconds"].to_numpy())
    grid = cost[cost["sweep"] == "all fits"].set_index("teacher")
    assert grid.loc["C=10 per fit", ["fits", "teacher_runs", "teacher_nfe"]].tolist() == [2, 2, 21 + 41]
    # leading DDIM starts at t = 666 (NFE 3) and t = 800 (NFE 5): two starts, two fine runs, each through every
    # training timestep below its start, then the jump to clean
    assert grid.loc["fine, shared", ["fits", "teacher_runs", "start_levels"]].tolist() == [2, 2, 2]
    assert grid.loc["fine, shared", "teacher_nfe"] == (666 + 1) + (800 + 1)


def test_quick_sampling_overhead_keeps_exactly_one_previous_output():
    overhead = bench.sampling_overhead(replace(TINY, solvers=("heun",)), progress=False)
    assert list(zip(overhead["solver"], overhead["nfe"], overhead["control"])) == [
        ("heun", 3, False), ("heun", 3, True)]
    solvers = overhead[~overhead["control"]]
    assert (solvers["output_bytes"] == 20 * 64 * 4).all()
    assert (solvers["extra_retained_bytes"] == solvers["output_bytes"]).all()  # the last model output
    assert (solvers["extra_peak_bytes"] >= 0).all()
