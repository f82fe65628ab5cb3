"""The refinement's exact gradient: autograd through every model evaluation and scheduler step, the noise levels
included (``dode.core.solvers.set_levels``), held to central finite differences in float64 on both embedded models
for every grid solver; micro-batches give the same gradient; the differentiable levels sample exactly what
``set_grid`` samples."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import dode
from dode.core.refine import MomentTerm, _Objective, grid_from_params, optimise, params_from_grid
from dode.core.sampling import count_evaluations, integrate, seeded_noise
from dode.core.schedule import differentiable_timestep, sigma_to_timestep, training_sigmas
from dode.core.scheduler import DODEScheduler, grid_scheduler
from dode.core.solvers import GRID_SOLVERS, get_solver, set_grid, set_levels
from dode.core.timegrid import TimeGrid

NFE = 5
#: diffusers' DPM-Solver++ multistep step casts the state to float32 whatever its dtype, so its finite differences
#: resolve no better than float32 rounding allows: a wider step and tolerance there
FLOAT32_STEPS = {"dpm_solver_pp_2m"}


def interior_levels(solver: str) -> np.ndarray:
    """A grid of NFE-many evaluations strictly inside the schedule (no level at the ends of the training range, where
    sigma -> t clamps and a central difference straddles a kink)."""
    steps = get_solver(solver).steps_for(NFE)
    return np.exp(np.linspace(np.log(40.0), np.log(0.05), steps))


def objective(model, solver: str, dtype=torch.float64, batch_size=None, samples: int = 4,
              moments: MomentTerm | None = None) -> _Objective:
    """The refinement's objective for "joint+timesteps" on an interior grid with nonzero lambdas, in ``dtype``,
    against targets from a finer run of the same model (any fixed targets would do)."""
    student = grid_scheduler(solver, model, interior_levels(solver))
    student.lambdas = [0.0, *np.linspace(0.3, -0.2, student.nfe - 1)]
    student.set_timesteps(student.num_inference_steps)
    noise = seeded_noise(model.sample_shape, samples, 0).to(dtype)
    targets = torch.stack([noise * 0.1] * student.nfe)  # any fixed targets: only the final state counts here
    lowest = float(training_sigmas(model.scheduler_config)[0])
    f = _Objective(model, student, noise, targets, "final", True, True, np.asarray(student.grid), lowest,
                   batch_size=batch_size, moments=moments)
    f.bar = type("Quiet", (), {"set_postfix": lambda *a, **k: None, "update": lambda *a: None})()
    return f


def start_point(f: _Objective) -> np.ndarray:
    z = params_from_grid(np.asarray(f.student.grid), f.lowest)
    return np.concatenate([f.student.lambdas[1:], [-0.05], z])  # u < 0: the first level inside, below its bound


def central_differences(f: _Objective, theta: np.ndarray, relative: float) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(len(theta)):
            h = relative * max(1.0, abs(theta[i]))
            up, down = theta.copy(), theta.copy()
            up[i] += h
            down[i] -= h
            # tensors: the levels stay float64 (a numpy grid goes through set_grid's float32 levels)
            values = [f.loss(*f.unpack(torch.from_numpy(p))).item() for p in (up, down)]
            out.append((values[0] - values[1]) / (2 * h))
    return np.array(out)


@pytest.fixture(scope="module")
def gmm64():
    return dode.load_model("gmm-digits", device="cpu").double()


@pytest.fixture
def unet64(monkeypatch):
    """unet-digits in float64, its sinusoidal time embedding too: diffusers computes that in float32 whatever the
    model's dtype (``timesteps.float()``), which would leave the finite differences in t at float32 resolution."""
    import diffusers.models.embeddings as embeddings

    original = embeddings.get_timestep_embedding

    def float64_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                          max_period=10000):
        half = embedding_dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
        emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 == 1 else emb

    probe = torch.tensor([3.0, 417.25])  # the float64 twin is diffusers' formula
    assert torch.allclose(float64_embedding(probe, 16, True, 0).float(), original(probe, 16, True, 0), atol=1e-5)
    monkeypatch.setattr(embeddings, "get_timestep_embedding", float64_embedding)
    return copy.deepcopy(dode.load_model("unet-digits", device="cpu")).double()


