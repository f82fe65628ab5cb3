"""The notebooks' parameter checks: every notebook calls ``check_parameters`` first, and writes into
``output_dir``; ``possible`` says whether a solver can make an NFE exactly."""
from __future__ import annotations

import math

import tempfile
from pathlib import Path

from ..core.solvers import FLOW_SOLVERS, SOLVERS, get_solver
from ..util.runtime import resolve_device


def output_dir(out_dir=None) -> Path:
    """The folder a notebook writes into: ``out_dir``, or a fresh temporary folder when None."""
    path = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dode-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def possible(solver: str, nfe: int) -> bool:
    try:
        get_solver(solver).steps_for(nfe)
    except ValueError:
        return False
    return True


def _names(value, name: str, valid, empty: bool = False) -> list:
    """A list of names from ``valid``; a single name (papermill's ``-p solvers deis``) is a one-element list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, e.g. {[valid[0]]!r}; got {value!r} (papermill: pass lists as "
                         f"YAML, -y '{name}: [{valid[0]}]')")
    unknown = [v for v in value if v not in valid]
    if unknown or not (value or empty):
        raise ValueError(f"{name}: unknown {unknown!r} (or none given); valid: {', '.join(map(str, valid))}")
    return list(value)


def _positive_ints(value, name: str, empty: bool = False) -> list:
    """A list of positive integers; a single integer (``-p nfes 4``) is a one-element list."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not (value or empty) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(f"{name} must be a list of positive integers, e.g. [3, 5]; got {value!r} (papermill: "
                         f"pass lists as YAML, -y '{name}: [3, 5]')")
    return list(value)


def _seeds(value, name: str) -> list:
    """A non-empty list of distinct seeds (integers >= 0); a single integer is a one-element list."""
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ValueError(f"{name} must be a list of distinct integers >= 0, e.g. [0, 100, 200]; got {value!r}")
    return list(value)


def _teacher_value(value, name: str):
    if value == "fine" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        return value
    raise ValueError(f"{name} must be an integer C >= 2 (DDIM steps per student step) or 'fine', got {value!r}")


def _model_name(value) -> str:
    from ..models.registry import MODELS

    name = str(value)
    if name in MODELS or Path(name).expanduser().exists() or "/" in name:
        return name  # an embedded model, a folder, or a hub id (load_model says at once if it cannot be had)
    raise ValueError(f"model_name: unknown model {name!r}; valid: {', '.join(MODELS)}, a diffusers UNet2DModel "
                     "folder, or a hub id such as 'google/ddpm-cifar10-32'")


def _metrics(value, name: str) -> list:
    from ..evaluation.metrics import FEATURES

    return _names(value, name, [f"fd_{f}" for f in FEATURES] + ["rmse_exact"])


def _spacing(value):
    from ..core.solvers import SPACINGS

    if value is None or value == "auto" or value in SPACINGS:
        return value
    raise ValueError(f"spacing: unknown {value!r}; valid: None (each solver's paper spacing), 'auto', "
                     f"{', '.join(SPACINGS)}")


def _precision(value, name):
    from ..core.teacher import PRECISIONS

    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{name}: {value!r}; valid: {', '.join(map(repr, PRECISIONS))}")
    return value


