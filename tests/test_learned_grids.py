"""Learned time grids for every solver (issue 12): DDIM's exact grid form, the grid alone (refine="timesteps"),
several starts chosen on validation seeds, and the never-worse guard on every refinement."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import dode
from dode.core.distill import distillation, refine_fit, refined_scheduler, refinement_starts
from dode.core.timegrid import TimeGrid
from dode.models.registry import training_sigmas
from dode.core import refine as refine_module
from dode.core.refine import REFINEMENTS
from dode.core.refine import optimise as refine
from dode.core.sampling import integrate, seeded_noise
from dode.core.scheduler import grid_scheduler, make_scheduler, to_grid_form
from dode.core.solvers import GRID_SOLVERS

NOISE_SEED, BATCH = 11, 12


def _ddim_by_hand(model, grid, noise, lambdas):
    """DDIM (eta 0) with D-ODE's corrected eps on a grid of noise levels, written out: abar = 1 / (1 + sigma^2),
    x0 = (x - sqrt(1 - abar) e) / sqrt(abar), x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) e, clean at the end."""
    log_sigmas = np.log(training_sigmas(model.scheduler_config))
    levels = [*grid, 0.0]
    x, previous = noise.double(), None
    for k, sigma in enumerate(grid):
        t = float(np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas))))
        eps = model(x.float(), torch.tensor(t)).double()
        corrected = eps if previous is None else eps + lambdas[k] * (eps - previous)
        previous = eps
        abar, abar_next = 1 / (1 + sigma**2), 1 / (1 + levels[k + 1] ** 2)
        x0 = (x - (1 - abar) ** 0.5 * corrected) / abar**0.5
        x = abar_next**0.5 * x0 + (1 - abar_next) ** 0.5 * corrected
    return x


def test_ddim_takes_a_grid_through_its_exact_grid_form(gmm):
    noise = seeded_noise(gmm.sample_shape, BATCH, NOISE_SEED)
    grid = [120.0, 9.0, 1.7, 0.4, 0.05]
    lambdas = [0.0, 0.7, -0.3, 1.2, 4.0]
    scheduler = grid_scheduler("ddim", gmm, grid)
    assert isinstance(scheduler.base_scheduler, dode.IPNDMDiscreteScheduler)
    assert scheduler.base_scheduler.config.max_order == 1
    scheduler.lambdas = lambdas
    got, _ = integrate(gmm, scheduler, scheduler.num_inference_steps, noise)
    torch.testing.assert_close(got.double(), _ddim_by_hand(gmm, grid, noise, lambdas), rtol=0, atol=2e-5)
    np.testing.assert_allclose(TimeGrid.of(scheduler).steps, grid, rtol=1e-6)


@pytest.mark.parametrize("spacing, nfe", [("leading", 3), ("leading", 5), ("trailing", 5), ("leading", 10)])
def test_the_grid_form_of_ddim_samples_as_ddim_itself(gmm, spacing, nfe):
    """On DDIM's own levels its grid form is the same sampler (D-ODE's lambdas included), where DDIM's next state is
    at the timestep it evaluates next (leading; trailing when the step count divides 1000)."""
    ddim = dode.DODEScheduler(make_scheduler("ddim", gmm, spacing), [0.0, *np.linspace(0.5, 2.0, nfe - 1)], nfe)
    form = to_grid_form(ddim)
    assert isinstance(form.base_scheduler, dode.IPNDMDiscreteScheduler) and form.lambdas == ddim.lambdas
    x, y = (dode.sample(gmm, s, nfe, BATCH, seed=NOISE_SEED, progress=False) for s in (ddim, form))
    torch.testing.assert_close(y, x, rtol=0, atol=2e-5)
    assert to_grid_form(form) is form  # a scheduler that takes grids is its own grid form


def test_plms_has_no_grid_form_and_says_so(gmm):
    assert "pndm" not in GRID_SOLVERS and "ddim" in GRID_SOLVERS
    with pytest.raises(ValueError, match="no scheduler makes exactly its update"):
        grid_scheduler("pndm", gmm, [100.0, 10.0, 1.0])
    with pytest.raises(ValueError, match="refine='timesteps' cannot learn a time grid for pndm"):
        dode.distill(gmm, "pndm", 4, batch_size=4, refine="timesteps")
    plms = dode.DODEScheduler(make_scheduler("pndm", gmm), [0.0] * 4, 3)
    with pytest.raises(ValueError, match="no scheduler makes exactly its update"):
        to_grid_form(plms)


def test_a_learned_grid_alone_keeps_every_lambda_at_zero_and_improves_the_fit(gmm):
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps="fine")
    base = dode.DODEScheduler(make_scheduler("ddim", gmm), [0.0] * 4, 4)
    probe = copy.deepcopy(to_grid_form(base))
    probe.set_timesteps(4)
    found = refine(gmm, base, teacher.noise, teacher.targets(probe), **REFINEMENTS["timesteps"]._asdict(), max_iterations=6,
                   progress=False)
    learned, info = found.scheduler, found.record()
    assert learned.lambdas == [0.0] * 4 and info["mode"] == "timesteps"
    assert info["mse_refined"] < info["mse_start"]
    start = TimeGrid.of(probe).steps
    grid = np.array(learned.grid)
    assert not np.allclose(grid, start) and np.all(np.diff(grid) < 0)
    assert grid[0] <= training_sigmas(gmm.scheduler_config)[-1]  # the first level never above the schedule's top
    # the objective it reports is the final samples' distance to the teacher's (the ODE from the start's own first
    # state), recomputed through dode.sample
    x = dode.sample(gmm, learned, 4, teacher.batch_size, seed=teacher.seed, progress=False)
    final = teacher.targets(probe)[-1].double()
    assert info["mse_refined"] == pytest.approx(float(torch.mean((x.double() - final) ** 2)), rel=1e-4)
    with pytest.raises(ValueError, match="nothing to refine"):
        refine(gmm, base, teacher.noise, teacher.targets(probe), timesteps=False, lambdas=False)


@pytest.mark.parametrize("solver", ["ddim", "deis"])
def test_a_grid_that_never_improves_comes_back_as_its_start(gmm, monkeypatch, solver):
    """Where no point L-BFGS visits beats the start, the start comes back: its own lambdas and grid (DDIM: the grid
    form on DDIM's levels; DEIS: none, its base scheduler's own), not the grid of the last trial run."""
    teacher = dode.Teacher(gmm, batch_size=8, seed=5, substeps="fine")
    base = dode.DODEScheduler(make_scheduler(solver, gmm), [0.0] * 4, dode.get_solver(solver).steps_for(4))
    probe = copy.deepcopy(to_grid_form(base))
    probe.set_timesteps(probe.num_inference_steps)
    real, calls = refine_module._loss, []

    def worse_after_the_start(*args):  # every trial scores worse than the start
        calls.append(1)
        loss = real(*args)
        return loss if len(calls) == 1 else loss + 1.0

    monkeypatch.setattr(refine_module, "_loss", worse_after_the_start)
    found = refine(gmm, base, teacher.noise, teacher.targets(probe), timesteps=True, lambdas=False,
                   objective="final", max_iterations=3, progress=False)
    assert len(calls) > 2 and found.mse_refined == found.mse_start  # trials ran, none was kept
    assert found.scheduler.lambdas == [0.0] * 4
    assert found.scheduler.grid == to_grid_form(base).grid  # DDIM: its own levels; DEIS: None


def test_a_low_first_level_climbs_towards_the_schedules_top_and_no_further(gmm):
    """A grid whose first level is far below the schedule's top (pure noise treated as the state at sigma 2, where a
    fifth of the variance is signal) has its first level raised by the refinement, never above the largest training
    level: before, the first level could only come down, and refinements from a low first level stayed trapped
    below the better minima (scripts/learned_limit.py)."""
    from dode.core.distill import final_targets
    from dode.core.refine import objective_at_start

    top = float(training_sigmas(gmm.scheduler_config)[-1])
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps="fine")
    low = dode.DODEScheduler(make_scheduler("deis", gmm), [0.0] * 4, 4, grid=[2.0, 0.8, 0.3, 0.1])
    targets = final_targets(gmm, teacher)
    # the bound itself: u at its upper end puts the first level at the top (less 1e-9 in log)
    f, x0, bounds = objective_at_start(gmm, low, teacher.noise, targets, lambdas=False, timesteps=True)
    assert 2.0 * np.exp(bounds[0][1]) == pytest.approx(top, rel=1e-8) and bounds[0][1] < np.log(top / 2.0)
    assert f.unpack(np.array([bounds[0][1], *x0[1:]]))[1][0] <= top
    # Rprop (the default) moves by signs, its steps growing from 2^-5: it needs about 60 iterations to get where
    # L-BFGS gets in 14 evaluations (first level 5.2 against 5.1, the objective at 0.48 of its start either way)
    for optimizer, iterations in (("rprop", 60), ("lbfgs", 15)):
        found = refine(gmm, low, teacher.noise, targets, **REFINEMENTS["timesteps"]._asdict(),
                       max_iterations=iterations, optimizer=optimizer, progress=False)
        grid = np.array(found.scheduler.grid)
        assert 4.0 < grid[0] <= top and np.all(np.diff(grid) < 0)
        assert found.mse_refined < 0.5 * found.mse_start


def test_joint_refinement_from_zero_lambdas_has_a_gradient(gmm):
    """Lambdas at 0 (what the guard hands back where D-ODE does not help) still move: the gradient is not lost."""
    teacher = dode.Teacher(gmm, batch_size=12, seed=2, substeps=4)
    zero = dode.DODEScheduler(make_scheduler("deis", gmm), [0.0] * 4, 4)
    zero.set_timesteps(4)
    joint = refine(gmm, zero, teacher.noise, teacher.targets(zero), objective="all", max_iterations=5, progress=False)
    assert any(v != 0.0 for v in joint.scheduler.lambdas[1:])
    assert joint.mse_refined < joint.mse_start


@pytest.fixture(scope="module")
def auto_fit(gmm, validation):
    teacher = dode.Teacher(gmm, batch_size=24, seed=3, substeps=4)
    return distillation(gmm, "deis", 4, spacing="auto", teacher=teacher, validation=validation), teacher


def test_the_starts_are_autos_spacing_the_papers_and_the_best_other(gmm, auto_fit):
    auto, _ = auto_fit
    # what the user reads in fit_info, against what the starts are made of
    candidates = {c["spacing"]: c for c in auto.scheduler.fit_info["validation"]["candidates"]}
    starts = refinement_starts(gmm, auto, "joint+timesteps", 3)
    spacings = [start.spacing for start in starts]
    assert spacings[0] == auto.scheduler.fit_info["spacing"] and starts[0].scheduler.lambdas == auto.scheduler.lambdas
    assert len(set(spacings)) == 3 and dode.get_solver("deis").default_spacing in spacings
    for scheduler, spacing, score, _ in starts[1:]:
        c = candidates[spacing]
        factor = float(min(c["scores"], key=c["scores"].get))
        assert scheduler.lambdas == [factor * v for v in c["greedy_lambdas"]] and score == c["best"]
        assert scheduler.spacing == spacing
    bases = refinement_starts(gmm, auto, "timesteps", 3)
    ranked = sorted(candidates.values(), key=lambda c: c["base"])
    assert bases[0].spacing == ranked[0]["spacing"] and bases[0].score == ranked[0]["base"]
    assert all(s.scheduler.lambdas == [0.0] * s.scheduler.nfe for s in bases)
    assert dode.get_solver("deis").default_spacing in [s.spacing for s in bases]


class _Scores:
    """A validation whose score of a refined scheduler is fixed: the guard's decision is then known in advance."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, scheduler, *args, **kwargs):
        self.calls += 1
        return self.score


