"""``make learned-rows`` (dode.tools.learned_rows): unet-digits' learned-grid rows at every NFE, outside make reproduce."""
import json
import math
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from dode.core.solvers import SOLVERS
from dode.experiments.parameters import defaults
from dode.experiments.summary import LEARNED_CHECKS, learned_checks
from dode.tools import learned_rows, reproduce

ROOT = reproduce.ROOT


def test_shards_hold_every_solver_once_in_order_and_differ_in_size_by_at_most_one():
    for count in range(1, len(SOLVERS) + 3):
        parts = learned_rows.shards(SOLVERS, count)
        assert [s for part in parts for s in part] == list(SOLVERS)
        assert len(parts) == min(count, len(SOLVERS)) and all(parts)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="at least 1"):
        learned_rows.shards(SOLVERS, 0)


def test_a_shard_runs_make_reproduce_s_parameters_with_only_its_solvers_nfes_moments_and_validation_changed():
    ours = learned_rows.run_parameters("unet-digits", [3, 10], ["ddim", "heun"])
    theirs = next(r.parameters for r in reproduce.plan(ROOT / "results", ["unet-digits"])
                  if r.name == "02_distill_solvers-unet-digits")
    assert {k for k in theirs if ours[k] != theirs[k]} == {"solvers", "nfes", "learned_nfes", "validation_size"}
    # the choices on more validation seeds than make reproduce's, which the tool can also take
    assert ours["validation_size"] == learned_rows.VALIDATION == 500 and theirs["validation_size"] == 100
    assert learned_rows.run_parameters("unet-digits", [3], ["ddim"], validation_size=100)["validation_size"] == 100
    assert ours["solvers"] == ["ddim", "heun"] and ours["nfes"] == ours["learned_nfes"] == [3, 10]
    # make reproduce runs notebook 02's default objective (the squared distance alone); the shards weigh MOMENTS
    assert set(ours) - set(theirs) == {"learned_moments"} and defaults("02_distill_solvers").learned_moments == [0]
    assert ours["learned_moments"] == [0.0, 1.0, 4.0] == list(learned_rows.MOMENTS)
    assert learned_rows.run_parameters("unet-digits", [3], ["ddim"], moments=[0])["learned_moments"] == [0.0]
    with pytest.raises(ValueError, match="no make reproduce profile"):
        learned_rows.run_parameters("gmm-digits-flow", [3], ["ddim"])


def _checks_by_loop(results: pd.DataFrame, metric: str) -> dict:
    """learned_checks' verdicts, computed cell by cell from the rows themselves."""
    out = {}
    for (solver, nfe), cell in results.groupby(["solver", "nfe"]):
        value = {v: cell.loc[cell.variant == v, metric] for v in ("best-base", "dode-auto", "learned-grid",
                                                                   "dode-learned")}
        if value["dode-learned"].empty:
            continue
        learned = float(value["dode-learned"].iloc[0])
        grid = float(value["learned-grid"].iloc[0]) if len(value["learned-grid"]) else math.nan
        out[(solver, nfe)] = (learned < float(value["best-base"].iloc[0]),
                              learned < float(value["dode-auto"].iloc[0]),
                              math.isnan(grid) or learned <= grid)
    return out


@pytest.mark.parametrize("model, metric", [("gmm-digits", "fd_pixel"), ("unet-digits", "fd_digits")])
def test_learned_checks_agree_with_a_cell_by_cell_computation_on_the_committed_results(model, metric):
    results = pd.read_csv(ROOT / "results" / model / "results.csv")
    checks = learned_checks(results, metric)
    expected = _checks_by_loop(results, metric)
    assert len(checks) == len(expected) > 0
    for row in checks.itertuples():
        assert (row.below_best, row.below_auto, row.at_or_below_grid) == expected[(row.solver, row.nfe)]
    assert list(checks.solver.map(list(SOLVERS).index)) == sorted(checks.solver.map(list(SOLVERS).index))


