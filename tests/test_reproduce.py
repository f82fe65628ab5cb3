"""`make reproduce` on a fresh clone, a second run, `make verify`, and the runner's input check (tiny notebooks run
through the real runner, in this process with --jobs 1)."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import nbformat
import pytest

from dode.tools import report, reproduce, verification
from dode.tools.provenance import provenance
from dode.util.runtime import describe_machine, machine, wanted_threads


def notebook(path, body, parameters="value = 1\nout_dir = None"):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


# writes a result table: a metric that follows the parameter, and a timing column that changes every run
WRITE = """import time
from pathlib import Path
(Path(out_dir) / 'm').mkdir(parents=True)
(Path(out_dir) / 'm/r.csv').write_text(f"solver,fd,lambdas,fit_seconds\\nddim,{value},[0.5 {value}],{time.time()}\\n")
"""
READ = """from pathlib import Path
(Path(out_dir) / 'm').mkdir(parents=True)
(Path(out_dir) / 'm/t.csv').write_text('x\\n' + (Path(results) / 'm/r.csv').read_text().splitlines()[1].split(',')[1])
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A notebooks folder with a writer and a reader of its output, and a plan over them."""
    (tmp_path / "nb").mkdir()
    notebook(tmp_path / "nb" / "w.ipynb", WRITE)
    notebook(tmp_path / "nb" / "r.ipynb", READ, parameters="results = None\nout_dir = None")
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path / "nb")
    monkeypatch.setattr(reproduce, "VERIFY_DIR", tmp_path / "verify")
    value = {"v": 0.7}

    def plan(results, models):
        return [reproduce.Run("w", "w.ipynb", {"value": value["v"]}),
                reproduce.Run("r", "r.ipynb", {"results": str(results)}, inputs=["m/r.csv"], needs=["w"])]

    monkeypatch.setattr(reproduce, "plan", plan)
    return tmp_path, value


def main(results, *args):
    reproduce.main(["--results", str(results), "--jobs", "1", *args])


def test_a_fresh_clone_runs_everything_and_a_second_run_skips(project, capsys):
    root, _ = project
    results = root / "results"
    main(results)
    manifest = json.loads((results / "manifest.json").read_text())
    assert set(manifest["runs"]) == {"w", "r"} and (results / "m/t.csv").read_text() == "x\n0.7"
    # a clone: the committed results and manifest, without this machine's state
    clone = root / "clone"
    subprocess.run(["cp", "-r", str(results), str(clone)], check=True)
    (clone / reproduce.STATE_FILE).unlink()
    capsys.readouterr()
    main(clone)
    out = capsys.readouterr().out
    assert "2 of 2 runs executed" in out and "up to date" not in out  # the manifest's keys do not skip
    # what it regenerated is compared with what was there: the timing column is left out; r.csv's row is named by
    # its solver, t.csv's (no name column) by its number; each row and each value is a cell
    report = (clone / "verification.md").read_text()
    assert ("5 result cells compared: **5 identical**, 0 within a relative 1e-06 (rounding), 0 within a relative "
            "0.001, **0 different**") in report
    assert "made on" not in report  # nothing differs: no machines to name
    main(clone)
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 2 and "0 of 2 runs executed" in out


def test_verify_compares_with_the_committed_results_and_leaves_them_alone(project, capsys):
    root, value = project
    results = root / "results"
    main(results)
    committed = (results / "m/r.csv").read_text()
    main(results, "--verify")  # the same code and parameters: identical
    assert (results / "m/r.csv").read_text() == committed
    assert "**0 different**" in (root / "verify/verification.md").read_text()
    value["v"] = 0.7000000001  # rounding: passes even the strictest check, which CI runs on the quickstart
    main(results, "--verify", "--only", "w", "--rtol", "1e-6")  # fd and lambdas of r.csv
    assert "2 within a relative 1e-06 (rounding)" in capsys.readouterr().out
    value["v"] = 0.7001  # within the tables' precision, beyond rounding: passes by default, fails --rtol 1e-6
    main(results, "--verify", "--force")
    assert "within a relative 0.001" in capsys.readouterr().out
    report = (root / "verify/verification.md").read_text()
    assert "**2 identical**, 0 within a relative 1e-06 (rounding), 3 within a relative 0.001" in report
    assert "**0 different**" in report  # fd, lambdas, x; rows the same
    # where the numbers differ, the report names the machine the committed ones were made on and this one
    here = describe_machine(machine(torch_threads=wanted_threads()))
    assert f"The numbers compared with were made on: {here}." in report and f"These were made on: {here}." in report
    assert "| `m/r.csv` | solver=ddim: fd | 0.7 | 0.7001 |" in report
    with pytest.raises(SystemExit) as failed:
        main(results, "--verify", "--only", "w", "--rtol", "1e-6")
    assert failed.value.code == 1
    assert "2 cells differ by more than a relative 1e-06" in capsys.readouterr().err
    value["v"] = 0.8  # a real change: reported cell by cell, and --verify fails
    with pytest.raises(SystemExit) as failed:
        main(results, "--verify")
    assert failed.value.code == 1
    report = (root / "verify/verification.md").read_text()
    assert "| `m/r.csv` | solver=ddim: fd | 0.7 | 0.8 |" in report and "| `m/t.csv` | row 1: x | 0.7 | 0.8 |" in report
    assert (results / "m/r.csv").read_text() == committed and not (results / "verification.md").read_text() == report


def test_a_partial_run_leaves_the_record_of_the_full_run_alone(project, capsys, monkeypatch):
    root, value = project
    results = root / "results"
    summaries = []
    monkeypatch.setattr(report, "write_summary", lambda results, manifest: summaries.append(results))
    main(results)
    assert summaries == [results]  # results/README.md and the docs/results.md block: written after a full run only
    summaries.clear()
    full = {name: (results / name).read_text() for name in ("verification.md", "manifest.json")}
    environment = json.loads(full["manifest.json"])["environment"]
    assert environment["parameters"]["runs"] == ["w", "r"]
    value["v"] = 0.9
    main(results, "--only", "w", "--force")
    assert "a partial run: the record of the last full run" in capsys.readouterr().out
    assert (results / "verification.md").read_text() == full["verification.md"]
    partial = (results / reproduce.PARTIAL_REPORT).read_text()
    assert partial.startswith("# Partial run (w): verification against") and "| 0.7 | 0.9 |" in partial
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["environment"] == environment  # the full run's provenance; the rerun's own is in its record
    record = manifest["runs"]["w"]
    assert record["parameters"] == {"value": 0.9} and record["machine"] == machine(wanted_threads())
    assert record["git_commit"] == provenance({}, 0.0)["git_commit"] and "git_dirty" in record
    # a run of the whole plan in which a run was skipped is partial too: its summary would mix two runs
    main(results)
    (results / "m/t.csv").unlink()  # r is out of date, w is not
    capsys.readouterr()
    main(results)
    assert "1 of 2 runs executed" in capsys.readouterr().out
    assert (results / "verification.md").read_text() == full["verification.md"] and len(summaries) == 0
    main(results, "--force")
    assert summaries == [results] and (results / "verification.md").read_text() != full["verification.md"]


def test_update_block_replaces_only_the_marked_block(tmp_path):
    start, end = report.RESULTS_BLOCK
    page = tmp_path / "results.md"
    page.write_text(f"# title\n\nbefore\n{start}\nold claims\n{end}\nafter\n")
    assert report.update_block(page, "new claims\n")
    assert page.read_text() == f"# title\n\nbefore\n{start}\nnew claims\n{end}\nafter\n"
    assert report.update_block(page, "newer")  # idempotent on its own output
    assert page.read_text() == f"# title\n\nbefore\n{start}\nnewer\n{end}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers")
    assert not report.update_block(tmp_path / "plain.md", "x") and not report.update_block(tmp_path / "none.md", "x")
    assert (tmp_path / "plain.md").read_text() == "no markers" and not (tmp_path / "none.md").exists()


@pytest.mark.parametrize("error, how", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("boom"), "failed")])
def test_an_interrupted_or_failed_run_is_named_so_and_its_copy_goes_when_it_succeeds(project, monkeypatch, error,
                                                                                     how):
    import papermill

    root, _ = project
    results = root / "results"
    real = papermill.execute_notebook

    def breaks(source, executed, **kwargs):  # the kernel got part of the way, then Ctrl-C (or an error)
        Path(executed).write_text(Path(source).read_text())
        raise error

    monkeypatch.setattr(papermill, "execute_notebook", breaks)
    with pytest.raises(type(error)):
        main(results, "--only", "w")
    kept = results / "notebooks" / f"w.{how}.ipynb"
    assert kept.is_file() and not list(results.glob(".staging-*"))
    assert not (results / "m/r.csv").exists()
    monkeypatch.setattr(papermill, "execute_notebook", real)
    main(results, "--only", "w")
    assert (results / "m/r.csv").is_file() and (results / "notebooks/w.ipynb").is_file() and not kept.exists()


def test_a_kernel_interrupted_inside_papermill_counts_as_interrupted():
    from papermill.exceptions import PapermillExecutionError

    inside = PapermillExecutionError(0, 1, "x", "KeyboardInterrupt", "", [])
    assert reproduce._interrupted(inside) and reproduce._interrupted(KeyboardInterrupt())
    assert not reproduce._interrupted(PapermillExecutionError(0, 1, "x", "ValueError", "", []))
    assert not reproduce._interrupted(RuntimeError())


def test_verify_of_one_run_takes_its_inputs_from_the_results(project):
    root, _ = project
    results = root / "results"
    main(results)
    main(results, "--verify", "--only", "r")
    assert (root / "verify/m/t.csv").read_text() == "x\n0.7" and not (root / "verify/notebooks/w.ipynb").exists()


def test_a_run_whose_inputs_are_missing_stops_before_anything_runs(project):
    root, _ = project
    with pytest.raises(SystemExit, match=r"r reads m/r.csv from .*which are not there; run w first"):
        main(root / "empty", "--only", "r")
    assert not (root / "empty" / "notebooks").exists()


def test_compare_sorts_cells_into_identical_within_and_different(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a/t.csv").write_text('solver,fd,lambdas,wall_seconds\nddim,0.5,"[0.1, 0.2]",3\nheun,1.0,[0.3],4\n')
    (tmp_path / "b/t.csv").write_text('solver,fd,lambdas,wall_seconds\nddim,0.5,"[0.1, 0.2000001]",9\nheun,1.1,[0.3],1\n')
    (tmp_path / "a/e.json").write_text(json.dumps({"floor": {"pixel": 0.095}, "seconds": 1, "seeds": [0, 99]}))
    (tmp_path / "b/e.json").write_text(json.dumps({"floor": {"pixel": 0.095}, "seconds": 2, "seeds": [0, 98]}))
    files = ["t.csv", "e.json", "figure.png"]
    result = verification.compare(verification.snapshot(tmp_path / "a", files), verification.snapshot(tmp_path / "b", files))
    # rows named by solver (their one name column): both rows, ddim's fd, heun's lambdas, floor.pixel identical
    assert (result.identical, result.within) == (5, 1)  # ddim's lambdas within
    assert sorted((f, c) for f, c, _, _ in result.different) == [("e.json", "seeds"), ("t.csv", "solver=heun: fd")]
    assert ("t.csv", "solver=heun: fd", "1.0", "1.1") in result.different and not result.ok
    # by file: cells per class, and the median and largest relative move of the changed numbers
    text = verification.report(result, "x")
    assert "| `e.json` | 1 | 0 | 0 | 1 | 0 | 1.0e-02 | 1.0e-02 |" in text  # seeds [0, 99] -> [0, 98]
    assert "| `t.csv` | 4 | 1 | 0 | 1 | 0 | 9.1e-02 | 9.1e-02 |" in text  # lambdas by 5e-7, heun's fd 1.0 -> 1.1
    # lambdas rounded to 6 decimals on either side of a rounding boundary are rounding; a printed digit moving is not
    before = {"x": "[0.0, -0.000983]", "w": "0.00101", "y": "0.123", "z": "0.0001234"}
    after = {"x": "[0.0, -0.000982]", "w": "0.001011", "y": "0.124", "z": "0.0001236"}
    rounded = verification.compare({"l.csv": before}, {"l.csv": after})
    assert sorted(c for _, c, _, _ in rounded.rounding) == ["w", "x"]  # w: a trailing zero dropped
    assert sorted(c for _, c, _, _ in rounded.different) == ["y", "z"]
    # a row that vanished is a difference, and a file with nothing before it is listed as new
    (tmp_path / "b/t.csv").write_text('solver,fd,lambdas,wall_seconds\nddim,0.5,"[0.1, 0.2]",3\n')
    result = verification.compare({"t.csv": verification.cells(tmp_path / "a/t.csv")},
                                  verification.snapshot(tmp_path / "b", ["t.csv", "e.json"]))
    assert ("t.csv", "solver=heun: fd", "1.0", None) in result.different and result.new_files == ["e.json"]
    assert ("t.csv", "solver=heun: (row)", "present", None) in result.different
    assert "| `t.csv` | solver=heun: fd | 1.0 | – |" in verification.report(result, "x")
    # a row inserted before the others shifts nothing: its cells are new, the others still match
    (tmp_path / "b/t.csv").write_text('solver,fd,lambdas,wall_seconds\nipndm,0.2,[0.1],1\nddim,0.5,"[0.1, 0.2]",3\n'
                                      'heun,1.0,[0.3],4\n')
    result = verification.compare({"t.csv": verification.cells(tmp_path / "a/t.csv")},
                                  {"t.csv": verification.cells(tmp_path / "b/t.csv")})
    assert result.identical == 6 and not result.different and not result.ok
    assert {c for _, c, _, _ in result.added} == {"solver=ipndm: (row)", "solver=ipndm: fd", "solver=ipndm: lambdas"}
    assert "**0 different**; 3 new cells" in verification.report(result, "x")


def test_the_makefile_has_verify_and_passes_lab_arguments():
    makefile = (reproduce.ROOT / "Makefile").read_text()
    assert "dode.tools.reproduce --results results --verify $(ARGS)" in makefile
    assert "jupyter lab notebooks $(LAB_ARGS)" in makefile
    dry = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--allow-root", "PY=true", "STAMP=Makefile"],
                         cwd=reproduce.ROOT, capture_output=True, text=True, check=True)
    assert "jupyter lab notebooks --allow-root" in dry.stdout
    helptext = subprocess.run([sys.executable, "-m", "dode.tools.reproduce", "--help"], capture_output=True, text=True,
                              check=True).stdout
    assert "the results folder" in helptext and "--verify" in helptext


def test_the_machine_record_names_the_cpu_the_blas_kernel_and_what_steers_them(monkeypatch):
    import threadpoolctl
    import torch

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # recorded as set; numpy's kernel is chosen at import
    record = machine(torch_threads=3)
    kernels = {pool["architecture"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}
    assert {b["architecture"] for b in record["blas"]} == kernels and kernels
    assert record["torch_cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch_cpu"]["threads"] == 3 and machine()["torch_cpu"]["threads"] == torch.get_num_threads()
    assert record["environment"]["OPENBLAS_CORETYPE"] == "Haswell" and record["cpu_model"]
    line = describe_machine(record)
    assert record["cpu_model"] in line and "OPENBLAS_CORETYPE=Haswell" in line and "3 threads" in line
    # an older manifest's record (platform and CPUs only) still reads
    assert describe_machine({"platform": "Linux", "cpus": 2}).startswith("CPU model not recorded, 2 CPUs, Linux")
