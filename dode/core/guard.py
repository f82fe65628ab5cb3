"""The never-worse guard: a student is judged on validation seeds, and D-ODE is kept only where it helps.

The validation seeds are held out from the fitting batch; their reference is the ODE solution from pure noise
(``dode.core.reference``): what any spacing's samples should be, known without data. A ``Judge``
scores a student's final samples against it; ``Judge.scores`` scores a fit at common factors of its lambdas (0 is
the base solver, 1 the fit, and a line search in between); ``choose`` keeps the best D-ODE fit only where it beats
the best base by ``MARGIN`` (docs/design.md, "The guard").
"""
from __future__ import annotations

import copy
import hashlib
import time

import torch

from .fit import rmse
from .reference import REFERENCE, Reference, reference_solution, tensor_bytes
from .sampling import count_evaluations, sample
from .scheduler import DODEScheduler
from .teacher import Teacher

#: the validation criteria: a student's final samples against the validation reference
CRITERIA = ("rmse", "fd")
#: D-ODE must validate this much better (relative) than the best base it would replace: below that the difference
#: is within the noise of 100 validation samples, and the base is the safe choice
MARGIN = 0.02
#: the line search's first common factors of the lambdas; then halfway to the best one's neighbours
SHRINK_FACTORS = (0.75, 0.5, 0.25)
#: sanity bounds of a greedy fit (``insanity``): the largest |lambda|, and how far the fitted student's final samples
#: may reach beyond the teacher's (max |x|, as a multiple). Chosen on the embedded models, over every spacing's
#: greedy fit of every solver at NFE 3-10, as ``spacing="auto"`` fits them (results/guard_reference.md, "Sanity"):
#: |lambda| up to 440 (Heun at NFE 5 on gmm-digits, whose corrector outputs differ little) and samples up to 9.9x the
#: teacher's (unet-digits at NFE 4). A UNet2DModel with random weights fits |lambda| above 1000
#: (results/benchmarks.md, guard_cost)
LAMBDA_BOUND = 1000.0
RANGE_BOUND = 25.0


class FitWarning(UserWarning):
    """A fitted D-ODE scheduler looks wrong (``insanity``): ``distill`` warns once per call."""


def scaled(scheduler: DODEScheduler, factor: float) -> DODEScheduler:
    """A copy of ``scheduler`` with every lambda times ``factor`` (0: the base solver on its grid)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.lambdas = [factor * v for v in scheduler.lambdas]
    return scheduler


class _SharedStart:
    """The model, with the first two evaluations of each run remembered. Every run on one grid starts from the same
    noise, and its first step uses the first output uncorrected (lambda_0 = 0), so the base, the fit and every shrunk
    fit evaluate the same two inputs before a lambda acts. Exact: an input seen before gets the output it got then."""

    SHARED = 2  # evaluations per run whose input no lambda has touched

    def __init__(self, model):
        self.model, self.outputs, self.k = model, {}, 0

    def begin(self) -> None:
        self.k = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, t):
        self.k += 1
        if self.k > self.SHARED:
            return self.model(x, t)
        digest = hashlib.blake2b(tensor_bytes(x), digest_size=16)
        key = (str(x.dtype), tuple(x.shape), float(t), digest.hexdigest())
        if key not in self.outputs:
            self.outputs[key] = self.model(x, t)
        return self.outputs[key]


class Judge:
    """Scores of a student's final samples on the validation seeds (``validation``'s noise batch) against their
    ODE solution (``reference``), by ``criterion``: "rmse", or "fd" (the Frechet distance in ``features``).

    Counts what it spends: ``runs`` (sampling runs), ``sample_evaluations`` and ``seconds`` of those runs, and the
    reference's (``solution``: 0 evaluations where this process had it)."""

    def __init__(self, model, validation: Teacher, criterion: str, device, features: str = "pixel",
                 reference: Reference = REFERENCE, progress: bool = True):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.model, self.validation, self.criterion, self.device = model, validation, criterion, device
        self.features = features
        self.solution = reference_solution(model, validation.seed, validation.batch_size, reference, device, progress)
        self.reference = self.solution.samples
        self.runs = 0  # sampling runs on the validation seeds so far
        self.sample_evaluations = 0  # ... their model evaluations, times the samples of each
        self.seconds = 0.0
        self._shared = _SharedStart(model)
        if criterion == "fd":  # the heavier metrics stack only for this criterion
            from ..evaluation.metrics import feature_statistics, frechet_distance

            self._frechet = frechet_distance
            self._statistics = feature_statistics(self.reference, features, device=device)

    def __call__(self, scheduler, scale: float = 1.0, nfe: int | None = None) -> float:
        """The score of ``scheduler``: a DODEScheduler with its lambdas times ``scale``, or a base solver (name or
        scheduler) at ``nfe``. A student that blows up scores infinity."""
        return self.score(self.samples(scheduler, scale, nfe))

    def samples(self, scheduler, scale: float = 1.0, nfe: int | None = None) -> torch.Tensor:
        """The final samples of the validation seeds by ``scheduler`` (as in ``__call__``), counted."""
        began = time.perf_counter()
        if isinstance(scheduler, DODEScheduler):
            scheduler = scaled(scheduler, scale)  # a copy: sampling steps it
            nfe = scheduler.nfe
        self._shared.begin()
        with count_evaluations(self.model) as meter:
            x = sample(self._shared, scheduler, nfe, self.validation.batch_size, seed=self.validation.seed,
                       device=self.device, progress=False)
        self.runs += 1
        self.sample_evaluations += meter.sample_evaluations
        self.seconds += time.perf_counter() - began
        return x

    def score(self, x: torch.Tensor) -> float:
        """The criterion of final samples ``x`` of the validation seeds against the reference (inf if not finite)."""
        if not torch.isfinite(x).all():
            return float("inf")
        if self.criterion == "rmse":
            return rmse(x, self.reference)
        return self._frechet(x, self._statistics, features=self.features, device=self.device)

    def scores(self, fitted: DODEScheduler, known: dict | None = None, search: bool = True) -> dict:
        """{common factor of ``fitted``'s lambdas: score} at 0 (the base) and 1 (the fit), and with ``search`` a line
        search in between (``SHRINK_FACTORS``, then halfway to the best one's neighbours). ``known``: scores already
        computed, kept."""
        scores = dict(known or {})
        for factor in (0.0, 1.0, *(SHRINK_FACTORS if search else ())):
            if factor not in scores:
                scores[factor] = self(fitted, factor)
        if search:
            best = min(scores, key=scores.get)
            for factor in (best - 0.125, best + 0.125):
                if 0.0 < factor < 1.0 and factor not in scores:
                    scores[factor] = self(fitted, factor)
        return scores


