"""Distillation: fit one lambda per model evaluation so the student follows the teacher (DESIGN.md, section 1).

Go through the student's evaluations in order. For evaluation i, with x0 = step(o_i) and
v = step(o_i + (o_i - o_{i-1})) - x0, the state after the step is x0 + lambda v (every scheduler is affine
in its model output), so the lambda closest to the teacher's state at the same time is the
one-dimensional least-squares solution lambda_i = <target - x0, v> / <v, v>. Apply it, step, go on
(``fit_lambdas``).

Around that fit (``distill``):

- the time grid is a choice: a spacing diffusers supports for the solver, an explicit list of noise levels, or
  ``"auto"``: every supported spacing is fitted and the best on validation seeds is kept;
- the result is never worse than its base (``guard``): on validation seeds, disjoint from the fitting batch, the
  fitted lambdas are compared with lambda = 0 on the same grid (and, with ``"auto"``, with every spacing's base);
  where they do not help, all of them are shrunk by one common factor in [0, 1], chosen by a line search;
- ``refine="joint"`` / ``"joint+timesteps"`` (beyond the paper, ``dode.refine``) then moves all lambdas together,
  and optionally the time grid, to bring the student's final samples closer to the teacher's, from several
  starting spacings, kept only where it validates better; ``"timesteps"`` learns the grid alone (lambdas 0).

The validation reference is the ODE solution of the validation seeds by a fine teacher (every training timestep,
from pure noise at the first training noise level): what every spacing's samples should be, known without data.
"""
from __future__ import annotations

import copy
import time
from importlib import metadata

import torch
from tqdm.auto import tqdm

from .grids import TimeGrid
from .runtime import resolve_device
from .refine import optimise
from .sampling import check_batch_size, integrate, sample
from .scheduler import DODEScheduler, make_scheduler, to_grid_form
from .solvers import GRID_SOLVERS, get_solver, solver_of
from .teacher import Teacher
from .variants import REFINEMENTS

#: the validation criteria of ``distill``: a student's final samples against the validation reference
CRITERIA = ("rmse", "fd")
#: the validation seeds start here (the fitting batch starts at ``seed``, evaluation in the notebooks at 1000)
VALIDATION_SEED = 500_000
_SHRINK_FACTORS = (0.75, 0.5, 0.25)  # the line search's first points; then halfway to the best neighbours
#: D-ODE must validate this much better (relative) than the best base it would replace: below that the difference
#: is within the noise of 100 validation samples, and the base is the safe choice
MARGIN = 0.02
#: starts of a refinement with the guard on (``refine_starts``): the spacing ``auto`` chose, the paper's and the
#: best other one; the best refinement on the validation seeds is kept
STARTS = 3
_SEARCHED = 3  # with spacing="auto", the line search runs on the best few candidates (and the best base's)


def least_squares_lambda(x_base: torch.Tensor, x_unit: torch.Tensor, target: torch.Tensor) -> float:
    """argmin_lambda ||x_base + lambda (x_unit - x_base) - target||^2, summed over the batch in float64."""
    v = (x_unit.double() - x_base.double()).flatten()
    r = (target.double().to(v.device) - x_base.double()).flatten()
    vv = torch.dot(v, v)
    return 0.0 if vv == 0 else float(torch.dot(r, v) / vv)


def _rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((x.double().cpu() - y.double().cpu()) ** 2)))


def _trial_step(dode: DODEScheduler, k: int, lam: float, output, t, x) -> torch.Tensor:
    """The state ``step`` would return with lambda_k = lam, computed on a copy (step mutates state)."""
    trial = copy.deepcopy(dode)
    trial.lambdas[k] = lam
    return trial.step(output, t, x).prev_sample


