"""``distill``: the greedy fit (``dode.core.fit``) with everything a user needs around it.

- The time grid is a choice: a spacing diffusers supports for the solver, an explicit list of noise levels, or
  ``"auto"``: every supported spacing is fitted, and the best on the validation seeds is kept.
- The result is never worse than its base (``dode.core.guard``): on validation seeds, disjoint from the fitting
  batch, the fitted lambdas are compared with lambda = 0 on the same grid (with ``"auto"``, with every spacing's
  base); where they do not help, all of them are shrunk by one common factor in [0, 1].
- ``refine`` (beyond the paper, ``dode.core.refine``) then moves all lambdas together, and optionally the time
  grid, from several starting spacings, kept only where it validates better.

Each stage hands the next a value (``Candidate``, ``Distillation``, ``Refined``); ``fit_info``, the record a user
reads on the returned scheduler, is written once from those values at the end (docs/design.md, "Conventions").
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..util.runtime import resolve_device
from .fit import GreedyFit, greedy_fit
from .guard import CRITERIA, MARGIN, FitWarning, Judge, best_factor, choose, decision, insanity, scaled
from .reference import REFERENCE, Reference, reference_solution
from . import refine as refine_constants  # PROBE_ITERATIONS, CHECK_EVERY: read when called (--patch can set them)
from .refine import (MOMENT_FEATURES, OPTIMIZER, OPTIMIZERS, PATIENCE, PROBE_ITERATIONS, REFINEMENTS, TOLERANCE,
                     MomentTerm, Monitor, Optimised, check_patience, moment_balance, optimise)
from .sampling import check_batch_size, count_evaluations
from .scheduler import DODEScheduler, grid_scheduler, make_scheduler
from .solvers import GRID_SOLVERS, Solver, get_solver
from .teacher import Teacher
from .timegrid import TimeGrid

#: the validation seeds start here (the fitting batch starts at ``seed``, evaluation in the notebooks at 1000)
VALIDATION_SEED = 500_000
#: starts of a refinement with the guard on (``refinement_starts``): the spacing ``auto`` chose, the paper's and
#: the best other one; the best refinement on the validation seeds is kept
STARTS = 3
#: the fitting batch of ``distill`` with ``refine`` and no ``batch_size`` (the paper's fit keeps its 100): a learned
#: grid fitted on 100 samples follows them into a worse held-out score; on gmm-digits the default call met 32 of issue
#: 25's 37 held-out limits on 100 seeds, 36 on 400 (docs/grids-and-guard.md, "What the default call gets")
REFINE_BATCH = 400
_SEARCHED = 3  # with spacing="auto", the line search runs on the best few candidates (and the best base's)


def spacing_label(spacing) -> str:
    """A spacing's name, or "explicit" for a list of noise levels."""
    return spacing if isinstance(spacing, str) else "explicit"


@dataclass
class Candidate:
    """One spacing's greedy fit, and its scores on the validation seeds."""

    spacing: object  # as requested: a spacing name or a list of noise levels
    fitted: DODEScheduler  # the greedy lambdas (common factor 1)
    fit: GreedyFit
    seconds: float
    sample_evaluations: int  # the fit's model evaluations (teacher and student), times the samples of each
    scores: dict = field(default_factory=dict)  # {common factor of the lambdas: score}; 0 is the base

    @property
    def label(self) -> str:
        return spacing_label(self.spacing)

    def at(self, factor: float) -> DODEScheduler:
        """The fit with every lambda times ``factor``, on a scheduler of its own."""
        return scaled(self.fitted, factor)

    def record(self) -> dict:
        return {"spacing": self.label, "base": self.scores[0.0], "fitted": self.scores[1.0],
                "best": min(self.scores.values()),
                "scores": {f"{k:g}": v for k, v in sorted(self.scores.items())},
                "greedy_lambdas": list(self.fit.lambdas), "fit_seconds": self.seconds}


