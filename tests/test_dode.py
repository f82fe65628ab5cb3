"""D-ODE: the wrapper, the closed-form fit, the teacher's time alignment, sampling, persistence, errors."""
import copy
import json

import numpy as np
import pytest
import torch

import dode
from dode.core.distill import spacing_grids
from dode.core.sampling import integrate
from dode.core.scheduler import CONFIG_FILE
from dode.core.solvers import get_solver
from dode.core.timegrid import TimeGrid

NFE = 5  # possible for every solver (Heun: 3 steps)


def zero_dode(model, solver, nfe=NFE):
    steps = dode.get_solver(solver).steps_for(nfe)
    return dode.DODEScheduler(dode.make_scheduler(solver, model), [0.0] * nfe, steps)


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_zero_lambdas_reproduce_the_base_scheduler_bit_for_bit(gmm, solver):
    base, base_traj = dode.sample(gmm, solver, NFE, 32, seed=7, return_trajectory=True, progress=False)
    wrapped, wrapped_traj = dode.sample(gmm, zero_dode(gmm, solver), NFE, 32, seed=7, return_trajectory=True,
                                        progress=False)
    assert torch.equal(base, wrapped)
    assert torch.equal(base_traj.states, wrapped_traj.states)


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_each_step_is_affine_in_lambda(gmm, solver):
    """The premise of the closed form: step(o + lam (o - o_prev)) = x(0) + lam (x(1) - x(0))."""
    scheduler = zero_dode(gmm, solver)
    checked = []

    def check(k, output, t, x):
        if k == 0:
            return
        results = {}
        for lam in (0.0, 1.0, 2.5):
            trial = copy.deepcopy(scheduler)
            trial.lambdas[k] = lam
            results[lam] = trial.step(output, t, x).prev_sample.double()
        predicted = results[0.0] + 2.5 * (results[1.0] - results[0.0])
        move = (results[2.5] - results[0.0]).abs().max()
        rounding = 1e-6 * results[0.0].abs().max()  # float32 steps: a few ulps of the state's size
        assert move > 1000 * rounding
        assert (results[2.5] - predicted).abs().max() <= 10 * rounding
        checked.append(k)

    integrate(gmm, scheduler, scheduler.num_inference_steps, dode.seeded_noise(gmm.sample_shape, 16, 0),
              before_step=check)
    assert checked == list(range(1, NFE))


def test_closed_form_lambda_equals_lstsq():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x_base, x_unit, target = (torch.randn(50, 1, 4, 4, generator=gen) for _ in range(3))
        v = (x_unit - x_base).double().flatten()[:, None]
        r = (target - x_base).double().flatten()[:, None]
        expected = torch.linalg.lstsq(v, r).solution.item()
        assert dode.least_squares_lambda(x_base, x_unit, target) == pytest.approx(expected, rel=1e-8)
    # no direction to move in: lambda 0
    assert dode.least_squares_lambda(x_base, x_base, target) == 0.0


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm_solver_2", "pndm"])
def test_fitted_states_are_the_least_squares_projection_and_the_scheduler_follows_them(gmm, solver):
    """Sampling the fitting batch with the fitted lambdas reproduces the fit's own residuals, and moving any
    lambda a little moves that step's state away from the teacher."""
    teacher = dode.Teacher(gmm, batch_size=20, seed=4, substeps=10)
    fitted = dode.distill(gmm, solver, NFE, teacher=teacher, guard=False)  # the plain greedy fit
    residuals = fitted.fit_info["rmse_to_teacher_fitted"]
    fitted.set_timesteps(fitted.num_inference_steps)
    targets = teacher.targets(fitted)
    _, traj = dode.sample(gmm, fitted, NFE, 20, seed=4, return_trajectory=True, progress=False)
    for k in range(NFE):
        assert dode.rmse(traj.states[k + 1], targets[k]) == pytest.approx(residuals[k], rel=1e-4, abs=1e-7)
    for k in range(1, NFE):
        for sign in (-1, 1):
            moved = copy.deepcopy(fitted)
            moved.lambdas[k] += sign * 0.25 * max(1.0, abs(moved.lambdas[k]))
            _, moved_traj = dode.sample(gmm, moved, NFE, 20, seed=4, return_trajectory=True, progress=False)
            assert dode.rmse(moved_traj.states[k + 1], targets[k]) > residuals[k] + 1e-7


