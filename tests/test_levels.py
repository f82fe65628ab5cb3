"""The levels are the levels (issue 25): where a scheduler evaluates the model and where its update puts the state.

On its sigma spacings diffusers hands the model an integer timestep while the update steps on the continuous level;
``TimeGrid.evaluated`` reports the first, ``TimeGrid.states`` the second. An explicit (or learned) grid evaluates the
model at exactly its levels, and ``set_grid`` given a named spacing's ``TimeGrid`` reproduces that spacing bit for
bit. The levels here are computed independently: sqrt((1 - abar) / abar) from the scheduler's own ``alphas_cumprod``,
log-linear between training timesteps."""
import copy

import numpy as np
import pytest
import torch

import dode
from dode.core.sampling import integrate, seeded_noise
from dode.core.scheduler import make_scheduler
from dode.core.solvers import GRID_SOLVERS, get_solver, set_grid
from dode.core.timegrid import TimeGrid
from dode.experiments.checks import possible

NFES = (3, 5, 8, 9, 10)
#: the solvers whose diffusers scheduler rounds (or truncates) the model's timestep on its sigma spacings
ROUNDING = ("dpm_solver_2", "dpm_solver_pp_2m", "deis", "unipc")
SIGMA_SPACINGS = ("karras", "exponential", "beta", "lu")
CASES = [(name, spacing) for name in GRID_SOLVERS if get_solver(name).custom_grid
         for spacing in get_solver(name).spacings]


class Spy(torch.nn.Module):
    """The model, recording the time input of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.times = model, []
        self.sample_shape, self.scheduler_config = model.sample_shape, model.scheduler_config

    def forward(self, x, t):
        self.times.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.model(x, t)


def _sigma_at(scheduler, t):
    """sigma at (fractional) training timesteps t, from the scheduler's alphas_cumprod, written out."""
    abar = scheduler.alphas_cumprod.double().numpy()
    log_sigma = 0.5 * np.log((1 - abar) / abar)
    t = np.asarray(t, dtype=np.float64)
    low = np.minimum(np.floor(t).astype(int), len(abar) - 2)
    return np.exp((1 - (t - low)) * log_sigma[low] + (t - low) * log_sigma[low + 1])


def _scheduler(model, name, spacing, nfe):
    scheduler = make_scheduler(name, model, spacing)
    scheduler.set_timesteps(get_solver(name).steps_for(nfe))
    return scheduler


def _run(model, scheduler, noise):
    spy = Spy(model)
    sample, _ = integrate(spy, copy.deepcopy(scheduler), None, noise)
    return sample, np.array(spy.times)


@pytest.mark.parametrize("name,spacing", CASES)
def test_a_named_spacing_is_the_grid_of_its_timegrid(gmm, name, spacing):
    """set_grid of a named spacing's TimeGrid on a scheduler of that config moved elsewhere gives its samples back:
    bit for bit, but for iPNDM on integer timesteps (there it steps on alphas_cumprod itself, on a grid on float32
    levels). The config stays: Heun's first state depends on its timestep spacing (init_noise_sigma)."""
    noise = seeded_noise(gmm.sample_shape, 6, 3)
    for nfe in _nfes(name, NFES):
        named = _scheduler(gmm, name, spacing, nfe)
        grid = TimeGrid.of(named)
        moved = _scheduler(gmm, name, spacing, nfe)
        set_grid(moved, grid.steps * np.linspace(1.0, 0.8, len(grid.steps)))  # elsewhere first
        set_grid(moved, grid)
        (a, times_a), (b, times_b) = _run(gmm, named, noise), _run(gmm, moved, noise)
        if name == "ipndm" and spacing in ("leading", "trailing", "linspace"):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
        else:
            assert torch.equal(a, b), (name, spacing, nfe)
        np.testing.assert_array_equal(times_a, times_b)
        # what TimeGrid reports as evaluated is the level of the time input the model really got
        np.testing.assert_allclose(grid.evaluated, _sigma_at(named, times_a), rtol=1e-6)


@pytest.mark.parametrize("name,spacing", CASES)
def test_explicit_levels_are_where_the_model_is_evaluated(gmm, name, spacing):
    noise = seeded_noise(gmm.sample_shape, 6, 3)
    for nfe in _nfes(name, NFES):
        scheduler = _scheduler(gmm, name, spacing, nfe)
        levels = TimeGrid.of(scheduler).steps
        set_grid(scheduler, levels)
        _, times = _run(gmm, scheduler, noise)
        grid = TimeGrid.of(scheduler)
        np.testing.assert_allclose(grid.steps, levels, rtol=1e-6)
        # every evaluation's time input has the level of the state its update steps from (float32 levels)
        np.testing.assert_allclose(_sigma_at(scheduler, times), grid.states[:-1], rtol=2e-6)
        assert grid.level_gap < 2e-6


@pytest.mark.parametrize("name,spacing", CASES)
def test_level_gap_is_where_diffusers_rounds_the_timestep(gmm, name, spacing):
    """The named spacings whose model sees another level than the update: only the sigma spacings of the
    schedulers that round the timestep, by more than 0.1 % of the level somewhere between NFE 3 and 10."""
    gaps = [TimeGrid.of(_scheduler(gmm, name, spacing, nfe)).level_gap for nfe in _nfes(name, range(3, 11))]
    if name in ROUNDING and spacing in SIGMA_SPACINGS:
        assert 1e-3 < max(gaps) < 0.12  # docs/grids-and-guard.md: over 0.1 %, up to a tenth of the level
        if spacing == "exponential":
            assert max(gaps) > 0.05
    else:
        assert max(gaps) < 1e-4  # float32 levels and fractional timesteps: rounding


def _nfes(name, nfes) -> list[int]:
    """Those of ``nfes`` that solver ``name`` can make exactly (Heun: odd ones)."""
    return [nfe for nfe in nfes if possible(name, nfe)]


def test_set_grid_of_a_timegrid_checks_its_step_count(gmm):
    grid = TimeGrid.of(_scheduler(gmm, "deis", "karras", 5))
    with pytest.raises(ValueError, match="needs 6 noise levels"):
        set_grid(_scheduler(gmm, "deis", "karras", 6), grid)


def test_named_spacing_matches_its_grid_on_a_unet():
    unet_digits = dode.load_model("unet-digits", device="cpu")
    noise = seeded_noise(unet_digits.sample_shape, 4, 5)
    for name in ROUNDING:
        named = _scheduler(unet_digits, name, "karras", 5)
        moved = _scheduler(unet_digits, name, get_solver(name).default_spacing, 5)
        set_grid(moved, TimeGrid.of(named))
        assert torch.equal(_run(unet_digits, named, noise)[0], _run(unet_digits, moved, noise)[0])
        levels = _scheduler(unet_digits, name, "karras", 5)
        set_grid(levels, TimeGrid.of(named).steps)
        assert TimeGrid.of(levels).level_gap < 2e-6 < TimeGrid.of(named).level_gap