@pytest.mark.parametrize("mode", list(REFINEMENTS))
@pytest.mark.parametrize("better", [True, False])
def test_every_refinement_is_kept_only_where_it_validates_better_than_what_it_replaces(gmm, auto_fit, mode, better):
    auto, teacher = auto_fit
    starts = refinement_starts(gmm, auto, mode, 2)
    before = (auto.scheduler.fit_info["validation"]["guarded"] if REFINEMENTS[mode].lambdas
              else min(s.score for s in starts))
    check = _Scores(before * (0.5 if better else 2.0))
    result = refine_fit(gmm, auto, teacher, mode, judge=check, starts=2, max_iterations=4, probe_iterations=2,
                        progress=False)
    refined, info = result.scheduler, result.scheduler.fit_info["refine"]
    assert info == result.record and result.kept is better and result.score == info["validation"]
    assert info["validation_before"] == before and info["kept"] is better
    # two probes (joint+timesteps: and the learned grid alone's, and the joint lambdas' where kept), the best continued
    both = mode == "joint+timesteps"
    assert len(info["steps"]) == 3 + both * (1 + better) and info["steps"][-1]["continued"]
    assert ("grid_alone" in info) is both and ("joint" in info) is both
    if both:
        assert info["joint"]["kept"] is better
    if better:
        assert info["validation"] < before
    elif REFINEMENTS[mode].lambdas:  # the fit itself comes back
        assert refined.lambdas == auto.scheduler.lambdas and refined.grid == auto.scheduler.grid
    else:  # the best-validating base among the starts
        best = min(starts, key=lambda s: s.score)
        assert refined.lambdas == [0.0] * refined.nfe and refined.fit_info["spacing"] == best.spacing == result.spacing
        assert refined.grid is None


