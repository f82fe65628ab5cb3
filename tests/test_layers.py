"""The package layers cleanly, and its folders are the layers: no module imports from a layer above its own.

Bottom to top (docs/design.md says what goes where):
  util         where dode runs, getting checkpoints
  evaluation   metrics and feature spaces (the guard in core scores students with them)
  core         D-ODE: schedules, time grids, solvers, the scheduler, sampling, the teacher, fit, guard, refine, distill
  models       the registry, the embedded testbeds, networks, pipelines
  experiments  what the notebooks run: parameters, grid evaluation, studies, variants, tables, plots
  tools        reproduce, verification, benchmarks, distributed generation, training
Inside ``core`` the modules are ordered too (``CORE``); ``import dode`` stays light.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dode"

#: the subpackages, bottom to top
LAYERS = ("util", "evaluation", "core", "models", "experiments", "tools")
#: the core's modules, bottom to top: a module imports only modules of a lower rank
CORE = {
    "schedule": 1, "timegrid": 2, "ipndm": 2, "flowmatch": 2, "solvers": 3, "persistence": 4, "scheduler": 5, "sampling": 6,
    "teacher": 7, "ode": 7, "fit": 8, "refine": 8, "reference": 8, "guard": 9, "distill": 10,
}
#: what ``import dode`` must not load: evaluation and reporting load where they are used
HEAVY = ("torchmetrics", "matplotlib", "pandas", "seaborn", "transformers")


def module_name(path: Path) -> str:
    """``core.fit`` for dode/core/fit.py, ``core`` for dode/core/__init__.py, ``""`` for dode/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dode_imports(path: Path) -> set[str]:
    """Every dode module or subpackage ``path`` imports (dotted below ``dode``: ``core.fit``, ``models``), at the top
    or inside a function, relative (any level) or absolute."""
    here = module_name(path).split(".") if module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "dode":
                base = []
            else:
                continue
            module = [p for p in (node.module or "").split(".") if p]
            if not node.level:
                module = module[1:]
            target = base + module
            for alias in node.names:  # ``from . import fit``: the name may be a module of its own
                candidate = target + [alias.name]
                is_module = ((PACKAGE.joinpath(*candidate).with_suffix(".py")).is_file()
                             or PACKAGE.joinpath(*candidate).is_dir())
                found.add(".".join(candidate if is_module else target))
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("dode."))
    found.discard("")
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rank(name: str) -> tuple[int, int]:
    """(the layer, the rank inside ``core``; 0 elsewhere) of a dotted module or subpackage name."""
    layer, _, module = name.partition(".")
    return LAYERS.index(layer), CORE.get(module, 0) if layer == "core" else 0


def test_every_module_sits_in_a_layer_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"put each module into its layer's folder ({', '.join(LAYERS)}): {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == sorted(LAYERS), folders


def test_every_core_module_has_a_rank():
    unranked = [p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__" and p.stem not in CORE]
    assert not unranked, f"give each new core module a rank in CORE (and docs/design.md): {unranked}"


@pytest.mark.parametrize("path", [p for p in sources() if module_name(p)], ids=module_name)
def test_no_module_imports_from_above(path):
    mine = module_name(path)
    own_package = mine.split(".")[0]
    upward = {}
    for other in dode_imports(path):
        layer = other.split(".")[0]
        if LAYERS.index(layer) > LAYERS.index(own_package):
            upward[other] = layer
        elif layer == own_package == "core" and "." in other and "." in mine and rank(other) >= rank(mine):
            upward[other] = f"core rank {rank(other)[1]} (this one: {rank(mine)[1]})"
    assert not upward, f"dode.{mine} imports from its own layer or above: {upward}"


def test_the_import_parser_sees_every_form(tmp_path):
    source = PACKAGE / "core" / "_probe_for_test.py"
    source.write_text("from .fit import distill\nfrom . import sampling\nimport dode.experiments.tables\n"
                      "from ..models import load_model\nfrom ..evaluation import metrics\n"
                      "def f():\n    from dode.tools.reproduce import main\n    from dode import models\n")
    try:
        assert dode_imports(source) == {"core.fit", "core.sampling", "experiments.tables", "models",
                                        "evaluation.metrics", "tools.reproduce", "models"}
    finally:
        source.unlink()


def test_import_dode_loads_no_evaluation_or_reporting_package_until_a_name_needs_it():
    code = ("import sys, dode; print(' '.join(sorted({m.split('.')[0] for m in sys.modules}))); "
            "f = dode.frechet_distance; print('torchmetrics' in sys.modules, f.__module__)")
    light, lazy = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
    loaded = set(light.split())
    assert "dode" in loaded and "torch" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert lazy.split() == ["True", "dode.evaluation.metrics"]


#: the scheduler writes its own ``fit_info`` into its config; nothing else in dode reads the record back
_FIT_INFO_OWNERS = ("core/scheduler.py", "core/persistence.py")
#: "about 60 lines": the longest function the core may have, docstring included
_CORE_FUNCTION_LINES = 65


def _fit_info_reads(path: Path) -> list[int]:
    """Lines where ``path`` reads a ``fit_info`` attribute (``x.fit_info[...]``, ``x.fit_info.get``, ``{**x.fit_info}``)
    or a ``"fit_info"`` key; assigning one (``x.fit_info = {...}``) is writing the record, which is allowed."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "fit_info" and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "fit_info":
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_reads_fit_info_back():
    """``fit_info`` is the record a user reads; dode's own stages hand each other values (docs/design.md)."""
    readers = {p.relative_to(PACKAGE).as_posix(): _fit_info_reads(p) for p in sources()
               if p.relative_to(PACKAGE).as_posix() not in _FIT_INFO_OWNERS}
    assert not {path: lines for path, lines in readers.items() if lines}


def test_the_fit_info_check_sees_reads_and_lets_writes_pass(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("s.fit_info = {'a': 1}\nx = s.fit_info['a']\ny = dict(**s.fit_info)\nz = c['fit_info']\n")
    assert _fit_info_reads(probe) == [2, 3, 4]


def test_no_core_function_is_longer_than_about_60_lines():
    long = {f"core/{p.name}:{node.name}": node.end_lineno - node.lineno + 1
            for p in sorted((PACKAGE / "core").glob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > _CORE_FUNCTION_LINES}
    assert not long, long
