"""Tables, summaries, teacher distances, the `make reproduce` runner and the notebooks' parameters."""
import json

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest

import dode
from dode.tools import reproduce
from dode.experiments.evaluate import teacher_distances
from dode.experiments.summary import gap_summary
from dode.experiments.tables import paper_table, to_latex, to_markdown

ROOT = reproduce.ROOT


def toy_results():
    rows = []
    for solver, base, gain in (("ddim", 5.0, 0.3), ("heun", 9.0, 0.5)):
        for nfe in (3, 4, 5):
            if solver == "heun" and nfe == 4:
                continue  # Heun cannot make 4 NFE
            rows.append({"solver": solver, "variant": "base", "nfe": nfe, "fd_pixel": base / nfe})
            rows.append({"solver": solver, "variant": "dode", "nfe": nfe, "fd_pixel": gain * base / nfe})
    return pd.DataFrame(rows)


def test_paper_table_layout_bold_minimum_and_missing_cells():
    table = paper_table(toy_results(), "fd_pixel")
    assert list(table.index) == ["DDIM", "D-DDIM", "EDM", "D-EDM"]
    assert list(table.columns) == ["NFE 3", "NFE 4", "NFE 5"]
    assert table.at["D-EDM", "NFE 3"] == pytest.approx(0.5 * 9.0 / 3)
    md = to_markdown(table)
    best = {col: table[col].min() for col in table.columns}
    assert md.count("**") == 2 * len(best)
    for col, value in best.items():
        assert f"**{value:.3f}**" in md
    assert md.count("–") == 2  # Heun at NFE 4, base and D-ODE
    tex = to_latex(table)
    assert tex.count(r"\textbf{") == len(best) and "D-EDM" in tex


def test_ties_at_the_printed_precision_are_all_bold():
    """Two rows equal to the column's best are both bold, and so are two that differ only beyond the printed
    digits; a value that prints differently is not."""
    table = pd.DataFrame({"NFE 3": [0.509, 0.509, 0.7], "NFE 5": [0.16012, 0.16049, 0.1606]},
                         index=["D-DDIM", "D-DDIM auto", "DDIM"])
    md = to_markdown(table, 3)
    assert md.count("**0.509**") == 2 and "**0.700**" not in md
    assert md.count("**0.160**") == 2 and "0.161" in md and "**0.161**" not in md
    assert to_latex(table, 3).count(r"\textbf{") == 4
    assert to_markdown(table, 4).count("**") == 2 * 3  # at 4 digits only the true minimum of NFE 5 is bold


def test_gap_summary_ratio_and_share_of_the_gap_closed():
    summary = gap_summary(toy_results(), floor=0.2)
    row = summary[(summary.solver == "ddim") & (summary.nfe == 5)].iloc[0]
    base, dode_value = 5.0 / 5, 0.3 * 5.0 / 5
    assert row["ratio"] == pytest.approx(dode_value / base)
    assert row["gap_closed"] == pytest.approx((base - dode_value) / (base - 0.2))
    assert list(summary["solver"].unique()) == ["ddim", "heun"]


def test_refined_rows_follow_their_solver_and_get_their_own_ratios():
    results = toy_results()
    refined = results[results.variant == "dode"].assign(variant="dode-joint", fd_pixel=lambda d: d.fd_pixel * 0.5)
    learned = refined[refined.solver == "heun"].assign(variant="dode-learned", fd_pixel=lambda d: d.fd_pixel * 0.5)
    results = pd.concat([results, refined, learned])
    table = paper_table(results, "fd_pixel")
    assert list(table.index) == ["DDIM", "D-DDIM", "D-DDIM joint", "EDM", "D-EDM", "D-EDM joint",
                                 "D-EDM learned grid"]
    summary = gap_summary(results, floor=0.2).set_index(["solver", "nfe"])
    base, joint = 9.0 / 5, 0.5 * 0.5 * 9.0 / 5
    assert summary.at[("heun", 5), "ratio-joint"] == pytest.approx(joint / base)
    assert summary.at[("heun", 5), "gap_closed-learned"] == pytest.approx((base - joint / 2) / (base - 0.2))
    assert np.isnan(summary.at[("ddim", 5), "ratio-learned"])
    with pytest.raises(ValueError, match="unknown variant"):
        dode.experiments.tables.row_label("ddim", "dode-jointly")


def test_teacher_distances_agree_with_the_fit_on_the_fitting_batch(gmm):
    teacher = dode.Teacher(gmm, batch_size=12, seed=5, substeps=10)
    fitted = dode.distill(gmm, "unipc", 4, teacher=teacher, guard=False)  # the fit's own (greedy) residuals
    distances = teacher_distances(gmm, fitted, 4, teacher)
    assert list(distances["evaluation"]) == [1, 2, 3, 4]
    assert np.allclose(distances["rmse_teacher"], fitted.fit_info["rmse_to_teacher_fitted"], rtol=1e-4, atol=1e-7)
    base = teacher_distances(gmm, "unipc", 4, teacher)
    assert base["rmse_teacher"].iloc[-1] > distances["rmse_teacher"].iloc[-1]
    assert distances["sigma"].iloc[-1] == 0