@pytest.mark.parametrize("grid", [10, "fine"])
@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_teacher_targets_lie_on_the_exact_ode_at_the_students_times(gaussian, solver, grid):
    """On a Gaussian, the teacher's target k is close to the exact ODE state at the student's k-th noise level,
    much closer than the exact states at the neighbouring levels are to it (where those differ visibly)."""
    teacher = dode.Teacher(gaussian.model, batch_size=32, seed=1, substeps=grid)
    scheduler = dode.make_scheduler(solver, gaussian.model)
    scheduler.set_timesteps(dode.get_solver(solver).steps_for(NFE))
    targets = teacher.targets(scheduler)
    grid_ = TimeGrid.of(scheduler)
    sig, start = grid_.after.tolist(), grid_.start
    x0 = grid_.to_ddpm(teacher.noise * scheduler.init_noise_sigma, start)
    levels = [start] + sig

    def exact(s):
        return gaussian.ddpm_state(x0, 1.0, start, s).float()

    def dist(a, b):
        return (a - b).abs().max().item()

    compared = 0
    for k, sigma in enumerate(sig):
        error = dist(targets[k], exact(sigma))
        if grid == "fine":  # 1000 DDIM steps: close to exact everywhere
            assert error < 0.02, (k, sigma, error)
        for s in (levels[k], levels[k + 2] if k + 2 < len(levels) else None):
            if s is not None and s != sigma and dist(exact(s), exact(sigma)) > 0.05:
                assert error < (0.1 if grid == "fine" else 0.35) * dist(exact(s), exact(sigma)), (k, sigma, s)
                compared += 1
    assert compared >= 3


def test_refined_teacher_grid_holds_every_student_time_and_c_steps_between(gmm):
    gmm_sigma_min = float(dode.models.registry.training_sigmas(gmm.scheduler_config)[0])
    for solver in dode.SOLVERS:
        scheduler = dode.make_scheduler(solver, gmm)
        scheduler.set_timesteps(dode.get_solver(solver).steps_for(NFE))
        levels = TimeGrid.of(scheduler).states.tolist()
        knots = [s for i, s in enumerate(levels) if i == 0 or s != levels[i - 1]]
        grid = dode.Teacher(gmm, batch_size=1, substeps=7).substep_levels(np.array(levels))
        positions = [int(np.argmin(np.abs(grid - s))) for s in knots]
        assert np.allclose(grid[positions], knots, rtol=1e-12, atol=0)
        # 7 steps per interval; below the smallest training sigma (t = 0) there is only the final jump to 0
        expected = [1 if low == 0 and high <= gmm_sigma_min * (1 + 1e-6) else 7 for high, low in zip(knots, knots[1:])]
        assert list(np.diff(positions)) == expected and len(grid) == sum(expected) + 1
        assert np.all(np.diff(grid) < 0)


def test_a_shared_fine_teacher_fits_what_a_fresh_one_fits_in_any_order_and_runs_once_per_exact_start(gmm):
    # starts that agree to 6 digits but not exactly: DDIM's first level in float64, the others' in float32, and
    # Heun's initial scale 2e-5 below 1 (DDIM on trailing: its default, leading, starts at t = 800)
    spacings = {"ddim": "trailing", "deis": None, "unipc": None, "heun": None, "dpm_solver_2": None}
    starts = {}
    for solver, spacing in spacings.items():
        times = spacing_grids(gmm, solver, 5, [spacing or get_solver(solver).default_spacing])[0]
        starts[solver] = (float(times.start), float(times.initial_scale))
    assert len({(float(f"{a:.6g}"), float(f"{b:.4g}")) for a, b in starts.values()}) == 1
    assert len(set(starts.values())) == 3

    def fits(order):
        teacher = dode.Teacher(gmm, batch_size=16, seed=2, substeps="fine")
        return teacher, {s: dode.distill(gmm, s, 5, spacing=spacings[s], teacher=teacher, guard=False).lambdas
                         for s in order}

    teacher, shared = fits(list(spacings))
    # one fine run per exact start (each above every training level: 1000 evaluations), + one step to each target off
    # the training grid: Heun's fractional Karras level (the state after both stages of its first step: two targets)
    # and DPM-Solver-2's three exponential (log-uniform) levels above sigma_min
    assert teacher.nfe == 1000 * len(set(starts.values())) + 2 + 3
    # which fits the teacher served first does not matter: a fresh teacher per fit, and the reverse order, fit the
    # same lambdas to the last bit (a run shared between starts that merely agree to 6 digits moved Heun's by 1e-3)
    _, reverse = fits(list(spacings)[::-1])
    for solver, lambdas in shared.items():
        alone = dode.distill(gmm, solver, 5, spacing=spacings[solver], batch_size=16, seed=2, teacher="fine",
                             guard=False).lambdas
        assert lambdas == alone == reverse[solver], solver
    # another start is another run: leading DDIM at NFE 5 starts at t = 800, every training timestep below it
    before = teacher.nfe
    dode.distill(gmm, "ddim", 5, teacher=teacher, guard=False)
    assert teacher.nfe - before == 800 + 1
    with pytest.raises(ValueError, match="fixes batch_size=16, seed=2"):
        dode.distill(gmm, "ddim", NFE, teacher=teacher, seed=3)


