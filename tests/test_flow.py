"""Flow-matching models: the ``gmm-digits-flow`` testbed against an independent computation and scipy's ODE solution,
the flow solvers (diffusers' FlowMatch Euler and Heun, DPM-Solver++ and UniPC on flow sigmas) against diffusers'
own loop, D-ODE on them (lambda = 0 is the base, the guard, ``auto``, learned grids with exact gradients), and the
clear errors for a solver of the other kind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import dode
from dode.core.refine import _Objective, params_from_grid
from dode.core.sampling import seeded_noise
from dode.core.schedule import is_flow, level_to_timestep, training_sigmas
from dode.core.scheduler import DODEScheduler, grid_scheduler, make_scheduler
from dode.core.flowmatch import TrailingFlowMatchEulerScheduler, TrailingFlowMatchHeunScheduler
from dode.core.solvers import FLOW_SHIFTS, FLOW_SOLVERS, get_solver, solver_of, solvers_for, spacing_of
from dode.core.timegrid import TimeGrid
from dode.experiments.checks import possible


@pytest.fixture(scope="module")
def flow():
    return dode.load_model("gmm-digits-flow", device="cpu")


def dense_velocity(model, x: np.ndarray, s: float) -> np.ndarray:
    """E[eps - x0 | x_s = x] from the mixture by dense linear algebra (scipy's Gaussian densities and a linear solve
    per component, no eigendecomposition): the state is a mixture of N((1 - s) mu_k, (1 - s)^2 S_k + s^2 I)."""
    weights, means, covs = (t.numpy() for t in model.mixture)
    a, eye = 1.0 - s, np.eye(means.shape[1])
    log_resp, posterior = [], []
    for w, mu, cov in zip(weights, means, covs):
        marginal = a * a * cov + s * s * eye
        log_resp.append(np.log(w) + multivariate_normal(a * mu, marginal).logpdf(x))
        posterior.append(mu + a * np.linalg.solve(marginal, (x - a * mu).T).T @ cov)  # cov symmetric
    log_resp = np.array(log_resp)
    resp = np.exp(log_resp - logsumexp(log_resp, axis=0))
    x0 = np.einsum("kb,kbd->bd", resp, np.array(posterior))
    return (x - x0) / s  # eps - x0, with eps = (x - (1 - s) x0) / s


@pytest.mark.parametrize("s", [1.0, 0.9, 0.5, 0.1, 0.01, 0.001])
def test_flow_velocity_matches_a_dense_computation(flow, s):
    gen = torch.Generator().manual_seed(3)
    x0 = flow.sample_data(6, seed=1, dtype=torch.float64).reshape(6, -1)
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    # diffusers' flow convention: the model's time input is s * num_train_timesteps
    out = flow(x.reshape(6, 1, 8, 8), torch.tensor(s * 1000.0, dtype=torch.float64)).reshape(6, -1).numpy()
    expected = dense_velocity(flow, x.numpy(), s)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_flow_testbed_is_a_flow_model_on_the_same_data(flow):
    gmm = dode.load_model("gmm-digits", device="cpu")
    assert is_flow(flow.scheduler_config) and not is_flow(gmm.scheduler_config)
    assert torch.equal(flow.sample_data(50, seed=4), gmm.sample_data(50, seed=4))
    assert solvers_for(flow) == FLOW_SOLVERS and solvers_for(gmm) == dode.SOLVERS
    np.testing.assert_array_equal(training_sigmas(flow.scheduler_config), np.arange(1, 1001) / 1000)
    assert level_to_timestep(0.25, flow.scheduler_config) == 250.0


def test_flow_ode_solution_matches_many_heun_steps(flow):
    """scipy's adaptive solution of dx/ds = v against 200 FlowMatch Heun steps (second order) from the same noise."""
    exact = dode.solve_ode(flow, 20, seed=7, rtol=1e-9, atol=1e-9, progress=False)
    heun = dode.sample(flow, "flow_heun", 399, 20, seed=7, progress=False)
    assert torch.sqrt(torch.mean((heun - exact) ** 2)) < 1e-4
    # the fine teacher (1000 Euler steps) is first order: close, not as close
    fine = dode.Teacher(flow, batch_size=20, seed=7, substeps="fine").solution()
    error = float(torch.sqrt(torch.mean((fine - exact) ** 2)))
    assert 1e-4 < error < 2e-3


