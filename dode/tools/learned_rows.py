"""``make learned-rows``: the learned-grid rows at every NFE on a model whose ``make reproduce`` profile holds fewer.

``make reproduce`` gives unet-digits learned rows (the grid alone, joint lambdas, both together) at NFE 5 only: at
NFE 3-10 they cost about an hour more on two CPU cores (docs/reproducing.md, "What 20 minutes hold"). This runs
notebook 02 on ``--model`` with its ``make reproduce`` parameters (``dode.experiments.parameters.REPRODUCE``) at
``--nfes``, learned rows at every one of them, its solvers split into ``--shards`` notebook runs at once (one torch
thread each: ``ONE_CORE``), the grid refinements' objective weighed by the guard among ``--moments`` (moment-matching
weights, ``refine_fit``'s ``moment_weights``: ``MOMENTS``; ``--moments 0`` is ``make reproduce``'s squared distance
alone), every choice (auto's spacing, the guard's verdicts, starts and weights) on ``--validation-size`` validation
seeds (``VALIDATION``; ``make reproduce``'s 100 on ``--validation-size 100``), and writes into ``--out``:

- ``learned_rows/<model>.csv``: the shards' ``results.csv`` rows together (every variant, as notebook 02 writes them);
- ``learned_rows/<model>-<k>.ipynb``: each shard's executed notebook; ``learned_rows/<model>.json``: provenance;
- ``learned_rows.md``: the learned table (``dode.experiments.tables.learned_table``) and, per cell, whether D-ODE on a
  learned grid is below the best base, below greedy D-ODE auto and at or below the grid alone (``learned_checks``).

``--solvers`` runs a part of the rows (a check under other kernels); ``--report-only`` rewrites ``learned_rows.md``
from the CSV and the provenance. The shards run, and keep their executed notebooks and saved schedulers, in
``build/learned_rows`` for ``--out results`` and in ``<out>/learned_rows-work`` for another ``--out`` (``--work``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import threadpoolctl
from tqdm.auto import tqdm

from ..core.solvers import SOLVERS
from ..experiments.checks import possible
from ..experiments.summary import LEARNED_CHECKS, learned_checks
from ..experiments.tables import FIT_SECONDS, learned_table, to_markdown
from ..models.registry import get_model
from ..util.runtime import describe_machine, machine
from .provenance import provenance

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "02_distill_solvers.ipynb"
MODEL = "unet-digits"
NFES = (3, 4, 5, 6, 8, 10)
#: the grid refinements' moment weights, the guard choosing per cell: with the squared distance alone (0) D-ODE on a
#: learned grid missed greedy auto in 4 of 38 cells, the table's Frechet distance counting the spread that distance
#: costs (docs/grids-and-guard.md, "unet-digits at every NFE")
MOMENTS = (0.0, 1.0, 4.0)
#: validation seeds of every choice: the guard picks among a learned row's weights and starts, whose held-out scores
#: are closer than 100 seeds' Frechet distance tells apart (docs/grids-and-guard.md, "unet-digits at every NFE")
VALIDATION = 500
#: set to 1 for the shards' kernels: each runs on one core, torch and BLAS alike
ONE_CORE = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: where the shards of ``make learned-rows`` (``--out results``) run, cleared first; only what the report needs is
#: copied into --out. Another --out runs its shards in ``<out>/learned_rows-work`` (``work_folder``), so that a check
#: run (another kernel, a part of the solvers) keeps its schedulers and leaves the main run's alone.
WORK = ROOT / "build" / "learned_rows"


def shards(solvers, count: int) -> list[list[str]]:
    """``solvers`` in ``count`` contiguous parts of nearly equal size (the first ones one longer), none empty."""
    solvers = list(solvers)
    if count < 1:
        raise ValueError(f"shards must be at least 1, got {count}")
    count = min(count, len(solvers))
    size, extra = divmod(len(solvers), count)
    parts, begin = [], 0
    for k in range(count):
        end = begin + size + (k < extra)
        parts.append(solvers[begin:end])
        begin = end
    return parts


def run_parameters(model: str, nfes, solvers, moments=MOMENTS, validation_size: int = VALIDATION) -> dict:
    """Notebook 02's parameters for one shard: ``make reproduce``'s for ``model`` (its profile), at ``nfes``, learned
    rows at each with the grid refinements' ``moments`` weights, for ``solvers``, choices on ``validation_size``
    validation seeds."""
    from .reproduce import plan, reproduced_models

    if model not in reproduced_models():
        raise ValueError(f"{model} has no make reproduce profile; models with one: {', '.join(reproduced_models())}")
    values = next(r.parameters for r in plan(ROOT / "results", [model]) if r.name == f"02_distill_solvers-{model}")
    values.update(solvers=list(solvers), nfes=list(nfes), learned_nfes=list(nfes),
                  learned_moments=[float(w) for w in moments], validation_size=int(validation_size))
    return values


def work_folder(out: Path, work: Path | None = None) -> Path:
    """Where the shards of a run into ``out`` run: ``work`` if given, ``WORK`` for the repository's results/,
    else ``<out>/learned_rows-work``."""
    if work is not None:
        return Path(work)
    return WORK if Path(out).resolve() == (ROOT / "results").resolve() else Path(out) / "learned_rows-work"


def _run_shard(k: int, values: dict, work: Path) -> float:
    import papermill

    folder = (work / f"shard-{k}").resolve()  # the notebook runs in notebooks/: a relative out_dir would land there
    shutil.rmtree(folder, ignore_errors=True)  # a shard starts clean: no rows of an earlier run are collected
    folder.mkdir(parents=True)
    began = time.perf_counter()
    papermill.execute_notebook(NOTEBOOK, folder / "executed.ipynb", cwd=str(NOTEBOOK.parent), log_output=True,
                               progress_bar=False, parameters={**values, "out_dir": str(folder / "out")})
    return time.perf_counter() - began


def _follow(runs: list, target: Path, model: str, total: int, every: float = 5.0) -> int:
    """A progress bar over the solver x NFE cells the shards have finished (notebook 02 saves a cell's schedulers
    when it is done: one ``*-dode-auto`` folder per cell) until every run has ended; returns the cells seen."""
    with tqdm(total=total, desc=f"{model}: solver x NFE cells", unit="cell") as bar:
        while True:
            finished = all(r.done() for r in runs)
            bar.update(len(list(target.glob(f"shard-*/out/{model}/schedulers/*-dode-auto"))) - bar.n)
            if finished:
                return bar.n
            time.sleep(every)


def run(model: str, nfes, shard_count: int, out: Path, work: Path = WORK, moments=MOMENTS,
        validation_size: int = VALIDATION, solvers=SOLVERS) -> dict:
    """The shards at once, then their rows together in ``out/learned_rows``; returns the provenance record."""
    for name in ONE_CORE:  # a shard per core: the kernels, which inherit this environment, on one thread each
        os.environ[name] = "1"
    parts = shards(solvers, shard_count)
    values = [run_parameters(model, nfes, part, moments, validation_size) for part in parts]
    target = work / model
    began = time.perf_counter()
    with ThreadPoolExecutor(len(parts)) as pool:  # each papermill run starts a kernel process of its own
        runs = [pool.submit(_run_shard, k, v, target) for k, v in enumerate(values)]
        _follow(runs, target, model, sum(possible(s, n) for s in solvers for n in nfes))
        seconds = [r.result() for r in runs]
    wall = time.perf_counter() - began
    return collect(model, [target / f"shard-{k}" for k in range(len(parts))], values, seconds, wall, out)


def collect(model: str, folders: list[Path], values: list[dict], seconds: list[float], wall: float,
            out: Path) -> dict:
    """The shards' rows (``folders``: each with ``out/<model>/results.csv`` and ``executed.ipynb``) into
    ``out/learned_rows``, with their provenance and the report."""
    folder = out / "learned_rows"
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([pd.read_csv(f / "out" / model / "results.csv") for f in folders], ignore_index=True)
    rows.to_csv(folder / f"{model}.csv", index=False)
    for k, f in enumerate(folders):
        shutil.copyfile(f / "executed.ipynb", folder / f"{model}-{k}.ipynb")
    meta = provenance({"model": model, "shards": values}, wall)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):  # what each shard's kernel ran on (ONE_CORE)
        meta["machine"] = machine(torch_threads=1)
    meta["shard_seconds"] = [round(s, 1) for s in seconds]
    (folder / f"{model}.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / "learned_rows.md").write_text(report(rows, meta))
    return meta


def report(rows: pd.DataFrame, meta: dict) -> str:
    """results/learned_rows.md from the merged rows and the provenance."""
    model = meta["parameters"]["model"]
    first = meta["parameters"]["shards"][0]
    metric = first["metric"]
    quality, cost = learned_table(rows, metric)
    checks = learned_checks(rows, metric)
    counts = {c: int(checks[c].sum()) for c in LEARNED_CHECKS}
    missed = checks[~checks[list(LEARNED_CHECKS)].all(axis=1)]
    weights = kept_weights(rows)
    if weights is not None:  # which objective made each cell's grid rows (runs with several moment weights)
        checks = checks.merge(weights, on=["solver", "nfe"], how="left")
    cpu = sum(meta.get("shard_seconds", []))
    lines = [
        f"# Learned-grid rows of {model} at every NFE", "",
        "<!-- written by python -m dode.tools.learned_rows (make learned-rows) from results/learned_rows/; "
        "do not edit by hand -->", "",
        f"Notebook 02 on {model} with `make reproduce`'s parameters for it (profile `{get_model(model).profile}`), "
        f"learned rows at NFE {', '.join(map(str, first['learned_nfes']))}: {first['learned_starts']} start(s), at "
        f"most {first['learned_iterations']} iterations, the fitting batch's C = {first['refine_teacher']} teacher "
        f"for the joint lambdas; {_moments_phrase(first.get('learned_moments', [0]))}; every choice on "
        f"{first['validation_size']} validation seeds; {metric} on "
        f"{first['num_samples']} held-out seeds. Commit "
        f"{(meta.get('git_commit') or 'unknown')[:7]}{' (with uncommitted changes)' if meta.get('git_dirty') else ''}"
        f", {len(meta['parameters']['shards'])} shards at once on {describe_machine(meta.get('machine'))}: "
        f"{meta['wall_seconds'] / 60:.0f} min wall, {cpu / 60:.0f} CPU-minutes.", "",
        f"Of {len(checks)} solver x NFE cells, D-ODE on a learned grid is below the best base in "
        f"{counts['below_best']}, below greedy D-ODE auto in {counts['below_auto']} and at or below the grid alone "
        f"in {counts['at_or_below_grid']}.{_weights_phrase(weights)}", "",
        f"## {metric} (lower is better)", "", to_markdown(quality), "",
        "## Per cell", "", checks.to_markdown(index=False, floatfmt=".4g"), "",
        "## Cells that miss a check", "", missed.to_markdown(index=False, floatfmt=".4g") if len(missed) else "None.",
        "", f"## Fit seconds ({FIT_SECONDS})", "", to_markdown(cost, 1), ""]
    return "\n".join(lines)


def kept_weights(rows: pd.DataFrame) -> pd.DataFrame | None:
    """Per solver and NFE, the moment weight the guard kept for D-ODE on a learned grid (``weight_learned``) and for
    the grid alone (``weight_grid``), from notebook 02's ``moment_weight`` column (written where it weighed several;
    empty where the refinement was not kept); None for rows without it (one weight, or rows written before it)."""
    if "moment_weight" not in rows:
        return None
    cells = rows.loc[rows["variant"] == "dode-learned", ["solver", "nfe"]]
    for variant, column in (("dode-learned", "weight_learned"), ("learned-grid", "weight_grid")):
        kept = rows.loc[rows["variant"] == variant, ["solver", "nfe", "moment_weight"]]
        cells = cells.merge(kept.rename(columns={"moment_weight": column}), on=["solver", "nfe"], how="left")
    return cells.reset_index(drop=True)


def _weights_phrase(weights: pd.DataFrame | None) -> str:
    """How often each moment weight made D-ODE on a learned grid and the grid alone (empty without the column)."""
    if weights is None:
        return ""

    def counts(column: str) -> str:
        kept = weights[column].dropna().value_counts().sort_index()
        said = ", ".join(f"{w:g} in {n}" for w, n in kept.items()) + " cells" if len(kept) else "in no cell"
        left = int(weights[column].isna().sum())
        return said + (f" (not kept in {left})" if left else "")

    return (f" The moment weight kept: for D-ODE on a learned grid {counts('weight_learned')}; for the grid alone "
            f"{counts('weight_grid')}.")


def _moments_phrase(weights) -> str:
    """How the report says which objective the grid refinements had."""
    if [float(w) for w in weights] == [0.0]:
        return "the grid refinements fit the squared distance alone"
    return (f"the grid refinements' moment weight chosen per cell on the validation seeds among "
            f"{', '.join(f'{float(w):g}' for w in weights)} (0: the squared distance alone)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--nfes", nargs="+", type=int, default=list(NFES))
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS), metavar="SOLVER",
                        help="a part of the rows (default: every solver)")
    parser.add_argument("--shards", type=int, default=2, help="notebook runs at once (one core each)")
    parser.add_argument("--moments", nargs="+", type=float, default=list(MOMENTS),
                        help="moment weights of the grid refinements' objective, the guard choosing (0: alone)")
    parser.add_argument("--validation-size", type=int, default=VALIDATION,
                        help="validation seeds of auto's choice, the guard, the starts and weights")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the shards run, their schedulers kept (default: build/learned_rows for "
                             "results/, else <out>/learned_rows-work)")
    parser.add_argument("--report-only", action="store_true", help="rewrite learned_rows.md from the saved rows")
    args = parser.parse_args(argv)
    if args.report_only:
        folder = args.out / "learned_rows"
        missing = [p for p in (folder / f"{args.model}.json", folder / f"{args.model}.csv") if not p.is_file()]
        if missing:
            raise SystemExit(f"no saved rows to report: {', '.join(map(str, missing))} missing; run make learned-rows "
                             f"(python -m dode.tools.learned_rows --out {args.out}) first")
        meta = json.loads((folder / f"{args.model}.json").read_text())
        (args.out / "learned_rows.md").write_text(report(pd.read_csv(folder / f"{args.model}.csv"), meta))
        return 0
    if args.validation_size < 2:
        parser.error(f"--validation-size must be at least 2, got {args.validation_size}")
    meta = run(args.model, args.nfes, args.shards, args.out, work=work_folder(args.out, args.work),
               moments=args.moments, validation_size=args.validation_size, solvers=args.solvers)
    print(f"wrote {args.out / 'learned_rows.md'} in {meta['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
