"""The package layers cleanly: no module imports one above it, and ``import dode`` stays light.

Bottom to top (the README's layout section says what goes where):
  1 foundation: the noise schedule's maths, where dode runs, getting checkpoints; the embedded models
  2 solvers and time grids
  3 the D-ODE scheduler
  4 sampling and evaluation: sampling, pipelines, metrics, features, the exact ODE (the fit runs the student and
    validates it by the evaluation's criteria, so both sit below it)
  5 fit and refinement, and the variant registry
  6 experiments, tables, plots, the experiment parameters
  7 tools: reproduce, benchmarks, training, distributed, verification
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dode"

LAYERS = {
    1: ("schedule", "runtime", "hub", "testbeds", "networks", "models"),
    2: ("grids", "ipndm", "solvers"),
    3: ("scheduler",),
    4: ("sampling", "pipelines", "metrics", "features", "ode"),
    5: ("variants", "teacher", "fit", "refine"),
    6: ("experiments", "tables", "plots", "parameters", "studies"),
    7: ("reproduce", "benchmarks", "training", "distributed", "verification"),
}
LAYER = {module: layer for layer, modules in LAYERS.items() for module in modules}
#: what ``import dode`` must not load: evaluation and reporting load where they are used
HEAVY = ("torchmetrics", "matplotlib", "pandas", "seaborn", "transformers")


def dode_imports(path: Path) -> set[str]:
    """Every dode module ``path`` imports, at the top or inside a function: ``from .x import``, ``from . import x``,
    ``import dode.x``, ``from dode.x import``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "dode" and "." in node.module:
                found.add(node.module.split(".")[1])
            elif node.module == "dode":
                found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("dode.") and alias.name.count(".") >= 1)
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m not in LAYER]
    assert not unplaced, f"give each new module a layer in LAYERS (and the README's layout section): {unplaced}"


@pytest.mark.parametrize("module", modules())
def test_no_module_imports_one_above_it(module):
    upward = {other: LAYER[other] for other in dode_imports(PACKAGE / f"{module}.py")
              if other in LAYER and LAYER[other] > LAYER[module]}
    assert not upward, f"dode.{module} (layer {LAYER[module]}) imports from above: {upward}"


def test_the_import_parser_sees_every_form(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from .fit import distill\nfrom . import plots\nimport dode.tables\n"
                      "def f():\n    from dode.experiments import provenance\n    from dode import metrics\n")
    assert dode_imports(source) == {"fit", "plots", "tables", "experiments", "metrics"}


def test_import_dode_loads_no_evaluation_or_reporting_package_until_a_name_needs_it():
    code = ("import sys, dode; print(' '.join(sorted({m.split('.')[0] for m in sys.modules}))); "
            "f = dode.frechet_distance; print('torchmetrics' in sys.modules, f.__module__)")
    light, lazy = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
    loaded = set(light.split())
    assert "dode" in loaded and "torch" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert lazy.split() == ["True", "dode.metrics"]