@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_flow_solvers_are_diffusers_own_loop_and_zero_lambdas_the_base(flow, solver):
    """Each flow solver on each of its spacings, through dode.sample, is diffusers' scheduler in a hand-written loop
    (the model called at the scheduler's timesteps, pure noise in, as SD3's pipeline does), bit for bit; a
    DODEScheduler with every lambda 0 samples exactly the same."""
    info = get_solver(solver)
    for spacing in info.spacings:
        for nfe in (3, 5):
            if not possible(solver, nfe):
                continue
            noise = seeded_noise(flow.sample_shape, 4, 11)
            scheduler = make_scheduler(solver, flow, spacing)
            scheduler.set_timesteps(info.steps_for(nfe))
            x = noise.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(flow(x, t), t, x).prev_sample
            assert len(scheduler.timesteps) == nfe
            ours = dode.sample(flow, solver, nfe, 4, seed=11, spacing=spacing, progress=False)
            zero = DODEScheduler(make_scheduler(solver, flow, spacing), [0.0] * nfe, info.steps_for(nfe))
            assert torch.equal(ours, x.float()), (solver, spacing, nfe)
            assert torch.equal(dode.sample(flow, zero, nfe, 4, seed=11, progress=False), ours), (solver, spacing)


def test_flow_spacings_are_the_shift_and_named_by_what_they_set(flow):
    for solver in FLOW_SOLVERS:
        for k in FLOW_SHIFTS:
            scheduler = make_scheduler(solver, flow, f"shift{k:g}")
            assert dode.core.solvers.spacing_of(scheduler) == f"shift{k:g}"
            scheduler.set_timesteps(get_solver(solver).steps_for(5))
            plain = make_scheduler(solver, flow, get_solver(solver).default_spacing)
            plain.set_timesteps(get_solver(solver).steps_for(5))
            s, shifted = TimeGrid.of(plain).steps, TimeGrid.of(scheduler).steps
            # the shift map s -> k s / (1 + (k - 1) s) of the plain grid; FlowMatch's linspace also ends at its own
            # shifted sigma_min, which moves its levels slightly and its last one more
            ends = 1 if get_solver(solver).default_spacing == "linspace" else 0
            np.testing.assert_allclose(shifted[:len(s) - ends], (k * s / (1 + (k - 1) * s))[:len(s) - ends],
                                       rtol=1e-5 if ends == 0 else 1e-2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_trailing_is_fluxs_grid_on_flowmatch_euler_and_heun(shift):
    """FlowMatch Euler and Heun's "trailing" spacing steps on linspace(1, 1/n, n) through the shift map: for Euler,
    diffusers' scheduler handed those sigmas (as Flux's pipeline hands them) bit for bit; for Heun, the closed form,
    each level but the first twice; dode.sample on it is the base on that explicit grid (``set_grid``'s path)."""
    model = dode.models.testbeds.gmm_digits_flow(shift)
    for steps in (1, 3, 4, 7):
        euler = make_scheduler("flow_euler", model, "trailing")
        assert type(euler) is TrailingFlowMatchEulerScheduler and spacing_of(euler) == "trailing"
        euler.set_timesteps(steps)
        plain = FlowMatchEulerDiscreteScheduler.from_config(euler.config)
        plain.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
        assert torch.equal(euler.sigmas, plain.sigmas) and torch.equal(euler.timesteps, plain.timesteps)
        s = np.linspace(1.0, 1.0 / steps, steps)
        levels = shift * s / (1 + (shift - 1) * s)
        heun = make_scheduler("flow_heun", model, "trailing")
        assert type(heun) is TrailingFlowMatchHeunScheduler and solver_of(heun).name == "flow_heun"
        heun.set_timesteps(steps)
        own = FlowMatchHeunDiscreteScheduler.from_config(heun.config)
        own.set_timesteps(steps)  # the parent's layout on its own grid: same length, same repeats
        assert heun.sigmas.shape == own.sigmas.shape and heun.timesteps.shape == own.timesteps.shape
        np.testing.assert_allclose(TimeGrid.of(heun).steps, levels, rtol=1e-6)
        np.testing.assert_allclose(heun.timesteps.numpy(), 1000 * np.concatenate([levels[:1], levels[1:].repeat(2)]),
                                   rtol=1e-6)
        nfe = 2 * steps - 1
        torch.testing.assert_close(
            dode.sample(model, "flow_heun", nfe, 4, seed=5, spacing="trailing", progress=False),
            dode.sample(model, grid_scheduler("flow_heun", model, levels), nfe, 4, seed=5, progress=False),
            rtol=1e-6, atol=1e-6)
    # the other spacings keep diffusers' own classes, and are not taken for trailing
    linspace = make_scheduler("flow_euler", model, "linspace")
    assert type(linspace) is FlowMatchEulerDiscreteScheduler
    assert spacing_of(linspace) == ("linspace" if shift == 1 else "shift3")  # at shift 3 the two configs are one


def test_a_dode_scheduler_on_trailing_saves_and_loads_on_its_own_class(flow, tmp_path):
    fitted = dode.distill(flow, "flow_heun", 3, spacing="trailing", guard=False, progress=False)
    assert fitted.spacing == "trailing" and any(v != 0 for v in fitted.lambdas)
    fitted.save_pretrained(tmp_path)
    loaded = DODEScheduler.from_pretrained(tmp_path)
    assert type(loaded.base_scheduler) is TrailingFlowMatchHeunScheduler and loaded.spacing == "trailing"
    assert torch.equal(dode.sample(flow, loaded, 3, 8, seed=2, progress=False),
                       dode.sample(flow, fitted, 3, 8, seed=2, progress=False))


def test_dynamic_shifting_is_the_shift_map_at_e_to_the_mu():
    """Flux's resolution-dependent shift (exponential, ``mu``) moves the unshifted levels s to e^mu s / (1 + (e^mu - 1)
    s), the static shift map at shift e^mu, which is why the shift spacings cover it."""
    mu = 0.8
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(6, mu=mu)
    plain = FlowMatchEulerDiscreteScheduler()
    plain.set_timesteps(6)
    k, s = np.exp(mu), plain.sigmas.double().numpy()
    np.testing.assert_allclose(dynamic.sigmas.double().numpy(), k * s / (1 + (k - 1) * s), rtol=1e-6, atol=1e-7)


def test_a_solver_of_the_other_kind_is_refused_clearly(flow):
    gmm = dode.load_model("gmm-digits", device="cpu")
    with pytest.raises(ValueError, match="flow-matching model; its solvers: flow_euler"):
        dode.distill(flow, "ddim", 5, progress=False)
    with pytest.raises(ValueError, match="is for flow-matching models.*its solvers: ddim"):
        dode.sample(gmm, "flow_euler", 5, 2, progress=False)
    with pytest.raises(ValueError, match="unknown solver 'flow'.*flow-matching models: flow_euler"):
        dode.get_solver("flow")


def test_flow_greedy_fit_follows_the_teacher_and_auto_beats_every_base(flow):
    """At NFE 3-10 for every flow solver: the greedy fit lowers the distance to the teacher at every step, and
    ``spacing="auto"``'s guarded score on the validation seeds is at or below the best base spacing's."""
    for solver in FLOW_SOLVERS:
        for nfe in (3, 4, 5, 6, 8, 10):
            if not possible(solver, nfe):
                continue
            fitted = dode.distill(flow, solver, nfe, spacing="auto", progress=False)
            validation = fitted.fit_info["validation"]
            assert [c["spacing"] for c in validation["candidates"]] == list(get_solver(solver).spacings)
            best_base = min(c["base"] for c in validation["candidates"])
            assert validation["guarded"] <= best_base, (solver, nfe)
            greedy = dode.distill(flow, solver, nfe, spacing=fitted.spacing, guard=False, progress=False)
            rmse = greedy.fit_info["rmse_to_teacher_fitted"], greedy.fit_info["rmse_to_teacher_base"]
            assert all(f <= b + 1e-9 for f, b in zip(*rmse)), (solver, nfe)


@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_flow_learned_grid_gradient_matches_central_differences(flow, solver):
    """The refinement's autograd gradient in the lambdas and every flow level, against central differences in
    float64 (the model and levels in float64; FlowMatch's steps upcast to float32, hence the tolerance)."""
    model = dode.load_model("gmm-digits-flow", device="cpu").double()
    steps = get_solver(solver).steps_for(5)
    student = grid_scheduler(solver, model, np.linspace(0.9, 0.15, steps))
    student.lambdas = [0.0, *np.linspace(0.3, -0.2, student.nfe - 1)]
    student.set_timesteps(student.num_inference_steps)
    noise = seeded_noise(model.sample_shape, 4, 0).double()
    targets = torch.stack([noise * 0.1] * student.nfe)
    lowest = float(training_sigmas(model.scheduler_config)[0])
    f = _Objective(model, student, noise, targets, "final", True, True, np.asarray(student.grid), lowest)
    f.bar = type("Quiet", (), {"set_postfix": lambda *a, **k: None, "update": lambda *a: None})()
    theta = np.concatenate([student.lambdas[1:], [-0.05], params_from_grid(np.asarray(student.grid), lowest)])
    _, gradient = f._value_and_gradient(theta)
    numeric = []
    with torch.no_grad():
        for i in range(len(theta)):
            h = 1e-3 * max(1.0, abs(theta[i]))
            values = []
            for sign in (1, -1):
                shifted = theta.copy()
                shifted[i] += sign * h
                values.append(f.loss(*f.unpack(torch.from_numpy(shifted))).item())
            numeric.append((values[0] - values[1]) / (2 * h))
    np.testing.assert_allclose(gradient, numeric, rtol=2e-3, atol=2e-3 * np.abs(numeric).max())


def test_flow_learned_grid_keeps_the_levels_and_never_validates_worse(flow):
    fitted = dode.distill(flow, "flow_unipc", 5, refine="timesteps", batch_size=100, refine_iterations=15,
                          refine_starts=1, progress=False)
    grid = np.asarray(fitted.grid)
    assert fitted.grid is not None and np.all(np.diff(grid) < 0) and grid[0] <= 1.0 and grid[-1] > 0
    fitted.set_timesteps(fitted.num_inference_steps)
    np.testing.assert_allclose(TimeGrid.of(fitted).steps, grid, rtol=1e-6)  # the model sees the grid's levels
    np.testing.assert_allclose(TimeGrid.of(fitted).evaluated, grid, rtol=1e-6)
    validation = fitted.fit_info["validation"]
    assert validation["guarded"] <= validation["base"]


@pytest.mark.parametrize("solver", ["flow_euler", "flow_dpm_solver_pp_2m"])
def test_a_flow_dode_scheduler_saves_and_loads_as_itself(flow, solver, tmp_path):
    fitted = dode.distill(flow, solver, 5, refine="joint+timesteps", batch_size=100, refine_iterations=5,
                          refine_starts=1, progress=False)
    fitted.save_pretrained(tmp_path)
    loaded = DODEScheduler.from_pretrained(tmp_path)
    assert get_solver(dode.core.solvers.solver_of(loaded).name).flow
    assert loaded.lambdas == fitted.lambdas and loaded.grid == fitted.grid
    assert torch.equal(dode.sample(flow, loaded, 5, 8, seed=2, progress=False),
                       dode.sample(flow, fitted, 5, 8, seed=2, progress=False))


def test_notebook_parameters_take_flow_solvers():
    from dode.experiments.checks import check_parameters

    assert check_parameters(model_name="gmm-digits-flow", solver="flow_euler", nfe=5).solver == "flow_euler"
    assert check_parameters(flow_solvers="all", nfes=[3, 4]).flow_solvers == list(FLOW_SOLVERS)
    skipped = check_parameters(flow_solvers=["flow_heun"], nfes=[3, 4]).skipped
    assert [(c["solver"], c["nfe"]) for c in skipped] == [("flow_heun", 4)]  # Heun makes odd NFE only
    with pytest.raises(ValueError, match="flow_solvers: unknown \\['ddim'\\]"):
        check_parameters(flow_solvers=["ddim"])


def test_flow_summary_keeps_the_best_base_and_the_trailing_one_and_its_prose_counts_them():
    """``summary`` and ``prose`` of notebook 07 on a made-up results table, against the counts done by hand."""
    import pandas as pd

    from dode.experiments.flow import prose, summary

    cells = {("flow_euler", 3): [("base", "linspace", 5.0), ("base", "trailing", 2.0), ("base", "shift3", 3.0),
                                 ("dode", "trailing", 1.0), ("dode-learned", "trailing", 0.5)],
             ("flow_heun", 5): [("base", "linspace", 0.8), ("base", "trailing", 0.9), ("base", "shift3", 1.5),
                                ("dode", "linspace", 0.7), ("dode-learned", "linspace", 0.72)],
             ("flow_unipc", 4): [("base", "trailing", 0.6), ("base", "shift3", 0.7), ("dode", "trailing", 0.65),
                                 ("dode-learned", "trailing", 0.66)]}
    rows = [{"solver": solver, "nfe": nfe, "variant": variant, "spacing": spacing, "fd_pixel": fd}
            for (solver, nfe), cell in cells.items() for variant, spacing, fd in cell]
    best = summary(pd.DataFrame(rows))
    assert best["best base spacing"].tolist() == ["trailing", "linspace", "trailing"]
    assert best["best base"].tolist() == [2.0, 0.8, 0.6]
    assert best["trailing base"].tolist() == [2.0, 0.9, 0.6]
    text = prose(best)
    assert "at or below the best base spacing in 2 of 3 solver x NFE cells" in text  # UniPC's auto loses
    assert "The best base is the trailing grid" in text and "in 2 cells, and D-ODE auto fits on it in 2" in text
    assert "within 5 % of D-ODE auto or below it in 3 of 3 cells, and 25 % or more below it in 1" in text


def test_flow_unipc_moves_a_first_level_of_one_below_it_as_diffusers_does(flow):
    """At s = 1 (alpha 0) UniPC's update takes log alpha = -inf and becomes another method. diffusers' UniPC on flow
    sigmas moves a first sigma of 1 to 1 - 1e-6; so do dode's explicit grids (``set_grid``) and the refinement's
    differentiable levels (``set_levels``), where that level's gradient is then 0."""
    from dode.core.solvers import set_levels

    grid = [1.0, 0.75, 0.5, 0.25]
    ours = grid_scheduler("flow_unipc", flow, grid)
    ours.set_timesteps(4)
    theirs = make_scheduler("flow_unipc", flow)
    theirs.set_timesteps(sigmas=np.array(grid))
    assert torch.equal(ours.base_scheduler.sigmas, theirs.sigmas)
    at_one = dode.sample(flow, grid_scheduler("flow_unipc", flow, grid), 4, 50, seed=3, progress=False)
    below = dode.sample(flow, grid_scheduler("flow_unipc", flow, [1 - 1e-6, *grid[1:]]), 4, 50, seed=3,
                        progress=False)
    assert torch.equal(at_one, below)
    scheduler = make_scheduler("flow_unipc", flow)
    scheduler.set_timesteps(4)
    levels = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
    set_levels(scheduler, levels)
    assert float(scheduler.sigmas[0].detach()) == pytest.approx(1 - 1e-6, abs=1e-12)
    scheduler.sigmas[:4].sum().backward()
    assert levels.grad.tolist() == [0.0, 1.0, 1.0, 1.0]
    # DPM-Solver++ on flow sigmas keeps its levels: diffusers does not move them either
    dpm = grid_scheduler("flow_dpm_solver_pp_2m", flow, grid)
    dpm.set_timesteps(4)
    assert float(dpm.base_scheduler.sigmas[0]) == 1.0