@dataclass
class Distillation:
    """What ``distill`` decided before any refinement: every candidate, the one kept and its factor."""

    model_name: str
    solver: Solver
    nfe: int
    auto: bool  # the spacing was "auto"
    teacher: Teacher
    candidates: list
    chosen: int  # index of the kept candidate
    factor: float  # the common factor its lambdas got (1: the fit; 0: the base)
    judge: Judge | None  # None without the guard
    margin: float
    seconds: float
    student_runs: int  # the judge's sampling runs, until the decision
    validation_cost: tuple = (0, 0.0)  # ... their sample-evaluations and seconds
    warning: str | None = None  # ``insanity`` of the kept candidate's greedy fit
    shared: dict = field(default_factory=dict)  # {spacing: TimeGrid} taught by shared runs (``shared_grids``)
    apart: dict = field(default_factory=dict)  # {spacing: TimeGrid}: the paper's and its twins, on the paper's teacher

    @property
    def kept(self) -> Candidate:
        return self.candidates[self.chosen]

    @property
    def scheduler(self) -> DODEScheduler:
        """The guarded result, its ``fit_info`` written."""
        scheduler = self.kept.at(self.factor)
        scheduler.fit_info = self.record()
        return scheduler

    @property
    def score(self) -> float | None:
        """The guarded result's score on the validation seeds (None without the guard)."""
        return self.kept.scores[self.factor] if self.judge is not None else None

    def record(self, spacing: str | None = None, refine: tuple | None = None) -> dict:
        """``fit_info``: how the fit was made (``spacing``: the spacing of a refinement start instead; ``refine``: the
        sample-evaluations and seconds of a refinement, for the cost)."""
        kept = self.kept
        record = {
            "solver": self.solver.name, "nfe": self.nfe, "num_inference_steps": kept.fitted.num_inference_steps,
            "spacing": spacing or kept.label, "spacing_requested": "auto" if self.auto else kept.label,
            "teacher": self.teacher.label, "batch_size": self.teacher.batch_size, "seed": self.teacher.seed,
            "model": self.model_name, "teacher_nfe": kept.fit.teacher_nfe, "teacher_shared_with": self.shared_with(),
            "rmse_to_teacher_base": kept.fit.rmse_base, "rmse_to_teacher_fitted": kept.fit.rmse_fitted,
            "greedy_lambdas": list(kept.fit.lambdas), "seconds": self.seconds, "dode_version": _version(),
            "cost": self.cost(refine), "warning": self.warning,
        }
        if self.judge is not None:
            scores, validation = kept.scores, self.judge.validation
            record["validation"] = {
                "criterion": self.judge.criterion,
                "features": self.judge.features if self.judge.criterion == "fd" else None,
                "seeds": [validation.seed, validation.seed + validation.batch_size - 1], "margin": self.margin,
                "base": scores[0.0], "fitted": scores[1.0], "shrink": self.factor, "guarded": scores[self.factor],
                "decision": decision(self.factor, self.warning), "candidates": [c.record() for c in self.candidates],
                "student_runs": self.student_runs, "reference": self.judge.solution.reference.record(self.judge.model),
            }
        return record

    def shared_with(self) -> list:
        """The other spacings whose fits shared the kept one's teacher run (``Teacher.sharing``; [] for none)."""
        label = self.kept.label
        if label in self.apart:
            key = Teacher._grid_key(self.apart[label])
            return [other for other, g in self.apart.items() if other != label and Teacher._grid_key(g) == key]
        if label not in self.shared:
            return []
        key = Teacher._grid_key(self.shared[label])
        for members in self.teacher.share_groups(self.shared.values()):
            if key in members:
                return [other for other, g in self.shared.items() if other != label and Teacher._grid_key(g) in members]
        return []

    def sharing(self):
        """``Teacher.sharing`` as the fits had it: a start on a candidate's grid reads the targets its fit had."""
        return self.teacher.sharing(self.shared.values(), self.apart.values())

    def cost(self, refine: tuple | None = None) -> dict:
        """Model evaluations (times the samples of each: machine-independent) and seconds, by part: the greedy fits
        (teacher and student, every candidate), the validation reference (0 where the process had it), the judge's
        sampling runs and ``refine`` ((evaluations, seconds) of a refinement); ``relative_to_fit``: the total over
        the fits'."""
        fit = sum(c.sample_evaluations for c in self.candidates)
        judge = self.judge
        evaluations = {"fit": fit, "reference": judge.solution.sample_evaluations if judge else 0,
                       "validation": self.validation_cost[0]}
        seconds = {"fit": sum(c.seconds for c in self.candidates), "reference": judge.solution.seconds if judge else 0.0,
                   "validation": self.validation_cost[1]}
        if refine is not None:
            evaluations["refine"], seconds["refine"] = refine
        evaluations["total"] = sum(evaluations.values())
        seconds["total"] = self.seconds + (refine[1] if refine is not None else 0.0)
        return {"sample_evaluations": evaluations, "seconds": seconds,
                "relative_to_fit": evaluations["total"] / fit if fit else None,
                "reference_shared": bool(judge and judge.solution.shared)}


def _version() -> str | None:
    try:
        return metadata.version("dode")
    except metadata.PackageNotFoundError:
        return None


def _teacher(model, teacher, batch_size, seed, device, what: str, precision: str | None = None) -> Teacher:
    """``teacher`` itself where it is a Teacher (checked against the other arguments), else a new one with C = it
    (in ``precision``, default float32)."""
    if isinstance(teacher, Teacher):
        if batch_size not in (None, teacher.batch_size) or seed not in (None, teacher.seed):
            raise ValueError(f"the given {what} Teacher fixes batch_size={teacher.batch_size}, seed={teacher.seed}; "
                             f"got batch_size={batch_size}, seed={seed}")
        if precision not in (None, teacher.precision):
            raise ValueError(f"the given {what} Teacher is in precision={teacher.precision!r}; got "
                             f"precision={precision!r}")
        if teacher.model is not model:
            raise ValueError(f"the given {what} Teacher was built for another model")
        return teacher
    return Teacher(model, batch_size=check_batch_size(100 if batch_size is None else batch_size),
                   seed=0 if seed is None else seed, substeps=teacher, device=device, precision=precision or "float32")


def _judge(model, teacher: Teacher, validation, criterion: str, features: str, device, reference: Reference,
           progress: bool) -> Judge:
    """The judge on the validation seeds (``validation``, a Teacher; default 100 seeds from VALIDATION_SEED)."""
    if validation is None:
        validation = Teacher(model, batch_size=100, seed=VALIDATION_SEED, substeps="fine", device=device)
    elif not isinstance(validation, Teacher):
        raise ValueError(f"validation must be a dode.Teacher on the validation seeds, got {validation!r}")
    validation = _teacher(model, validation, None, None, device, "validation")
    fitting = range(teacher.seed, teacher.seed + teacher.batch_size)
    held_out = range(validation.seed, validation.seed + validation.batch_size)
    if set(fitting) & set(held_out):
        raise ValueError(f"the validation seeds {held_out.start}-{held_out.stop - 1} overlap the fitting batch "
                         f"{fitting.start}-{fitting.stop - 1}")
    return Judge(model, validation, criterion, device, features, reference, progress)


def _check_refine(solver: Solver, refine, optimizer: str = OPTIMIZER, moments=(0.0,),
                  features: str | None = "pixel", patience: int | None = PATIENCE) -> None:
    """``distill``'s check of ``refine``, ``refine_optimizer``, ``refine_moments`` (in the guard's ``features``;
    None: no guard) and ``refine_patience``, before any work."""
    check_patience(patience, "refine_patience")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"refine_optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
    if refine is not None and refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {(None, *REFINEMENTS)}, got {refine!r}")
    if refine is not None and REFINEMENTS[refine].timesteps and not solver.takes_grid:
        raise ValueError(
            f"refine={refine!r} cannot learn a time grid for {solver.name}: its diffusers scheduler steps on "
            f"integer timesteps and no scheduler makes exactly its update on other levels. Use refine='joint', "
            f"or one of: {', '.join(GRID_SOLVERS)}"
        )
    _moment_weights(moments, refine, features)


def _check(solver: Solver, nfe: int, spacing, guard: bool, criterion: str, margin: float) -> list:
    """The spacings to fit, after every other argument check, before any work."""
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
    return spacings


def _student(model, solver: Solver, nfe: int, spacing) -> DODEScheduler:
    """``solver`` at ``nfe`` on ``spacing`` (a name or a list of noise levels), every lambda 0."""
    if isinstance(spacing, str):
        student = DODEScheduler(make_scheduler(solver.name, model, spacing), [0.0] * nfe, solver.steps_for(nfe),
                                spacing=spacing)
    else:
        student = grid_scheduler(solver.name, model, spacing)
        if student.nfe != nfe:
            raise ValueError(f"an explicit grid for {solver.name} at NFE {nfe} needs {solver.steps_for(nfe)} noise "
                             f"levels (one per step), got {student.num_inference_steps}")
    return student


