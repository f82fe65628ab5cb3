"""iPNDM (dode.core.ipndm) against DDIM, the closed-form Gaussian ODE, a direct transcription of its update,
diffusers' pipeline and persistence machinery, and diffusers' scheduler contract (partial loops, the step counter
of EulerDiscreteScheduler, DDIMScheduler's training schedule and step arguments)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerOutput

import dode
from dode.core.ipndm import IPNDMDiscreteScheduler
from dode.core.solvers import set_grid

NUM = 24
#: the issue's coefficients, written here rather than imported, so that the transcription is independent
AB = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm(model, spacing=None, **overrides):
    """iPNDM on a named spacing, or on a list of noise levels (then a zero-lambda DODEScheduler on that grid)."""
    if spacing is None or isinstance(spacing, str):
        return dode.make_scheduler("ipndm", model, spacing, **overrides)
    return dode.grid_scheduler("ipndm", model, spacing, **overrides)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_order_one_is_ddim_bit_for_bit_on_ddims_timesteps(gmm, spacing):
    """At NFE that divide T = 1000: otherwise DDIM steps to t - T // n, which is not its next timestep (at NFE 3
    on trailing: 666 -> 333, then evaluates at 332), while iPNDM steps to the next timestep."""
    for nfe in (4, 5, 8):
        first_order = dode.sample(gmm, ipndm(gmm, spacing, max_order=1), nfe, NUM, seed=3, progress=False)
        ddim = dode.sample(gmm, "ddim", nfe, NUM, seed=3, spacing=spacing, progress=False)
        assert torch.equal(first_order, ddim), (spacing, nfe)
        # and the full method is a different one
        assert (dode.sample(gmm, ipndm(gmm, spacing), nfe, NUM, seed=3, progress=False) - ddim).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_order_one_is_ddim_for_v_and_x0_models_too(gmm, prediction_type):
    model = dode.as_prediction_type(gmm, prediction_type)
    first_order = dode.sample(model, ipndm(model, "trailing", max_order=1), 5, NUM, seed=4, progress=False)
    ddim = dode.sample(model, "ddim", 5, NUM, seed=4, spacing="trailing", progress=False)
    torch.testing.assert_close(first_order, ddim, rtol=0, atol=2e-5)
    # the same ODE whatever the parametrisation: iPNDM on the converted model agrees with iPNDM on eps
    eps = dode.sample(gmm, "ipndm", 5, NUM, seed=4, progress=False)
    torch.testing.assert_close(dode.sample(model, "ipndm", 5, NUM, seed=4, progress=False), eps, rtol=0, atol=2e-4)


def error_against_closed_form(gaussian, steps, max_order, top=2.0):
    """Max error at sigma = 0 of iPNDM from sigma = ``top`` on a grid uniform in sigma (its ODE variable)."""
    grid = np.linspace(top, 0.0, steps + 1)[:-1]
    scheduler = ipndm(gaussian.model, grid, max_order=max_order)
    x = dode.sample(gaussian.model, scheduler, steps, 64, seed=0, progress=False).double()
    exact = gaussian.ddpm_state(dode.seeded_noise(gaussian.shape, 64, 0), 1.0, top, 0.0)
    return (x - exact).abs().max().item()


def test_error_shrinks_at_the_order_of_the_multistep_method(gaussian):
    """Global error ~ h^p. DDIM (order 1) has p = 1 and two-step Adams-Bashforth p = 2. iPNDM starts with one
    Euler step and then AB2, AB3: its error is several times smaller than AB2's, and at small h the Euler
    start's O(h^2) is what remains, so its asymptotic slope is 2, not 4 (measured: 3.4 from 4 to 8 steps, then
    2.0)."""
    steps = [4, 8, 16, 32, 64]
    errors = {order: np.array([error_against_closed_form(gaussian, n, order) for n in steps]) for order in (1, 2, 4)}
    slope = {order: -np.polyfit(np.log(steps), np.log(e), 1)[0] for order, e in errors.items()}
    local = {order: -np.log2(e[1:] / e[:-1]) for order, e in errors.items()}
    assert 0.9 < slope[1] < 1.1 and np.all(np.abs(local[1][1:] - 1) < 0.1), errors[1]
    assert 1.8 < slope[2] < 2.2 and np.all(np.abs(local[2][1:] - 2) < 0.1), errors[2]
    assert slope[4] > slope[1] + 1.0 and local[4][0] > 3.0 and abs(local[4][-1] - 2) < 0.1, errors[4]
    assert np.all(errors[4] < errors[2]) and np.all(errors[4] < errors[1] / 5)


def transcribed_ipndm(model, timesteps, noise, lambdas=None):
    """The iPNDM update written out from its formula, in float64, on integer ``timesteps`` then the clean sample:
    x_next = sqrt(abar_next / abar) x + (sqrt(1 - abar_next) - sqrt(abar_next / abar) sqrt(1 - abar)) e~, e~
    the Adams-Bashforth combination of the latest (D-ODE corrected) noise predictions."""
    alphas = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod.double()
    abar = [alphas[t].item() for t in timesteps] + [1.0]
    x, history, previous = noise.double(), [], None
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            eps = model(x.float(), torch.tensor(t)).double()
        lam = 0.0 if lambdas is None else lambdas[i]
        corrected = eps if previous is None else eps + lam * (eps - previous)
        previous = eps
        history = [corrected, *history][:4]
        combined = sum(c * e for c, e in zip(AB[len(history)], history))
        ratio = np.sqrt(abar[i + 1] / abar[i])
        x = ratio * x + (np.sqrt(1 - abar[i + 1]) - ratio * np.sqrt(1 - abar[i])) * combined
    return x


@pytest.mark.parametrize("nfe", [3, 5, 10])
def test_an_independent_transcription_gives_the_same_samples(gmm, nfe):
    leading = [k * (1000 // nfe) for k in reversed(range(nfe))]  # uniform in t, evaluated at t = 0 last
    noise = dode.seeded_noise(gmm.sample_shape, NUM, 9)
    expected = transcribed_ipndm(gmm, leading, noise).float()
    got = dode.sample(gmm, "ipndm", nfe, NUM, seed=9, progress=False)
    assert dode.get_solver("ipndm").default_spacing == "leading"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # float32 against float64 arithmetic
    # D-iPNDM: the D-ODE wrapper corrects each noise prediction before it enters the multistep history
    lambdas = list(np.linspace(0.0, 0.4, nfe))  # lambda_0 has no previous output to act on
    wrapped = dode.DODEScheduler(ipndm(gmm), lambdas, nfe)
    corrected = dode.sample(gmm, wrapped, nfe, NUM, seed=9, progress=False)
    # lambdas amplify the round-off of late steps (measured up to 3e-4 at NFE 10), against a change of 0.5
    torch.testing.assert_close(corrected, transcribed_ipndm(gmm, leading, noise, lambdas).float(), rtol=0, atol=1e-3)
    assert (corrected - got).abs().max() > 0.1


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "karras", "exponential"])
def test_zero_lambdas_are_the_base_solver(gmm, spacing):
    base = dode.sample(gmm, "ipndm", 5, NUM, seed=2, spacing=spacing, progress=False)
    zero = dode.DODEScheduler(ipndm(gmm, spacing), [0.0] * 5, 5)
    assert torch.equal(dode.sample(gmm, zero, 5, NUM, seed=2, progress=False), base)


def test_a_moved_grid_is_the_spacing_it_was_moved_to(gmm):
    """set_grid (learned grids) replaces the noise levels; the steps must then use them, not the old ones."""
    target = ipndm(gmm, "exponential")
    target.set_timesteps(5)
    moved = ipndm(gmm, "trailing")
    moved.set_timesteps(5)
    set_grid(moved, target.sigmas[:-1].double().numpy())
    torch.testing.assert_close(moved.sigmas, target.sigmas)
    noise = dode.seeded_noise(gmm.sample_shape, NUM, 1)
    x_moved, x_target = noise.clone(), noise.clone()
    for t_m, t_t in zip(moved.timesteps, target.timesteps):
        x_moved = moved.step(gmm(x_moved, t_m), t_m, x_moved).prev_sample
        x_target = target.step(gmm(x_target, t_t), t_t, x_target).prev_sample
    torch.testing.assert_close(x_moved, x_target, rtol=0, atol=1e-5)
    assert (x_moved - dode.sample(gmm, "ipndm", 5, NUM, seed=1, progress=False)).abs().max() > 1e-2
    # and an explicit grid through the public API is the same thing
    explicit = dode.grid_scheduler("ipndm", gmm, target.sigmas[:-1].tolist())
    torch.testing.assert_close(dode.sample(gmm, explicit, 5, NUM, seed=1, progress=False), x_target, rtol=0, atol=1e-5)


def test_save_and_load_round_trip(gmm, tmp_path):
    scheduler = ipndm(gmm, "karras", max_order=3)
    scheduler.save_pretrained(tmp_path / "base")
    loaded = IPNDMDiscreteScheduler.from_pretrained(tmp_path / "base")
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}
    assert public(loaded.config) == public(scheduler.config) and loaded.config.max_order == 3
    assert torch.equal(dode.sample(gmm, loaded, 4, NUM, seed=5, progress=False),
                       dode.sample(gmm, scheduler, 4, NUM, seed=5, progress=False))
    fitted = dode.distill(gmm, "ipndm", 4, guard=False)
    fitted.save_pretrained(tmp_path / "dode")
    again = dode.DODEScheduler.from_pretrained(tmp_path / "dode")
    assert isinstance(again.base_scheduler, IPNDMDiscreteScheduler) and again.lambdas == fitted.lambdas
    assert torch.equal(dode.sample(gmm, again, 4, NUM, seed=5, progress=False),
                       dode.sample(gmm, fitted, 4, NUM, seed=5, progress=False))
    # a diffusers config (any Karras scheduler's) converts, as diffusers' own schedulers do
    converted = IPNDMDiscreteScheduler.from_config(DDIMScheduler(**gmm.scheduler_config).config)
    assert converted.config.beta_end == gmm.scheduler_config["beta_end"] and converted.config.max_order == 4


def test_ddpm_pipeline_runs_it_and_matches_dode_sample(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=IPNDMDiscreteScheduler(prediction_type="v_prediction", beta_end=0.015))
    pipe.set_progress_bar_config(disable=True)
    model = dode.pipeline_model(pipe)
    images = pipe(**model.pipeline_inputs(4, 7), num_inference_steps=5, output_type="pt").images
    expected = (dode.sample(model, "ipndm", 5, 4, seed=7, progress=False) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    pipe.save_pretrained(tmp_path)  # the pipeline's model_index.json names dode's class; it reloads
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler) is IPNDMDiscreteScheduler
    torch.testing.assert_close(reloaded(**model.pipeline_inputs(4, 7), num_inference_steps=5, output_type="pt").images,
                               images, rtol=0, atol=0)


def test_bad_settings_and_misuse_are_clear_errors(gmm):
    with pytest.raises(ValueError, match="max_order must be one of 1, 2, 3, 4"):
        IPNDMDiscreteScheduler(max_order=5)
    with pytest.raises(ValueError, match="prediction_type"):
        IPNDMDiscreteScheduler(prediction_type="flow")
    scheduler = IPNDMDiscreteScheduler()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.ones_like(x), t, x).prev_sample
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, 0, x)


# -- diffusers' scheduler contract: partial loops (image-to-image), the step counter, DDIM's step arguments ------------

def partial_loop(scheduler, model, x0, noise, k, steps=10, begin=False, scale=False):
    """diffusers' image-to-image loop: ``add_noise`` at ``timesteps[k]``, then a step at each of ``timesteps[k:]``
    (``begin``: the pipeline calls ``set_begin_index(k)``; ``scale``: it calls ``scale_model_input``); the
    start state and the end state."""
    scheduler.set_timesteps(steps)
    if begin:
        scheduler.set_begin_index(k)
    start = x = scheduler.add_noise(x0, noise, scheduler.timesteps[k:k + 1])
    for t in scheduler.timesteps[k:]:
        model_input = scheduler.scale_model_input(x, t) if scale else x
        x = scheduler.step(model(model_input, t), t, x).prev_sample
    return start, x


def clean_and_noise(model, seed=11):
    x0 = (dode.seeded_noise(model.sample_shape, NUM, seed) * 0.6).clamp(-1, 1)
    return x0, dode.seeded_noise(model.sample_shape, NUM, seed + 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("k", [8, 5])
def test_a_partial_loop_of_order_one_is_ddims(gmm, spacing, k):
    """diffusers' DDIM ``test_full_loop_with_noise`` pattern (10 steps from ``timesteps[k]``): DDIM reads the
    current timestep; iPNDM used to start at index 0 whatever it was given."""
    x0, noise = clean_and_noise(gmm)
    ddim = DDIMScheduler(**gmm.scheduler_config, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True)
    first_order = IPNDMDiscreteScheduler(**gmm.scheduler_config, timestep_spacing=spacing, max_order=1)
    ddim_start, expected = partial_loop(ddim, gmm, x0, noise, k)
    start, got = partial_loop(first_order, gmm, x0, noise, k)
    assert torch.equal(first_order.timesteps, ddim.timesteps) and torch.equal(start, ddim_start)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("begin", [False, True], ids=["from-timestep", "set_begin_index"])
@pytest.mark.parametrize("k", [4, 8])
def test_a_partial_loop_of_the_full_method_is_the_transcription_from_an_empty_history(gmm, begin, k):
    """iPNDM from ``timesteps[k]`` is iPNDM on ``timesteps[k:]`` alone: orders 1, 2, 3, 4, ... from there, whether
    the first step finds its index from its timestep or from ``set_begin_index`` (a full run before leaves no
    history behind)."""
    x0, noise = clean_and_noise(gmm)
    leading = [j * 100 for j in reversed(range(10))]
    scheduler = ipndm(gmm)
    dode.sample(gmm, scheduler, 10, NUM, seed=0, progress=False)  # a full run first, on the same scheduler
    start, got = partial_loop(scheduler, gmm, x0, noise, k, begin=begin)
    assert scheduler.timesteps.tolist() == leading
    expected = transcribed_ipndm(gmm, leading[k:], start).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # float32 against float64 arithmetic
    # from the same start, the same number of steps on the levels at the top of the schedule (where step began
    # whatever its timestep) ends far away (measured: 1.1 at k = 4, 1.6 at k = 8)
    assert (got - transcribed_ipndm(gmm, leading[:10 - k], start).float()).abs().max() > 0.5


def test_step_index_and_begin_index_follow_eulers(gmm):
    """The counter of diffusers' sigma schedulers, side by side with EulerDiscreteScheduler on the same config:
    None after set_timesteps; set at the first ``scale_model_input`` or ``step`` of a run, from ``begin_index``
    or from the timestep; one more per step."""
    config = dict(gmm.scheduler_config, timestep_spacing="leading")
    euler, ours = EulerDiscreteScheduler(**config), IPNDMDiscreteScheduler(**config)
    state = lambda s: (s.step_index, s.begin_index)
    assert state(ours) == state(euler) == (None, None)
    x = dode.seeded_noise(gmm.sample_shape, 2, 0)
    for begin, k, scale in [(None, 6, False), (3, 3, True), (2, 2, False), (None, 0, True)]:
        trace = {}
        for name, scheduler in (("euler", euler), ("ours", ours)):
            scheduler.set_timesteps(10)
            seen = [state(scheduler)]
            if begin is not None:
                scheduler.set_begin_index(begin)
                seen.append(state(scheduler))
            for t in scheduler.timesteps[k:]:
                if scale:
                    scheduler.scale_model_input(x, t)
                    seen.append(state(scheduler))
                scheduler.step(torch.zeros_like(x), t, x)
                seen.append(state(scheduler))
            trace[name] = seen
        assert trace["ours"] == trace["euler"], (begin, k, scale)
        assert trace["ours"][0] == (None, None) and trace["ours"][-1] == (10, begin)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this schedule's timesteps"):
        ours.step(x, 950, x)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_the_training_schedule_is_ddims(beta_schedule):
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours, ddim = IPNDMDiscreteScheduler(**config), DDIMScheduler(**config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, name), getattr(ddim, name)), name


def test_step_takes_ddims_arguments_and_only_eta_zero(gmm):
    """DDIM's positional order, so ``step(out, t, x, 0.0)`` is eta = 0 (it used to be return_dict, giving a tuple);
    pipelines pass ``eta`` and ``generator`` when step's signature names them (``prepare_extra_step_kwargs``)."""
    parameters = list(inspect.signature(IPNDMDiscreteScheduler.step).parameters)
    assert parameters[:9] == list(inspect.signature(DDIMScheduler.step).parameters)
    scheduler = ipndm(gmm)
    x = dode.seeded_noise(gmm.sample_shape, 4, 2)
    runs = {}
    for call in ("plain", "positional", "keywords", "none", "tuple"):
        scheduler.set_timesteps(5)
        y = x
        for t in scheduler.timesteps:
            out = gmm(y, t)
            if call == "plain":
                result = scheduler.step(out, t, y)
            elif call == "positional":
                result = scheduler.step(out, t, y, 0.0)
            elif call == "keywords":
                result = scheduler.step(out, t, y, eta=0.0, use_clipped_model_output=True,
                                        generator=torch.Generator().manual_seed(1), variance_noise=None)
            elif call == "none":
                result = scheduler.step(out, t, y, None)
            else:
                result = scheduler.step(out, t, y, 0.0, False, None, None, False)
            if call == "tuple":
                assert isinstance(result, tuple) and len(result) == 1
                y = result[0]
            else:
                assert isinstance(result, SchedulerOutput)
                y = result.prev_sample
        runs[call] = y
    assert all(torch.equal(y, runs["plain"]) for y in runs.values())
    torch.testing.assert_close(runs["plain"], dode.sample(gmm, "ipndm", 5, 4, seed=2, progress=False), rtol=0, atol=0)
    scheduler.set_timesteps(5)
    t = scheduler.timesteps[0]
    for eta in (0.5, 1.0, -0.1):
        with pytest.raises(ValueError, match="iPNDM is deterministic.*DDIM or DDPM"):
            scheduler.step(gmm(x, t), t, x, eta)
    with pytest.raises(ValueError, match="deterministic"):
        scheduler.step(gmm(x, t), t, x, variance_noise=torch.zeros_like(x))
    assert scheduler.step_index is None  # a refused step does not start the run


@pytest.mark.parametrize("spacing", ["karras", "exponential", "leading"])
def test_add_noise_puts_the_state_at_the_noise_level_the_steps_use(gmm, spacing):
    """Image-to-image starts from add_noise at timesteps[k]: its noise-to-signal ratio is the step's own sigma at k,
    also at the fractional timesteps of the sigma spacings (where it used to truncate the timestep)."""
    scheduler = ipndm(gmm, spacing)
    scheduler.set_timesteps(6)
    shape = (1, *gmm.sample_shape)
    for k, t in enumerate(scheduler.timesteps):
        signal = scheduler.add_noise(torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
                                     t.reshape(1))
        spread = scheduler.add_noise(torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64),
                                     t.reshape(1))
        ratio = float(spread.flatten()[0] / signal.flatten()[0])
        assert ratio == pytest.approx(float(scheduler.sigmas[k]), rel=2e-5), (spacing, k, float(t))