def fit_lambdas(model, dode: DODEScheduler, teacher: Teacher) -> dict:
    """The paper's greedy fit, in place: every lambda of ``dode`` in order, against the teacher's states at the
    student's own noise levels, on the teacher's noise batch. Returns the fit's record (RMSE to the teacher after
    every step with lambda = 0 and fitted, the wall-time split)."""
    began = time.perf_counter()
    device = teacher.noise.device
    dode.set_timesteps(dode.num_inference_steps, device=device)
    grid = TimeGrid.of(dode)
    teacher_nfe = teacher.nfe
    targets = teacher.targets(grid)
    seconds = {"teacher": time.perf_counter() - began, "trial_steps": 0.0, "lstsq": 0.0}
    before, after = [], []

    def fit(k, output, t, x):
        clock = time.perf_counter()
        x_base = grid.to_ddpm(_trial_step(dode, k, 0.0, output, t, x), grid.after[k])
        x_unit = grid.to_ddpm(_trial_step(dode, k, 1.0, output, t, x), grid.after[k]) if k > 0 else x_base
        seconds["trial_steps"] += time.perf_counter() - clock
        clock = time.perf_counter()
        if k > 0:
            dode.lambdas[k] = least_squares_lambda(x_base, x_unit, targets[k])
        seconds["lstsq"] += time.perf_counter() - clock
        x_fit = x_base + dode.lambdas[k] * (x_unit - x_base)
        before.append(_rmse(x_base, targets[k]))
        after.append(_rmse(x_fit, targets[k]))

    student_began = time.perf_counter()
    integrate(model, dode, None, teacher.noise, before_step=fit)
    # the student's own evaluations and steps (and RMSE bookkeeping): its run less trial steps and solves
    seconds["student"] = time.perf_counter() - student_began - seconds["trial_steps"] - seconds["lstsq"]
    return {"teacher_nfe": teacher.nfe - teacher_nfe, "rmse_to_teacher_base": before,
            "rmse_to_teacher_fitted": after, "seconds_split": seconds, "targets": targets}


class Validation:
    """Scores of a student's final samples on the validation seeds against their ODE solution (``criterion``)."""

    def __init__(self, model, teacher: Teacher, criterion: str, device, features: str = "pixel"):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.model, self.teacher, self.criterion, self.device = model, teacher, criterion, device
        self.features = features
        self.reference = teacher.solution()
        self.runs = 0
        if criterion == "fd":  # the heavier metrics stack only for this criterion
            from .metrics import feature_statistics, frechet_distance

            self._frechet = frechet_distance
            self._statistics = feature_statistics(self.reference, features, device=device)

    def __call__(self, scheduler, scale: float = 1.0, nfe: int | None = None) -> float:
        """The criterion for ``scheduler``: a DODEScheduler with its lambdas times ``scale``, or a base solver
        (name or scheduler) at ``nfe``."""
        if isinstance(scheduler, DODEScheduler):
            scheduler = copy.deepcopy(scheduler)
            scheduler.lambdas = [scale * v for v in scheduler.lambdas]
            nfe = scheduler.nfe
        x = sample(self.model, scheduler, nfe, self.teacher.batch_size, seed=self.teacher.seed,
                   device=self.device, progress=False)
        self.runs += 1
        if not torch.isfinite(x).all():
            return float("inf")
        if self.criterion == "rmse":
            return _rmse(x, self.reference)
        return self._frechet(x, self._statistics, features=self.features, device=self.device)

    def scores(self, fitted: DODEScheduler, known: dict | None = None, search: bool = True) -> dict:
        """The criterion at common factors of ``fitted``'s lambdas: 0 (the base) and 1 (the fit), and with ``search``
        a line search in between (0.25, 0.5, 0.75, then halfway to the best one's neighbours). ``known``: scores
        already computed, kept."""
        scores = dict(known or {})
        for factor in (0.0, 1.0, *(_SHRINK_FACTORS if search else ())):
            if factor not in scores:
                scores[factor] = self(fitted, factor)
        if search:
            best = min(scores, key=scores.get)
            for factor in (best - 0.125, best + 0.125):
                if 0.0 < factor < 1.0 and factor not in scores:
                    scores[factor] = self(fitted, factor)
        return scores


def choose(candidates: list[dict], margin: float, preferred: int | None = None) -> tuple[int, float]:
    """(candidate index, factor): the best-validating D-ODE fit (factor > 0) when it beats the best-validating base
    (factor 0) of all candidates by more than ``margin`` (relative), else that base; a base within ``margin`` of
    the best counts as the best when it is the ``preferred`` candidate (the paper's spacing). Each candidate has
    ``scores`` {factor: criterion}."""
    base = min(range(len(candidates)), key=lambda i: candidates[i]["scores"][0.0])
    best_base = candidates[base]["scores"][0.0]
    if preferred is not None and candidates[preferred]["scores"][0.0] <= (1 + margin) * best_base:
        base = preferred
    fits = [(score, i, factor) for i, c in enumerate(candidates) for factor, score in c["scores"].items() if factor > 0]
    if fits:
        score, i, factor = min(fits)
        if score < (1 - margin) * best_base:
            return i, factor
    return base, 0.0


