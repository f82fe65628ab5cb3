"""What the benchmark measures must hold: paired rounds of one case time alike, the memory counters see a known
allocation, sampling streams in batches, D-ODE costs its base scheduler about nothing, a missed target fails."""
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

import dode
from dode.core.distill import spacing_grids
from dode.tools import benchmarks as bench

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as `make bench` uses: on a busy machine more threads make these runs erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interleaved_rotates_the_order_and_ratios_pair_runs_of_one_round():
    now, calls = [0.0], []
    durations = {"a": [1.0, 5.0, 2.0], "b": [2.0, 20.0, 3.0], "c": [1.0, 1.0, 1.0]}

    def case(name):
        def run():
            calls.append(name)
            now[0] += durations[name][calls.count(name) - 1]
            return {"tag": name.upper()}
        return run

    runs = bench.interleaved({n: case(n) for n in "abc"}, 3, clock=lambda: now[0], progress=False)
    assert calls == list("abc" "bca" "cab")
    assert runs.groupby("case")["seconds"].median().to_dict() == {"a": 2.0, "b": 3.0, "c": 1.0}
    assert (runs["tag"] == runs["case"].str.upper()).all()
    ratios = bench.round_ratios(runs, "b", "a")
    assert list(ratios) == [2.0, 4.0, 1.5]  # per round: the slow spell of round 1 hit both
    assert bench.spread(ratios, "r") == {"r": 2.0, "r_min": 1.5, "r_max": 4.0}


def test_interleaved_times_two_identical_cases_alike():
    a, b = torch.randn(160, 160), torch.randn(160, 160)

    def work():  # about 10-20 ms of real work; a result that is not a dict adds no columns
        for _ in range(200):
            a @ b
        return a

    runs = bench.interleaved({"one": work, "same": work}, 9, progress=False)
    assert list(runs.columns) == ["case", "round", "seconds"]
    # the two runs of a round are adjacent, so a slow spell of a busy machine hits both
    assert 0.67 < bench.round_ratios(runs, "same", "one").median() < 1.5


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


def test_sampling_memory_does_not_grow_with_the_number_of_samples(gmm):
    one_sample = 4 * 64  # float32, 1 x 8 x 8
    small, large = (bench.peak_tensor_bytes(dode.sample, gmm, "ddim", 5, n, batch_size=50, progress=False)
                    for n in (100, 1000))
    assert large.retained - small.retained == 900 * one_sample  # what is kept: the returned samples
    # ten times the samples: the samples returned, plus at most one more batch of working memory (streaming)
    assert 0 <= (large.peak - 1000 * one_sample) - (small.peak - 100 * one_sample) <= 50 * one_sample
    bigger_batch = bench.peak_tensor_bytes(dode.sample, gmm, "ddim", 5, 1000, batch_size=500, progress=False)
    assert bigger_batch.peak - large.peak > 5 * 450 * one_sample  # it is the batch that sets the memory


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_bytes_sees_a_known_allocation_and_not_the_warmup():
    warmup = partial(torch.ones, 128 * MiB, dtype=torch.uint8)  # run before the high-water mark is reset
    peak = bench.peak_rss_bytes(torch.ones, 64 * MiB, dtype=torch.uint8, warmup=warmup)
    assert abs(peak - 64 * MiB) < 2 * MiB  # not 128 MiB: the warm-up is not counted


TINY = replace(bench.QUICK, rounds=1, solvers=("ddim",), nfes=(3, 5), cost_scales=(2,), cost_batch_sizes=(25,),
               eval_samples=(("gmm-digits", 20),), sample_nfe=5, overhead_samples=50, overhead_rounds=3)


def test_dode_sampling_costs_about_what_its_base_scheduler_costs():
    overhead = bench.sampling_overhead(replace(TINY, solvers=("ddim", "heun")), progress=False)
    assert list(zip(overhead["solver"], overhead["nfe"], overhead["control"])) == [
        ("ddim", 5, False), ("heun", 5, False), ("ddim", 5, True)]
    assert overhead["time_ratio"].between(0.5, 2.0).all()  # generous: a shared machine's wall time is noisy
    assert (overhead["own_extra"].abs() < 0.05).all()  # D-ODE's own work, outside the model calls
    solvers = overhead[~overhead["control"]]
    assert (solvers["output_bytes"] == 50 * 64 * 4).all()  # unet-digits: 50 x 1 x 8 x 8 float32
    assert (solvers["extra_retained_bytes"] == solvers["output_bytes"]).all()  # it keeps the last model output
    assert (solvers["extra_peak_bytes"].between(0, solvers["output_bytes"])).all()


def test_distillation_cost_split_adds_up_and_counts_teacher_evaluations():
    cost = bench.distillation_cost(TINY, progress=False)
    assert list(zip(cost["sweep"], cost["nfe"], cost["teacher"], cost["batch_size"])) == [
        ("NFE", 3, "10", 100), ("NFE", 5, "10", 100), ("teacher C", 5, "2", 100), ("batch size", 5, "10", 25),
        ("solver", 5, "10", 100)]
    # C teacher steps per student step, but the last: leading DDIM evaluates last at t = 0, which only jumps to clean
    assert list(cost["teacher_nfe"]) == [21, 41, 9, 41, 41]
    parts = cost[[f"{k}_seconds" for k in (*bench.SPLIT, "other")]].sum(axis=1)
    assert parts.to_numpy() == pytest.approx(cost["fit_seconds"].to_numpy())
    assert (cost["teacher_seconds"] > cost["lstsq_seconds"]).all()