def check_gradient(f: _Objective, solver: str, rtol: float):
    theta = start_point(f)
    value, exact = f._value_and_gradient(theta)
    loose = solver in FLOAT32_STEPS
    numeric = central_differences(f, theta, 1e-3 if loose else 1e-6)
    scale = np.abs(numeric).max()
    assert value > 0 and scale > 0
    # every parameter: the lambdas, the first level's u and each gap's z
    np.testing.assert_allclose(exact, numeric, rtol=0, atol=(5e-3 if loose else rtol) * scale)


@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_the_gradient_is_autograds_and_matches_central_differences_on_the_mixture(gmm64, solver):
    check_gradient(objective(gmm64, solver), solver, rtol=1e-6)


@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_the_gradient_matches_central_differences_on_unet_digits(unet64, solver):
    check_gradient(objective(unet64, solver, samples=2), solver, rtol=1e-5)


@pytest.mark.parametrize("solver", ["ddim", "deis", "unipc", "heun"])
def test_a_moment_term_s_gradient_matches_central_differences_on_the_mixture(gmm64, solver):
    """The moment-matching term (pixel features) differentiated with the rest: the same check, term included."""
    check_gradient(objective(gmm64, solver, samples=6, moments=MomentTerm(2.0, "pixel", 3.0)), solver, rtol=1e-6)


def test_a_moment_term_in_the_digits_classifier_s_features_matches_central_differences_on_unet_digits(unet64):
    """Through the network and the FD-digits classifier (float64, frozen) both."""
    check_gradient(objective(unet64, "deis", samples=3, moments=MomentTerm(1.0, "digits", 50.0)), "deis", rtol=1e-5)


@pytest.mark.parametrize("solver", ["ddim", "deis", "heun"])
def test_micro_batches_give_the_same_value_and_gradient(gmm64, solver):
    whole, parts = objective(gmm64, solver, samples=7), objective(gmm64, solver, batch_size=3, samples=7)
    assert len(parts.parts) == 3
    theta = start_point(whole)
    (v1, g1), (v2, g2) = whole._value_and_gradient(theta), parts._value_and_gradient(theta)
    assert v2 == pytest.approx(v1, rel=1e-12)
    np.testing.assert_allclose(g2, g1, rtol=1e-10, atol=1e-14)
    assert parts.backward == 3 and whole.backward == 1


@pytest.mark.parametrize("solver", [s for s in GRID_SOLVERS if get_solver(s).custom_grid])
def test_differentiable_levels_sample_what_set_grid_samples(gmm, solver):
    """set_levels on float32 levels against set_grid (DEIS: its torch coefficients against diffusers' numpy ones),
    and the differentiable timesteps against numpy's interpolation."""
    levels = interior_levels(solver)
    noise = seeded_noise(gmm.sample_shape, 6, 3)
    runs = []
    for differentiable in (False, True):
        scheduler = dode.make_scheduler(solver, gmm)
        scheduler.set_timesteps(get_solver(solver).steps_for(NFE))
        if differentiable:
            set_levels(scheduler, torch.tensor(levels, dtype=torch.float32))
        else:
            set_grid(scheduler, levels)
        runs.append((integrate(gmm, scheduler, None, noise)[0], scheduler.timesteps.detach().double()))
    (x, t), (y, u) = runs
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(u, t, rtol=0, atol=1e-3)
    log_sigmas = np.log(training_sigmas(gmm.scheduler_config))
    exact = differentiable_timestep(torch.tensor(levels), torch.from_numpy(log_sigmas))
    np.testing.assert_allclose(exact.numpy(), sigma_to_timestep(levels, log_sigmas), rtol=1e-12)


def test_grid_parameters_as_tensors_are_the_numpy_grid(gmm):
    z = np.array([0.3, -1.2, 0.5])
    grid = grid_from_params(torch.tensor(z, requires_grad=True), torch.tensor(80.0, dtype=torch.float64), 0.02)
    assert grid.requires_grad and torch.all(grid[1:] < grid[:-1])
    np.testing.assert_allclose(grid.detach().numpy(), grid_from_params(z, 80.0, 0.02), rtol=1e-14)