def best_factor(scores: dict) -> float:
    """The common factor with the best score; among equal scores the smallest factor."""
    return min(sorted(scores), key=scores.get)


def choose(scores: list[dict], margin: float, preferred: int | None = None) -> tuple[int, float]:
    """(candidate index, factor), from each candidate's ``scores`` ({factor: score}): the best-scoring D-ODE fit
    (factor > 0) where it beats the best-scoring base (factor 0) of all candidates by more than ``margin``
    (relative), else that base; a base within ``margin`` of the best counts as the best when it is the
    ``preferred`` candidate's (the paper's spacing)."""
    base = min(range(len(scores)), key=lambda i: scores[i][0.0])
    best_base = scores[base][0.0]
    if preferred is not None and scores[preferred][0.0] <= (1 + margin) * best_base:
        base = preferred
    fits = [(score, i, factor) for i, s in enumerate(scores) for factor, score in s.items() if factor > 0]
    if fits:
        score, i, factor = min(fits)
        if score < (1 - margin) * best_base:
            return i, factor
    return base, 0.0


def insanity(fit) -> str | None:
    """What is wrong with a greedy fit (a ``GreedyFit``) beyond ``LAMBDA_BOUND`` or ``RANGE_BOUND``, in words; None
    when nothing is. Typical causes: an untrained or broken model, a wrong prediction type or schedule."""
    problems = []
    largest = max((abs(v) for v in fit.lambdas), default=0.0)
    if largest > LAMBDA_BOUND:
        problems.append(f"a fitted |lambda| of {largest:.4g} (bound {LAMBDA_BOUND:g})")
    if not fit.sample_range <= RANGE_BOUND * max(fit.teacher_range, 1e-12):
        problems.append(f"final samples up to |x| = {fit.sample_range:.4g} on the fitting batch, where the teacher's "
                        f"stay within {fit.teacher_range:.4g} (bound {RANGE_BOUND:g}x)")
    if not problems:
        return None
    return ("suspicious fit: " + " and ".join(problems) + "; check the model (trained weights, prediction type, "
            "noise schedule) before using these lambdas")


def decision(factor: float, warning: str | None = None) -> str:
    """What the guard kept, in words (with ``insanity``'s warning where there is one)."""
    text = ("fitted lambdas kept" if factor == 1.0 else
            f"lambdas shrunk by {factor:g}" if factor > 0 else "lambdas set to 0: the base validates as well or better")
    return text if warning is None else f"{text} ({warning})"