def test_least_squares_solves_are_a_small_share_of_a_fit():
    # make bench's target, on the median of three interleaved rounds as make bench takes it: one round's millisecond
    # solves also read a busy machine's pauses (a CI run beside another job once measured a 5.5 % share)
    cost = bench.distillation_cost(replace(TINY, rounds=3), progress=False)
    assert (cost["lstsq_share"] < 0.05).all() and (cost["teacher_seconds"] > cost["lstsq_seconds"]).all()
    assert bench.targets({"distillation_cost": cost})["met"].all()


def scaling_table(seconds, working):
    samples = [1000, 10_000, 50_000]
    return pd.DataFrame({"sweep": "samples", "samples": samples, "batch_size": 1000, "seconds": seconds,
                         "output_bytes": [256 * n for n in samples], "tensor_working_bytes": working})


def test_targets_are_computed_from_the_tables():
    cost = pd.DataFrame({"model": "m", "sweep": ["NFE", "solver"], "solver": ["ddim", "heun"], "nfe": 5,
                         "teacher": "10", "batch_size": 100, "lstsq_share": [0.01, 0.06]})
    overhead = pd.DataFrame({"solver": ["ddim", "pndm", "ddim"], "control": [False, False, True],
                             "time_ratio": [1.01, 0.99, 1.5], "own_extra": [0.001, 0.0, 0.3],
                             "extra_peak_bytes": [0, 256, None], "output_bytes": [256, 256, None]})
    verdicts = bench.targets({"distillation_cost": cost, "sampling_overhead": overhead,
                              "scaling": scaling_table([1.0, 10.0, 50.0], [5000, 5000, 5100])})
    assert list(verdicts["met"]) == [False, True, True, True, True]  # heun's 6 % solve share; control row ignored
    assert "6.00% (m, heun" in verdicts["measured"].iloc[0]
    overhead.loc[1, "own_extra"] = 0.03
    assert list(bench.targets({"sampling_overhead": overhead})["met"]) == [False, True]
    slow = bench.targets({"scaling": scaling_table([1.0, 14.0, 90.0], [5000, 5000, 5000 + 256_001])})
    assert list(slow["met"]) == [False, False]  # slope 1.15; working memory grew by more than one batch


def test_a_missed_target_fails_the_run_naming_the_target_and_the_value(tmp_path, monkeypatch):
    def fake(seconds):
        def part(sizes, progress=True):
            """A scaling table, made up."""
            return scaling_table(seconds, [5000] * 3).assign(nfe=5, tensor_peak_bytes=1.0, rss_peak_bytes=1.0)
        return part

    monkeypatch.setitem(bench.PARTS, "scaling", fake([1.0, 10.0, 50.0]))
    bench.main(["--out", str(tmp_path), "--only", "scaling", "--no-progress"])  # every target met: no exit
    assert "| scaling | wall time linear" in (tmp_path / "benchmarks.md").read_text()
    monkeypatch.setitem(bench.PARTS, "scaling", fake([1.0, 14.0, 90.0]))
    with pytest.raises(SystemExit) as failed:
        bench.main(["--out", str(tmp_path), "--only", "scaling", "--no-progress"])
    assert "wall time linear in the number of samples" in str(failed.value)
    assert "measured slope 1.150" in str(failed.value)
    assert "**missed**" in (tmp_path / "benchmarks.md").read_text()  # the report is written all the same
    assert (tmp_path / "benchmarks/scaling.json").is_file()


def test_guard_cost_counts_the_fit_the_reference_and_the_targets():
    """Counts against closed forms: DDIM at NFE 3 on leading is a 21-step teacher and 3 student evaluations on
    100 samples; the first guarded call spends exactly the reference's evaluations more than the second."""
    table = bench.guard_cost(replace(TINY, guard_nfes=(3,), random_unet=(8, (8, 16))), progress=False)
    row = table.iloc[0]
    assert (row["model"], row["solver"], row["nfe"], row["spacings"]) == ("gmm-digits", "ddim", 3, 3)
    assert row["plain"] == (21 + 3) * 100
    assert row["first"] - row["shared"] == 100 * dode.REFERENCE.steps
    assert row["shared_x"] == row["shared"] / row["plain"] <= 2
    unet = table.iloc[-1]
    assert unet["model"].startswith("random UNet2DModel 8x8") and unet["first_x"] > 1
    # every spacing's own paper fit: its teacher grid (substep_levels, C = 10) and 3 student evaluations
    gmm = dode.load_model("gmm-digits")
    teacher = dode.Teacher(gmm, batch_size=1)
    steps = [len(teacher.substep_levels(g.states)) - 1 for g in spacing_grids(gmm, "ddim", 3)]
    assert steps[0] == 21 and row["own"] == sum(n + 3 for n in steps) * 100
    assert row["auto_own_x"] == row["auto"] / (row["own"] + row["plain"]) <= 1
    verdicts = bench.targets({"guard_cost": table})
    assert list(verdicts["part"]) == ["guard_cost"] * 4
    assert list(verdicts["enforced"]) == [True, True, False, True] and verdicts["met"].iloc[:2].all()
