"""``make reproduce``: run the notebooks with papermill over the full parameter grid, into results/.

Each run executes one notebook with one set of parameters into a staging folder; only when it succeeds
are its files moved into results/ (one rename each), next to its executed copy in results/notebooks/ and
its record in results/manifest.json (committed: what produced the results). What ran on this machine is kept
apart, untracked, in results/.state.json: a run whose notebook, parameters, inputs and ``dode`` source are
unchanged since it last succeeded here is skipped, so a fresh clone runs everything and a second run skips;
``--force`` (``make reproduce FORCE=1``) reruns everything. A failing run stops the whole job with the
notebook's error and leaves every earlier result in place.

After the runs, every number they wrote is compared with the one it replaced (``dode.verification``), printed
and written to results/verification.md. ``--verify`` (``make verify``) runs into a scratch folder instead and
compares with results/ without touching it; it fails when a number differs beyond the tolerance.
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

from . import parameters, verification
from .experiments import provenance
from .models import available_models, get_model
from .runtime import WEIGHTS_DIR, describe_machine, machine, wanted_threads

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
#: per results folder, untracked: the key and outputs of each run that succeeded on this machine
STATE_FILE = ".state.json"
#: a partial run's (``--only``, some ``--models``, or runs skipped) comparison, beside the full run's verification.md
PARTIAL_REPORT = "verification-partial.md"
#: where ``--verify`` runs (cleared first)
VERIFY_DIR = ROOT / "build" / "verify"


@dataclass
class Run:
    name: str
    notebook: str
    parameters: dict
    inputs: list = field(default_factory=list)  # files under results/ that the run reads
    needs: list = field(default_factory=list)  # runs that must finish first (they write the inputs)


def plan(results: Path, models: list[str]) -> list[Run]:
    """The full grid of `make reproduce`: the parameters of the paper's tables, figures and ablations
    (``dode.parameters.REPRODUCE``), for each embedded model in ``models`` with its registry entry's profile."""
    digits = (WEIGHTS_DIR / "digits-classifier").is_dir()
    features = ["pixel", "digits"] if digits else ["pixel"]
    quickstart = parameters.reproduce("01_quickstart")
    runs = [Run(f"01_quickstart-{quickstart['model_name']}", "01_quickstart.ipynb", quickstart)]
    for model in models:
        entry = get_model(model)
        metric = entry.metric if entry.metric.removeprefix("fd_") in features else "fd_pixel"
        runs.append(Run(f"02_distill_solvers-{model}", "02_distill_solvers.ipynb", {
            "model_name": model, "features": [f for f in features if f in entry.features], "metric": metric,
            **parameters.reproduce("02_distill_solvers", entry.profile)}))
    metrics = [f"fd_{f}" for f in features] + ["rmse_exact"]
    runs.append(Run("03_paper_tables", "03_paper_tables.ipynb",
                    {"results_dir": os.path.relpath(results.resolve(), NOTEBOOKS), "models": models, "metrics": metrics},
                    inputs=[f"{m}/{f}" for m in models for f in ("results.csv", "spacings.csv", "evaluation.json")],
                    needs=[f"02_distill_solvers-{m}" for m in models]))
    for model in models:
        runs.append(Run(f"04_trajectories-{model}", "04_trajectories.ipynb", {
            "model_name": model, **parameters.reproduce("04_trajectories")}))
    ablations = parameters.reproduce("05_ablations")
    runs.append(Run(f"05_ablations-{ablations['model_name']}", "05_ablations.ipynb", ablations))
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