def _grid(student: DODEScheduler, device) -> TimeGrid:
    """Where ``student`` evaluates the model and puts its states (on a copy: ``set_timesteps`` is not undone)."""
    probe = copy.deepcopy(student)
    probe.set_timesteps(probe.num_inference_steps, device=device)
    return TimeGrid.of(probe)


def _candidate(model, student: DODEScheduler, spacing, teacher: Teacher) -> Candidate:
    """The greedy fit of ``student`` (on ``spacing``, a name or a list of noise levels)."""
    began = time.perf_counter()
    with count_evaluations(model) as counted:
        fit = greedy_fit(model, student, teacher)
    fitted = DODEScheduler(student.base_scheduler, fit.lambdas, student.num_inference_steps, grid=student.grid,
                           spacing=spacing_label(spacing))
    return Candidate(spacing, fitted, fit, time.perf_counter() - began, counted.sample_evaluations)


def spacing_grids(model, solver, nfe: int, spacings=None, device="cpu") -> list:
    """The ``TimeGrid`` of ``solver`` at ``nfe`` on each of ``spacings`` (default: every one it supports)."""
    solver = get_solver(solver)
    return [_grid(_student(model, solver, nfe, s), device) for s in (solver.spacings if spacings is None else spacings)]


def shared_grids(model, solver, nfe: int, spacings=None, device="cpu") -> dict:
    """{spacing: TimeGrid} of the spacings whose fits ``spacing="auto"`` teaches by shared runs (``Teacher.sharing``):
    every one of ``spacings`` (default: all the solver supports) but the paper's, which keeps its own teacher, so
    that auto's fit on it is the paper's; a spacing whose grid is the paper's grid (Heun at NFE 3: linspace,
    exponential and beta are karras's) keeps it too, and reads the paper spacing's run. A named spacing taught as
    auto teaches it: ``with teacher.sharing(shared_grids(model, solver, nfe).values()): distill(..., teacher=teacher)``."""
    solver = get_solver(solver)
    names = list(solver.spacings if spacings is None else spacings)
    return _shared(solver, dict(zip(names, spacing_grids(model, solver, nfe, names, device))), model, nfe, device)[0]


def _shared(solver: Solver, grids: dict, model, nfe: int, device) -> tuple[dict, dict]:
    """(``shared_grids`` of the grids at hand ({spacing: TimeGrid}), those kept apart: the paper spacing's and its
    twins', taught on the paper's own teacher grid); the paper's is made only where it is not one."""
    paper = grids.get(solver.default_spacing)
    if paper is None:
        paper = spacing_grids(model, solver, nfe, [solver.default_spacing], device)[0]
    paper = Teacher._grid_key(paper)
    shared = {name: g for name, g in grids.items() if name != solver.default_spacing and Teacher._grid_key(g) != paper}
    return shared, {name: g for name, g in grids.items() if name not in shared}


def fit_candidates(model, solver: Solver, nfe: int, spacings: list, teacher: Teacher,
                   progress: bool = False) -> tuple[list, dict, dict]:
    """(every spacing's greedy fit as a ``Candidate``, {spacing: TimeGrid} of those taught by shared runs, {spacing:
    TimeGrid} of those kept apart). With several spacings, all but the paper's share teacher runs where their grids
    start at the same noise level (``shared_grids``, ``Teacher.sharing``): ``spacing="auto"`` costs about one teacher
    run per start, not one per spacing. The paper's spacing, its twins (the spacings with its grid) and one spacing
    alone get the paper's fit on their own teacher grid; identical grids read one run."""
    students = [_student(model, solver, nfe, spacing) for spacing in spacings]
    device = teacher.noise.device
    shared, apart = (_shared(solver, {s: _grid(student, device) for s, student in zip(spacings, students)}, model, nfe,
                             device) if len(spacings) > 1 else ({}, {}))
    with teacher.sharing(shared.values(), apart.values()):
        candidates = [_candidate(model, student, spacing, teacher) for spacing, student in
                      tqdm(list(zip(spacings, students)), desc=f"{solver.name} at NFE {nfe}: fits", disable=not progress)]
    return candidates, shared, apart


def _decide(candidates: list, judge: Judge, solver: Solver, auto: bool, margin: float,
            progress: bool = True) -> tuple[int, float]:
    """(the kept candidate, its factor): with ``auto`` the line search first runs on the best few candidates, the
    best base's and the paper's spacing's (the others keep their scores at 0 and 1)."""
    if auto:
        ranked = sorted(range(len(candidates)), key=lambda i: min(candidates[i].scores.values()))
        bases = sorted(range(len(candidates)), key=lambda i: candidates[i].scores[0.0])
        paper = [i for i, c in enumerate(candidates) if c.spacing == solver.default_spacing]
        searched = sorted({*ranked[:_SEARCHED], bases[0], *paper})
        for i in tqdm(searched, desc=f"{solver.name}: line search of the best spacings", disable=not progress):
            candidates[i].scores = judge.scores(candidates[i].fitted, candidates[i].scores)
    paper = [i for i, c in enumerate(candidates) if isinstance(c.spacing, str) and c.spacing == solver.default_spacing]
    return choose([c.scores for c in candidates], margin, paper[0] if paper else None)