def test_an_autograd_iteration_costs_one_run_and_one_backward_pass_finite_differences_nfe_plus_one(gmm):
    teacher = dode.Teacher(gmm, batch_size=8, seed=0, substeps=4)
    start = dode.distill(gmm, "unipc", NFE, teacher=teacher, guard=False)
    learned = dode.core.scheduler.to_grid_form(start)
    learned.set_timesteps(learned.num_inference_steps)
    targets = teacher.targets(TimeGrid.of(learned))
    found = {g: optimise(gmm, start, teacher.noise, targets, timesteps=True, gradient=g, max_iterations=3,
                         progress=False) for g in ("autograd", "fd")}
    exact, fd = found["autograd"], found["fd"]
    assert exact.student_runs == exact.evaluations == exact.backward_passes
    assert fd.student_runs == fd.evaluations * (1 + NFE)  # u and NFE - 1 gaps, one run each, and the point itself
    assert exact.gradient == "autograd" and fd.gradient == "fd"
    with count_evaluations(gmm) as counted:
        optimise(gmm, start, teacher.noise, targets, timesteps=True, max_iterations=3, progress=False)
    # one run to score the start, then one per objective evaluation (its backward pass calls no model)
    assert counted.calls == NFE * (1 + exact.evaluations)


def test_the_default_refinement_converges_to_its_tolerance(gmm):
    teacher = dode.Teacher(gmm, batch_size=16, seed=0, substeps="fine")
    start = dode.distill(gmm, "ddim", NFE, teacher=teacher, guard=False)
    learned = dode.core.scheduler.to_grid_form(start)
    learned.set_timesteps(learned.num_inference_steps)
    targets = teacher.targets(TimeGrid.of(learned))
    # Rprop (the default) stops once every step has shrunk to RPROP_SETTLED (here after about 260 iterations, at
    # the objective its 200 reach), L-BFGS once an iteration gains less than the tolerance share of the start value
    # (here after 27): both end at about the same point
    ends = {}
    for optimizer, settled, budget in (("rprop", "converged", 400), ("lbfgs", "CONVERGENCE", 200)):
        found = optimise(gmm, start, teacher.noise, targets, timesteps=True, optimizer=optimizer,
                         max_iterations=budget, progress=False)
        assert settled in found.message and found.iterations < budget, (optimizer, found.message)
        assert found.mse_refined < 0.3 * found.mse_start
        assert min(found.history) == found.mse_refined  # the best point it saw comes back
        ends[optimizer] = found.mse_refined
    assert ends["rprop"] == pytest.approx(ends["lbfgs"], rel=0.05)


def test_options_are_checked(gmm):
    teacher = dode.Teacher(gmm, batch_size=4, seed=0, substeps=2)
    start = dode.distill(gmm, "ddim", 4, teacher=teacher, guard=False)
    targets = teacher.targets(start)
    for bad, match in (({"gradient": "exact"}, "gradient"), ({"batch_size": 0}, "batch_size"),
                       ({"tolerance": 1.5}, "tolerance")):
        with pytest.raises(ValueError, match=match):
            optimise(gmm, start, teacher.noise, targets, progress=False, **bad)
    with pytest.raises(ValueError, match="set_timesteps|steps on integer"):
        set_levels(dode.make_scheduler("ddim", gmm), torch.ones(4))


def test_set_levels_keeps_the_graph_through_the_initial_scale_and_time_input(gmm):
    """Heun's initial state is noise * sqrt(1 + sigma_0^2) in its own convention: the first level's gradient
    flows through it as well as through the model's time input."""
    scheduler = dode.make_scheduler("heun", gmm)
    scheduler.set_timesteps(3)
    levels = torch.tensor([20.0, 2.0, 0.3], dtype=torch.float64, requires_grad=True)
    set_levels(scheduler, levels)
    assert scheduler.timesteps.requires_grad and scheduler.sigmas.requires_grad
    assert torch.as_tensor(scheduler.init_noise_sigma).requires_grad
    x, _ = integrate(gmm, DODEScheduler(scheduler, [0.0] * 5, 3), None, seeded_noise(gmm.sample_shape, 2, 0).double(),
                     grad=True)
    x.sum().backward()
    assert torch.all(levels.grad != 0)