@pytest.mark.parametrize("mode", ["joint", "timesteps"])
def test_probes_and_checks_take_their_lengths_from_the_refine_constants(gmm, auto_fit, monkeypatch, mode):
    """Without ``probe_iterations``, each start is probed for ``PROBE_ITERATIONS`` (read when called); the best probe
    goes on, scored every ``CHECK_EVERY`` iterations: under a judge that finds nothing better it stops after
    ``patience`` checks, CHECK_EVERY x patience iterations."""
    auto, teacher = auto_fit
    monkeypatch.setattr(refine_module, "PROBE_ITERATIONS", 3)
    monkeypatch.setattr(refine_module, "CHECK_EVERY", 2)
    info = refine_fit(gmm, auto, teacher, mode, judge=_Scores(1.0), starts=2, max_iterations=50, patience=2,
                      progress=False).record
    probes, continued = info["steps"][:-1], info["steps"][-1]
    assert len(probes) == 2 and [p["iterations"] for p in probes] == [3, 3] and continued["continued"]
    assert continued["iterations"] == 2 * 2 and info["stopped_early"]
    assert info["checks"] == [1.0, 1.0] or info["checks"] == [1.0, 1.0, 1.0]  # and the best point, unless checked


class _Fixed(_Scores):
    """``judge`` (its seeds, reference and criterion for the records) scoring every refined scheduler ``score``."""

    def __init__(self, judge, score):
        super().__init__(score)
        self.judge = judge

    def __getattr__(self, name):
        return getattr(self.judge, name)