def distillation(model, solver, nfe: int, *, spacing=None, batch_size: int | None = None, seed: int | None = None,
                 teacher=10, guard: bool = True, validation=None, criterion: str = "fd", features: str = "pixel",
                 margin: float = MARGIN, reference: Reference = REFERENCE, device="auto",
                 precision: str | None = None, progress: bool = True) -> Distillation:
    """``distill`` without refinement, as a value: every candidate spacing's fit and scores, and the decision
    (``Distillation.scheduler`` is what ``distill`` returns). The arguments are ``distill``'s."""
    solver = get_solver(solver)
    spacings = _check(solver, nfe, spacing, guard, criterion, margin)
    auto = isinstance(spacing, str) and spacing == "auto"
    device = resolve_device(device)
    model.to(device)
    teacher = _teacher(model, teacher, batch_size, seed, device, "fitting", precision)
    began = time.perf_counter()
    judge = _judge(model, teacher, validation, criterion, features, device, reference, progress) if guard or auto else None
    candidates, shared, apart = fit_candidates(model, solver, nfe, spacings, teacher, progress and auto)
    for candidate in tqdm(candidates, desc=f"{solver.name} at NFE {nfe}: base and fit of each spacing",
                          disable=not (progress and auto and judge is not None)):
        if judge is not None:  # a named spacing gets its line search now; auto's best few in _decide
            candidate.scores = judge.scores(candidate.fitted, search=not auto)
    chosen, factor = _decide(candidates, judge, solver, auto, margin, progress) if judge is not None else (0, 1.0)
    warning = insanity(candidates[chosen].fit)
    if warning is not None:
        guarded = f"; the guard: {decision(factor)}" if judge is not None else ""
        warnings.warn(f"dode.distill({solver.name!r}, nfe={nfe}, spacing={candidates[chosen].label!r}): {warning}"
                      f"{guarded}", FitWarning, stacklevel=3)
    return Distillation(getattr(model, "name", type(model).__name__), solver, nfe, auto, teacher, candidates, chosen,
                        factor, judge, margin, time.perf_counter() - began, judge.runs if judge is not None else 0,
                        (judge.sample_evaluations, judge.seconds) if judge is not None else (0, 0.0), warning,
                        shared, apart)


def _distill_counts(single, arguments: dict) -> DODEScheduler:
    """``single`` (``distill``) at several NFE (``arguments``: its arguments, ``nfe`` a list), into one
    DODEScheduler (``DODEScheduler.combine``): one fitting teacher and one validation set (so one validation
    reference) for all, each count's fit exactly what ``single`` gives at that NFE alone."""
    given = dict(arguments)
    model, solver, nfes = given.pop("model"), get_solver(given.pop("solver")), list(given.pop("nfe"))
    if not nfes or any(isinstance(n, bool) or not isinstance(n, int) for n in nfes) or len(set(nfes)) != len(nfes):
        raise ValueError(f"nfe is a number of model evaluations, or a list of distinct ones; got {nfes!r}")
    if given["spacing"] is not None and not isinstance(given["spacing"], str):
        raise ValueError("an explicit grid fixes one step count: distil several NFE on a named spacing or 'auto'")
    _check_refine(solver, given["refine"], given["refine_optimizer"], given["refine_moments"],
                  given["features"] if given["guard"] else None, given["refine_patience"])
    for n in nfes:  # every argument check before any work
        _check(solver, n, given["spacing"], given["guard"], given["criterion"], given["margin"])
    device = given["device"] = resolve_device(given["device"])
    model.to(device)
    given["teacher"] = _teacher(model, given["teacher"], given["batch_size"], given["seed"], device, "fitting",
                                given["precision"])
    given["batch_size"] = given["seed"] = given["precision"] = None  # the teacher's
    if given["validation"] is None and given["guard"]:
        given["validation"] = Teacher(model, batch_size=100, seed=VALIDATION_SEED, substeps="fine", device=device)
    counts = tqdm(nfes, desc=f"{solver.name}: one fit per NFE", disable=not given["progress"] or len(nfes) < 2)
    return DODEScheduler.combine([single(model, solver, n, **given) for n in counts])


def distill(model, solver, nfe: int | list, *, spacing=None, batch_size: int | None = None, seed: int | None = None,
            teacher=None, guard: bool = True, validation=None, criterion: str = "fd", features: str = "pixel",
            margin: float = MARGIN, reference: Reference = REFERENCE, device="auto", refine: str | None = None,
            refine_iterations: int = 200, refine_starts: int = STARTS, refine_tolerance: float = TOLERANCE,
            refine_batch_size: int | None = None, refine_optimizer: str = OPTIMIZER, refine_moments=(0.0,),
            refine_patience: int | None = PATIENCE, precision: str | None = None, progress: bool = True) -> DODEScheduler:
    """Fit the D-ODE lambdas of ``solver`` at ``nfe`` model evaluations on one batch; returns a DODEScheduler.

    ``nfe``: model evaluations, or a list of them: then one DODEScheduler holds each count's fit (one teacher, one
    validation set and reference; ``DODEScheduler.combine``), exactly what ``distill`` at that NFE gives.

    ``spacing``: the time grid. None (the paper's, ``Solver.default_spacing``), one of the solver's spacings
    (``dode.get_solver(solver).spacings``), an explicit list of noise levels (one per step, for the solvers in
    ``dode.core.solvers.GRID_SOLVERS``), or ``"auto"``: every supported spacing is fitted and the one that scores
    best on the validation seeds (after the guard) is returned; spacings that start at the same noise level share a
    teacher run at least as fine as each one's own (``shared_grids``; ``fit_info["teacher_shared_with"]``), but the
    paper's spacing gets the paper's fit.

    The fitting batch is ``batch_size`` samples (default 100, the paper's; with ``refine`` ``REFINE_BATCH``, 400)
    from seeds ``seed``, ``seed + 1``, ... (default 0). ``teacher``: C (DDIM, each student step split in C; default
    10, the paper's), ``"fine"`` (every training timestep; the default with ``refine``: the fits it starts from), or
    a ``dode.Teacher`` to share one teacher run between fits (its noise batch is then the fitting batch).

    ``guard`` (default on): never hand back something worse than the base on validation seeds. The fitted lambdas
    are scaled by the common factor in [0, 1] that validates best (a line search; 0 is the base itself), and D-ODE
    is kept only where it validates more than ``margin`` (relative) better than the best base among the candidates
    (the spacing's own, or with ``"auto"`` every spacing's): else the best base comes back, with every lambda 0.
    ``validation``: a ``dode.Teacher`` whose noise batch is the validation set, default 100 seeds from
    ``VALIDATION_SEED``; ``reference``: how their ODE solution is solved (``dode.Reference``, default
    ``dode.REFERENCE``), once per process for the model, seeds and reference (keyed on a hash of its parameters: a
    second call reuses it); ``criterion``: ``"fd"`` (pixel Frechet distance between the final samples and the
    reference solution of the same seeds, the default) or ``"rmse"`` (of the final samples to that solution);
    ``features``: the feature space of ``"fd"`` (``"pixel"``, or ``"digits"`` / ``"inception"`` to validate in the
    space of the metric you report). ``guard=False`` and a named spacing: the paper's plain fit, no validation.

    ``refine`` (beyond the paper; ``refine_fit`` has the detail): None (the paper's fit), ``"joint"`` (every lambda
    together, against the teacher's states), ``"joint+timesteps"`` (lambdas and every noise level, against the
    fitting batch's ``reference`` solution; ``GRID_SOLVERS`` only) or ``"timesteps"`` (the grid alone, every lambda
    0). Exact gradients; ``refine_optimizer`` (``OPTIMIZERS``): Rprop (the default) or "lbfgs" (to
    ``refine_tolerance``), at most ``refine_iterations``, or "adam" for exactly as many; ``refine_batch_size``:
    micro-batches; ``refine_moments``: moment weights of a grid's objective; ``refine_patience``: validation checks
    in a row without a better score that stop a run (None: never). With the guard and no ``spacing``, from
    ``"auto"`` and ``refine_starts`` starts (and for "joint+timesteps" the grid alone and the joint lambdas, never
    worse than either); kept only where it validates better than what it replaces by ``margin``
    (``fit_info["refine"]["kept"]``). ``precision``: of the fitting batch and all fitted on it (``dode.Teacher``'s,
    default float32; "float64" narrows what CPU kernels change).

    ``fit_info``: the spacing, every candidate's validation scores, the decision, the reference, and ``"cost"`` (model
    evaluations times samples, and seconds, by part). A fit that looks wrong warns (``FitWarning``)."""
    teacher = teacher if teacher is not None else 10 if refine is None else "fine"
    batch_size = REFINE_BATCH if batch_size is None and refine and not isinstance(teacher, Teacher) else batch_size
    if isinstance(nfe, (list, tuple)):  # one fit per count, in one scheduler
        return _distill_counts(distill, locals())
    _check_refine(get_solver(solver), refine, refine_optimizer, refine_moments, features if guard else None,
                  refine_patience)
    if refine is not None and spacing is None and guard:  # the best a user can get: from auto's choice and more
        spacing = "auto"
    found = distillation(model, solver, nfe, spacing=spacing, batch_size=batch_size, seed=seed, teacher=teacher,
                         guard=guard, validation=validation, criterion=criterion, features=features, margin=margin,
                         reference=reference, device=device, precision=precision, progress=progress)
    if refine is None:
        return found.scheduler
    return refined_scheduler(model, found, refine, iterations=refine_iterations, starts=refine_starts,
                             tolerance=refine_tolerance, batch_size=refine_batch_size, optimizer=refine_optimizer,
                             moment_weights=refine_moments, patience=refine_patience, progress=progress)