def execute(run: Run, results: Path, previous: dict, *, force: bool, label: str) -> dict | None:
    """Run one notebook unless up to date (``previous``: its manifest record); returns its new manifest record,
    or None when it was skipped. Runs in a worker process of its own."""
    import papermill

    key = run_key(run, results)
    if not force and previous.get("key") == key and all((results / p).is_file() for p in previous.get("outputs", [])):
        print(f"{label} {run.name}: up to date, skipped", flush=True)
        return None
    print(f"{label} {run.name}: running {run.notebook} with {json.dumps(run.parameters)}", flush=True)
    staging = results.resolve() / f".staging-{run.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    executed = staging / run.notebook
    began = time.perf_counter()
    try:
        papermill.execute_notebook(NOTEBOOKS / run.notebook, executed, cwd=str(NOTEBOOKS), progress_bar=True,
                                   parameters={**run.parameters, "out_dir": str(staging / "out")})
    except BaseException as err:
        how = "interrupted" if _interrupted(err) else "failed"
        kept = results / "notebooks" / f"{run.name}.{how}.ipynb"
        kept.parent.mkdir(parents=True, exist_ok=True)
        if executed.is_file():
            shutil.move(executed, kept)
            print(f"{run.name} {how}; the executed notebook is in {kept}", file=sys.stderr)
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
    for how in ("failed", "interrupted"):  # an earlier attempt's copy is stale now
        (results / "notebooks" / f"{run.name}.{how}.ipynb").unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"{label} {run.name}: done in {time.perf_counter() - began:.0f} s", flush=True)
    return {
        "notebook": f"notebooks/{run.notebook}", "parameters": run.parameters, "key": key,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "executed_notebook": notebook_copy.relative_to(results).as_posix(), "outputs": outputs,
        "machine": machine(torch_threads=wanted_threads()),  # the threads the notebook's kernel ran on
        **{key: value for key, value in provenance({}, 0.0).items() if key.startswith("git_")},
    }


def _interrupted(err: BaseException) -> bool:
    """Whether a run ended by an interruption (Ctrl-C here, or in its kernel) rather than by an error."""
    return isinstance(err, KeyboardInterrupt) or getattr(err, "ename", None) == "KeyboardInterrupt"


