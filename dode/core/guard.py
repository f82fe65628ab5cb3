"""The never-worse guard: a student is judged on validation seeds, and D-ODE is kept only where it helps.

The validation seeds are held out from the fitting batch; their reference is the ODE solution by a fine teacher
(every training timestep, from pure noise): what any spacing's samples should be, known without data. A ``Judge``
scores a student's final samples against it; ``Judge.scores`` scores a fit at common factors of its lambdas (0 is
the base solver, 1 the fit, and a line search in between); ``choose`` keeps the best D-ODE fit only where it beats
the best base by ``MARGIN`` (docs/design.md, "The guard").
"""
from __future__ import annotations

import copy

import torch

from .fit import rmse
from .sampling import sample
from .scheduler import DODEScheduler
from .teacher import Teacher

#: the validation criteria: a student's final samples against the validation reference
CRITERIA = ("rmse", "fd")
#: D-ODE must validate this much better (relative) than the best base it would replace: below that the difference
#: is within the noise of 100 validation samples, and the base is the safe choice
MARGIN = 0.02
#: the line search's first common factors of the lambdas; then halfway to the best one's neighbours
SHRINK_FACTORS = (0.75, 0.5, 0.25)


def scaled(scheduler: DODEScheduler, factor: float) -> DODEScheduler:
    """A copy of ``scheduler`` with every lambda times ``factor`` (0: the base solver on its grid)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.lambdas = [factor * v for v in scheduler.lambdas]
    return scheduler


class Judge:
    """Scores of a student's final samples on the validation seeds (``validation``'s noise batch) against their
    ODE solution, by ``criterion``: "rmse", or "fd" (the Frechet distance in ``features``)."""

    def __init__(self, model, validation: Teacher, criterion: str, device, features: str = "pixel"):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.model, self.validation, self.criterion, self.device = model, validation, criterion, device
        self.features = features
        self.reference = validation.solution()
        self.runs = 0  # sampling runs on the validation seeds so far
        if criterion == "fd":  # the heavier metrics stack only for this criterion
            from ..evaluation.metrics import feature_statistics, frechet_distance

            self._frechet = frechet_distance
            self._statistics = feature_statistics(self.reference, features, device=device)

    def __call__(self, scheduler, scale: float = 1.0, nfe: int | None = None) -> float:
        """The score of ``scheduler``: a DODEScheduler with its lambdas times ``scale``, or a base solver (name or
        scheduler) at ``nfe``. A student that blows up scores infinity."""
        if isinstance(scheduler, DODEScheduler):
            scheduler = scaled(scheduler, scale)  # a copy: sampling steps it
            nfe = scheduler.nfe
        x = sample(self.model, scheduler, nfe, self.validation.batch_size, seed=self.validation.seed,
                   device=self.device, progress=False)
        self.runs += 1
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


def decision(factor: float) -> str:
    """What the guard kept, in words."""
    return ("fitted lambdas kept" if factor == 1.0 else
            f"lambdas shrunk by {factor:g}" if factor > 0 else "lambdas set to 0: the base validates as well or better")