def refined_scheduler(model, found: "Distillation", refine: str, *, iterations: int = 200, starts: int = STARTS,
                      tolerance: float = TOLERANCE, batch_size: int | None = None, optimizer: str = OPTIMIZER,
                      moment_weights=(0.0,), patience: int | None = PATIENCE, progress: bool = True) -> DODEScheduler:
    """What ``distill(refine=refine)`` returns, from its ``distillation`` ``found`` (which may have given its own
    ``scheduler`` first: D-ODE auto and its refinement from one fit): ``refine_fit`` against the fit's teacher and
    targets, with ``starts`` starts where ``found`` is an auto fit (one otherwise)."""
    with found.sharing():  # a start on a candidate's grid reads the targets its fit had, without another teacher run
        return refine_fit(model, found, found.teacher, refine, judge=found.judge, targets=found.kept.fit.targets,
                          max_iterations=iterations, starts=starts if found.auto else 1, tolerance=tolerance,
                          batch_size=batch_size, optimizer=optimizer, moment_weights=moment_weights,
                          patience=patience, progress=progress).scheduler


@dataclass
class Refined:
    """What ``refine_fit`` kept, and its record."""

    scheduler: DODEScheduler  # ``fit_info`` written, with its "refine" record
    kept: bool  # False: the refinement validated worse than what it would replace, which came back instead
    spacing: str  # the spacing of the start it came from
    score: float | None  # the refinement's score on the validation seeds (None without a judge)
    seconds: float  # the whole refinement's, every start included
    iterations: int  # the optimiser's iterations, every start included
    record: dict  # ``fit_info["refine"]``


class _Start(NamedTuple):
    scheduler: DODEScheduler
    spacing: str
    score: float | None  # its score on the validation seeds, where known
    kept: bool = False  # it is the distillation's own result (whose teacher targets ``distill`` already has)


def refinement_starts(model, found: Distillation, mode: str, count: int = STARTS) -> list:
    """Up to ``count`` starting points of a ``mode`` refinement of ``found`` (a ``distillation``), each a
    (scheduler, spacing, score) with its score on the validation seeds where known.

    From the candidates the guard judged: for "joint" and "joint+timesteps", the kept fit itself, then the paper's
    spacing and the best other spacing, each with its greedy lambdas at the common factor that validated best; for
    "timesteps" (lambdas held at 0) the bases: the best-validating spacing, the paper's, the next best. Without
    judged candidates: the kept fit alone (with every lambda 0 for "timesteps")."""
    if mode not in REFINEMENTS:
        raise ValueError(f"mode must be one of {tuple(REFINEMENTS)}, got {mode!r}")
    zero = not REFINEMENTS[mode].lambdas
    kept = found.kept
    candidates = [c for c in found.candidates if c.label != "explicit"] if found.judge is not None else []
    if not candidates:
        start = kept.at(found.factor)
        if zero:
            start.lambdas = [0.0] * start.nfe
        return [_Start(start, kept.label, None)]

    def key(c):  # each candidate's validation score: at lambda 0, or at its best factor
        return c.scores[0.0] if zero else min(c.scores.values())

    paper = [c for c in candidates if c.spacing == found.solver.default_spacing]
    own = [c for c in candidates if c.label == kept.label] if not zero else []
    chosen, seen = [], set()
    ranked = sorted(candidates, key=key)
    for c in [*own, *ranked[:1], *paper, *ranked]:
        if c.label not in seen and len(chosen) < count:
            seen.add(c.label)
            chosen.append(c)
    return [_Start(kept.at(found.factor), c.label, found.score, True) if not zero and c.label == kept.label else
            _Start(c.at(0.0 if zero else best_factor(c.scores)), c.label, key(c)) for c in chosen]