class _InProcess:
    """``--jobs 1``: each run in this process, one after the other, behind the executor interface."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 -- handed on through the future, as a worker would
            future.set_exception(err)
        return future


def execute_all(runs: list[Run], results: Path, manifest: dict, save, *, force: bool, jobs: int,
                state: dict | None = None) -> int:
    """Execute ``runs``, up to ``jobs`` at once (one process each, one torch thread each), each after the runs it
    ``needs``; ``save()`` after every run that ran. A run is skipped when ``state`` (this machine's record,
    ``STATE_FILE``; None: the manifest's) has its key. Returns how many ran. The first failure stops the job:
    runs under way finish, none starts."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    state = manifest if state is None else state

    names = {r.name for r in runs}
    pending, running, done, ran = list(runs), {}, set(), 0
    pool = _InProcess() if jobs == 1 else ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    with pool:
        failure = None
        while (pending and failure is None) or running:
            ready = [r for r in pending if all(n in done or n not in names for n in r.needs)]
            for run in ready[: max(0, jobs - len(running))] if failure is None else []:
                pending.remove(run)
                label = f"[{runs.index(run) + 1}/{len(runs)}]"
                running[pool.submit(execute, run, results, state["runs"].get(run.name, {}), force=force,
                                    label=label)] = run
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                try:
                    record = future.result()
                except BaseException as err:  # noqa: BLE001 -- reraised once the runs under way are done
                    failure = failure or err
                    continue
                done.add(run.name)
                if record is not None:
                    manifest["runs"][run.name] = record
                    if state is not manifest:
                        state["runs"][run.name] = {key: record[key] for key in ("key", "outputs", "finished")}
                    ran += 1
                    save()
        if failure is not None:
            raise failure
    return ran


def headline(summary, metric: str, floor: float, tolerance: float = 0.01, costs: dict | None = None) -> str:
    """Prose of what D-ODE auto does against the best base, from a ``spacing_summary`` table: wins, ties (within
    ``tolerance``), losses with their numbers, the median ratio, and ``costs`` (median seconds of ``auto`` and
    of one greedy fit)."""
    import pandas as pd

    cells = summary.dropna(subset=["best-base", "dode-auto"])
    ratio = cells["dode-auto"] / cells["best-base"]
    wins, losses = cells[ratio < 1 - tolerance], cells[ratio > 1 + tolerance]
    lines = [f"D-ODE with `spacing=\"auto\"` against the best base a user could configure (the best of diffusers' "
             f"spacings for that solver and NFE, by `{metric}` on the evaluation seeds): better in {len(wins)} of "
             f"{len(cells)} solver x NFE cells, within {tolerance:.0%} in {len(cells) - len(wins) - len(losses)}, "
             f"worse in {len(losses)}; median ratio {ratio.median():.3f} (floor {floor:.3f})."]
    if len(losses):
        lines.append("Where it does not win: " + "; ".join(
            f"{r.solver} NFE {r.nfe}: {r['dode-auto']:.3f} ({r['dode-auto_spacing']}) against "
            f"{r['best-base']:.3f} ({r['best-base_spacing']})" for _, r in losses.iterrows()) + ".")
    paper = cells["dode"] / cells["base"] if "dode" in cells and "base" in cells else pd.Series(dtype=float)
    if len(paper):
        lines.append(f"The paper's method on the paper's spacing (D-ODE against its own base) has a median ratio of "
                     f"{paper.median():.3f}; against the best base, {(cells['dode'] / cells['best-base']).median():.3f}.")
    if costs is not None:
        lines.append(f"Cost on this machine: `spacing=\"auto\"` took a median {costs['auto']:.2f} s per solver and "
                     f"NFE (every spacing fitted and validated, the shared validation run included), against "
                     f"{costs['greedy']:.2f} s for one greedy fit.")
    return " ".join(lines)  # the learned grids: learned_claims


def learned_claims(results, metric: str) -> str:
    """Prose on the learned grids from a model's ``results.csv`` rows (empty where it holds none): what the lambdas
    add on top of a learned grid, what the grid adds on top of the lambdas, and what each fit costs."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric)
    seconds = results.pivot_table(index=["solver", "nfe"], columns="variant", values="fit_seconds")
    if "dode-learned" not in wide or "learned-grid" not in wide:
        return ""
    both = wide.dropna(subset=["dode-learned", "learned-grid"])
    if both.empty:
        return ""
    nfes = sorted({n for _, n in both.index})
    lam = both["dode-learned"] / both["learned-grid"]
    low = lam[[n <= 5 for _, n in both.index]]
    grid = (both["dode-learned"] / both["dode-auto"]).median()
    lines = [f"Learned grids ({len(both)} solver x NFE cells, NFE {', '.join(map(str, nfes))}): D-ODE with lambdas and "
             f"grid learned together against the base solver on a grid learned alone (lambdas 0, same starts and "
             f"iterations): median ratio {lam.median():.3f}"
             + (f", at or below 0.5x in {int((low <= 0.5).sum())} of {len(low)} cells at NFE 5 and below" if len(low)
                else "") + f". What the grid adds on top of the lambdas: median ratio {grid:.3f} to greedy D-ODE auto."]
    best = (both["dode-learned"] / wide.loc[both.index, "best-base"]).median()
    lines.append(f"Against the best base on diffusers' spacings, D-ODE learned grid has a median ratio of {best:.3f}.")
    costs = {v: seconds[v].median() for v in ("learned-grid", "dode-joint", "dode-learned", "dode-auto") if v in seconds}
    lines.append("Median fit seconds per solver and NFE: " + ", ".join(
        f"{name} {costs[v]:.1f} s" for v, name in (("dode-auto", "greedy D-ODE auto"), ("learned-grid", "grid alone"),
                                                  ("dode-joint", "joint lambdas"), ("dode-learned", "lambdas and grid"))
        if v in costs) + " (each refinement on top of the auto fit it starts from).")
    return " ".join(lines)


README_BLOCK = ("<!-- results: written by make reproduce from results/; do not edit by hand -->", "<!-- /results -->")


def update_readme(readme: Path, text: str) -> bool:
    """Replace the text between the ``README_BLOCK`` markers of ``readme`` (if it has them); True if it did."""
    if not readme.is_file():
        return False
    content = readme.read_text()
    start, end = README_BLOCK
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    readme.write_text(head + start + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])
    return True


def write_summary(results: Path, manifest: dict) -> str | None:
    """results/README.md: each model's headline table and claims, generated from the result files, with
    provenance, ready to cite. Returns the claims, which also go into the repository README's "Known results"
    block when ``results`` is the repository's results/; None, writing nothing, where no 02 run is in the manifest."""
    import pandas as pd

    if not any(name.startswith("02_distill_solvers-") for name in manifest["runs"]):
        return None

    env = manifest["environment"]
    sections, claims = [], []
    for name in sorted(manifest["runs"]):
        if not name.startswith("02_distill_solvers-"):
            continue
        model = name.removeprefix("02_distill_solvers-")
        folder = results / model
        evaluation = json.loads((folder / "evaluation.json").read_text())
        metric = evaluation["metric"]
        floor = evaluation["floor"].get(metric.removeprefix("fd_"), 0.0)
        if not (folder / "summary.csv").is_file() or not (folder / f"table_{metric}.md").is_file():
            continue
        summary = pd.read_csv(folder / "summary.csv")
        correlation = pd.DataFrame(evaluation.get("criterion_correlation", []))
        costs = None
        if (folder / "results.csv").is_file() and (folder / "spacings.csv").is_file():
            rows, sweep = pd.read_csv(folder / "results.csv"), pd.read_csv(folder / "spacings.csv")
            if "fit_seconds" in sweep:
                costs = {"auto": rows.loc[rows.variant == "dode-auto", "fit_seconds"].median(),
                         "greedy": sweep.loc[sweep.variant == "dode", "fit_seconds"].median()}
        text = headline(summary, metric, floor, costs=costs)
        learned = learned_claims(pd.read_csv(folder / "results.csv"), metric) if (folder / "results.csv").is_file() \
            else ""
        if learned:
            text += " " + learned
        for spread_file in sorted(folder.glob("ablation_seeds_summary-nfe*.csv")):
            spread = pd.read_csv(spread_file)
            spread = spread[spread.variant == "dode-learned"]
            if len(spread):
                nfe = spread_file.stem.rsplit("-nfe", 1)[1]
                text += (f" Refitted on {len(pd.read_csv(folder / f'ablation_seeds-nfe{nfe}.csv').fit_seed.unique())} "
                         f"fitting batches, D-ODE learned grid at NFE {nfe} varies by at most "
                         f"{spread.range_over_median.max():.1%} of its median ("
                         + ", ".join(f"{r.solver} {r['median']:.3f}, {r['min']:.3f}-{r['max']:.3f}"
                                     for _, r in spread.iterrows()) + ").")
        claims.append(f"- **{model}** (`{metric}`, {evaluation['num_samples']} held-out samples per cell, NFE "
                      f"{', '.join(map(str, sorted(summary.nfe.unique())))}): {text}")
        if not correlation.empty:
            picks = ", ".join(f"`{r.criterion}` {r.spearman_all:.3f} (picks the best spacing in "
                              f"{r.picks_the_best:.0%} of solver x NFE cells)" for r in correlation.itertuples())
            claims.append(f"  Validation criteria, Spearman rank correlation with `{metric}` over every cell: {picks}.")
        sections.append(f"""## {model}: `{metric}` (lower is better)

{evaluation['num_samples']} samples per cell (seeds {evaluation['evaluation_seeds'][0]}-{evaluation['evaluation_seeds'][1]}),
against {evaluation['reference']}. D-ODE lambdas fitted on seeds {evaluation['fit_seeds'][0]}-{evaluation['fit_seeds'][1]}
with teacher C = {evaluation['teacher']}; spacings chosen and guarded on seeds
{evaluation['validation_seeds'][0]}-{evaluation['validation_seeds'][1]}. Floor (the reference solution's own score):
**{floor:.3f}**. Heun makes only odd NFE (2n - 1); its even columns are empty.

{text}

{(folder / f"table_{metric}.md").read_text()}
The spacing behind each cell is in `{model}/table_spacings.md`; every solver x spacing x NFE x (base, D-ODE) cell
in `{model}/spacings.csv` and `figures/spacings-{model}.png`.
""" + ("" if not (folder / "table_learned.md").is_file() else f"""
### Learned grids: the grid alone, the lambdas alone, both

The best base, the base on a learned grid (lambdas 0), greedy D-ODE auto, its lambdas refined jointly, lambdas and
grid learned together (`{model}/table_learned.md`):

{(folder / "table_learned.md").read_text()}""") + ("" if correlation.empty else f"""
How well each validation criterion predicts `{metric}` (Spearman rank correlation over every cell, its median
within each solver and NFE, and how often the criterion's pick is the true best):

{correlation.to_markdown(index=False, floatfmt=".3f")}
"""))
    runs = "\n".join(f"| {name} | `{r['notebook']}` | {r['wall_seconds']} | {r['finished']} |"
                     for name, r in manifest["runs"].items())
    text = f"""# Results

Written by `make reproduce` (`python -m dode.reproduce`) from the result files; do not edit by hand.

{chr(10).join(sections)}
Every table (Markdown and LaTeX) is in `<model>/table_<metric>.md|tex`, every number in `<model>/results.csv`,
every fitted DODEScheduler in `<model>/schedulers/`, the figures in `figures/`, the executed notebooks in
`notebooks/`, and each run's parameters and outputs in `manifest.json`.

## Provenance

git commit `{env['git_commit']}`{' (with uncommitted changes)' if env['git_dirty'] else ''}; {describe_machine(env['machine'])};
Python {env['machine']['python']}; torch {env['packages']['torch']},
diffusers {env['packages']['diffusers']}, torchmetrics {env['packages']['torchmetrics']}; wall time
{env['wall_seconds']} s with {env['parameters'].get('jobs', 1)} runs at once.

| run | notebook | wall seconds | finished (UTC) |
|---|---|---|---|
{runs}
"""
    (results / "README.md").write_text(text)
    block = "\n".join(claims) + (f"\n\n(`make reproduce` at `{env['git_commit']}`, {env['wall_seconds']} s on "
                                 f"{env['machine']['cpus']} CPUs; tables: results/README.md.)")
    if results.resolve() == (ROOT / "results").resolve():
        update_readme(ROOT / "README.md", block)
    return block


def check_inputs(runs: list[Run], results: Path) -> None:
    """Before anything runs: every input of every run is in ``results`` or made by a run that runs first."""
    made = {r.name for r in runs}
    for run in runs:
        missing = [p for p in run.inputs if not (results / p).is_file()]
        if missing and not any(n in made for n in run.needs):
            raise SystemExit(f"{run.name} reads {', '.join(missing)} from {results}, which are not there; "
                             f"run {' and '.join(run.needs)} first (or drop --only)")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="the results folder (default: results/ of the repository); with --verify, the one "
                        "to compare with")
    parser.add_argument("--models", nargs="+", default=None, help="default: every embedded model with weights")
    parser.add_argument("--only", nargs="+", default=None, help="run only these run names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--force", action="store_true", help="rerun runs that are up to date")
    parser.add_argument("--verify", action="store_true", help="run into build/verify (cleared first) and compare "
                        "every number with --results, which stays as it is; exit 1 when one differs by more than "
                        "--rtol")
    parser.add_argument("--rtol", type=float, default=verification.RTOL, help="with --verify: the relative "
                        f"difference a number may have; default {verification.RTOL:g} (below the three digits the "
                        f"tables print); {verification.ROUNDING:g} allows only the rounding of another CPU")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process and one torch thread each "
                        "(default 2: the two models' grids side by side on a 2-core machine)")
    args = parser.parse_args(argv)

    reference = args.results.resolve()  # the notebooks run in notebooks/: hand them absolute paths
    results = VERIFY_DIR.resolve() if args.verify else reference
    runs = plan(results, args.models or available_models())
    if args.list:
        print("\n".join(f"{r.name}: {r.notebook} {json.dumps(r.parameters)}" for r in runs))
        return
    whole_plan = not args.only and set(args.models or available_models()) == set(available_models())
    if args.only:
        unknown = set(args.only) - {r.name for r in runs}
        if unknown:
            parser.error(f"unknown runs {sorted(unknown)}; see --list")
        runs = [r for r in runs if r.name in args.only]
    if args.verify:
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        for run in runs:  # inputs no selected run makes come from the results being verified
            if not any(n in {r.name for r in runs} for n in run.needs):
                for relative in run.inputs:
                    if (reference / relative).is_file():
                        (results / relative).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(reference / relative, results / relative)
    check_inputs(runs, results)
    results.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = results / "manifest.json", results / STATE_FILE
    manifest, state = _read_json(manifest_path), _read_json(state_path)
    # what the runs will overwrite (or, with --verify, what they are checked against), read before they run
    committed = _read_json(reference / "manifest.json")
    previous = committed["runs"]
    before = verification.snapshot(reference, {o for r in runs for o in previous.get(r.name, {}).get("outputs", [])})
    began = time.perf_counter()

    def save():  # after every run, so an interrupted job resumes where it stopped
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    ran = execute_all(runs, results, manifest, save, force=args.force, jobs=args.jobs, state=state)
    # the record of a full run (manifest's environment, the summaries, verification.md) is rewritten only by a run
    # of the whole plan in which every run ran; a subset leaves it alone and reports in verification-partial.md
    full = whole_plan and ran == len(runs)
    summary = None
    if full:
        manifest["environment"] = provenance({"runs": [r.name for r in runs], "jobs": args.jobs},
                                             time.perf_counter() - began)
        save()
        if write_summary(results, manifest) is not None:
            summary = results / "README.md"
    print(f"{ran} of {len(runs)} runs executed in {time.perf_counter() - began:.0f} s"
          + (f"; summary in {summary}" if summary else "")
          + ("" if full or not ran or args.verify else "; a partial run: the record of the last full run (README.md, "
             "results/README.md, results/verification.md) stays as it was"))
    if not ran:
        return
    written = {o for r in runs if r.name in manifest["runs"] for o in manifest["runs"][r.name]["outputs"]}
    checked = verification.compare(before, verification.snapshot(results, written),
                                   rtol=max(args.rtol, verification.RTOL))
    against = f"{reference} (before this run)" if not args.verify else str(reference)
    made_on = "; ".join(sorted({describe_machine(previous.get(r.name, {}).get("machine")
                                                 or committed.get("environment", {}).get("machine"))
                                for r in runs if r.name in previous})) or "an unrecorded machine"
    made_now = "; ".join(sorted({describe_machine(manifest["runs"][r.name].get("machine")) for r in runs
                                 if r.name in manifest["runs"]}))
    recorded = full or args.verify  # a partial run reports beside the full run's record, not over it
    text = verification.report(checked, against, machines=(made_on, made_now), heading="Verification" if recorded
                               else f"Partial run ({', '.join(r.name for r in runs)}): verification")
    report_path = results / ("verification.md" if recorded else PARTIAL_REPORT)
    report_path.write_text(text)
    print(text.split("\n\n", 1)[1].split("\n\n", 1)[0] + f" Details: {report_path}")
    if args.verify:
        failing = checked.beyond(args.rtol)
        if failing:
            print(f"{len(failing)} cells differ by more than a relative {args.rtol:g} or are new or gone; the "
                  f"committed results were made on {made_on}, these on {made_now}", file=sys.stderr)
            raise SystemExit(1)


if __name__ == "__main__":
    main()
