"""Joint refinement and learned time grids (dode/refine.py, solvers.set_grid), against independent computations."""
import copy

import numpy as np
import pytest
import torch

import dode
from dode.models.registry import training_sigmas
from dode.core.refine import (_adam, _loss, _rprop, _student_states, grid_from_params, optimise as refine,
                              params_from_grid)
from dode.core.sampling import integrate, seeded_noise
from dode.core.timegrid import TimeGrid
from dode.core.scheduler import make_scheduler
from dode.core.solvers import GRID_SOLVERS, set_grid
from dode.core.ode import solve_ode
from dode.core.reference import reference_solution

NOISE_SEED, BATCH = 7, 12


def _with_grid(scheduler, grid):
    """The scheduler with ``set_grid(grid)`` after each of its ``set_timesteps`` (what a DODEScheduler does)."""
    original = scheduler.set_timesteps

    def set_timesteps(steps, **kwargs):
        original(steps, **kwargs)
        set_grid(scheduler, grid)

    scheduler.set_timesteps = set_timesteps
    return scheduler


def test_grid_parameters_always_give_a_strictly_descending_grid_with_fixed_ends():
    rng = np.random.default_rng(0)
    for _ in range(200):
        z = rng.normal(scale=4.0, size=rng.integers(1, 8))
        grid = grid_from_params(z, 157.4, 0.01)
        assert grid[0] == pytest.approx(157.4, rel=1e-12)
        assert len(grid) == len(z) + 1 and np.all(np.diff(grid) < 0) and grid[-1] > 0.01
    grid = np.array([157.4, 20.0, 3.0, 0.5])
    np.testing.assert_allclose(grid_from_params(params_from_grid(grid, 0.01), 157.4, 0.01), grid, rtol=1e-12)


# DPM-Solver's paper spacings (exponential, logSNR-uniform) put levels between training timesteps and call the model
# at the rounded (DPM-Solver++) or truncated (DPM-Solver) timestep; set_grid calls it at the level's own fractional
# timestep, a difference of a few 1e-3 at the end. Their linspace levels sit on integer timesteps.
INTEGER_LEVELS = {"dpm_solver_2": "linspace", "dpm_solver_pp_2m": "linspace"}