def _weights(value, name: str) -> list:
    """A list of distinct finite numbers >= 0, at least one (a scalar: one)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if (not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                          for v in values) or len(set(values)) < len(values)):
        raise ValueError(f"{name} must be distinct finite numbers >= 0, at least one; got {value!r}")
    return [float(v) for v in values]


def _checks():
    from ..core.guard import CRITERIA
    from ..evaluation.metrics import FEATURES

    solvers = lambda value, name: list(SOLVERS) if value == "all" else _names(value, name, SOLVERS)  # noqa: E731
    flow = lambda value, name: list(FLOW_SOLVERS) if value == "all" else _names(value, name, FLOW_SOLVERS)  # noqa: E731
    return {
        "flow_solvers": flow,
        "model_name": lambda v, n: _model_name(v),
        "models": lambda v, n: [_model_name(m) for m in ([v] if isinstance(v, str) else v)],
        "solvers": solvers, "matching_solvers": solvers, "refine_solvers": solvers, "learned_solvers": solvers,
        "seed_solvers": solvers,
        "learned_starts": lambda v, n: _positive_ints(v, n)[0], "learned_iterations": lambda v, n: _positive_ints(v, n)[0],
        "fit_seeds": _seeds,
        "solver": lambda v, n: (_names([v], n, SOLVERS + FLOW_SOLVERS)[0] if isinstance(v, str)
                                else _names(v, n, SOLVERS)),
        "pca_solver": lambda v, n: _names([v], n, SOLVERS)[0],
        "nfes": _positive_ints, "grid_nfes": _positive_ints, "batch_sizes": _positive_ints,
        "learned_nfes": lambda v, n: _positive_ints(v, n, empty=True), "learned_moments": _weights,
        "nfe": lambda v, n: _positive_ints([v] if not isinstance(v, (list, tuple)) else v, n)[0],
        "features": lambda v, n: _names(v, n, FEATURES),
        "criteria": lambda v, n: _names(v, n, CRITERIA, empty=True),
        "metric": lambda v, n: _metrics([v], n)[0], "metrics": _metrics,
        "teacher": _teacher_value, "refine_teacher": _teacher_value,
        "teacher_scales": lambda v, n: [_teacher_value(t, n) for t in ([v] if not isinstance(v, (list, tuple)) else v)],
        "spacing": lambda v, n: _spacing(v),
        "precision": _precision,
        "device": lambda v, n: (resolve_device(v), v)[1],
        "num_threads": lambda v, n: v,
    }


def check_parameters(**parameters):
    """A notebook's parameters, checked and normalised before any work; every notebook calls it first.

    A scalar where a list is expected is a one-element list (papermill hands ``-p nfes 4`` over as an int and
    ``-p solvers deis`` as a string); an unknown solver, model, spacing, feature, metric or criterion, a device
    this machine lacks, or a value of the wrong kind is a ValueError that names what is valid. ``num_threads``
    is applied (``dode.util.runtime.use_threads``: one thread unless asked otherwise). With ``solvers`` (or
    ``solver``) and ``nfes`` (or ``nfe``), the solver x NFE cells a solver cannot make exactly are returned in
    ``skipped`` (solver, nfe, reason) and printed; none possible at all is a ValueError.

    Returns a namespace with every parameter given, normalised, plus ``skipped`` and ``num_threads`` (in use).
    """
    from types import SimpleNamespace

    from ..util.runtime import use_threads

    checks = _checks()
    unknown = sorted(set(parameters) - set(checks))
    if unknown:
        raise TypeError(f"check_parameters does not know {unknown}; it checks {', '.join(sorted(checks))}")
    checked = {name: checks[name](value, name) for name, value in parameters.items()}
    checked["num_threads"] = use_threads(parameters.get("num_threads"))
    single = [checked["solver"]] if isinstance(checked.get("solver"), str) else None
    solvers = checked.get("solvers", checked.get("flow_solvers", single))
    nfes = checked.get("nfes", [checked["nfe"]] if "nfe" in checked else None)
    skipped = []
    if solvers is not None and nfes is not None:
        for solver in solvers:
            for nfe in nfes:
                try:
                    get_solver(solver).steps_for(nfe)
                except ValueError as err:
                    skipped.append({"solver": solver, "nfe": nfe, "reason": str(err)})
        if len(skipped) == len(solvers) * len(nfes):
            raise ValueError("no solver x NFE cell can run: " + "; ".join(s["reason"] for s in skipped))
        for cell in skipped:
            print(f"skipped {cell['solver']} at NFE {cell['nfe']}: {cell['reason']}")
    return SimpleNamespace(**checked, skipped=skipped)
