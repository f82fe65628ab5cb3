"""The moment-matching term of a grid refinement's objective (``dode.core.refine.MomentTerm``) and the guard's choice
of its weight (``refine_fit(moment_weights=...)``, ``distill(refine_moments=...)``): the term against numpy's mean
and covariance, its balance, what each weight's refinement is and which one comes back, its cost, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dode
from dode.core.distill import _first_unless_beaten, distillation, final_targets, refine_fit
from dode.core.refine import (MomentTerm, _student_states, moment_balance, moment_distance, moment_features,
                              moments_of, objective_at_start, optimise)
from dode.experiments.checks import check_parameters


def test_the_moment_distance_is_numpy_s_mean_and_covariance_apart():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, 4, 4, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(40, 1, 4, 4, generator=g, dtype=torch.float64) + 0.2
    fx, fy = x.flatten(1).numpy(), y.flatten(1).numpy()
    expected = (np.sum((fx.mean(0) - fy.mean(0)) ** 2)
                + np.sum((np.cov(fx, rowvar=False) - np.cov(fy, rowvar=False)) ** 2))
    target = moments_of(moment_features(y, "pixel"))
    assert float(moment_distance(x, target, "pixel")) == pytest.approx(expected, rel=1e-12)
    # a batch against its own moments, in any order: zero
    assert float(moment_distance(y[torch.randperm(40, generator=g)], target, "pixel")) == pytest.approx(0, abs=1e-24)


def test_digits_features_are_the_fd_digits_classifier_s_and_carry_the_gradient():
    from dode.evaluation.features import DigitsFeatures

    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ours = moment_features(x, "digits")
    torch.testing.assert_close(ours.detach(), DigitsFeatures().double()(x.detach()), rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pixel"):
        moment_features(x, "inception")


def test_at_its_balance_point_weight_w_weighs_the_objective_by_one_plus_w(gmm):
    """``moment_balance`` makes the term equal to the squared distance at the scheduler it is measured at: there the
    objective with weight w is (1 + w) times the squared distance alone."""
    teacher = dode.Teacher(gmm, batch_size=20, seed=4, substeps=4)
    start = dode.distill(gmm, "deis", 4, teacher=teacher, guard=False)
    targets = final_targets(gmm, teacher)
    balance = moment_balance(gmm, start, teacher.noise, targets, "pixel")
    values = []
    for moments in (None, MomentTerm(2.5, "pixel", balance)):
        f, _, _ = objective_at_start(gmm, start, teacher.noise, targets, timesteps=True, moments=moments)
        with torch.no_grad():
            values.append(f.loss(f.student.lambdas, f.student.grid).item())
    assert values[1] == pytest.approx(3.5 * values[0], rel=1e-9)
    # and the balance is what its definition says, from an independent run of the student
    with torch.no_grad():
        final = _student_states(gmm, start, teacher.noise, list(start.lambdas), start.grid)[-1]
    squared = torch.mean((final.double() - targets[-1].double()) ** 2).item()
    term = moment_distance(final, moments_of(moment_features(targets[-1], "pixel")), "pixel").item()
    assert balance == pytest.approx(squared / term, rel=1e-9)


def test_a_moment_term_pulls_the_student_s_moments_towards_the_solution_s(gmm):
    """Against the squared distance alone from the same start, a large weight ends with moments nearer the
    solution's (what the term is for) and a larger squared distance (what it trades)."""
    teacher = dode.Teacher(gmm, batch_size=40, seed=6, substeps=4)
    start = dode.distill(gmm, "unipc", 4, teacher=teacher, guard=False)
    targets = final_targets(gmm, teacher)
    balance = moment_balance(gmm, start, teacher.noise, targets, "pixel")
    target = moments_of(moment_features(targets[-1], "pixel"))
    ends = {}
    for weight in (0.0, 20.0):
        moments = MomentTerm(weight, "pixel", balance) if weight else None
        found = optimise(gmm, start, teacher.noise, targets, timesteps=True, max_iterations=25, moments=moments,
                         optimizer="lbfgs", progress=False)  # converged in 25 (Rprop is not): the term's pull
        with torch.no_grad():
            final = _student_states(gmm, found.scheduler, teacher.noise, list(found.scheduler.lambdas),
                                    found.scheduler.grid)[-1]
        ends[weight] = (moment_distance(final, target, "pixel").item(),
                        torch.mean((final.double() - targets[-1].double()) ** 2).item())
        assert ("moments" in found.record()) == bool(weight)
    assert ends[20.0][0] < ends[0.0][0] and ends[20.0][1] > ends[0.0][1]


@pytest.fixture(scope="module")
def auto_fit(gmm, validation):
    teacher = dode.Teacher(gmm, batch_size=32, seed=3, substeps=4)
    return distillation(gmm, "deis", 4, spacing="auto", teacher=teacher, validation=validation), teacher