def test_learned_checks_are_strict_against_the_bases_and_not_against_the_grid_alone():
    rows = pd.DataFrame([
        # a tie with the best base and with auto is not below them; a tie with the grid alone is at or below it
        *({"solver": "ddim", "nfe": 5, "variant": v, "fd": x} for v, x in
          (("best-base", 1.0), ("dode-auto", 1.0), ("learned-grid", 1.0), ("dode-learned", 1.0))),
        # no grid alone (none kept in the table): the check holds
        *({"solver": "deis", "nfe": 5, "variant": v, "fd": x} for v, x in
          (("best-base", 2.0), ("dode-auto", 1.0), ("dode-learned", 0.5))),
        # no learned row: no cell
        {"solver": "unipc", "nfe": 5, "variant": "best-base", "fd": 1.0},
    ])
    checks = learned_checks(rows, "fd").set_index("solver")
    assert list(checks.index) == ["ddim", "deis"]
    assert not checks.at["ddim", "below_best"] and not checks.at["ddim", "below_auto"]
    assert checks.at["ddim", "at_or_below_grid"] and checks.at["deis", "at_or_below_grid"]
    assert checks.at["deis", "below_best"] and checks.at["deis", "below_auto"]


def test_collect_puts_the_shards_rows_together_and_the_report_counts_them(tmp_path):
    results = pd.read_csv(ROOT / "results" / "unet-digits" / "results.csv")
    parts = learned_rows.shards(SOLVERS, 2)
    folders = []
    for k, part in enumerate(parts):
        folder = tmp_path / f"shard-{k}"
        (folder / "out" / "unet-digits").mkdir(parents=True)
        results[results.solver.isin(part)].to_csv(folder / "out" / "unet-digits" / "results.csv", index=False)
        nbformat.write(nbformat.v4.new_notebook(), folder / "executed.ipynb")
        folders.append(folder)
    values = [learned_rows.run_parameters("unet-digits", [5], part) for part in parts]
    learned_rows.collect("unet-digits", folders, values, [10.0, 20.0], 25.0, tmp_path / "out")
    merged = pd.read_csv(tmp_path / "out" / "learned_rows" / "unet-digits.csv")
    key = ["solver", "nfe", "variant"]
    pd.testing.assert_frame_equal(merged.sort_values(key).reset_index(drop=True),
                                  results.sort_values(key).reset_index(drop=True))
    checks = learned_checks(results, "fd_digits")
    text = (tmp_path / "out" / "learned_rows.md").read_text()
    assert (f"Of {len(checks)} solver x NFE cells, D-ODE on a learned grid is below the best base in "
            f"{int(checks.below_best.sum())}, below greedy D-ODE auto in {int(checks.below_auto.sum())}") in text
    meta = json.loads((tmp_path / "out" / "learned_rows" / "unet-digits.json").read_text())
    assert meta["shard_seconds"] == [10.0, 20.0] and meta["parameters"]["shards"] == values
    assert (tmp_path / "out" / "learned_rows" / "unet-digits-1.ipynb").is_file()



def test_the_committed_report_is_what_the_tool_writes_from_the_committed_rows(tmp_path):
    committed = ROOT / "results" / "learned_rows"
    (tmp_path / "learned_rows").mkdir()
    for name in ("unet-digits.csv", "unet-digits.json"):
        (tmp_path / "learned_rows" / name).write_bytes((committed / name).read_bytes())
    assert learned_rows.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "learned_rows.md").read_text() == (ROOT / "results" / "learned_rows.md").read_text()