# -- the runner ---------------------------------------------------------------------------------------------
def tiny_notebook(path, body):
    """A notebook with a parameters cell (value, out_dir) and one cell of code."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("value = 1\nout_dir = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


WRITE = "from pathlib import Path\n(Path(out_dir) / 'm').mkdir(parents=True)\n(Path(out_dir) / 'm/v.txt').write_text(str(value))"


def test_runner_moves_outputs_skips_unchanged_runs_and_keeps_results_when_a_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path / "nb")
    (tmp_path / "nb").mkdir()
    tiny_notebook(tmp_path / "nb" / "w.ipynb", WRITE)
    results = tmp_path / "results"
    run = reproduce.Run("w", "w.ipynb", {"value": 7})

    record = reproduce.execute(run, results, {}, force=False, label="[1/1]")  # its manifest record
    assert (results / "m/v.txt").read_text() == "7"
    assert record["outputs"] == ["m/v.txt"] and record["parameters"] == {"value": 7}
    assert (results / "notebooks/w.ipynb").is_file() and not any(results.glob(".staging-*"))
    assert reproduce.execute(run, results, record, force=False, label="[1/1]") is None  # unchanged: skipped
    assert reproduce.execute(run, results, record, force=True, label="[1/1]") is not None  # forced

    changed = reproduce.Run("w", "w.ipynb", {"value": 8})
    assert reproduce.run_key(changed, results) != record["key"]
    tiny_notebook(tmp_path / "nb" / "w.ipynb", WRITE.replace("str(value)", "str(value) + 1"))  # a failing cell
    with pytest.raises(papermill.PapermillExecutionError):
        reproduce.execute(changed, results, record, force=False, label="[1/1]")
    assert (results / "m/v.txt").read_text() == "7"  # the earlier result is intact
    assert (results / "notebooks/w.failed.ipynb").is_file() and not any(results.glob(".staging-*"))


def test_the_full_plan_names_every_notebook_and_the_paper_grid():
    runs = reproduce.plan(ROOT / "results", ["gmm-digits"])
    # 06_pretrained needs a download and a GPU: users run it themselves (README), make reproduce does not
    assert {r.notebook for r in runs} == {p.name for p in (ROOT / "notebooks").glob("0*.ipynb")} - {"06_pretrained.ipynb"}
    grid = next(r for r in runs if r.name == "02_distill_solvers-gmm-digits").parameters
    assert grid["nfes"] == [3, 4, 5, 6, 8, 10] and grid["num_samples"] == 2000 and grid["solvers"] == "all"


def test_a_notebook_honours_non_default_parameters(tmp_path):
    """The quickstart run with another solver and NFE really uses them (papermill injects the parameters)."""
    executed = tmp_path / "quickstart.ipynb"
    papermill.execute_notebook(ROOT / "notebooks/01_quickstart.ipynb", executed, cwd=str(ROOT / "notebooks"),
                               parameters={"solver": "deis", "nfe": 4, "num_samples": 150, "out_dir": str(tmp_path)},
                               progress_bar=False)
    assert (tmp_path / "figures/quickstart-gmm-digits-deis-nfe4.png").is_file()
    text = json.dumps(nbformat.read(executed, as_version=4).cells)
    assert "D-DEIS" in text and "DODEScheduler(DEISMultistepScheduler, spacing='linspace', nfe=4" in text


def test_runner_accepts_a_relative_results_folder(tmp_path, monkeypatch):
    """Notebooks run in notebooks/, so out_dir must reach them as an absolute path (`make reproduce` passes
    `--results results`). The runs go through execute in this process (execute_all's worker processes would not
    see the patched NOTEBOOKS)."""
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path / "nb")
    (tmp_path / "nb").mkdir()
    tiny_notebook(tmp_path / "nb" / "w.ipynb", WRITE)
    monkeypatch.setattr(reproduce, "plan", lambda results, models: [reproduce.Run("w", "w.ipynb", {"value": 3})])

    def in_process(runs, results, manifest, save, *, force, jobs, state=None):
        assert results.is_absolute()
        for run in runs:
            manifest["runs"][run.name] = reproduce.execute(run, results, manifest["runs"].get(run.name, {}),
                                                           force=force, label="[1/1]")
            save()
        return len(runs)

    monkeypatch.setattr(reproduce, "execute_all", in_process)
    monkeypatch.chdir(tmp_path)
    reproduce.main(["--results", "res", "--models", "gmm-digits"])
    assert (tmp_path / "res/m/v.txt").read_text() == "3"
    assert json.loads((tmp_path / "res/manifest.json").read_text())["runs"]["w"]["outputs"] == ["m/v.txt"]