def _decision(factor: float) -> str:
    return ("fitted lambdas kept" if factor == 1.0 else
            f"lambdas shrunk by {factor:g}" if factor > 0 else "lambdas set to 0: the base validates as well or better")


def _version() -> str | None:
    try:
        return metadata.version("dode")
    except metadata.PackageNotFoundError:
        return None


def _spacing_label(spacing) -> str:
    return spacing if isinstance(spacing, str) else "explicit"


def _candidate(model, solver, nfe: int, spacing, teacher: Teacher) -> tuple[DODEScheduler, dict]:
    """A zero-lambda DODEScheduler of ``solver`` at ``nfe`` on ``spacing``, greedily fitted."""
    scheduler = make_scheduler(solver.name, model, spacing)
    if isinstance(scheduler, DODEScheduler):  # an explicit grid
        if scheduler.nfe != nfe:
            raise ValueError(f"an explicit grid for {solver.name} at NFE {nfe} needs {solver.steps_for(nfe)} noise "
                             f"levels (one per step), got {scheduler.num_inference_steps}")
        dode = scheduler
    else:
        dode = DODEScheduler(scheduler, [0.0] * nfe, solver.steps_for(nfe))
    return dode, fit_lambdas(model, dode, teacher)


def _teacher(model, teacher, batch_size, seed, device, what: str) -> Teacher:
    if isinstance(teacher, Teacher):
        if batch_size not in (None, teacher.batch_size) or seed not in (None, teacher.seed):
            raise ValueError(f"the given {what} Teacher fixes batch_size={teacher.batch_size}, seed={teacher.seed}; "
                             f"got batch_size={batch_size}, seed={seed}")
        if teacher.model is not model:
            raise ValueError(f"the given {what} Teacher was built for another model")
        return teacher
    return Teacher(model, batch_size=check_batch_size(100 if batch_size is None else batch_size),
                   seed=0 if seed is None else seed, grid=teacher, device=device)