@pytest.mark.parametrize("patience", [2, 3, None])
def test_distill_s_refine_patience_is_the_continued_run_s(gmm, auto_fit, monkeypatch, patience):
    """``distill(refine_patience=...)`` reaches the refinement (through ``refined_scheduler``): under a judge that
    finds nothing better the best probe's run stops after ``patience`` checks, CHECK_EVERY x patience iterations,
    and with None it runs until the optimiser converges or the iterations run out."""
    auto, _ = auto_fit
    monkeypatch.setattr(refine_module, "PROBE_ITERATIONS", 3)
    monkeypatch.setattr(refine_module, "CHECK_EVERY", 2)
    found = dataclasses.replace(auto, judge=_Fixed(auto.judge, 1.0))
    info = refined_scheduler(gmm, found, "joint", iterations=40, starts=2, patience=patience,
                             progress=False).fit_info["refine"]
    continued = info["steps"][-1]
    assert continued["continued"] and info["stopped_early"] == (patience is not None)
    if patience is None:  # until Rprop settles or the iterations left run out, past any patience's stop
        assert 2 * 3 < continued["iterations"] <= 40 - 3
        assert continued["iterations"] == 40 - 3 or "converged" in info["optimizer_message"]
    else:
        assert continued["iterations"] == 2 * patience
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="refine_patience must be a positive integer or None"):
            dode.distill(gmm, "deis", [3, 4], refine="joint", refine_patience=bad)
        with pytest.raises(ValueError, match="refine_patience must be a positive integer or None"):
            dode.distill(gmm, "deis", 4, refine="joint", refine_patience=bad)


