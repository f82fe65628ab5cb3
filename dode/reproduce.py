"""``make reproduce``: run the notebooks with papermill over the full parameter grid, into results/.

Each run executes one notebook with one set of parameters into a staging folder; only when it succeeds
are its files moved into results/ (one rename each), next to its executed copy in results/notebooks/ and
its record in results/manifest.json. A run whose notebook, parameters, inputs and ``dode`` source are
unchanged since it last succeeded is skipped; ``--force`` (``make reproduce FORCE=1``) reruns everything.
A failing run stops the whole job with the notebook's error and leaves every earlier result in place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .experiments import PAPER_NFES, provenance
from .models import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@dataclass
class Run:
    name: str
    notebook: str
    parameters: dict
    inputs: list = field(default_factory=list)  # files under results/ that the run reads


def available_models() -> list[str]:
    """gmm-digits always; unet-digits once its weights are there."""
    return ["gmm-digits"] + (["unet-digits"] if (WEIGHTS_DIR / "unet-digits" / "config.json").is_file() else [])


def plan(results: Path, models: list[str]) -> list[Run]:
    """The full grid of `make reproduce`: the parameters of the paper's tables, figures and ablations."""
    digits = (WEIGHTS_DIR / "digits-classifier").is_dir()
    features = ["pixel", "digits"] if digits else ["pixel"]
    runs = [Run("01_quickstart-gmm-digits", "01_quickstart.ipynb", {"model_name": "gmm-digits", "num_samples": 1000})]
    for model in models:
        exact = model == "gmm-digits"
        runs.append(Run(f"02_distill_solvers-{model}", "02_distill_solvers.ipynb", {
            "model_name": model, "solvers": "all", "nfes": list(PAPER_NFES), "features": features,
            "num_samples": 2000 if exact else 1000, "reference_samples": 10_000, "teacher": 10,
            "refine": {"joint": [4, 5, 6], "joint+timesteps": [5]} if exact else {"joint": [5], "joint+timesteps": [5]},
            "refine_teacher": "fine"}))
    metrics = [f"fd_{f}" for f in features] + ["rmse_exact"]
    runs.append(Run("03_paper_tables", "03_paper_tables.ipynb",
                    {"results_dir": os.path.relpath(results.resolve(), NOTEBOOKS), "models": models, "metrics": metrics},
                    inputs=[f"{m}/{f}" for m in models for f in ("results.csv", "evaluation.json")]))
    for model in models:
        runs.append(Run(f"04_trajectories-{model}", "04_trajectories.ipynb", {
            "model_name": model, "solvers": "all", "nfe": 5, "grid_nfes": [3, 5, 10], "grid_samples": 16}))
    runs.append(Run("05_ablations-gmm-digits", "05_ablations.ipynb", {
        "model_name": "gmm-digits", "solver": "ddim", "nfe": 5, "teacher_scales": [2, 5, 10, 20, "fine"],
        "batch_sizes": [10, 25, 100, 400], "fit_repeats": 3, "matching_solvers": "all", "num_samples": 2000,
        "reference_samples": 10_000, "refine_solvers": ["ddim", "dpm_solver_pp_2m", "heun"], "refine_teacher": "fine"}))
    return runs


def run_key(run: Run, results: Path) -> str:
    """Hash of everything a run's outputs depend on: notebook, parameters, inputs, the dode source."""
    digest = hashlib.sha256()
    digest.update((NOTEBOOKS / run.notebook).read_bytes())
    digest.update(json.dumps(run.parameters, sort_keys=True).encode())
    for path in [*sorted((ROOT / "dode").glob("*.py")), *(results / p for p in run.inputs)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


def execute(run: Run, results: Path, manifest: dict, *, force: bool, label: str) -> bool:
    """Run one notebook unless up to date; returns True when it ran."""
    import papermill

    key = run_key(run, results)
    previous = manifest["runs"].get(run.name, {})
    if not force and previous.get("key") == key and all((results / p).is_file() for p in previous.get("outputs", [])):
        print(f"{label} {run.name}: up to date, skipped", flush=True)
        return False
    print(f"{label} {run.name}: running {run.notebook} with {json.dumps(run.parameters)}", flush=True)
    staging = results.resolve() / f".staging-{run.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    executed = staging / run.notebook
    began = time.perf_counter()
    try:
        papermill.execute_notebook(NOTEBOOKS / run.notebook, executed, cwd=str(NOTEBOOKS), progress_bar=True,
                                   parameters={**run.parameters, "out_dir": str(staging / "out")})
    except BaseException:
        failed = results / "notebooks" / f"{run.name}.failed.ipynb"
        failed.parent.mkdir(parents=True, exist_ok=True)
        if executed.is_file():
            shutil.move(executed, failed)
            print(f"{run.name} failed; the executed notebook is in {failed}", file=sys.stderr)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    outputs = sorted(p.relative_to(staging / "out").as_posix() for p in (staging / "out").rglob("*") if p.is_file())
    if not outputs:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"{run.name} wrote nothing into its out_dir {staging / 'out'}")
    for stale in set(previous.get("outputs", [])) - set(outputs):
        (results / stale).unlink(missing_ok=True)
    for relative in outputs:
        target = results / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / "out" / relative).replace(target)
    notebook_copy = results / "notebooks" / f"{run.name}.ipynb"
    notebook_copy.parent.mkdir(parents=True, exist_ok=True)
    executed.replace(notebook_copy)
    shutil.rmtree(staging, ignore_errors=True)
    manifest["runs"][run.name] = {
        "notebook": f"notebooks/{run.notebook}", "parameters": run.parameters, "key": key,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "executed_notebook": notebook_copy.relative_to(results).as_posix(), "outputs": outputs,
    }
    return True


