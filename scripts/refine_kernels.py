"""Does a learned grid depend on the CPU kernel path? The same refinements in two fresh processes, one under the
default kernels and one under other BLAS / MKL / oneDNN paths, compared.

Each cell is ``dode.distill(model, solver, nfe, spacing="auto", refine="joint+timesteps", teacher="fine")``
(3 starts, distill's default optimiser, as notebook 02's gmm-digits run; the fitting batch distill's default, 400)
in each ``--precision`` (``--model unet-digits``: float32 only, its network computes in float32); ``--set`` changes
any of distill's keywords, ``--patch`` any constant of ``dode.core.refine`` (Rprop's first step, ...) in both
processes. The table gives, per cell and precision, the validation score in each process, its relative change, and
the largest relative change of a lambda (of those above 1e-3) and of a grid level, and with ``--heldout N`` the
model's table metric on N held-out seeds in each process and its change. ``--single``: the first process alone, no
comparison (what a setting reaches). Prints the table; ``--out`` also writes it as CSV.

    python scripts/refine_kernels.py                        # the ten cells below, float32 and float64
    python scripts/refine_kernels.py --cells ddim:3 deis:8 --precision float64
    python scripts/refine_kernels.py --cells ddim:3 --set "refine_optimizer='lbfgs'" --heldout 2000   # L-BFGS
    python scripts/refine_kernels.py --env "ATEN_CPU_CAPABILITY=default"   # torch's own kernels instead
    python scripts/refine_kernels.py --single --precision float64 --cells ddim:3 ddim:4 --heldout 2000 \
        --patch RPROP_STEP=0.25                                         # Rprop's first step 2^-2, not 2^-5
    python scripts/refine_kernels.py --model unet-digits --precision float32 --cells ddim:5 deis:5 \
        --env "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"     # on an AVX-512 CPU: its AVX2 path

``--env`` (default: ``OTHER_KERNELS``) is what the second process gets on top of the first's environment.
``--perturb REL`` instead (or as well) adds to every output of the second process's model a fixed pattern of
uniform noise of width REL times the output's largest entry (``PERTURB``): what another kernel's summation order
does, at a size of one's choosing, on a CPU that has no other kernel to take.

    python scripts/refine_kernels.py --cells ddim:3 dpm_solver_pp_2m:10 --precision float64 --env "" --perturb 1e-13
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
import time
from unittest import mock

import pandas as pd

CELLS = ["unipc:4", "unipc:5", "dpm_solver_pp_2m:4", "dpm_solver_pp_2m:10", "deis:3", "deis:8", "ddim:3", "ipndm:6",
         "heun:5", "dpm_solver_2:6"]
#: numpy's and scipy's OpenBLAS on another core type, MKL and oneDNN on SSE only (torch's own kernels unchanged)
OTHER_KERNELS = "OPENBLAS_CORETYPE=Sandybridge MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41"
#: the variable that tells a fit's process to perturb its model's outputs (``--perturb``)
PERTURB = "REFINE_KERNELS_PERTURB"


def perturbed(model, width: float):
    """``model`` with ``width`` x its largest entry x a fixed pattern of uniform noise in [-1/2, 1/2] added to every
    output (the pattern depends on the output's shape only; the gradient passes through unchanged)."""
    import torch

    forward = model.forward

    def nudged(x, t, *args, **kwargs):
        out = forward(x, t, *args, **kwargs)
        plain = out.detach()
        pattern = torch.rand(plain.shape, generator=torch.Generator().manual_seed(plain.numel()), dtype=plain.dtype)
        return out + (width * plain.abs().max() * (pattern - 0.5)).detach()

    model.forward = nudged
    return model


def patched(patches: dict):
    """A context in which each ``{NAME: value}`` of ``patches`` is ``dode.core.refine.NAME`` (``--patch``), restored
    after (``unittest.mock.patch.multiple``); a name that is no upper-case constant of that module is an error."""
    from dode.core import refine

    unknown = [name for name in patches if not (name.isupper() and hasattr(refine, name))]
    if unknown:
        raise ValueError(f"--patch sets constants of dode.core.refine (RPROP_STEP, PATIENCE, ...), not {unknown}")
    return mock.patch.multiple(refine, **patches) if patches else contextlib.nullcontext()


def fit(cells: list, precision: str, model_name: str = "gmm-digits", options: dict | None = None,
        heldout: int | None = None, patches: dict | None = None) -> list:
    """In this process: each cell's lambdas, grid and validation score (floats, exactly); ``options``: more of
    ``distill``'s keywords (``--set``); ``heldout``: also the model's table metric on that many held-out seeds
    (1000, ... as notebook 02's tables; against 10000 data samples where the model has them, else the seeds'
    200-step DDIM samples); ``patches``: constants of ``dode.core.refine`` set during the fits (``--patch``)."""
    import torch

    import dode
    from dode.experiments.evaluate import evaluate_scheduler, evaluation_data

    torch.set_num_threads(1)
    model = dode.load_model(model_name)
    metric = dode.MODELS[model_name].metric
    data = None if heldout is None else evaluation_data(
        model, heldout, seed=1000, reference_samples=10_000, features=[metric.removeprefix("fd_")], fine_nfe=200,
        device="cpu", progress=False)  # before the perturbation: the same reference in both processes
    if os.environ.get(PERTURB):
        model = perturbed(model, float(os.environ[PERTURB]))
    out = []
    for cell in cells:
        solver, nfe = cell.split(":")
        began = time.perf_counter()
        with patched(patches or {}):
            s = dode.distill(model, solver, int(nfe), **{
                "spacing": "auto", "refine": "joint+timesteps", "teacher": "fine", "precision": precision,
                "progress": False, **(options or {})})
        seconds = time.perf_counter() - began
        scored = {} if data is None else {"heldout": evaluate_scheduler(
            model, s, int(nfe), data, features=(metric.removeprefix("fd_"),), device="cpu")[metric]}
        out.append({"cell": cell, "lambdas": list(map(float, s.lambdas)), "grid": list(map(float, s.grid or [])),
                    "validation": s.fit_info["refine"]["validation"], "optimizer": s.fit_info["refine"]["optimizer"],
                    "seconds": seconds, **scored})
    return out


def _both(cells: list, precision: str, envs: list, model_name: str, options: dict | None = None,
          heldout: int | None = None, patches: dict | None = None) -> list:
    """``fit`` in one fresh process per environment, at once (one thread each)."""
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); " \
           f"import refine_kernels as r; print(json.dumps(r.fit({cells!r}, {precision!r}, {model_name!r}, " \
           f"{options!r}, {heldout!r}, {patches!r})))"
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for env in envs]
    outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode for run in runs):
        raise RuntimeError(f"a fit failed (exit codes {[run.returncode for run in runs]})")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def _largest(a: list, b: list, floor: float) -> float:
    moves = [abs(x - y) / abs(x) for x, y in zip(a, b) if abs(x) > floor]
    return max(moves, default=0.0)