def distill(model, solver, nfe: int, *, spacing=None, batch_size: int | None = None, seed: int | None = None,
            teacher=10, guard: bool = True, validation=None, criterion: str = "fd", features: str = "pixel",
            margin: float = MARGIN, device="auto",
            refine: str | None = None, refine_iterations: int = 50, refine_starts: int = STARTS,
            progress: bool = True) -> DODEScheduler:
    """Fit the D-ODE lambdas of ``solver`` at ``nfe`` model evaluations on one batch; returns a DODEScheduler.

    ``spacing``: the time grid. None (the paper's, ``Solver.default_spacing``), one of the solver's spacings
    (``dode.get_solver(solver).spacings``), an explicit list of noise levels (one per step, for the solvers in
    ``dode.solvers.GRID_SOLVERS``), or ``"auto"``: every supported spacing is fitted and the one that scores best
    on the validation seeds (after the guard) is returned.

    The fitting batch is ``batch_size`` samples (default 100) from seeds ``seed``, ``seed + 1``, ... (default 0).
    ``teacher``: an integer C (DDIM with each student step split into C steps, the paper's choice, default 10),
    ``"fine"`` (every training timestep), or a ``dode.Teacher`` to share one teacher run between fits (its
    noise batch is then the fitting batch).

    ``guard`` (default on): never hand back something worse than the base on validation seeds. The fitted
    lambdas are scaled by the common factor in [0, 1] that validates best (a line search; 0 is the base itself),
    and D-ODE is kept only where it validates more than ``margin`` (relative) better than the best base among the
    candidates (the spacing's own, or with ``"auto"`` every spacing's): else the best base comes back, with every
    lambda 0. ``validation``: a ``dode.Teacher`` whose noise batch is the validation set (share one between fits:
    its fine run is made once), default 100 seeds from ``VALIDATION_SEED``; ``criterion``: ``"fd"`` (pixel Frechet
    distance between the final samples and the reference solution of the same seeds, the default: on gmm-digits
    it ranks spacings as the true Frechet distance does, see the README) or ``"rmse"`` (of the final samples to
    that solution); ``features``: the feature space of ``"fd"`` (``"pixel"``, or ``"digits"`` / ``"inception"``
    to validate in the space of the metric you report). ``guard=False`` and a named spacing give the paper's plain
    greedy fit, with no validation.

    ``refine``: None (the paper's greedy fit), ``"joint"`` (then all lambdas together, against the teacher's
    state after every step, at most ``refine_iterations`` L-BFGS iterations), ``"joint+timesteps"`` (lambdas
    and the noise level of every step, the first only downwards, against the teacher's final samples; only for the solvers
    in ``dode.solvers.GRID_SOLVERS``) or ``"timesteps"`` (the grid alone, every lambda 0: the base solver on a
    learned grid, the ablation without D-ODE). With ``spacing="auto"`` a refinement runs from ``refine_starts``
    starting points (``refinement_starts``: auto's spacing, the paper's, the best other one) and the best on
    the validation seeds is kept; with the guard on, a refinement that validates worse than what it would
    replace (the greedy fit; for "timesteps" the best base) is dropped (``fit_info["refine"]["kept"]``).

    ``fit_info`` records the spacing, every candidate's validation scores and the decision.
    """
    solver = get_solver(solver)
    if refine is not None and refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {(None, *REFINEMENTS)}, got {refine!r}")
    if refine is not None and REFINEMENTS[refine].timesteps and solver.name not in GRID_SOLVERS:
        raise ValueError(
            f"refine={refine!r} cannot learn a time grid for {solver.name}: its diffusers scheduler steps on "
            f"integer timesteps and no scheduler makes exactly its update on other levels. Use refine='joint', "
            f"or one of: {', '.join(GRID_SOLVERS)}"
        )
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    auto = isinstance(spacing, str) and spacing == "auto"
    if auto and not guard:
        raise ValueError("spacing='auto' chooses on the validation seeds, which is the guard: it cannot go with "
                         "guard=False (name a spacing for the paper's plain greedy fit)")
    spacings = list(solver.spacings) if auto else [solver.check_spacing(spacing)]
    solver.steps_for(nfe)
    if nfe < 2:
        raise ValueError(f"D-ODE corrects each model output with the one before it, so it needs at least 2 model "
                         f"evaluations; got nfe={nfe} (sample with the base solver, dode.sample(model, "
                         f"{solver.name!r}, {nfe}, ...), for a single evaluation)")
    device = resolve_device(device)
    model.to(device)
    teacher = _teacher(model, teacher, batch_size, seed, device, "fitting")
    began = time.perf_counter()
    check = None
    if guard or auto:
        if validation is None:
            validation = Teacher(model, batch_size=100, seed=VALIDATION_SEED, grid="fine", device=device)
        elif not isinstance(validation, Teacher):
            raise ValueError(f"validation must be a dode.Teacher on the validation seeds, got {validation!r}")
        validation = _teacher(model, validation, None, None, device, "validation")
        fitting, held_out = range(teacher.seed, teacher.seed + teacher.batch_size), \
            range(validation.seed, validation.seed + validation.batch_size)
        if set(fitting) & set(held_out):
            raise ValueError(f"the validation seeds {held_out.start}-{held_out.stop - 1} overlap the fitting batch "
                             f"{fitting.start}-{fitting.stop - 1}")
        check = Validation(model, validation, criterion, device, features)
    validation_seconds = time.perf_counter() - began

    candidates = []
    for spacing_k in tqdm(spacings, desc=f"{solver.name} at NFE {nfe}: spacings", disable=not (progress and auto)):
        clock = time.perf_counter()
        fitted, record = _candidate(model, solver, nfe, spacing_k, teacher)
        record.update(spacing=spacing_k, fitted=fitted, fit_seconds=time.perf_counter() - clock,
                      greedy_lambdas=list(fitted.lambdas))
        clock = time.perf_counter()
        if check is not None:  # a named spacing gets its line search now; auto's best few below
            record["scores"] = check.scores(fitted, search=not auto)
        validation_seconds += time.perf_counter() - clock
        candidates.append(record)
    chosen, factor = 0, 1.0
    if check is not None:
        clock = time.perf_counter()
        if auto:
            ranked = sorted(range(len(candidates)), key=lambda i: min(candidates[i]["scores"].values()))
            bases = sorted(range(len(candidates)), key=lambda i: candidates[i]["scores"][0.0])
            paper = [i for i, c in enumerate(candidates) if c["spacing"] == solver.default_spacing]
            for i in {*ranked[:_SEARCHED], bases[0], *paper}:
                candidates[i]["scores"] = check.scores(candidates[i]["fitted"], candidates[i]["scores"])
        paper = [i for i, c in enumerate(candidates) if isinstance(c["spacing"], str)
                 and c["spacing"] == solver.default_spacing]
        chosen, factor = choose(candidates, margin, paper[0] if paper else None)
        validation_seconds += time.perf_counter() - clock
    record = candidates[chosen]
    spacing_k, dode = record["spacing"], record["fitted"]
    greedy_lambdas = list(dode.lambdas)
    dode.lambdas = [factor * v for v in dode.lambdas]
    targets = record["targets"]
    dode.fit_info = {
        "solver": solver.name,
        "nfe": nfe,
        "num_inference_steps": dode.num_inference_steps,
        "spacing": _spacing_label(spacing_k),
        "spacing_requested": "auto" if auto else _spacing_label(spacing_k),
        "teacher": teacher.label,
        "batch_size": teacher.batch_size,
        "seed": teacher.seed,
        "model": getattr(model, "name", type(model).__name__),
        **{key: record[key] for key in ("teacher_nfe", "rmse_to_teacher_base", "rmse_to_teacher_fitted")},
        "greedy_lambdas": greedy_lambdas,
        "seconds": time.perf_counter() - began,
        # wall time split: the teacher's run, the student's evaluations, trial steps, least-squares solves
        "seconds_split": {**record["seconds_split"], "validation": validation_seconds},
        "dode_version": _version(),
    }
    if check is not None:
        scores = record["scores"]
        dode.fit_info["validation"] = {
            "criterion": criterion, "features": features if criterion == "fd" else None,
            "seeds": [check.teacher.seed, check.teacher.seed + check.teacher.batch_size - 1],
            "margin": margin,
            "base": scores[0.0], "fitted": scores[1.0], "shrink": factor, "guarded": scores[factor],
            "decision": _decision(factor),  # what the guard kept, in words
            "candidates": [{"spacing": _spacing_label(c["spacing"]), "base": c["scores"][0.0],
                            "fitted": c["scores"][1.0], "best": min(c["scores"].values()),
                            "scores": {f"{k:g}": v for k, v in sorted(c["scores"].items())},
                            "greedy_lambdas": c["greedy_lambdas"], "fit_seconds": c["fit_seconds"]}
                           for c in candidates],
            "student_runs": check.runs,
        }
    if refine is not None:
        dode = refine_fit(model, dode, teacher, refine, validation=check, targets=targets,
                          max_iterations=refine_iterations, starts=refine_starts if auto else 1, progress=progress)
    return dode