class _Attempt(NamedTuple):
    start: _Start
    found: Optimised
    score: float | None  # the refinement's score on the validation seeds

    def record(self) -> dict:
        return {**self.found.record(), **({} if self.score is None else {"validation": self.score}),
                "start": {"spacing": self.start.spacing, "validation": self.start.score}}

    def step(self, **extra) -> dict:
        """This attempt as one step of ``fit_info["refine"]["steps"]``."""
        f = self.found
        return {"mse_start": f.mse_start, "mse_refined": f.mse_refined, "validation": self.score,
                "iterations": f.iterations, "evaluations": f.evaluations, "seconds": f.seconds,
                "spacing": self.start.spacing, "start_validation": self.start.score, **extra}


def _attempt(model, start: _Start, teacher: Teacher, mode: str, judge: Judge | None, options: "RefineOptions",
             targets=None, progress: bool = True, monitored: bool = False, continued: bool = False) -> _Attempt:
    """One refinement from ``start`` on ``teacher``'s batch, scored by ``judge``: "joint" against the teacher's
    states (``targets``: at the start's levels, where known), a grid against ``final_targets``. ``monitored``: with
    early stopping on the judge's seeds (``dode.core.refine.Monitor``, a check every ``CHECK_EVERY`` iterations,
    ``options.patience`` in a row without a better score stop it; not Adam), the start a candidate of it where it
    is ``continued`` (a probe's result), else not (the guard judges a refinement against its start)."""
    mode_options = REFINEMENTS[mode]._asdict()
    if mode_options["objective"] == "final":  # what the guard judges by: the ODE's solution, from pure noise
        targets = final_targets(model, teacher, options.reference)
    elif targets is None:
        probe = copy.deepcopy(start.scheduler)
        probe.set_timesteps(probe.num_inference_steps, device=teacher.noise.device)
        targets = teacher.targets(TimeGrid.of(probe))
    monitor = None
    if monitored and judge is not None and options.optimizer != "adam":
        monitor = Monitor(judge, refine_constants.CHECK_EVERY, options.patience, start.score if continued else math.inf)
    found = optimise(model, start.scheduler, teacher.noise, targets, **mode_options,
                     max_iterations=options.max_iterations, tolerance=options.tolerance,
                     gradient=options.gradient, batch_size=options.batch_size, optimizer=options.optimizer,
                     monitor=monitor, moments=options.moments if mode_options["objective"] == "final" else None,
                     progress=progress)
    score = found.validation if monitor is not None else None if judge is None else judge(found.scheduler)
    return _Attempt(start, found, score)


def final_targets(model, teacher: Teacher, reference: Reference = REFERENCE) -> torch.Tensor:
    """What a refinement of the grid (objective "final") matches: the reference solution of the fitting batch
    (``reference_solution`` of the teacher's seeds, computed once per process), the ODE solved from pure noise at
    the first training noise level, as the guard's validation reference is. Not the teacher's own final samples:
    those start where each start's grid starts (lower for a "leading" grid), and at C = 10 carry the teacher's own
    error. (1, batch, *shape), in the batch's dtype."""
    solution = reference_solution(model, teacher.seed, teacher.batch_size, reference, teacher.noise.device,
                                  progress=False)
    return solution.samples.to(teacher.noise.dtype).unsqueeze(0)


class RefineOptions(NamedTuple):
    """How a refinement runs (``refine_fit``): ``optimizer`` (``dode.core.refine.OPTIMIZERS``). Rprop (the default)
    until its steps settle, or L-BFGS until an iteration gains less than ``tolerance`` of its start value, or
    ``max_iterations``, with several starts each first for ``probe_iterations``, and the long run (a start's, or the
    best probe's continued) stopped early on the validation seeds: checked every ``CHECK_EVERY``, stopped after
    ``patience`` checks in a row without a better score (None: no early stopping); Adam for exactly ``max_iterations``
    from every start (an annealed run cannot be probed and continued). The fitting batch in micro-batches of
    ``batch_size`` samples (None: whole); ``gradient``: "autograd" or "fd" (``GRADIENTS``); ``reference``: how a grid
    refinement's targets are solved (``final_targets``); ``moments``: a moment-matching term in a grid refinement's
    objective (``dode.core.refine.MomentTerm``), None for the squared distance alone."""

    max_iterations: int = 200
    tolerance: float = TOLERANCE
    probe_iterations: int = PROBE_ITERATIONS
    batch_size: int | None = None
    gradient: str = "autograd"
    optimizer: str = OPTIMIZER
    reference: Reference = REFERENCE
    patience: int | None = PATIENCE
    moments: MomentTerm | None = None


