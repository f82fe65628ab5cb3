"""``spacing="auto"`` shares teacher runs between its spacings (``Teacher.sharing``, ``Teacher.envelope``): grids
that start at the same noise level are taught by one run, at least as fine as each one's own, and auto costs at most
(k + 1)x the paper's fit where the paper's spacing costs what the others do (issue 24; docs/grids-and-guard.md)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dode
from dode.core.distill import VALIDATION_SEED, distillation, fit_candidates, shared_grids, spacing_grids
from dode.core.reference import reference_solution
from dode.core.sampling import count_evaluations
from dode.core.schedule import sigma_to_timestep
from dode.core.solvers import SOLVERS, get_solver
from dode.experiments.checks import possible

NFES = (3, 5, 10)


def grids_of(model, solver, nfe):
    spacings = list(get_solver(solver).spacings)
    return dict(zip(spacings, spacing_grids(model, solver, nfe)))


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_grids_envelope_is_its_own_teacher_grid(gmm, solver):
    """A grid alone: the envelope is substep_levels (the paper teacher's grid, a separate implementation), exactly."""
    teacher = dode.Teacher(gmm, batch_size=2, substeps=7)
    for nfe in (n for n in NFES if possible(solver, n)):
        for spacing, times in grids_of(gmm, solver, nfe).items():
            own = teacher.substep_levels(times.states)
            assert np.array_equal(teacher.envelope([times.states]), own), (solver, nfe, spacing)


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_pp_2m", "heun"])
def test_an_envelope_holds_every_grid_and_is_as_fine_as_each(gmm, solver):
    """Every level of every grid that shares the start is on the envelope, and each envelope step (in training
    timesteps) is no longer than the step of each grid's own teacher (substep_levels) over the same stretch."""
    teacher = dode.Teacher(gmm, batch_size=2)
    log_sigmas = np.log(dode.core.schedule.training_sigmas(gmm.scheduler_config))

    def t(levels):
        levels = np.asarray(levels, dtype=float)
        out = np.zeros_like(levels)
        out[levels > 0] = sigma_to_timestep(levels[levels > 0], log_sigmas)
        return out

    by_start = {}
    for times in grids_of(gmm, solver, 5).values():
        by_start.setdefault(round(times.start, 4), []).append(times)
    shared = [g for g in by_start.values() if len(g) > 1]
    assert shared, "no two spacings share a start"
    for group in shared:
        envelope = teacher.envelope([g.states for g in group])
        assert np.all(np.diff(envelope) < 0)
        for times in group:
            own = teacher.substep_levels(times.states)
            for level in times.states[1:]:
                assert np.min(np.abs(envelope - level)) <= 1e-9 * max(level, 1e-12)
            # each envelope step is no longer than the grid's own teacher step where it begins
            high, low = envelope[:-1], envelope[1:]
            inside = low >= own[-1] * (1 - 1e-9)
            for h, lo in zip(high[inside], low[inside]):
                j = np.nonzero(own >= h * (1 - 1e-6))[0][-1]  # (starts agree to 6 digits)
                if lo == 0.0 and own[j + 1] == 0.0:
                    continue  # the jump to clean
                assert t([h])[0] - t([lo])[0] <= t([own[j]])[0] - t([own[j + 1]])[0] + 1e-6


def test_the_shared_run_is_the_euler_run_on_the_envelope_and_sharing_ends_with_the_block(gmm):
    """Inside the block, each grid's targets are the states of one Euler run on the envelope (an independent run of
    diffusers' Euler scheduler on that grid), and the run is made once; after the block each grid again gets
    exactly what a fresh teacher gives it."""
    grids = grids_of(gmm, "ddim", 5)
    trailing, linspace = grids["trailing"], grids["linspace"]
    teacher = dode.Teacher(gmm, batch_size=6, seed=4)
    envelope = teacher.envelope([trailing.states, linspace.states])
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(gmm.scheduler_config)
    euler.set_timesteps(sigmas=list(envelope))
    x = teacher.noise * trailing.initial_scale * float(np.sqrt(1 + envelope[0] ** 2))  # the VE state
    states = {}
    with torch.no_grad():
        for k, t in enumerate(euler.timesteps):
            out = gmm(euler.scale_model_input(x, t), t)
            x = euler.step(out, t, x).prev_sample
            states[k + 1] = x / float(np.sqrt(1 + envelope[k + 1] ** 2))
    with teacher.sharing([trailing, linspace]):
        before = teacher.nfe
        for times in (trailing, linspace):
            targets = teacher.targets(times)
            index = [int(np.argmin(np.abs(envelope - s))) for s in times.after]
            expected = torch.stack([states[i] for i in index])
            assert torch.allclose(targets, expected, atol=1e-5, rtol=1e-5)
        assert teacher.nfe - before == len(envelope) - 1  # one run for both
    fresh = dode.Teacher(gmm, batch_size=6, seed=4)
    assert torch.equal(teacher.targets(trailing), fresh.targets(trailing))


def test_shared_targets_are_no_further_from_the_exact_ode_than_each_grids_own(gmm):
    """On gmm-digits the ODE is known: each spacing's shared targets are within 2 % of (or closer than) its own
    teacher's distance to the exact states, for the spacings DDIM shares a start with."""
    grids = grids_of(gmm, "dpm_solver_pp_2m", 5)
    teacher = dode.Teacher(gmm, batch_size=16, seed=2)
    fine = dode.Teacher(gmm, batch_size=16, seed=2, substeps="fine")
    shared = [g for name, g in grids.items() if name != "leading"]
    with teacher.sharing(shared):
        together = [teacher.targets(g) for g in shared]
    for times, target in zip(shared, together):
        exact = fine.targets(times)
        own = dode.Teacher(gmm, batch_size=16, seed=2).targets(times)
        assert dode.rmse(target, exact) <= 1.02 * dode.rmse(own, exact) + 1e-6


def test_auto_fits_pay_one_teacher_run_per_start(gmm, wrap):
    """The model calls of auto's fits: the paper spacing's own teacher run, one run per start for the others (a grid
    alone: its own; grids that share a start: their envelope), and one student run per spacing, counted at the
    model."""
    model = wrap(gmm)
    solver = get_solver("dpm_solver_pp_2m")
    teacher = dode.Teacher(model, batch_size=10)
    with count_evaluations(model) as meter:
        candidates, shared, apart = fit_candidates(model, solver, 5, list(solver.spacings), teacher)
    assert solver.default_spacing not in shared and len(shared) == len(candidates) - 1
    assert list(apart) == [solver.default_spacing]
    by_start = {}
    for times in shared.values():
        by_start.setdefault(round(times.start, 4), []).append(times)
    paper = grids_of(gmm, solver.name, 5)[solver.default_spacing]
    runs = (len(teacher.substep_levels(paper.states)) - 1
            + sum(len(teacher.envelope([g.states for g in group])) - 1 for group in by_start.values()))
    assert meter.sample_evaluations == 10 * (runs + 5 * len(candidates))
    assert sum(c.fit.teacher_nfe for c in candidates) == runs
    # docs/grids-and-guard.md: five spacings share an 89-step run where their own would take 41-50 steps each
    top = max(by_start.values(), key=len)
    own = [len(teacher.substep_levels(g.states)) - 1 for g in top]
    assert (len(top), len(teacher.envelope([g.states for g in top])) - 1) == (5, 89)
    assert (min(own), max(own), sum(own)) == (41, 50, 223)


@pytest.mark.parametrize("solver", SOLVERS)
def test_auto_fits_the_paper_spacing_as_the_named_call(gmm, solver):
    """The paper's spacing keeps its own teacher in auto: its fit is the named call's, lambda for lambda."""
    solver = get_solver(solver)
    candidates, _, _ = fit_candidates(gmm, solver, 5, list(solver.spacings), dode.Teacher(gmm, batch_size=20))
    named = dode.distill(gmm, solver.name, 5, batch_size=20, guard=False, progress=False)
    assert candidates[list(solver.spacings).index(solver.default_spacing)].fit.lambdas == named.lambdas


def heun3_twins(gmm):
    """Heun at NFE 3's spacings, grouped by grid (states equal to 1e-9, an independent grouping): three grids."""
    groups = []
    for name, times in grids_of(gmm, "heun", 3).items():
        for group in groups:
            first = group[0][1]
            if len(first.states) == len(times.states) and np.allclose(first.states, times.states, rtol=1e-9, atol=0):
                group.append((name, times))
                break
        else:
            groups.append([(name, times)])
    return groups


def test_identical_grids_read_one_teacher_run_and_keep_their_own_fits(gmm, wrap):
    """Heun at NFE 3: its twelve spacings give three grids (karras's, the paper's, is also linspace's, exponential's
    and beta's). Auto's fits pay one teacher run per grid, each that grid's own C-split run, and every spacing's
    fit is its named call's on a fresh teacher, lambda for lambda (so the paper's and its twins' are the paper's)."""
    solver = get_solver("heun")
    groups = heun3_twins(gmm)
    assert len(groups) == 3 and len(solver.spacings) == 12
    paper = next(g for g in groups if solver.default_spacing in dict(g))
    assert {name for name, _ in paper} == {"karras", "linspace", "exponential", "beta"}
    assert not set(dict(paper)) & set(shared_grids(gmm, "heun", 3))  # kept apart, on the paper's teacher
    model = wrap(gmm)
    teacher = dode.Teacher(model, batch_size=20)
    candidates, _, apart = fit_candidates(model, solver, 3, list(solver.spacings), teacher)
    assert set(apart) == set(dict(paper))
    runs = sum(len(teacher.substep_levels(group[0][1].states)) - 1 for group in groups)
    assert teacher.nfe == runs  # three runs, where each spacing's own teacher would make twelve
    for c in candidates:
        named = dode.distill(gmm, "heun", 3, spacing=c.label, batch_size=20, guard=False, progress=False)
        assert c.fit.lambdas == named.lambdas, c.label


def test_fit_info_names_the_twins_that_read_the_same_run(gmm, validation):
    """Heun at NFE 3: each spacing's fit shared its run with exactly its twins (the other spacings on its grid)."""
    found = distillation(gmm, "heun", 3, spacing="auto", validation=validation, progress=False)
    labels = [c.label for c in found.candidates]
    twins = {name: [other for other, _ in group if other != name] for group in heun3_twins(gmm) for name, _ in group}
    for chosen in range(len(labels)):
        found.chosen = chosen
        assert sorted(found.record()["teacher_shared_with"]) == sorted(twins[labels[chosen]]), labels[chosen]


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_2", "unipc"])
def test_auto_costs_at_most_k_plus_one_fits(gmm, solver, validation):
    """The cost target of spacing="auto" with k spacings, the reference shared: at most (k + 1)x the paper's fit."""
    reference_solution(gmm, VALIDATION_SEED, 100, progress=False)
    with count_evaluations(gmm) as plain:
        dode.distill(gmm, solver, 5, guard=False, progress=False)
    with count_evaluations(gmm) as auto:
        found = distillation(gmm, solver, 5, spacing="auto", validation=validation, progress=False)
    assert auto.sample_evaluations == found.cost()["sample_evaluations"]["total"]
    assert auto.sample_evaluations <= (len(found.candidates) + 1) * plain.sample_evaluations


def test_fit_info_names_the_spacings_that_shared_the_teacher(gmm, validation):
    """DDIM: trailing and linspace start at the top and share a run; leading starts lower and has its own."""
    found = distillation(gmm, "ddim", 5, spacing="auto", validation=validation, progress=False)
    labels = [c.label for c in found.candidates]
    for chosen in range(len(labels)):
        found.chosen = chosen
        expected = {"leading": [], "trailing": ["linspace"], "linspace": ["trailing"]}[labels[chosen]]
        assert found.record()["teacher_shared_with"] == expected
    named = dode.distill(gmm, "ddim", 5, validation=validation, progress=False)
    assert named.fit_info["teacher_shared_with"] == []


def test_a_joint_refinement_after_auto_reads_the_shared_targets(gmm, validation):
    """refine="joint" from auto's three starts (each on a candidate's grid) runs no teacher of its own: the teacher
    spends exactly one run per start of the spacings (leading alone; trailing and linspace on their envelope)."""
    teacher = dode.Teacher(gmm, batch_size=16, substeps=4)
    grids = grids_of(gmm, "ddim", 4)
    runs = (len(teacher.substep_levels(grids["leading"].states)) - 1
            + len(teacher.envelope([grids["trailing"].states, grids["linspace"].states])) - 1)
    fitted = dode.distill(gmm, "ddim", 4, spacing="auto", teacher=teacher, validation=validation, refine="joint",
                          refine_iterations=3, refine_starts=3, progress=False)
    assert len(fitted.fit_info["refine"]["steps"]) >= 3  # three starts were refined
    assert teacher.nfe == runs


def test_a_shared_run_serves_only_its_own_exact_start_and_scale(gmm):
    """Two calls whose grids share an envelope but start from states scaled 2e-5 apart (Heun's scale against 1) get
    a run each: the second reads what a fresh teacher gives it, not the first call's run, whichever came first."""
    grid = spacing_grids(gmm, "ddim", 5, ["trailing"])[0]
    scaled = dataclasses.replace(grid, init_noise_sigma=grid.init_noise_sigma * (1 - 2e-5))
    assert dode.Teacher._grid_key(grid) == dode.Teacher._grid_key(scaled)  # one envelope, up to rounding

    def targets(teacher, times):
        with teacher.sharing([times]):
            return teacher.targets(times)

    shared = dode.Teacher(gmm, batch_size=4, seed=3, substeps=5)
    first, second = targets(shared, grid), targets(shared, scaled)
    assert torch.equal(second, targets(dode.Teacher(gmm, batch_size=4, seed=3, substeps=5), scaled))
    assert not torch.equal(first, second)
    assert len(shared._shared_runs) == 2