@pytest.mark.parametrize("budget, probe", [(9, 3), (30, 10), (2, 1)])
def test_a_probe_takes_at_most_a_third_of_the_iterations(gmm, auto_fit, budget, probe):
    """PROBE_ITERATIONS (30) is cut to a third of a smaller ``max_iterations`` (at least 1), so that the best probe
    has the rest: notebook 02's 30-iteration unet-digits refinements probe for 10, as before the longer probes."""
    auto, teacher = auto_fit
    info = refine_fit(gmm, auto, teacher, "joint", judge=_Scores(1.0), starts=2, max_iterations=budget, patience=None,
                      progress=False).record
    assert [p["iterations"] for p in info["steps"][:-1]] == [probe, probe] and info["steps"][-1]["continued"]


@pytest.mark.parametrize("mode", ["joint", "timesteps"])
def test_a_refinement_is_kept_only_where_it_validates_better_by_the_margin(gmm, auto_fit, mode):
    """The guard's margin (the distillation's, 2 % by default) holds for the refinements as for the lambdas: a
    refinement that validates better than what it replaces by less than it, or by nothing, comes back as that; by
    more, it is kept; with margin 0 any gain is kept and a tie is not."""
    auto, teacher = auto_fit
    assert auto.margin == dode.core.guard.MARGIN == 0.02
    starts = refinement_starts(gmm, auto, mode, 1)
    before = auto.scheduler.fit_info["validation"]["guarded"] if mode == "joint" else starts[0].score
    for found, factor, kept in ((auto, 1.0, False), (auto, 0.99, False), (auto, 0.97, True),
                                (dataclasses.replace(auto, margin=0.0), 1.0, False),
                                (dataclasses.replace(auto, margin=0.0), 0.999, True)):
        result = refine_fit(gmm, found, teacher, mode, judge=_Scores(before * factor), max_iterations=2,
                            progress=False)
        assert result.kept is kept and result.record["validation_before"] == before, (found.margin, factor)
        if not kept and mode == "joint":  # the fit itself comes back
            assert result.scheduler.lambdas == auto.scheduler.lambdas and result.scheduler.grid is None
        elif not kept:
            assert result.scheduler.lambdas == [0.0] * auto.nfe and result.scheduler.grid is None
        else:
            assert result.scheduler.lambdas != auto.scheduler.lambdas or result.scheduler.grid is not None