def test_the_report_says_which_moment_weight_made_each_cell_s_grid_rows_where_the_rows_carry_it():
    saved = pd.read_csv(ROOT / "results" / "learned_rows" / "unet-digits.csv")
    meta = json.loads((ROOT / "results" / "learned_rows" / "unet-digits.json").read_text())
    # the committed rows carry the column: each cell's weights are its two grid rows'
    for _, w in learned_rows.kept_weights(saved).iterrows():
        cell = saved[(saved.solver == w.solver) & (saved.nfe == w.nfe)].set_index("variant").moment_weight
        assert [w.weight_learned, w.weight_grid] == pytest.approx(
            [cell["dode-learned"], cell["learned-grid"]], nan_ok=True), tuple(w)
    rows = saved.drop(columns="moment_weight")  # rows made before the column: no count
    assert learned_rows.kept_weights(rows) is None and "moment weight kept" not in learned_rows.report(rows, meta)
    grid = rows.variant.isin(["dode-learned", "learned-grid"])
    cells = rows.loc[grid, ["solver", "nfe"]].drop_duplicates().reset_index(drop=True)
    chosen = {(s, n): [0.0, 1.0, 4.0, None][k % 4] for k, (s, n) in enumerate(zip(cells.solver, cells.nfe))}
    rows["moment_weight"] = [chosen[s, n] if g and v == "dode-learned" else (4.0 if g else None)
                             for s, n, v, g in zip(rows.solver, rows.nfe, rows.variant, grid)]
    weights = learned_rows.kept_weights(rows)
    assert len(weights) == len(cells) and weights.weight_grid.eq(4.0).all()
    for _, w in weights.iterrows():
        expected = chosen[w.solver, w.nfe]
        assert (math.isnan(w.weight_learned) if expected is None else w.weight_learned == expected), tuple(w)
    text = learned_rows.report(rows, meta)
    kept = pd.Series([w for w in chosen.values() if w is not None]).value_counts()
    left = sum(w is None for w in chosen.values())
    assert (f"The moment weight kept: for D-ODE on a learned grid 0 in {kept[0.0]}, 1 in {kept[1.0]}, 4 in "
            f"{kept[4.0]} cells (not kept in {left}); for the grid alone 4 in {len(cells)} cells.") in text
    assert "weight_learned" in text and "weight_grid" in text


def test_the_progress_bar_counts_the_cells_the_shards_have_saved_and_ends_with_the_runs(tmp_path):
    from concurrent.futures import Future

    for k, cells in enumerate((["ddim-nfe3", "ddim-nfe4"], ["deis-nfe3"])):
        for cell in cells:
            for variant in ("dode-auto", "dode-learned"):  # one cell: several folders, one of them dode-auto
                (tmp_path / f"shard-{k}" / "out" / "unet-digits" / "schedulers" / f"{cell}-{variant}").mkdir(parents=True)
    done = Future()
    done.set_result(1.0)
    assert learned_rows._follow([done, done], tmp_path, "unet-digits", total=44, every=0.01) == 3


def test_the_docs_quote_the_report_s_count_as_it_stands():
    sentence = next(line for line in (ROOT / "results" / "learned_rows.md").read_text().splitlines()
                    if line.startswith("Of ") and "solver x NFE cells" in line)
    page = (ROOT / "docs" / "grids-and-guard.md").read_text()
    quoted = page.split("<!-- learned-rows: the report's sentence")[1].split("\n")[1]
    assert quoted == sentence


def test_report_only_without_saved_rows_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="no saved rows to report.*run make learned-rows"):
        learned_rows.main(["--report-only", "--out", str(tmp_path)])


def test_too_few_validation_seeds_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        learned_rows.main(["--validation-size", "1", "--out", str(tmp_path)])
    assert "--validation-size must be at least 2, got 1" in capsys.readouterr().err
    assert not (tmp_path / "learned_rows").exists()


def test_a_part_of_the_solvers_runs_only_those_and_an_unknown_one_is_refused(monkeypatch, tmp_path, capsys):
    ran = []
    for name in learned_rows.ONE_CORE:  # run() sets them for its shards: restored after the test
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(learned_rows, "_run_shard", lambda k, values, target: ran.append(values["solvers"]) or 0.0)
    monkeypatch.setattr(learned_rows, "_follow", lambda runs, target, model, total: total)
    monkeypatch.setattr(learned_rows, "collect", lambda *args: {"wall_seconds": 0.0})
    assert learned_rows.main(["--solvers", "unipc", "ddim", "deis", "--out", str(tmp_path)]) == 0
    assert ran == [["unipc", "ddim"], ["deis"]]
    with pytest.raises(SystemExit):
        learned_rows.main(["--solvers", "euler", "--out", str(tmp_path)])
    assert "invalid choice: 'euler'" in capsys.readouterr().err