def refinement_starts(model, fitted: DODEScheduler, mode: str, count: int = STARTS) -> list[tuple[DODEScheduler, float | None]]:
    """Up to ``count`` starting points of a ``mode`` refinement of ``fitted`` (a ``distill`` result), each with its
    validation score where ``fitted`` records one: (scheduler, score).

    From the candidates ``spacing="auto"`` validated (``fit_info["validation"]["candidates"]``): for "joint" and
    "joint+timesteps", ``fitted`` itself, then the paper's spacing and the best other spacing, each with its
    greedy lambdas at the common factor that validated best; for "timesteps" (lambdas held at 0) the bases: the
    best-validating spacing, the paper's, the next best. Without recorded candidates: ``fitted`` alone (with
    every lambda 0 for "timesteps")."""
    if mode not in REFINEMENTS:
        raise ValueError(f"mode must be one of {tuple(REFINEMENTS)}, got {mode!r}")
    zero = not REFINEMENTS[mode].lambdas
    check = fitted.fit_info.get("validation", {})
    candidates = [c for c in check.get("candidates", []) if c["spacing"] != "explicit"]
    solver = get_solver(fitted.fit_info.get("solver") or solver_of(fitted).name)

    def at(spacing, lambdas):
        return DODEScheduler(make_scheduler(solver.name, model, spacing), lambdas, fitted.num_inference_steps,
                             {**copy.deepcopy(fitted.fit_info), "spacing": spacing})

    if not candidates:
        start = copy.deepcopy(fitted)
        if zero:
            start.lambdas = [0.0] * start.nfe
        return [(start, None)]
    key = "base" if zero else "best"  # each candidate's validation score: lambda 0, or its best factor
    ranked = sorted(candidates, key=lambda c: c[key])
    paper = [c for c in candidates if c["spacing"] == solver.default_spacing]
    order = [c for c in candidates if c["spacing"] == fitted.fit_info.get("spacing")] if not zero else []
    chosen, seen = [], set()
    for c in [*order, *ranked[:1], *paper, *ranked]:
        if c["spacing"] not in seen and len(chosen) < count:
            seen.add(c["spacing"])
            chosen.append(c)
    starts = []
    for c in chosen:
        if not zero and c["spacing"] == fitted.fit_info.get("spacing"):
            starts.append((fitted, check.get("guarded", c[key])))
            continue
        factor = 0.0 if zero else float(min(c["scores"], key=c["scores"].get))
        starts.append((at(c["spacing"], [factor * v for v in c["greedy_lambdas"]]), c[key]))
    return starts


