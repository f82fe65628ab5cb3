"""``make reproduce``: run the notebooks with papermill over the full parameter grid, into results/.

Each run executes one notebook with one set of parameters into a staging folder; only when it succeeds
are its files moved into results/ (one rename each), next to its executed copy in results/notebooks/ and
its record in results/manifest.json (committed: what produced the results). What ran on this machine is kept
apart, untracked, in results/.state.json: a run whose notebook, parameters, inputs and ``dode`` source are
unchanged since it last succeeded here is skipped, so a fresh clone runs everything and a second run skips;
``--force`` (``make reproduce FORCE=1``) reruns everything. A failing run stops the whole job with the
notebook's error and leaves every earlier result in place.

After the runs, every number they wrote is compared with the one it replaced (``dode.tools.verification``), printed
and written to results/verification.md. ``--verify`` (``make verify``) runs into a scratch folder instead and
compares with results/ without touching it; it fails when a number differs beyond the tolerance. After a run of the
whole plan, ``dode.tools.report`` writes the prose: results/README.md and the generated block of docs/results.md.
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

from ..experiments import parameters

from . import report, verification
from .provenance import provenance
from ..models.registry import available_models, get_model
from ..util.runtime import WEIGHTS_DIR, describe_machine, machine, wanted_threads

ROOT = Path(__file__).resolve().parents[2]
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


def reproduced_models() -> list[str]:
    """The embedded models here that ``make reproduce`` runs: those with a reproduce profile (``ModelEntry.profile``;
    gmm-digits-flow has none yet)."""
    return [name for name in available_models() if get_model(name).profile is not None]


def plan(results: Path, models: list[str]) -> list[Run]:
    """The full grid of `make reproduce`: the parameters of the paper's tables, figures and ablations
    (``dode.experiments.parameters.REPRODUCE``), for each embedded model in ``models`` with its registry entry's profile."""
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
    flow = parameters.reproduce("07_flow")
    runs.append(Run(f"07_flow-{flow['model_name']}", "07_flow.ipynb", flow))
    ablations = parameters.reproduce("05_ablations")
    runs.append(Run(f"05_ablations-{ablations['model_name']}", "05_ablations.ipynb", ablations))
    return runs


def run_key(run: Run, results: Path) -> str:
    """Hash of everything a run's outputs depend on: notebook, parameters, inputs, the dode source."""
    digest = hashlib.sha256()
    digest.update((NOTEBOOKS / run.notebook).read_bytes())
    digest.update(json.dumps(run.parameters, sort_keys=True).encode())
    sources = {path.relative_to(ROOT / "dode").as_posix(): path for path in sorted((ROOT / "dode").rglob("*.py"))}
    for name, path in [*sources.items(), *((p, results / p) for p in run.inputs)]:  # every subpackage's modules
        digest.update(name.encode())
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
    runs = plan(results, args.models or reproduced_models())
    if args.list:
        print("\n".join(f"{r.name}: {r.notebook} {json.dumps(r.parameters)}" for r in runs))
        return
    whole_plan = not args.only and set(args.models or reproduced_models()) == set(reproduced_models())
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
        if report.write_summary(results, manifest) is not None:
            summary = results / "README.md"
    print(f"{ran} of {len(runs)} runs executed in {time.perf_counter() - began:.0f} s"
          + (f"; summary in {summary}" if summary else "")
          + ("" if full or not ran or args.verify else "; a partial run: the record of the last full run (docs/results.md, "
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