def test_sampling_does_not_depend_on_batch_size_and_seeds_are_per_sample(gmm, validation):
    fitted = dode.distill(gmm, "deis", NFE, batch_size=10, validation=validation)
    whole = dode.sample(gmm, fitted, NFE, 10, seed=100, progress=False)
    pieces = dode.sample(gmm, fitted, NFE, 10, seed=100, batch_size=3, progress=False)
    assert torch.allclose(whole, pieces, rtol=0, atol=1e-6)
    shifted = dode.sample(gmm, fitted, NFE, 4, seed=106, progress=False)
    assert torch.allclose(whole[6:], shifted, rtol=0, atol=1e-6)
    assert not torch.allclose(whole[:4], shifted, atol=1e-2)


def test_save_and_load_round_trip(gmm, validation, tmp_path):
    fitted = dode.distill(gmm, "dpm_solver_pp_2m", NFE, batch_size=10, validation=validation)
    fitted.save_pretrained(tmp_path)
    loaded = dode.DODEScheduler.from_pretrained(tmp_path)
    assert loaded.lambdas == fitted.lambdas and loaded.nfe == NFE
    assert loaded.num_inference_steps == fitted.num_inference_steps
    assert {k: v for k, v in loaded.config.items() if not k.startswith('_')} == {
        k: v for k, v in fitted.config.items() if not k.startswith('_')}
    assert loaded.fit_info == json.loads(json.dumps(fitted.fit_info))
    assert type(loaded.base_scheduler) is type(fitted.base_scheduler)
    assert torch.equal(dode.sample(gmm, loaded, NFE, 8, progress=False), dode.sample(gmm, fitted, NFE, 8, progress=False))


def _saved(tmp_path, gmm, solver="ddim"):
    zero_dode(gmm, solver).save_pretrained(tmp_path)
    return json.loads((tmp_path / CONFIG_FILE).read_text())


def test_from_pretrained_rejects_missing_corrupt_and_mismatched_folders(gmm, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path)
    record = _saved(tmp_path, gmm)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        dode.DODEScheduler.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**record, "lambdas": record["lambdas"][:-1]}))
    with pytest.raises(ValueError, match="4 lambdas for nfe=5"):
        dode.DODEScheduler.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**record, "nfe": 6, "lambdas": [0.0] * 6}))
    with pytest.raises(ValueError, match="makes 5 model evaluations, but 6 lambdas"):
        dode.DODEScheduler.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**record, "base_scheduler": "NoSuchScheduler"}))
    with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'"):
        dode.DODEScheduler.from_pretrained(tmp_path)


def test_a_dode_scheduler_refuses_another_step_count_or_extra_steps(gmm):
    scheduler = zero_dode(gmm, "ddim")
    with pytest.raises(ValueError, match="fitted for num_inference_steps=5"):
        scheduler.set_timesteps(8)
    with pytest.raises(ValueError, match="fitted for NFE 5, not 6"):
        dode.sample(gmm, scheduler, 6, 2, progress=False)
    scheduler.set_timesteps(5)
    x = torch.randn(2, *gmm.sample_shape)
    for t in scheduler.timesteps:
        x = scheduler.step(gmm(x, t), t, x).prev_sample
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        scheduler.step(gmm(x, 1), 1, x)
    with pytest.raises(ValueError, match="finite"):
        dode.DODEScheduler(scheduler.base_scheduler, [0.0, float("nan")], 2)


def test_nan_model_output_names_the_evaluation(gmm, wrap):
    def nan_from_third_call(out, call):
        return out * float("nan") if call >= 3 else out

    with pytest.raises(FloatingPointError, match="evaluation 3 of 5"):
        dode.sample(wrap(gmm, nan_from_third_call), "ddim", NFE, 4, progress=False)
    broken = wrap(gmm, nan_from_third_call)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        dode.distill(broken, "ddim", NFE, batch_size=4, teacher=dode.Teacher(broken, batch_size=4, substeps=1), guard=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_batch_sizes_and_teachers_are_clear_errors(gmm, bad):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        dode.sample(gmm, "ddim", NFE, 4, batch_size=bad, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        dode.distill(gmm, "ddim", NFE, batch_size=bad)
    with pytest.raises(ValueError, match="teacher substeps must be"):
        dode.distill(gmm, "ddim", NFE, teacher=bad)