def refine_fit(model, fitted: DODEScheduler, teacher: Teacher, mode: str, *, validation: Validation | None = None,
               targets=None, max_iterations: int = 50, starts: int = 1, probe_iterations: int = 5,
               progress: bool = True) -> DODEScheduler:
    """``distill(refine=mode)`` from an existing fit, against ``teacher`` (its noise batch is the fitting batch).

    ``mode``: "joint", "timesteps" (a learned grid, every lambda 0: the base solver on it) or "joint+timesteps".
    ``starts``: how many starting points (``refinement_starts``: the fit's own spacing, the paper's, the best other
    one; they need the candidates ``spacing="auto"`` records, and ``validation``). With several, each is refined
    for ``probe_iterations``, the one that then validates best goes on for the rest of ``max_iterations``, and
    the best-validating of all is the result. With ``validation``, the never-worse guard: the refinement comes
    back only where it validates better than what it would replace (``fitted``, or for "timesteps" the
    best-validating base among the starts); else that comes back, with the attempt recorded
    (``fit_info["refine"]["kept"] = False``)."""
    if mode not in REFINEMENTS:
        raise ValueError(f"mode must be one of {tuple(REFINEMENTS)}, got {mode!r}")
    began = time.perf_counter()
    options = REFINEMENTS[mode]._asdict()
    points = refinement_starts(model, fitted, mode, starts if validation is not None else 1)
    probing = len(points) > 1 and probe_iterations < max_iterations

    def run(start, iterations, given_targets=None):
        if given_targets is None:
            probe = copy.deepcopy(to_grid_form(start) if options["timesteps"] else start)
            probe.set_timesteps(probe.num_inference_steps, device=teacher.noise.device)
            given_targets = teacher.targets(TimeGrid.of(probe))
        refined = optimise(model, start, teacher.noise, given_targets, **options, max_iterations=iterations,
                                 progress=progress)
        if validation is not None:
            refined.fit_info["refine"]["validation"] = validation(refined)
        return refined

    attempts = []
    for start, known in points:
        own = targets if start is fitted and not options["timesteps"] else None
        refined = run(start, probe_iterations if probing else max_iterations, own)
        refined.fit_info["refine"]["start"] = {"spacing": start.fit_info.get("spacing"), "validation": known}
        attempts.append(refined)
    if validation is None:
        refined = attempts[0]
        refined.fit_info["refine"]["seconds_total"] = time.perf_counter() - began
        return refined
    def step_record(info, spacing, start_validation, **extra):
        return {**{k: info[k] for k in ("mse_start", "mse_refined", "validation", "iterations", "evaluations",
                                         "seconds")}, "spacing": spacing, "start_validation": start_validation, **extra}

    steps = [step_record(r.fit_info["refine"], r.fit_info["refine"]["start"]["spacing"],
                         r.fit_info["refine"]["start"]["validation"]) for r in attempts]
    best = min(attempts, key=lambda r: r.fit_info["refine"]["validation"])
    if probing:  # the best probe goes on
        more = run(best, max_iterations - probe_iterations)
        info = more.fit_info["refine"]
        steps.append(step_record(info, best.fit_info["refine"]["start"]["spacing"],
                                 best.fit_info["refine"]["validation"], continued=True))
        info["start"] = best.fit_info["refine"]["start"]
        if info["validation"] <= best.fit_info["refine"]["validation"]:
            best = more
    # what the refinement would replace: the fit itself, or for a learned grid alone the best base among the starts
    if options["lambdas"]:
        baseline, before = fitted, fitted.fit_info.get("validation", {}).get("guarded")
    else:
        baseline, before = min(points, key=lambda p: float("inf") if p[1] is None else p[1])
    if before is None:
        before = validation(baseline)
    score = best.fit_info["refine"]["validation"]
    record = {**best.fit_info["refine"], "validation_before": before, "kept": score <= before, "steps": steps,
              "iterations": sum(step["iterations"] for step in steps),
              "evaluations": sum(step["evaluations"] for step in steps),
              "student_runs": sum(r.fit_info["refine"]["student_runs"] for r in attempts) +
              (more.fit_info["refine"]["student_runs"] if probing else 0),
              "seconds_total": time.perf_counter() - began}
    kept = best if score <= before else copy.deepcopy(baseline)
    kept.fit_info["refine"] = record
    return kept