def _probes(given: int | None, max_iterations: int) -> int:
    """A probe's iterations: ``given``, or ``PROBE_ITERATIONS`` (read when called), at most a third of
    ``max_iterations`` so that the best probe has the rest to go on with (and at least 1)."""
    return given if given is not None else max(1, min(refine_constants.PROBE_ITERATIONS, max_iterations // 3))


def refine_fit(model, found: Distillation, teacher: Teacher, mode: str, *, judge: Judge | None = None,
               targets=None, max_iterations: int = 200, starts: int = 1, probe_iterations: int | None = None,
               tolerance: float = TOLERANCE, batch_size: int | None = None, gradient: str = "autograd",
               grid_alone: "Refined | None" = None, joint: "Refined | None" = None, optimizer: str = OPTIMIZER,
               reference: Reference | None = None, patience: int | None = PATIENCE, moment_weights=(0.0,),
               progress: bool = True) -> Refined:
    """``distill(refine=mode)`` from a ``distillation``, on ``teacher``'s noise batch (the fitting batch): "joint"
    against the teacher's states, a grid refinement against the batch's ``reference`` solution (``final_targets``;
    default the judge's reference).

    ``mode``: "joint", "timesteps" (a learned grid, every lambda 0: the base solver on it) or "joint+timesteps".
    ``starts``: how many starting points (``refinement_starts``; they need ``judge``). With several and Rprop or
    L-BFGS, each is run ``probe_iterations`` (None: ``PROBE_ITERATIONS``, at most a third of ``max_iterations``) and
    the best-validating goes on until the optimiser converges (Rprop: every step settled; L-BFGS: ``tolerance``), at
    most ``max_iterations`` in all, or, with ``judge``, stops early: scored every ``dode.core.refine.CHECK_EVERY``
    iterations, after ``patience`` checks in a row without a better score (None: never), its best-scoring iterate
    kept (``dode.core.refine.Monitor``; a single start's run too); with ``optimizer="adam"`` each runs its
    ``max_iterations``. The best-validating of all is the result. With ``judge``, the never-worse guard
    (``_guarded``): the refinement comes back only where it validates better, by more than the distillation's
    ``margin``, than what it would replace (the distillation's result; for "timesteps" the best base among the
    starts), else that (``Refined.kept`` False). "joint+timesteps" with ``judge`` also starts from the learned grid
    alone (``grid_alone``: a "timesteps" ``refine_fit`` of the same distillation, else made here) and the joint
    lambdas (``joint``: a "joint" one, else made here; where kept), its special cases, and never validates worse
    than either.
    ``targets``: the teacher's states at the distillation's own levels, where the caller has them. ``batch_size``:
    micro-batches (bounded memory); ``gradient``: "autograd" (exact) or "fd" (finite differences in the grid).

    ``moment_weights`` (beyond the paper; grid refinements): weights of a moment-matching term in the judge's features
    added to the squared distance (``dode.core.refine.MomentTerm``; 0 alone, the default). With several, the whole
    refinement runs once per weight ("joint+timesteps" with its own grid alone unless ``grid_alone`` is given); the
    first weight's is kept unless another's validates better by the ``margin`` (``_weighed`` records each's)."""
    weights = _moment_weights(moment_weights, mode, None if judge is None else getattr(judge, "features", "pixel"))
    if len(weights) > 1:
        return _weighed(model, found, teacher, mode, weights, dict(
            judge=judge, targets=targets, max_iterations=max_iterations, starts=starts,
            probe_iterations=probe_iterations, tolerance=tolerance, batch_size=batch_size, gradient=gradient,
            grid_alone=grid_alone, joint=joint, optimizer=optimizer, reference=reference, patience=patience,
            progress=progress))
    if reference is None:  # the guard's, so that a learned grid is fitted to what it is judged by
        reference = judge.solution.reference if isinstance(judge, Judge) else REFERENCE
    options = RefineOptions(max_iterations, tolerance, _probes(probe_iterations, max_iterations), batch_size, gradient,
                            optimizer, reference, patience)
    special = {}  # "joint+timesteps"'s special cases: its starts and floors, their costs part of its own
    if mode == "joint+timesteps" and judge is not None:
        for name, given, what in (("grid_alone", grid_alone, "timesteps"), ("joint", joint, "joint")):
            special[name] = given if given is not None else refine_fit(
                model, found, teacher, what, judge=judge, targets=targets if what == "joint" else None, starts=starts,
                progress=progress, moment_weights=weights if what == "timesteps" else (0.0,),
                **{k: v for k, v in options._asdict().items() if k != "moments"})
    with count_evaluations(model) as counted:
        began = time.perf_counter()
        options = _with_moments(model, found, teacher, judge, options, weights[0])
        balancing = time.perf_counter() - began
        refined = _refine_fit(model, found, teacher, mode, judge, targets, starts, options, special, progress)
    refined.seconds += balancing
    refined.record["sample_evaluations"] = counted.sample_evaluations
    cost = (counted.sample_evaluations, refined.seconds)
    for name, part in special.items():
        refined.record[name] = {"sample_evaluations": part.record["sample_evaluations"], "seconds": part.seconds,
                                "validation": part.score, "kept": part.kept}
        cost = (cost[0] + part.record["sample_evaluations"], cost[1] + part.seconds)
        refined.seconds = cost[1]
    # fit_info: the distillation's record on the start's spacing, its cost with the refinement's, and the refinement's
    refined.scheduler.fit_info = {**found.record(refined.spacing, cost), "refine": refined.record}
    return refined


def _moment_weights(weights, mode: str, features: str | None) -> tuple:
    """``refine_fit``'s ``moment_weights`` checked: a tuple of distinct finite numbers >= 0, non-zero only for a grid
    refinement in the judge's ``features`` where a moment term can use them, several only with a judge to choose
    among them (``features`` None: no judge)."""
    if mode is not None and mode not in REFINEMENTS:
        raise ValueError(f"mode must be one of {tuple(REFINEMENTS)}, got {mode!r}")
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"moment_weights must be a sequence of numbers >= 0, got {weights!r}") from None
    if not weights or any(not (math.isfinite(w) and w >= 0) for w in weights) or len(set(weights)) < len(weights):
        raise ValueError(f"moment_weights must be distinct finite numbers >= 0, at least one, got {weights!r}")
    if weights == (0.0,):
        return weights
    if mode is None or REFINEMENTS[mode].objective != "final":
        raise ValueError(f"moment weights other than 0 weigh a grid refinement's objective: they need refine="
                         f"'timesteps' or 'joint+timesteps', not {mode!r}")
    if len(weights) > 1 and features is None:
        raise ValueError("several moment weights need the guard's validation seeds to choose among them")
    if features not in (None, *MOMENT_FEATURES):
        raise ValueError(f"a moment term is in the judge's features, which must be one of {MOMENT_FEATURES}, "
                         f"not {features!r}")
    return weights


def _with_moments(model, found: Distillation, teacher: Teacher, judge, options: RefineOptions,
                  weight: float) -> RefineOptions:
    """``options`` with a moment term of ``weight`` in the judge's features (none at weight 0), balanced at the
    distillation's result on the fitting batch (one run of it)."""
    if weight == 0:
        return options
    features = getattr(judge, "features", "pixel")
    balance = moment_balance(model, found.scheduler, teacher.noise, final_targets(model, teacher, options.reference),
                             features)
    return options._replace(moments=MomentTerm(weight, features, balance))


def _weighed(model, found: Distillation, teacher: Teacher, mode: str, weights: tuple, options: dict) -> Refined:
    """``refine_fit`` once per moment weight; the first weight's result unless another's validates better by more
    than the distillation's ``margin`` (``_first_unless_beaten``), its record with every weight's validation and the
    cost of all (given ``grid_alone`` and ``joint`` counted once)."""
    if mode == "joint+timesteps" and options["joint"] is None:  # the joint lambdas do not depend on the weight
        options = dict(options, joint=refine_fit(model, found, teacher, "joint", **{
            k: v for k, v in options.items() if k not in ("grid_alone", "joint")}))
    tried = [refine_fit(model, found, teacher, mode, moment_weights=(w,), **options) for w in weights]
    returned = [t.score if t.kept else t.record.get("validation_before", t.score) for t in tried]
    chosen = _first_unless_beaten(returned, found.margin)
    given = [p for p in (options["grid_alone"], options["joint"]) if p is not None] if mode == "joint+timesteps" else []
    # each weight's refinement with its special cases (refine_fit's cost), the given ones counted once in all
    costs = [{"sample_evaluations": t.record["sample_evaluations"] + sum(
        t.record[name]["sample_evaluations"] for name in ("grid_alone", "joint") if name in t.record),
        "seconds": t.seconds} for t in tried]
    evaluations = sum(c["sample_evaluations"] for c in costs) - (len(tried) - 1) * sum(
        p.record["sample_evaluations"] for p in given)
    seconds = sum(c["seconds"] for c in costs) - (len(tried) - 1) * sum(p.seconds for p in given)
    best = tried[chosen]
    # its own spending, every weight's run (the given parts not): what a caller adds when it is given in turn
    record = {**best.record, "sample_evaluations": evaluations - sum(p.record["sample_evaluations"] for p in given),
              "moment_weight": weights[chosen], "moment_weights": [
        {"weight": w, "validation": v, "kept": t.kept, **c} for w, v, t, c in zip(weights, returned, tried, costs)]}
    best.scheduler.fit_info = {**found.record(best.spacing, (evaluations, seconds)), "refine": record}
    return Refined(best.scheduler, best.kept, best.spacing, best.score, seconds,
                   sum(t.iterations for t in tried), record)


def _first_unless_beaten(scores: list, margin: float) -> int:
    """Which of several validation ``scores`` (lower is better) to keep: the first, unless another validates better
    than it by more than ``margin`` (relative; then the best of those, the first on a tie), as the guard keeps a
    refinement only where it beats what it replaces by the margin: a score within it cannot be told apart on the
    validation seeds, and the choice would follow the last bits of the arithmetic."""
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best if scores[best] < (1 - margin) * scores[0] else 0


def _refine_fit(model, found: Distillation, teacher: Teacher, mode: str, judge: Judge | None, targets, starts: int,
                options: RefineOptions, special: dict, progress: bool) -> Refined:
    if mode not in REFINEMENTS:
        raise ValueError(f"mode must be one of {tuple(REFINEMENTS)}, got {mode!r}")
    began = time.perf_counter()
    points = refinement_starts(model, found, mode, starts if judge is not None else 1)
    # the learned grid alone (lambda 0) and the kept joint lambdas (the grid held): starts, and floors of the result
    special = {name: part for name, part in special.items() if name == "grid_alone" or part.kept}
    points = [*(_Start(copy.deepcopy(part.scheduler), part.spacing, part.score) for part in special.values()), *points]
    probing = len(points) > 1 and options.probe_iterations < options.max_iterations and options.optimizer != "adam"
    own = targets if not REFINEMENTS[mode].timesteps else None
    first = options._replace(max_iterations=options.probe_iterations) if probing else options
    attempts = [_attempt(model, p, teacher, mode, judge, first, own if p.kept else None, progress, not probing)
                for p in points]
    if judge is None:
        best = attempts[0]
        record = {**best.record(), "seconds_total": time.perf_counter() - began}
        return _refined(found, best.found.scheduler, best.start.spacing, True, best.score, record)
    steps = [a.step() for a in attempts]
    best = min(attempts, key=lambda a: a.score)
    runs = 0
    if probing:  # the best probe goes on
        rest = options._replace(max_iterations=options.max_iterations - options.probe_iterations)
        more = _attempt(model, _Start(best.found.scheduler, best.start.spacing, best.score), teacher, mode, judge,
                        rest, None, progress, monitored=True, continued=True)
        steps.append(more.step(continued=True))
        more = more._replace(start=best.start)
        runs = more.found.student_runs
        if more.score <= best.score:
            best = more
    record = {**best.record(), "steps": steps, "iterations": sum(step["iterations"] for step in steps),
              "evaluations": sum(step["evaluations"] for step in steps),
              "student_runs": sum(a.found.student_runs for a in attempts) + runs}
    return _guarded(found, mode, judge, points, best, special, record, began)


def _guarded(found: Distillation, mode: str, judge: Judge, points: list, best: _Attempt, special: dict,
             record: dict, began: float) -> Refined:
    """The never-worse guard of ``refine_fit``: ``best`` where it validates better by more than the distillation's
    ``margin`` (relative) than what it would replace (the fit itself, or for a learned grid alone the best base among
    the starts) and than each of its ``special`` cases (the grid alone, the joint lambdas); else the best of those,
    a special case where it validates at least as well as the fit. The margin, as the lambdas' guard has one: a
    refinement that validates within it of what it replaces cannot be told apart from that on the validation seeds,
    and its verdict would follow the last bits of the arithmetic (a 0.04 % tie on unet-digits went either way
    under another CPU kernel)."""
    if REFINEMENTS[mode].lambdas:
        baseline = _Start(found.scheduler, found.kept.label, found.score)
    else:
        baseline = min(points, key=lambda p: float("inf") if p.score is None else p.score)
    before = baseline.score if baseline.score is not None else judge(baseline.scheduler)
    record.update(validation_before=before, seconds_total=time.perf_counter() - began)
    name, floor = min(((n, part.score) for n, part in special.items()), key=lambda item: item[1],
                      default=(None, math.inf))
    if best.score < (1 - found.margin) * min(before, floor):
        return _refined(found, best.found.scheduler, best.start.spacing, True, best.score, {**record, "kept": True})
    if floor <= before:  # a special case beats every refinement and the fit: it is the result
        record.update({"kept": True, f"{name}_kept": True})
        part = special[name]
        return _refined(found, copy.deepcopy(part.scheduler), part.spacing, True, floor, record)
    # the baseline's scheduler is a copy of its own (Candidate.at), returned to nobody else
    return _refined(found, baseline.scheduler, baseline.spacing, False, best.score, {**record, "kept": False})


def _refined(found: Distillation, scheduler: DODEScheduler, spacing: str, kept: bool, score, record: dict) -> Refined:
    """The value ``refine_fit`` returns (``refine_fit`` writes its ``fit_info``)."""
    return Refined(scheduler, kept, spacing, score, record["seconds_total"], record["iterations"], record)