def test_compare_rows_counts_moves_and_flipped_verdicts_against_a_perturbed_copy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_rows", ROOT / "scripts" / "compare_rows.py")
    compare_rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_rows)
    first = pd.read_csv(ROOT / "results" / "learned_rows" / "unet-digits.csv")
    second = first.copy()
    grid = second.index[second.variant == "learned-grid"]
    second.loc[grid[0], "fd_digits"] *= 1.03  # beyond 2 %
    second.loc[grid[1], "fd_digits"] *= 1.01  # within, not identical
    second.loc[grid[2], "kept"] = not bool(second.loc[grid[2], "kept"])
    table = compare_rows.compare(first, second, "fd_digits", 0.02).set_index("variant")
    assert table.at["learned-grid", "rows"] == len(grid) and table.at["learned-grid", "within"] == len(grid) - 1
    assert table.at["learned-grid", "identical"] == len(grid) - 2
    assert table.at["learned-grid", "largest"] == pytest.approx(0.03)
    assert table.at["learned-grid", "flipped"] == 1 and table.drop("learned-grid").flipped.sum() == 0
    assert (table.drop("learned-grid").within == table.drop("learned-grid").rows).all()
    cells = set(zip(first.solver, first.nfe))
    assert compare_rows.counts(first, "fd_digits", cells) == {
        "cells": len(learned_checks(first, "fd_digits")),
        **{c: int(learned_checks(first, "fd_digits")[c].sum()) for c in LEARNED_CHECKS}}


def test_a_check_run_into_another_folder_keeps_its_shards_there_and_leaves_the_main_run_s_alone(monkeypatch, tmp_path):
    assert learned_rows.work_folder(ROOT / "results") == learned_rows.WORK == ROOT / "build" / "learned_rows"
    assert learned_rows.work_folder(tmp_path / "avx2") == tmp_path / "avx2" / "learned_rows-work"
    assert learned_rows.work_folder(tmp_path / "avx2", tmp_path / "w") == tmp_path / "w"
    for name in learned_rows.ONE_CORE:
        monkeypatch.setenv(name, "1")
    targets = []
    monkeypatch.setattr(learned_rows, "_run_shard", lambda k, values, target: targets.append(target) or 0.0)
    monkeypatch.setattr(learned_rows, "_follow", lambda runs, target, model, total: total)
    monkeypatch.setattr(learned_rows, "collect", lambda *args: {"wall_seconds": 0.0})
    assert learned_rows.main(["--solvers", "ddim", "--out", str(tmp_path / "avx2")]) == 0
    assert learned_rows.main(["--solvers", "ddim", "--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 0
    assert targets == [tmp_path / "avx2" / "learned_rows-work" / "unet-digits", tmp_path / "w" / "unet-digits"]


def test_a_relative_out_folder_gets_the_shard_s_rows_where_collect_reads_them(monkeypatch, tmp_path):
    """papermill runs notebook 02 in notebooks/ (``cwd``): the shard's ``out_dir`` must not be relative to the caller's
    folder (``--out build/avx2`` once wrote a check run's rows under notebooks/build/ and ``collect`` found none)."""
    import papermill

    written = []

    def execute(notebook, output, cwd, parameters, **kwargs):  # where the kernel, in cwd, would write its rows
        written.append((Path(cwd) / parameters["out_dir"]).resolve())

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.chdir(tmp_path)
    learned_rows._run_shard(0, {"solvers": ["ddim"]}, Path("build") / "avx2" / "unet-digits")
    assert written == [tmp_path / "build" / "avx2" / "unet-digits" / "shard-0" / "out"]