# DDIM takes grids through its grid form (tests/test_learned_grids.py), not set_grid on DDIMScheduler
@pytest.mark.parametrize("solver", [s for s in GRID_SOLVERS if dode.get_solver(s).custom_grid])
def test_setting_the_default_grid_changes_nothing(gmm, solver):
    steps = dode.get_solver(solver).steps_for(5)
    spacing = INTEGER_LEVELS.get(solver)
    base = make_scheduler(solver, gmm, spacing)
    base.set_timesteps(steps)
    noise = seeded_noise(gmm.sample_shape, BATCH, NOISE_SEED)
    expected, _ = integrate(gmm, base, steps, noise)
    moved = _with_grid(make_scheduler(solver, gmm, spacing), TimeGrid.of(base).steps)
    got, _ = integrate(gmm, moved, steps, noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(TimeGrid.of(moved).after, TimeGrid.of(base).after, rtol=1e-6, atol=0)
    assert TimeGrid.of(moved).start == pytest.approx(TimeGrid.of(base).start, rel=1e-6)


@pytest.mark.parametrize("solver", ["dpm_solver_2", "dpm_solver_pp_2m", "heun"])
def test_a_custom_grid_equals_diffusers_own_custom_timesteps(gmm, solver):
    """diffusers takes integer custom timesteps for these schedulers: the same levels through set_grid agree."""
    timesteps = [999, 700, 420, 150, 40]
    noise = seeded_noise(gmm.sample_shape, BATCH, NOISE_SEED)
    theirs = make_scheduler(solver, gmm, "linspace")  # diffusers refuses custom timesteps with Karras/exponential/lu
    theirs.set_timesteps(timesteps=timesteps)
    steps = len(theirs.timesteps) if solver != "heun" else len(timesteps)
    expected = _run_custom(gmm, theirs, timesteps, noise)
    grid = training_sigmas(gmm.scheduler_config)[timesteps]
    ours = _with_grid(make_scheduler(solver, gmm, "linspace"), grid)
    got, _ = integrate(gmm, ours, steps if solver != "heun" else len(timesteps), noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(TimeGrid.of(ours).steps, grid, rtol=1e-6)


def _run_custom(model, scheduler, timesteps, noise):
    """diffusers' own loop over a scheduler set with custom timesteps."""
    scheduler.set_timesteps(timesteps=timesteps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver", ["unipc", "heun"])
def test_teacher_targets_follow_a_custom_grid_onto_the_exact_ode(gaussian, solver):
    model = gaussian.model
    steps = dode.get_solver(solver).steps_for(5)
    scheduler = make_scheduler(solver, model)
    scheduler.set_timesteps(steps)
    default = TimeGrid.of(scheduler).steps
    custom = np.concatenate([[default[0]], np.geomspace(default[0] / 3, 0.05, len(default) - 1)])
    scheduler = _with_grid(make_scheduler(solver, model), custom)
    scheduler.set_timesteps(steps)
    grid = TimeGrid.of(scheduler)
    np.testing.assert_allclose(grid.steps, custom, rtol=1e-6)
    teacher = dode.Teacher(model, batch_size=8, seed=3, substeps="fine")
    targets = teacher.targets(scheduler)
    start = float(scheduler.sigmas[0])  # written out: the noise level of the initial state, its DDPM scale
    scale = float(scheduler.init_noise_sigma) / (np.sqrt(1 + start**2) if solver == "heun" else 1)
    assert grid.start == pytest.approx(start, rel=1e-12) and grid.initial_scale == pytest.approx(scale, rel=1e-12)

    def exact(sigma):
        return gaussian.ddpm_state(teacher.noise, scale, start, sigma)

    default_levels = np.append(default[1:], 0.0)
    far_from_default = 0
    for k, sigma in enumerate(grid.after):
        assert float((targets[k].double() - exact(sigma)).abs().max()) < 0.02, (k, sigma)
        nearest_default = default_levels[np.argmin(np.abs(np.log((default_levels + 1e-9) / (sigma + 1e-9))))]
        far_from_default += float((exact(nearest_default) - exact(sigma)).abs().max()) > 0.1
    assert far_from_default >= 1


def test_set_grid_rejects_integer_timestep_schedulers_and_bad_grids(gmm):
    for solver in ("ddim", "pndm"):
        scheduler = make_scheduler(solver, gmm)
        scheduler.set_timesteps(4)
        with pytest.raises(ValueError, match="cannot take a custom time grid.*" + GRID_SOLVERS[-1]):
            set_grid(scheduler, [100.0, 10.0, 1.0, 0.1])
    scheduler = make_scheduler("unipc", gmm)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="needs 4 noise levels"):
        set_grid(scheduler, [100.0, 1.0])
    with pytest.raises(ValueError, match="strictly descending"):
        set_grid(scheduler, [100.0, 10.0, 20.0, 1.0])


def _fitting_loss(model, dode_scheduler, teacher, objective):
    """The refinement objective recomputed through the public sampling path (dode.sample with a trajectory): "all"
    against the teacher's states, "final" against the reference solver's samples of the same seeds."""
    _, trajectory = dode.sample(model, dode_scheduler, dode_scheduler.nfe, teacher.batch_size, seed=teacher.seed,
                                return_trajectory=True, progress=False)
    probe = copy.deepcopy(dode_scheduler)
    probe.set_timesteps(probe.num_inference_steps)
    targets = teacher.targets(probe) if objective == "all" else [
        dode.sample(model, dode.REFERENCE.solver, dode.REFERENCE.steps, teacher.batch_size, seed=teacher.seed,
                    spacing=dode.REFERENCE.spacing, progress=False)]
    states = trajectory.states[1:]
    pairs = [(states[-1], targets[-1])] if objective == "final" else list(zip(states, targets))
    return float(np.mean([torch.mean((x.double() - y.double()) ** 2) for x, y in pairs]))


@pytest.mark.parametrize("solver", ["ddim", "pndm", "dpm_solver_pp_2m"])
def test_joint_refinement_never_ends_worse_than_its_greedy_start(gmm, solver):
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    greedy = dode.distill(gmm, solver, 4, teacher=teacher, guard=False)
    joint = dode.distill(gmm, solver, 4, teacher=teacher, refine="joint", refine_iterations=8, progress=False,
                         guard=False)
    before, after = (_fitting_loss(gmm, d, teacher, "all") for d in (greedy, joint))
    assert after <= before
    info = joint.fit_info["refine"]
    assert info["mse_start"] == pytest.approx(before, rel=1e-4)
    assert info["mse_refined"] == pytest.approx(after, rel=1e-4)
    assert joint.lambdas[0] == 0.0 and joint.grid is None


def test_a_refinement_fits_on_refine_batch_seeds_unless_told_and_the_papers_fit_on_100(gmm):
    """distill's fitting batch: REFINE_BATCH (400) seeds with refine= and no batch_size, the same fit as asking for
    them; the paper's fit keeps 100; a given batch_size or Teacher wins."""
    from dode.core.distill import REFINE_BATCH

    common = dict(spacing="leading", teacher=2, guard=False, progress=False)
    default = dode.distill(gmm, "ddim", 3, refine="joint", refine_iterations=3, **common)
    asked = dode.distill(gmm, "ddim", 3, batch_size=REFINE_BATCH, refine="joint", refine_iterations=3, **common)
    small = dode.distill(gmm, "ddim", 3, batch_size=100, refine="joint", refine_iterations=3, **common)
    assert REFINE_BATCH == 400 and default.fit_info["batch_size"] == REFINE_BATCH
    assert default.lambdas == asked.lambdas and small.fit_info["batch_size"] == 100
    assert default.lambdas != small.lambdas  # the batch is what the lambdas were fitted on
    assert dode.distill(gmm, "ddim", 3, **common).fit_info["batch_size"] == 100
    teacher = dode.Teacher(gmm, batch_size=20, seed=0, substeps=2)
    given = dode.distill(gmm, "ddim", 3, spacing="leading", teacher=teacher, guard=False, refine="joint",
                         refine_iterations=3, progress=False)
    assert given.fit_info["batch_size"] == 20


def test_the_lambda_gradient_through_the_trajectory_matches_finite_differences(gmm):
    teacher = dode.Teacher(gmm, batch_size=10, seed=1, substeps=3)
    student = dode.distill(gmm, "deis", 4, teacher=teacher, guard=False)
    student.set_timesteps(student.num_inference_steps)
    targets = teacher.targets(student)
    lam = torch.tensor(student.lambdas[1:], dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        loss = _loss(_student_states(gmm, student, teacher.noise, [0.0, *lam], None), targets, "all")
        loss.backward()
    for i in range(len(lam)):  # central differences: steps of 1e-2 (float32 states: 1e-3 leaves ~1e-6 of noise)
        moved = [list(student.lambdas), list(student.lambdas)]
        moved[0][i + 1] += 1e-2
        moved[1][i + 1] -= 1e-2
        up, down = (float(_loss(_student_states(gmm, student, teacher.noise, m, None), targets, "all")) for m in moved)
        assert float(lam.grad[i]) == pytest.approx((up - down) / 2e-2, rel=2e-2, abs=1e-6)
    assert max(abs(float(g)) for g in lam.grad) > 1e-4


def test_a_learned_grid_is_monotone_keeps_its_ends_improves_the_fit_and_round_trips(gmm, tmp_path):
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    greedy = dode.distill(gmm, "dpm_solver_pp_2m", 4, teacher=teacher, guard=False)
    learned = dode.distill(gmm, "dpm_solver_pp_2m", 4, teacher=teacher, refine="joint+timesteps",
                           refine_iterations=6, progress=False, guard=False)
    probe = copy.deepcopy(greedy)
    probe.set_timesteps(probe.num_inference_steps)
    default = TimeGrid.of(probe).steps
    grid = np.array(learned.grid)
    assert grid[0] <= training_sigmas(gmm.scheduler_config)[-1]  # the first level never above the schedule's top
    assert np.all(np.diff(grid) < 0) and grid[-1] > training_sigmas(gmm.scheduler_config)[0]
    assert not np.allclose(grid, default)
    before, after = (_fitting_loss(gmm, d, teacher, "final") for d in (greedy, learned))
    assert after < before  # against the reference solution of the fitting seeds (final_targets)
    info = learned.fit_info["refine"]
    assert info["mse_start"] == pytest.approx(before, rel=1e-4)
    assert info["mse_refined"] == pytest.approx(after, rel=1e-4)
    learned.save_pretrained(tmp_path)
    loaded = dode.DODEScheduler.from_pretrained(tmp_path)
    assert loaded.grid == learned.grid and loaded.lambdas == learned.lambdas
    x, y = (dode.sample(gmm, d, 4, 6, seed=100, progress=False) for d in (learned, loaded))
    assert torch.equal(x, y)
    assert not torch.equal(x, dode.sample(gmm, greedy, 4, 6, seed=100, progress=False))


def test_refinement_errors_are_clear(gmm, tmp_path):
    with pytest.raises(ValueError, match="cannot learn a time grid for pndm.*refine='joint'.*unipc"):
        dode.distill(gmm, "pndm", 4, batch_size=4, refine="joint+timesteps")
    with pytest.raises(ValueError, match="refine must be one of"):
        dode.distill(gmm, "ddim", 4, batch_size=4, refine="jointly")
    teacher = dode.Teacher(gmm, batch_size=4, seed=0, substeps=2)
    greedy = dode.distill(gmm, "pndm", 4, teacher=teacher, guard=False)
    with pytest.raises(ValueError, match="custom time grid"):
        refine(gmm, greedy, teacher.noise, teacher.targets(greedy), timesteps=True, objective="final")
    with pytest.raises(ValueError, match="objective"):
        refine(gmm, greedy, teacher.noise, teacher.targets(greedy), objective="all states")
    with pytest.raises(ValueError, match="refine_optimizer must be one of 'rprop', 'lbfgs', 'adam', got 'sgd'"):
        dode.distill(gmm, "ddim", [3, 4], batch_size=4, refine="joint", refine_optimizer="sgd")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        refine(gmm, greedy, teacher.noise, teacher.targets(greedy), objective="all", optimizer="newton")
    unipc = dode.distill(gmm, "unipc", 4, teacher=teacher, guard=False)
    unipc.grid = [100.0, 10.0, 20.0, 1.0]  # not descending
    unipc.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="grid this scheduler cannot use.*strictly descending"):
        dode.DODEScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("solver, kept", [("deis", True), ("ddim", False)])
def test_with_the_guard_a_refinement_is_kept_only_where_it_validates_better(gmm, validation, solver, kept):
    """Measured on these seeds: joint DEIS validates better than its greedy start by more than the guard's 2 %
    margin (pixel FD 0.996 against 1.028), joint DDIM worse (0.470 against 0.441), so the greedy fit comes back. The
    scores recomputed through dode.sample."""
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    paper = dode.get_solver(solver).default_spacing  # a refinement on one spacing (without one it starts from auto)
    joint = dode.distill(gmm, solver, 4, spacing=paper, teacher=teacher, refine="joint", refine_iterations=20,
                         validation=validation, criterion="fd", progress=False)
    greedy = dode.distill(gmm, solver, 4, spacing=paper, teacher=teacher, validation=validation, criterion="fd")
    info = joint.fit_info["refine"]
    assert info["kept"] is kept and info["validation_before"] == greedy.fit_info["validation"]["guarded"]

    def fd(scheduler):
        x = dode.sample(gmm, scheduler, 4, validation.batch_size, seed=validation.seed, progress=False)
        reference = reference_solution(gmm, validation.seed, validation.batch_size).samples
        return dode.frechet_distance(x, reference, features="pixel")

    assert fd(greedy) == pytest.approx(info["validation_before"], rel=1e-7)
    if kept:
        assert joint.lambdas != greedy.lambdas and fd(joint) == pytest.approx(info["validation"], rel=1e-7)
        assert info["validation"] < (1 - dode.core.guard.MARGIN) * info["validation_before"]
    else:
        assert joint.lambdas == greedy.lambdas and joint.grid is None
        assert info["validation"] > info["validation_before"] and info["mse_refined"] <= info["mse_start"]


@pytest.mark.parametrize("timesteps", [False, True])
def test_a_refinement_backs_off_where_the_student_blows_up(gmm, monkeypatch, timesteps):
    """Far out, a line-search trial can make the student's states overflow: NaN through autograd, a FloatingPointError
    from the finite-difference runs. Such a point counts as an infinite loss (L-BFGS backs off from it); the refinement
    ends normally with the best finite point, no worse than its start. Blow-ups are simulated past |lambda| = bound."""
    import dode.core.refine as refine_module

    teacher = dode.Teacher(gmm, batch_size=12, seed=5, substeps=4)
    greedy = dode.distill(gmm, "deis", 4, teacher=teacher, guard=False)
    bound = max(abs(v) for v in greedy.lambdas) * 1.01
    real = refine_module._student_states
    trials = []

    def blows_up_far_out(model, student, noise, lambdas, grid):
        states = real(model, student, noise, lambdas, grid)
        far = max(abs(float(torch.as_tensor(v).detach())) for v in lambdas) > bound
        trials.append(far)
        if far and torch.is_grad_enabled():
            return [s * float("nan") for s in states]
        if far:
            raise FloatingPointError("the model output contains NaN or inf")
        return states

    monkeypatch.setattr(refine_module, "_student_states", blows_up_far_out)
    probe = copy.deepcopy(greedy)
    probe.set_timesteps(probe.num_inference_steps)
    targets = teacher.targets(TimeGrid.of(probe)) if timesteps else teacher.targets(probe)
    refined = refine(gmm, greedy, teacher.noise, targets, timesteps=timesteps,
                     objective="final" if timesteps else "all", max_iterations=8, progress=False)
    refined, info = refined.scheduler, refined.record()
    assert any(trials)  # the optimiser did go out there
    assert float("inf") in info["history"] and np.isfinite(info["mse_refined"])
    assert info["mse_refined"] <= info["mse_start"]
    assert max(abs(v) for v in refined.lambdas) <= bound


def test_annealed_adam_reaches_the_closed_form_minimum_of_a_quadratic_inside_its_box():
    """An ill-conditioned quadratic (curvatures 1e-2 ... 1e2) whose minimum lies outside the box in one coordinate:
    the minimum is c clipped into the box, in closed form. Adam is scale-free, so every coordinate gets there."""
    curvature, centre = np.array([1e-2, 1.0, 1e2]), np.array([0.7, -1.3, 2.5])
    low, high = [-3.0, -3.0, -3.0], [3.0, 3.0, 2.0]
    calls = []

    def f(x):
        calls.append(x.copy())
        return float(np.sum(curvature * (x - centre) ** 2)), 2 * curvature * (x - centre)

    result = _adam(f, np.zeros(3), list(zip(low, high)), 300)
    assert result.nit == 300 and len(calls) == 301  # one evaluation per iteration and the last point
    assert all(np.all(x >= low) and np.all(x <= high) for x in calls)
    np.testing.assert_allclose(result.x, np.clip(centre, low, high), atol=2e-3)


def test_annealed_adam_steps_shrink_on_a_half_cosine_to_nothing():
    """What ``refine_optimizer="adam"`` is for: its steps shrink to nothing, so the iterates settle on a point and
    a last-bit difference in the arithmetic (another CPU) is not carried on by full-size steps. On a linear objective Adam's normalised step is exactly 1 in every coordinate, so the path is the
    schedule itself: step k is rate * (1 + cos(pi (k - 1) / n)) / 2, n steps travel rate * (n + 1) / 2 in all, and
    the last is rate * (1 - cos(pi / n)) / 2. The same with the box reached: the coordinate stops at its bound."""
    n, rate, slope = 50, 0.1, np.array([3.0, -0.5, 2.0])
    path = []

    def f(x):
        path.append(x.copy())
        return float(slope @ x), slope.copy()

    _adam(f, np.zeros(3), [(-10.0, 10.0), (-10.0, 10.0), (-1.0, 10.0)], n, rate)
    steps = np.abs(np.diff(np.array(path), axis=0))
    expected = rate * (1 + np.cos(np.pi * np.arange(n) / n)) / 2
    np.testing.assert_allclose(steps[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(steps[:, 1], expected, rtol=1e-6)
    assert np.sum(steps[:, 0]) == pytest.approx(rate * (n + 1) / 2, rel=1e-6)
    assert path[-1][2] == -1.0 and steps[-1, 0] == pytest.approx(rate * (1 - np.cos(np.pi / n)) / 2, rel=1e-6)


def test_rprop_reaches_the_closed_form_minimum_of_a_quadratic_inside_its_box():
    """The same ill-conditioned quadratic as Adam's (curvatures 1e-2 ... 1e2, the minimum outside the box in one
    coordinate): Rprop uses the gradient's signs only, so every coordinate gets to c clipped into the box, and it
    stops by itself once every step has shrunk to RPROP_SETTLED, long before its iteration budget."""
    from dode.core.refine import RPROP_SETTLED

    curvature, centre = np.array([1e-2, 1.0, 1e2]), np.array([0.7, -1.3, 2.5])
    low, high = [-3.0, -3.0, -3.0], [3.0, 3.0, 2.0]
    calls = []

    def f(x):
        calls.append(x.copy())
        return float(np.sum(curvature * (x - centre) ** 2)), 2 * curvature * (x - centre)

    result = _rprop(f, np.zeros(3), list(zip(low, high)), 1000)
    assert "converged" in result.message and result.nit < 200 and len(calls) == result.nit + 1
    assert all(np.all(x >= low) and np.all(x <= high) for x in calls)
    np.testing.assert_allclose(result.x, np.clip(centre, low, high), atol=4 * RPROP_SETTLED)


def test_rprop_takes_the_same_path_whatever_the_gradient_size():
    """Why ``refine_optimizer="rprop"`` reproduces across CPUs: its path is a function of the gradient's signs
    alone. The gradient of a non-convex objective, each entry multiplied by a positive factor drawn anew at every
    call (as large as 10x either way, far beyond any kernel's last bits), and the objective's value replaced by
    noise: the iterates are the same to the last bit. Flipping one sign once does change the path: the test can
    fail."""
    centre = np.array([0.4, -1.1, 2.0, 0.3])

    def gradient(x):  # a sum of cosines: ridges and valleys, no single basin
        return 2 * (x - centre) + 3 * np.sin(3 * x)

    def run(scale=None, flip_at=None):
        path, rng = [], np.random.default_rng(0)

        def f(x):
            path.append(x.copy())
            g = gradient(x)
            if scale is not None:
                g = g * 10.0 ** rng.uniform(-1, 1, size=g.shape)
            if flip_at == len(path):
                g[0] = -g[0]
            return float(rng.uniform(1, 2)) if scale is not None else 1.0, g

        _rprop(f, np.zeros(4), [(-5.0, 5.0)] * 4, 60)
        return np.array(path)

    plain = run()
    assert np.array_equal(plain, run(scale=True))
    assert not np.array_equal(plain, run(flip_at=3))


def _blowing_up_past_the_fit(gmm, monkeypatch, timesteps):
    """(teacher, greedy UniPC NFE 4 fit, its targets, bound, trials) with the student simulated to blow up (NaN states)
    wherever a lambda exceeds 1.01 x the fit's largest; ``trials`` records, per student run, whether it was out there."""
    import dode.core.refine as refine_module

    teacher = dode.Teacher(gmm, batch_size=8, seed=5, substeps=4)
    greedy = dode.distill(gmm, "unipc", 4, teacher=teacher, guard=False)
    bound = max(abs(v) for v in greedy.lambdas) * 1.01
    real, trials = refine_module._student_states, []

    def blows_up_far_out(model, student, noise, lambdas, grid):
        far = max(abs(float(torch.as_tensor(v).detach())) for v in lambdas) > bound
        trials.append(far)
        states = real(model, student, noise, lambdas, grid)
        return [s * float("nan") for s in states] if far else states

    monkeypatch.setattr(refine_module, "_student_states", blows_up_far_out)
    probe = copy.deepcopy(greedy)
    probe.set_timesteps(probe.num_inference_steps)
    targets = teacher.targets(TimeGrid.of(probe)) if timesteps else teacher.targets(probe)
    return teacher, greedy, targets, bound, trials


@pytest.mark.parametrize("timesteps", [False, True])
def test_rprop_is_chosen_by_name_never_worse_and_backs_off_from_a_blow_up(gmm, monkeypatch, timesteps):
    """optimizer="rprop": one evaluation per iteration and one at the end, never worse than its start; where the
    student blows up (simulated past |lambda| = bound, as for Adam) it steps back and goes on with halved steps."""
    teacher, greedy, targets, bound, trials = _blowing_up_past_the_fit(gmm, monkeypatch, timesteps)
    found = refine(gmm, greedy, teacher.noise, targets, timesteps=timesteps, objective="final" if timesteps else "all",
                   max_iterations=15, optimizer="rprop", progress=False)
    info = found.record()
    assert info["optimizer"] == "rprop" and found.evaluations == found.iterations + 1 <= 16
    assert any(trials) and float("inf") in info["history"]  # it went out there, and came back
    assert np.isfinite(found.mse_refined) and found.mse_refined < found.mse_start
    assert max(abs(v) for v in found.scheduler.lambdas) <= bound


@pytest.mark.parametrize("timesteps", [False, True])
def test_adam_is_chosen_by_name_runs_exactly_its_iterations_and_backs_off_from_a_blow_up(gmm, monkeypatch, timesteps):
    """optimizer="adam": one evaluation per iteration and one at the end, never worse than its start; where the
    student blows up (simulated past |lambda| = bound, as above) it steps back and goes on with smaller steps."""
    teacher, greedy, targets, _, trials = _blowing_up_past_the_fit(gmm, monkeypatch, timesteps)
    found = refine(gmm, greedy, teacher.noise, targets, timesteps=timesteps, objective="final" if timesteps else "all",
                   max_iterations=12, optimizer="adam", progress=False)
    info = found.record()
    assert info["optimizer"] == "adam" and found.iterations == 12 and found.evaluations == 13
    assert any(trials) and float("inf") in info["history"]  # it went out there, and came back
    assert np.isfinite(found.mse_refined) and found.mse_refined <= found.mse_start
    assert found.history[-1] < float("inf")  # its last point is a finite one
    assert refine(gmm, greedy, teacher.noise, targets, timesteps=timesteps, max_iterations=2, progress=False,
                  objective="final" if timesteps else "all").record()["optimizer"] == "rprop"  # the default


def test_a_refinement_defaults_to_the_fine_teacher_and_the_paper_fit_to_c_10(gmm):
    """distill's default teacher: C = 10 (the paper's) for the greedy fit, "fine" with refine=, exactly as if given;
    and why neither a grid's target nor a refinement's start should come from C = 10: at 3 steps its final samples
    are far from the exact ODE solution, the fine teacher's and the reference solution's are not."""
    options = dict(batch_size=8, validation=dode.Teacher(gmm, batch_size=8, seed=500, substeps="fine"),
                   refine_iterations=3, refine_starts=1, progress=False)
    default = dode.distill(gmm, "ddim", 3, refine="joint+timesteps", **options)
    fine = dode.distill(gmm, "ddim", 3, refine="joint+timesteps", teacher="fine", **options)
    assert default.fit_info["teacher"] == "fine"
    assert default.lambdas == fine.lambdas and default.grid == fine.grid
    paper = dode.distill(gmm, "ddim", 3, batch_size=8, guard=False)
    assert paper.fit_info["teacher"] == "C=10"
    assert paper.lambdas == dode.distill(gmm, "ddim", 3, batch_size=8, guard=False, teacher=10).lambdas
    exact = solve_ode(gmm, 8, seed=0, progress=False).double()  # scipy's RK45 to 1e-7
    grid = make_scheduler("ddim", gmm, "trailing")
    grid.set_timesteps(3)
    errors = {c: float((dode.Teacher(gmm, batch_size=8, seed=0, substeps=c).targets(grid)[-1].double() - exact)
                       .pow(2).mean().sqrt()) for c in (10, "fine")}
    assert errors["fine"] < errors[10] / 5
    reference = reference_solution(gmm, 0, 8, progress=False).samples.double()  # what a grid is fitted to
    assert float((reference - exact).pow(2).mean().sqrt()) < errors[10] / 5


def _recording_judge(score):
    """A judge scoring a scheduler by ``score(lambdas)``, remembering every (lambdas, score) it gave."""
    seen = []

    def judge(scheduler):
        value = float(score(np.array(scheduler.lambdas)))
        seen.append((list(scheduler.lambdas), value))
        return value

    return judge, seen


def test_early_stopping_returns_the_best_scoring_iterate_it_checked(gmm):
    """A judge that prefers lambda_1 near 0.05: the monitor scores the start, every 3rd iterate and the best point by
    the objective, and the refinement comes back as the best-scoring of those, with that score."""
    from dode.core.refine import Monitor

    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    greedy = dode.distill(gmm, "ddim", 4, teacher=teacher, guard=False)
    probe = copy.deepcopy(greedy)
    probe.set_timesteps(probe.num_inference_steps)
    judge, seen = _recording_judge(lambda lam: abs(lam[1] - 0.05))
    monitor = Monitor(judge, every=3, patience=50)
    found = refine(gmm, greedy, teacher.noise, teacher.targets(probe), objective="all", max_iterations=12,
                   monitor=monitor, progress=False)
    assert found.iterations >= 3 and seen[0][0] == list(greedy.lambdas)  # the start first
    assert len(found.checks) - found.iterations // 3 in (0, 1)  # every 3rd iterate, and the best by the objective
    best_lambdas, best_score = min(seen, key=lambda item: item[1])
    assert found.validation == best_score and list(found.scheduler.lambdas) == pytest.approx(best_lambdas, abs=0)
    assert list(found.checks) == [value for _, value in seen[1:]] and not found.stopped_early
    assert found.record()["checks"] == list(found.checks)


def test_early_stopping_stops_after_patience_checks_without_a_better_score(gmm):
    """A judge under which nothing beats the start: L-BFGS stops at the patience-th check (every * patience
    iterations), the start comes back unchanged, with its score; without a monitor the same run goes on."""
    from dode.core.refine import Monitor

    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    greedy = dode.distill(gmm, "ddim", 4, teacher=teacher, guard=False)
    probe = copy.deepcopy(greedy)
    probe.set_timesteps(probe.num_inference_steps)
    targets = teacher.targets(probe)
    start = np.array(greedy.lambdas)
    judge, seen = _recording_judge(lambda lam: 1.0 + float(np.abs(lam - start).sum()))  # the start scores best
    found = refine(gmm, greedy, teacher.noise, targets, objective="all", max_iterations=30, tolerance=0.0,
                   monitor=Monitor(judge, every=2, patience=3), optimizer="lbfgs", progress=False)
    assert found.stopped_early and found.iterations == 6 and len(found.checks) == 3
    assert list(found.scheduler.lambdas) == list(greedy.lambdas) and found.validation == 1.0
    assert found.mse_refined < found.mse_start  # the objective did fall: the monitor overruled it
    free = refine(gmm, greedy, teacher.noise, targets, objective="all", max_iterations=30, tolerance=0.0,
                  optimizer="lbfgs", progress=False)
    assert free.iterations > 6 and free.validation is None and not free.checks
    # Rprop (the default) the same way; its last iterate is checked before the objective is had there, so the best
    # point by the objective, where it is another, is a check more
    found = refine(gmm, greedy, teacher.noise, targets, objective="all", max_iterations=30,
                   monitor=Monitor(judge, every=2, patience=3), progress=False)
    assert found.stopped_early and found.iterations == 6 and len(found.checks) in (3, 4)
    assert list(found.scheduler.lambdas) == list(greedy.lambdas) and found.validation == 1.0
    with pytest.raises(ValueError, match="patience"):
        Monitor(judge, patience=0)
    with pytest.raises(ValueError, match="every"):
        Monitor(judge, every=0)
    with pytest.raises(ValueError, match="lbfgs"):
        refine(gmm, greedy, teacher.noise, targets, objective="all", max_iterations=3, optimizer="adam",
               monitor=Monitor(judge), progress=False)


def test_a_guarded_refinement_stops_early_on_the_validation_seeds(gmm, validation):
    """refine_fit with a judge: the long run is monitored on the validation seeds (its record says so), the score it
    reports is the returned scheduler's pixel FD recomputed through dode.sample; patience=None never stops it early
    (the checks still choose the iterate) and runs at least as long."""
    teacher = dode.Teacher(gmm, batch_size=16, seed=5, substeps=4)
    found = dode.core.distill.distillation(gmm, "deis", 4, spacing="auto", teacher=teacher, validation=validation)
    refined = dode.core.distill.refine_fit(gmm, found, teacher, "timesteps", judge=found.judge, starts=1,
                                           max_iterations=40, probe_iterations=5, progress=False)
    record = refined.record
    assert "checks" in record and len(record["checks"]) >= 1
    reference = reference_solution(gmm, validation.seed, validation.batch_size).samples
    x = dode.sample(gmm, refined.scheduler, 4, validation.batch_size, seed=validation.seed, progress=False)
    assert dode.frechet_distance(x, reference, features="pixel") == pytest.approx(refined.score, rel=1e-6)
    free = dode.core.distill.refine_fit(gmm, found, teacher, "timesteps", judge=found.judge, starts=1,
                                        max_iterations=40, probe_iterations=5, patience=None, progress=False)
    assert "checks" in free.record and not free.record["stopped_early"] and free.iterations >= refined.iterations
    assert free.score <= min(free.record["checks"])