def test_distill_learns_ddims_grid_and_the_result_round_trips(gmm, validation, tmp_path):
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    learned = dode.distill(gmm, "ddim", 4, spacing="auto", teacher=teacher, validation=validation,
                           refine="joint+timesteps", refine_iterations=6, refine_starts=2, progress=False)
    info = learned.fit_info["refine"]
    assert info["validation"] <= info["validation_before"] or not info["kept"]
    # the learned grid alone, the joint lambdas where kept and two spacings, each probed for 2 iterations (a third of
    # the 6), and the best continued
    assert len(info["steps"]) == 3 + info["joint"]["kept"] + 1 and "grid_alone" in info
    assert [s["iterations"] for s in info["steps"][:-1]] == [2] * (len(info["steps"]) - 1)
    assert info["steps"][-1]["continued"]
    if info["kept"]:
        assert isinstance(learned.base_scheduler, dode.IPNDMDiscreteScheduler) and learned.grid is not None
    learned.save_pretrained(tmp_path)
    loaded = dode.DODEScheduler.from_pretrained(tmp_path)
    x, y = (dode.sample(gmm, d, 4, 6, seed=100, progress=False) for d in (learned, loaded))
    assert torch.equal(x, y)


class _FavoursZeroLambdas:
    """A judge that scores every scheduler with lambda 0 at ``low`` and any other at ``high``."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, scheduler, *args, **kwargs):
        return self.low if all(v == 0.0 for v in scheduler.lambdas) else self.high


def test_joint_and_timesteps_never_validates_worse_than_the_learned_grid_alone(gmm, auto_fit):
    """Where every refinement with lambdas validates worse than the learned grid alone (lambda 0, the special case),
    the grid alone is the result of "joint+timesteps"; its cost is counted in the result's."""
    auto, teacher = auto_fit
    judge = _FavoursZeroLambdas(0.5 * auto.score, 2.0 * auto.score)
    alone = refine_fit(gmm, auto, teacher, "timesteps", judge=judge, starts=2, max_iterations=4, probe_iterations=2,
                       progress=False)
    assert alone.kept and alone.scheduler.grid is not None and alone.score == 0.5 * auto.score
    result = refine_fit(gmm, auto, teacher, "joint+timesteps", judge=judge, starts=2, max_iterations=4,
                        probe_iterations=2, grid_alone=alone, progress=False)
    info = result.record
    assert result.kept and info["grid_alone_kept"] and result.score == alone.score
    assert result.scheduler.lambdas == [0.0] * result.scheduler.nfe and result.scheduler.grid == alone.scheduler.grid
    assert info["steps"][0]["spacing"] == alone.spacing and info["steps"][0]["start_validation"] == alone.score
    cost = result.scheduler.fit_info["cost"]
    assert info["grid_alone"]["sample_evaluations"] == alone.record["sample_evaluations"] > 0
    assert not info["joint"]["kept"]  # the judge scores every joint fit worse: not a start, not a floor
    assert result.seconds >= alone.seconds and cost["sample_evaluations"]["refine"] == (
        info["sample_evaluations"] + alone.record["sample_evaluations"] + info["joint"]["sample_evaluations"])
    # without a grid alone given, refine_fit learns one first: the same first start
    again = refine_fit(gmm, auto, teacher, "joint+timesteps", judge=judge, starts=2, max_iterations=4,
                       probe_iterations=2, progress=False)
    assert again.scheduler.grid == result.scheduler.grid and again.record["grid_alone_kept"]


class _FavoursLearnedGrids:
    """A judge that scores a scheduler with every lambda 0 at ``low``, one with lambdas on a learned grid at
    ``factor`` x ``low``, any other at ``high``."""

    def __init__(self, low, factor, high):
        self.low, self.factor, self.high = low, factor, high

    def __call__(self, scheduler, *args, **kwargs):
        if all(v == 0.0 for v in scheduler.lambdas):
            return self.low
        return self.factor * self.low if scheduler.grid is not None else self.high


