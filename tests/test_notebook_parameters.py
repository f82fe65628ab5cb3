"""The notebooks' parameters: each notebook's ``parameters`` cell holds its defaults as literals, equal to
``dode.experiments.parameters.DEFAULTS``; and through papermill, as a user passes them, wrong ones stop in the first
code cell with what is valid, scalars work as one-element lists, impossible cells are reported, and 06 runs on a
local model."""
from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import nbformat
import papermill
import pandas as pd
import pytest
import torch

from dode.experiments import parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


# -- the parameters cells: literals, equal to DEFAULTS (no kernel) -------------------------------------------------
def parameters_cell(notebook: str) -> str:
    """The source of the notebook's one cell tagged ``parameters`` (papermill injects its values after it)."""
    cells = [c for c in nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4).cells
             if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook}: {len(cells)} cells tagged parameters"
    return cells[0].source


def literals(notebook: str) -> dict:
    """name -> value of each line of the parameters cell, every statement a ``name = <literal>`` (comments aside)."""
    source, values = parameters_cell(notebook), {}
    for node in ast.parse(source).body:
        line = ast.get_source_segment(source, node)
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{notebook}: {line!r} is not `name = <literal>` (the parameters cell holds literals only, no import)")
        name = node.targets[0].id
        assert name not in values, f"{notebook}: {name} is set twice"
        try:
            values[name] = ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"{notebook}: {line!r} is not a literal")
    return values


def test_every_numbered_notebook_has_its_defaults():
    assert sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb")) == sorted(parameters.DEFAULTS)


@pytest.mark.parametrize("notebook", list(parameters.DEFAULTS))
def test_the_parameters_cell_holds_exactly_the_defaults_as_literals(notebook):
    """Each line of the cell is one default of dode.experiments.parameters, with its value written out (readable
    where it is read; papermill's -p overrides it), and each default has its line: a change to one side alone
    fails here."""
    cell, expected = literals(notebook), vars(parameters.defaults(notebook))
    missing, extra = [n for n in expected if n not in cell], [n for n in cell if n not in expected]
    assert not missing and not extra, (f"{notebook}: DEFAULTS has no line in the parameters cell for {missing}; "
                                       f"the cell has {extra}, which DEFAULTS lacks")
    differ = {n: (cell[n], expected[n]) for n in expected if repr(cell[n]) != repr(expected[n])}  # 1 is not True
    assert not differ, f"{notebook}: (parameters cell, DEFAULTS) differ: {differ}"
    assert cell == expected


# -- through papermill (a kernel per run) ----------------------------------------------------------------------------


def execute(notebook, tmp_path, **parameters):
    output = tmp_path / f"executed-{notebook}"
    papermill.execute_notebook(NOTEBOOKS / notebook, output, cwd=str(NOTEBOOKS), progress_bar=False,
                               parameters={"out_dir": str(tmp_path / "out"), **parameters})
    return json.dumps(nbformat.read(output, as_version=4).cells)


# one wrong parameter per notebook (each run starts a kernel, about 10 s); every kind of wrong value is checked
# without a kernel in tests/test_parameters.py, through the same check_parameters
@pytest.mark.parametrize("notebook, bad, words", [
    ("01_quickstart.ipynb", {"solver": "dies"}, "unknown ['dies']"),
    ("02_distill_solvers.ipynb", {"metric": "fd"}, "metric: unknown ['fd']"),
    ("04_trajectories.ipynb", {"solvers": ["ddim", "rk4"]}, "unknown ['rk4']"),
    ("05_ablations.ipynb", {"teacher_scales": [1]}, "integer C >= 2"),
])
def test_a_wrong_parameter_stops_the_notebook_at_once_with_what_is_valid(tmp_path, notebook, bad, words):
    began = time.perf_counter()
    with pytest.raises(papermill.PapermillExecutionError) as stopped:
        execute(notebook, tmp_path, **bad)
    assert words in str(stopped.value) and "ValueError" in stopped.value.ename
    assert "KeyError" not in str(stopped.value)
    assert time.perf_counter() - began < 60  # before any distillation or sampling
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.csv"))


def test_scalars_work_and_an_impossible_cell_is_reported_in_the_output_and_the_csv(tmp_path):
    # PLMS (three spacings, so a cheap run): n steps cost n + 1 NFE, at least 3
    text = execute("02_distill_solvers.ipynb", tmp_path, solvers="pndm", nfes=[2, 3], num_samples=100,
                   reference_samples=1000, learned_nfes=[], criteria=[], validation_size=20)
    assert "skipped pndm at NFE 2: solver 'pndm' cannot make exactly 2" in text
    skipped = pd.read_csv(tmp_path / "out/gmm-digits/skipped.csv")
    assert list(skipped[["solver", "nfe"]].itertuples(index=False, name=None)) == [("pndm", 2)]
    results = pd.read_csv(tmp_path / "out/gmm-digits/results.csv")
    assert set(results.solver) == {"pndm"} and set(results.nfe) == {3}


def test_the_pretrained_notebook_runs_on_a_local_model_folder_on_the_cpu(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    unet.save_pretrained(tmp_path / "model")
    DDPMScheduler().save_pretrained(tmp_path / "model")
    text = execute("06_pretrained.ipynb", tmp_path, model_name=str(tmp_path / "model"), solvers="ipndm", nfes=[3],
                   num_samples=8, batch_size=8, fit_batch_size=8, validation_size=8, features="pixel",
                   reference=None, grid_samples=4, device="cpu")
    assert "1 cells in" in text
    folder = next((tmp_path / "out").iterdir())
    assert (folder / "figures/pretrained-ipndm.png").is_file()
    results = pd.read_csv(folder / "results.csv")
    assert set(results.variant) == {"base", "dode"} and set(results.solver) == {"ipndm"}
    assert json.loads((folder / "run.json").read_text())["parameters"]["model_name"] == str(tmp_path / "model")
