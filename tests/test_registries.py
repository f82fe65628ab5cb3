"""A new solver, embedded model or variant is one entry: each is added to a copy of the package's source as one
entry (docs/design.md, "Where a new piece goes", says where), and the copy then fits, samples, plans, tables and
plots it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dode"

#: (file, the line an entry goes after, the entry): one line each
ENTRIES = [
    ("core/solvers.py", '           _spacing_options(_ALL), "trailing", paper="UniPC", custom_grid=True),\n',
     '    Solver("euler", diffusers.EulerDiscreteScheduler, {}, _spacing_options(_ALL), "karras", paper="Euler",'
     ' custom_grid=True),\n'),
    ("models/registry.py", '               description="a small diffusers UNet2DModel trained on the 8x8 digits (dode/models/weights)"),\n',
     '    ModelEntry("gmm-digits-3", lambda: gmm_digits(n_components=3), exact=True, features=("pixel",),'
     ' metric="fd_pixel", profile="exact"),\n'),
    ("experiments/variants.py", '    Variant("dode-learned", " learned grid", "D-ODE auto, learned grid", True, "auto", "joint+timesteps", "D"),\n',
     '    Variant("dode-joint-again", " joint again", "D-ODE joint, again", True, "auto", "joint", "*"),\n'),
]

PROBE = textwrap.dedent("""
    import math
    from pathlib import Path

    import pandas as pd
    import torch

    import dode
    from dode.experiments import checks
    from dode.experiments import evaluate as experiments
    from dode.experiments import plots
    from dode.tools import reproduce
    from dode.experiments import tables
    from dode.core.solvers import GRID_SOLVERS
    from dode.experiments.variants import REFINED_VARIANTS

    torch.set_num_threads(1)
    # the solver: in the solver list and the grid solvers, fitted, sampled, labelled, checked as a parameter
    assert "euler" in dode.SOLVERS and "euler" in GRID_SOLVERS
    model = dode.load_model("gmm-digits-3")
    assert model.name == "gmm-digits-3" and len(model.weights) == 3
    fitted = dode.distill(model, "euler", 3, batch_size=8, progress=False)
    x = dode.sample(model, fitted, 3, num_samples=4, seed=0)
    base = dode.sample(model, "euler", 3, num_samples=4, seed=0)
    assert torch.isfinite(x).all() and not torch.equal(x, base)
    assert tables.row_label("euler", "dode") == "D-Euler"
    assert checks.check_parameters(solvers=["euler"], model_name="gmm-digits-3").solvers == ["euler"]
    # the model: planned by make reproduce with its entry's profile, available, judged exactly
    runs = {r.name: r for r in reproduce.plan(Path("results"), ["gmm-digits-3"])}
    assert runs["02_distill_solvers-gmm-digits-3"].parameters["nfes"] == [3, 4, 5, 6, 8, 10]
    assert "04_trajectories-gmm-digits-3" in runs and "gmm-digits-3" in dode.models.registry.available_models()
    # the variant: fitted by evaluate_spacings, in the tables and the plots' legend
    assert "dode-joint-again" in REFINED_VARIANTS
    data = experiments.evaluation_data(model, 20, reference_samples=200, progress=False)
    teacher = dode.Teacher(model, batch_size=8, seed=0, substeps=10)
    validation = dode.Teacher(model, batch_size=8, seed=500_000, substeps=10)
    results, _ = experiments.evaluate_spacings(model, data, solvers=["euler"], nfes=[3], fit_teacher=teacher,
                                               validation=validation, learned_nfes=[3], learned_starts=1,
                                               learned_iterations=2, progress=False)
    again = results.set_index("variant").loc["dode-joint-again"]
    assert math.isfinite(again["fd_pixel"]) and again["spacing"] in dode.get_solver("euler").spacings
    table = tables.paper_table(results, "fd_pixel")
    assert list(table.index)[-1] == "D-Euler joint again", list(table.index)
    fig = plots.quality_vs_nfe(results)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "D-ODE joint, again" in legend, legend
    print("one entry each: ok")
""")


def test_a_solver_a_model_and_a_variant_are_one_entry_each(tmp_path):
    copy = tmp_path / "dode"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for file, after, entry in ENTRIES:
        source = (copy / file).read_text()
        assert source.count(after) == 1, f"{file}: the anchor line moved; update ENTRIES"
        (copy / file).write_text(source.replace(after, after + entry))
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "DODE_NUM_THREADS": "1",
                               "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one entry each: ok" in done.stdout