def _environment() -> dict:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    base.pop(PERTURB, None)
    return base


def single(cells: list, precisions: list, model_name: str = "gmm-digits", options: dict | None = None,
           heldout: int | None = None, patches: dict | None = None) -> pd.DataFrame:
    """``--single``: each cell fitted in one fresh process under the default kernels, no comparison."""
    rows = []
    for precision in precisions:
        fits, = _both(cells, precision, [_environment()], model_name, options, heldout, patches)
        rows += [{"cell": f["cell"], "precision": precision, **({} if heldout is None else {"heldout": f["heldout"]}),
                  "validation": f["validation"], "seconds": f["seconds"]} for f in fits]
    return pd.DataFrame(rows)


def compare(cells: list, precisions: list, other: str, model_name: str = "gmm-digits",
            perturb: float | None = None, options: dict | None = None, heldout: int | None = None,
            patches: dict | None = None) -> pd.DataFrame:
    base = _environment()
    changed = {**base, **dict(item.split("=", 1) for item in other.split())}
    if perturb is not None:
        changed[PERTURB] = repr(float(perturb))
    rows = []
    for precision in precisions:
        for a, b in zip(*_both(cells, precision, [base, changed], model_name, options, heldout, patches)):
            scored = {} if heldout is None else {
                "heldout": a["heldout"], "heldout_other": b["heldout"],
                "heldout_change": abs(a["heldout"] - b["heldout"]) / a["heldout"]}
            rows.append({"cell": a["cell"], "precision": precision, **scored, "validation": a["validation"],
                         "validation_other": b["validation"],
                         "validation_change": abs(a["validation"] - b["validation"]) / a["validation"],
                         "lambda_change": _largest(a["lambdas"], b["lambdas"], 1e-3),
                         "grid_change": _largest(a["grid"], b["grid"], 0.0),
                         "identical": a["lambdas"] == b["lambdas"] and a["grid"] == b["grid"],
                         "seconds": a["seconds"]})
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gmm-digits")
    parser.add_argument("--cells", nargs="+", default=CELLS, help="solver:nfe ...")
    parser.add_argument("--precision", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--env", default=OTHER_KERNELS, help="VAR=value ... for the second process")
    parser.add_argument("--perturb", type=float, default=None,
                        help="the second process's model outputs perturbed by this width x their largest entry")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more of distill's keywords, each value a Python literal (refine_optimizer='rprop')")
    parser.add_argument("--heldout", type=int, default=None, metavar="N",
                        help="also score each fit by the model's table metric on N held-out seeds (as notebook 02)")
    parser.add_argument("--patch", nargs="+", default=[], metavar="NAME=VALUE",
                        help="constants of dode.core.refine for the fits, each a Python literal (RPROP_STEP=0.25)")
    parser.add_argument("--single", action="store_true",
                        help="the first process alone (default kernels): what a setting reaches, no comparison")
    parser.add_argument("--out", default=None, help="also write the table here (CSV)")
    args = parser.parse_args(argv)
    try:
        options = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.set)}
        patches = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.patch)}
    except (ValueError, SyntaxError) as error:
        parser.error(f"--set and --patch take KEY=VALUE with a Python literal as the value: {error}")
    try:
        patched(patches)
    except ValueError as error:
        parser.error(str(error))
    if args.single and args.perturb is not None:
        parser.error("--single fits in one process only: there is no second one to --perturb")
    if args.perturb is not None and not args.perturb > 0:
        parser.error(f"--perturb must be a width > 0, got {args.perturb}")
    if args.heldout is not None and args.heldout < 2:
        parser.error(f"--heldout needs at least 2 seeds, got {args.heldout}")
    if args.single:
        table = single(args.cells, args.precision, args.model, options, args.heldout, patches)
    else:
        table = compare(args.cells, args.precision, args.env, args.model, args.perturb, options, args.heldout,
                        patches)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