def test_joint_and_timesteps_keeps_a_special_case_unless_a_refinement_beats_it_by_the_margin(gmm, auto_fit):
    """"joint+timesteps" whose own refinement validates 1 % better than the learned grid alone (its special case,
    itself well below the greedy fit) returns the grid alone; 3 % better, its own refinement."""
    auto, teacher = auto_fit
    alone = refine_fit(gmm, auto, teacher, "timesteps", judge=_Scores(0.5 * auto.score), starts=1, max_iterations=2,
                       progress=False)
    assert alone.kept
    for factor, own in ((0.99, False), (0.97, True)):
        judge = _FavoursLearnedGrids(alone.score, factor, 2.0 * auto.score)
        result = refine_fit(gmm, auto, teacher, "joint+timesteps", judge=judge, max_iterations=2, grid_alone=alone,
                            progress=False)
        info = result.record
        assert result.kept and not info["joint"]["kept"] and info.get("grid_alone_kept", False) is not own
        if own:
            assert result.score == factor * alone.score and result.scheduler.lambdas != [0.0] * auto.nfe
            assert result.scheduler.grid is not None
        else:
            assert result.score == alone.score and result.scheduler.grid == alone.scheduler.grid
            assert result.scheduler.lambdas == [0.0] * auto.nfe


class _FavoursOne:
    """A judge that scores schedulers with ``lambdas`` on the schedule's own grid at ``low`` and any other at ``high``."""

    def __init__(self, lambdas, low, high):
        self.lambdas, self.low, self.high = list(lambdas), low, high

    def __call__(self, scheduler, *args, **kwargs):
        return self.low if list(scheduler.lambdas) == self.lambdas and scheduler.grid is None else self.high


def test_joint_and_timesteps_never_validates_worse_than_the_joint_lambdas(gmm, auto_fit):
    """Where every refinement of lambdas and grid validates worse than the joint lambdas (the grid held, the other
    special case), the joint lambdas are the result of "joint+timesteps", and they were one of its starts."""
    auto, teacher = auto_fit
    joint = refine_fit(gmm, auto, teacher, "joint", judge=_Scores(0.5 * auto.score), starts=1, max_iterations=4,
                       progress=False)
    assert joint.kept and joint.scheduler.lambdas != auto.scheduler.lambdas
    alone = refine_fit(gmm, auto, teacher, "timesteps", judge=_Scores(0.9 * auto.score), starts=1, max_iterations=4,
                       progress=False)
    judge = _FavoursOne(joint.scheduler.lambdas, 0.5 * auto.score, 2.0 * auto.score)
    result = refine_fit(gmm, auto, teacher, "joint+timesteps", judge=judge, starts=2, max_iterations=4,
                        probe_iterations=2, grid_alone=alone, joint=joint, progress=False)
    info = result.record
    assert result.kept and info["joint_kept"] and "grid_alone_kept" not in info and result.score == joint.score
    assert result.scheduler.lambdas == joint.scheduler.lambdas and result.scheduler.grid is None
    assert [(s["spacing"], s["start_validation"]) for s in info["steps"][:2]] == [
        (alone.spacing, alone.score), (joint.spacing, joint.score)]
    assert info["joint"]["sample_evaluations"] == joint.record["sample_evaluations"] > 0


def test_a_refinement_without_a_spacing_starts_from_auto(gmm, validation):
    """The default should be the best a user can get: ``refine=`` with no spacing fits every spacing (auto) and
    refines from several of them; the paper's plain fit is ``refine=None``."""
    teacher = dode.Teacher(gmm, batch_size=8, seed=5, substeps=2)
    refined = dode.distill(gmm, "deis", 4, teacher=teacher, validation=validation, refine="joint",
                           refine_iterations=2, refine_starts=2, progress=False)
    info = refined.fit_info
    assert info["spacing_requested"] == "auto" and len(info["validation"]["candidates"]) == len(
        dode.get_solver("deis").spacings)
    assert len({step["spacing"] for step in info["refine"]["steps"]}) == 2
    plain = dode.distill(gmm, "deis", 4, teacher=teacher, validation=validation, progress=False)
    assert plain.fit_info["spacing_requested"] == dode.get_solver("deis").default_spacing