def _refine(gmm, auto_fit, mode, weights, **extra):
    found, teacher = auto_fit
    with found.sharing():
        return refine_fit(gmm, found, teacher, mode, judge=found.judge, targets=found.kept.fit.targets,
                          max_iterations=6, starts=1, moment_weights=weights, progress=False, **extra)


def _returned_score(refined):
    return refined.score if refined.kept else refined.record["validation_before"]


@pytest.mark.parametrize("mode", ["timesteps", "joint+timesteps"])
def test_the_guard_keeps_the_weight_whose_refinement_validates_best_by_the_margin_and_counts_every_weight_s_cost(
        gmm, auto_fit, mode):
    weights = (0.0, 1.0, 4.0)
    joint = _refine(gmm, auto_fit, "joint", (0.0,)) if mode == "joint+timesteps" else None
    alone = {w: _refine(gmm, auto_fit, mode, (w,), joint=joint) for w in weights}
    chosen = _refine(gmm, auto_fit, mode, weights, joint=joint)
    scores = {w: _returned_score(r) for w, r in alone.items()}
    # the first weight unless another validates better by more than the margin, as the guard keeps a refinement
    lowest = min(weights, key=lambda w: (scores[w], weights.index(w)))
    best = lowest if scores[lowest] < (1 - auto_fit[0].margin) * scores[0.0] else 0.0
    record = chosen.record
    # each weight's refinement is what a refinement with that weight alone gives
    assert [e["weight"] for e in record["moment_weights"]] == list(weights)
    assert [e["validation"] for e in record["moment_weights"]] == [scores[w] for w in weights]
    assert record["moment_weight"] == best and _returned_score(chosen) == scores[best]
    assert chosen.scheduler.lambdas == alone[best].scheduler.lambdas
    assert chosen.scheduler.grid == alone[best].scheduler.grid
    # the cost: every weight's, the given joint lambdas once
    spent = [e["sample_evaluations"] for e in record["moment_weights"]]
    once = joint.record["sample_evaluations"] if joint is not None else 0
    total = chosen.scheduler.fit_info["cost"]["sample_evaluations"]["refine"]
    assert total == sum(spent) - (len(weights) - 1) * once and total > max(spent)
    assert chosen.seconds > max(r.seconds for r in alone.values()) / 2
    # weight 0 alone is the package's refinement, unchanged: no term, no balance, no record of one
    assert "moments" not in alone[0.0].record and "moment_weights" not in alone[0.0].record
    assert "moments" in alone[1.0].record and alone[1.0].record["moments"]["weight"] == 1.0


def test_moment_weights_are_checked_before_any_work(gmm, auto_fit):
    found, teacher = auto_fit
    for bad, match in ((("a",), "numbers"), ((-1.0,), "distinct finite"), ((1.0, 1.0), "distinct finite"),
                       ((), "at least one"), ((float("nan"),), "distinct finite")):
        with pytest.raises(ValueError, match=match):
            refine_fit(gmm, found, teacher, "timesteps", judge=found.judge, moment_weights=bad, progress=False)
    with pytest.raises(ValueError, match="grid refinement"):
        refine_fit(gmm, found, teacher, "joint", judge=found.judge, moment_weights=(0.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="validation seeds to choose"):
        refine_fit(gmm, found, teacher, "timesteps", judge=None, moment_weights=(0.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="need refine="):
        dode.distill(gmm, "deis", 4, refine_moments=(1.0,))
    with pytest.raises(ValueError, match="judge's features"):
        dode.distill(gmm, "deis", 4, refine="timesteps", features="inception", refine_moments=(1.0,))
    with pytest.raises(ValueError, match="micro-batches"):
        optimise(gmm, found.scheduler, teacher.noise, final_targets(gmm, teacher), timesteps=True, batch_size=8,
                 moments=MomentTerm(1.0, "pixel", 1.0), progress=False)
    with pytest.raises(ValueError, match="objective='final'"):
        optimise(gmm, found.scheduler, teacher.noise, teacher.targets(found.scheduler), objective="all",
                 moments=MomentTerm(1.0, "pixel", 1.0), progress=False)
    # a notebook's parameter: a scalar is a list, anything else named
    assert check_parameters(learned_moments=1).learned_moments == [1.0]
    with pytest.raises(ValueError, match="learned_moments"):
        check_parameters(learned_moments=[0, -2])


@pytest.mark.parametrize("scores, margin, chosen", [
    ([1.0, 0.99, 0.5], 0.02, 2),  # the best by far
    ([1.0, 0.985, 0.99], 0.02, 0),  # within the margin of the first: the first, though another is lower
    ([1.0, 0.97, 0.97], 0.02, 1),  # beyond it: the best, the first of a tie
    ([0.5, 0.7, 0.9], 0.0, 0),  # the first is the best
    ([1.0, 0.99, 0.98], 0.0, 2),  # no margin: the lowest
])
def test_another_weight_replaces_the_first_only_beyond_the_margin(scores, margin, chosen):
    assert _first_unless_beaten(scores, margin) == chosen