def write_summary(results: Path, manifest: dict):
    """results/README.md: the headline table of gmm-digits with its provenance, ready to cite."""
    table = (results / "gmm-digits" / "table_fd_pixel.md").read_text()
    evaluation = json.loads((results / "gmm-digits" / "evaluation.json").read_text())
    grid = manifest["runs"]["02_distill_solvers-gmm-digits"]
    env = manifest["environment"]
    runs = "\n".join(f"| {name} | `{r['notebook']}` | {r['wall_seconds']} | {r['finished']} |"
                     for name, r in manifest["runs"].items())
    text = f"""# Results

Written by `make reproduce` (`python -m dode.reproduce`); do not edit by hand.

## gmm-digits: pixel Frechet distance to the data distribution (lower is better)

{evaluation['num_samples']} samples per cell (seeds {evaluation['evaluation_seeds'][0]}-{evaluation['evaluation_seeds'][1]}),
against {evaluation['reference']}. D-ODE lambdas fitted on seeds {evaluation['fit_seeds'][0]}-{evaluation['fit_seeds'][1]}
with teacher C = {evaluation['teacher']} (DDIM steps per student step). Exact-ODE floor: **{evaluation['floor']['pixel']:.3f}**.
Heun makes only odd NFE (2n - 1); its even columns are empty.

{table}
Every table (Markdown and LaTeX) is in `<model>/table_<metric>.md|tex`, every number in `<model>/results.csv`,
every fitted DODEScheduler in `<model>/schedulers/`, the figures in `figures/`, the executed notebooks in
`notebooks/`, and each run's parameters and outputs in `manifest.json`.

## Provenance

git commit `{env['git_commit']}`{' (with uncommitted changes)' if env['git_dirty'] else ''}; {env['machine']['platform']},
{env['machine']['cpus']} CPUs, Python {env['machine']['python']}; torch {env['packages']['torch']},
diffusers {env['packages']['diffusers']}, torchmetrics {env['packages']['torchmetrics']}.
Parameters of the table: `{json.dumps(grid['parameters'])}`.

| run | notebook | wall seconds | finished (UTC) |
|---|---|---|---|
{runs}
"""
    (results / "README.md").write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--models", nargs="+", default=None, help="default: every embedded model with weights")
    parser.add_argument("--only", nargs="+", default=None, help="run only these run names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--force", action="store_true", help="rerun runs that are up to date")
    args = parser.parse_args(argv)

    results = args.results.resolve()  # the notebooks run in notebooks/: hand them absolute paths
    runs = plan(results, args.models or available_models())
    if args.list:
        print("\n".join(f"{r.name}: {r.notebook} {json.dumps(r.parameters)}" for r in runs))
        return
    if args.only:
        unknown = set(args.only) - {r.name for r in runs}
        if unknown:
            parser.error(f"unknown runs {sorted(unknown)}; see --list")
        runs = [r for r in runs if r.name in args.only]
    results.mkdir(parents=True, exist_ok=True)
    manifest_path = results / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"runs": {}}
    began = time.perf_counter()
    ran = 0
    for i, run in enumerate(runs, 1):
        ran += execute(run, results, manifest, force=args.force, label=f"[{i}/{len(runs)}]")
        if ran:  # record progress after every run, so an interrupted job resumes where it stopped
            manifest["environment"] = provenance({}, 0.0)
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if ran:
        manifest["environment"] = provenance({"runs": [r.name for r in runs]}, time.perf_counter() - began)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        if "02_distill_solvers-gmm-digits" in manifest["runs"] and (results / "gmm-digits/table_fd_pixel.md").is_file():
            write_summary(results, manifest)
    print(f"{ran} of {len(runs)} runs executed in {time.perf_counter() - began:.0f} s; see {results / 'README.md'}")


if __name__ == "__main__":
    main()
