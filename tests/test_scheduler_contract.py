"""diffusers' scheduler contract (what diffusers' own ``SchedulerCommonTest`` checks), written here, for
``DODEScheduler`` around every base in ``dode.SOLVERS`` with zero and with nonzero lambdas, and for
``IPNDMDiscreteScheduler`` itself (issue 26, docs/diffusers.md). Each check compares against the base scheduler
driven by hand: the same loop on ``o_i + lambda_i (o_i - o_{i-1})``, its config, its own outputs."""
from __future__ import annotations

import copy
import inspect
import re
import warnings

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

import dode
from dode.core.ipndm import IPNDMDiscreteScheduler
from dode.core.scheduler import OWN_KEYS, LambdasDroppedWarning
from dode.core.solvers import SOLVERS, get_solver
from dode.core.timegrid import TimeGrid

pytestmark = pytest.mark.usefixtures("one_thread")
NFE = 5
KINDS = [(solver, lambdas) for solver in SOLVERS for lambdas in ("zero", "fitted")]


def lambdas_of(kind: str, nfe: int) -> list:
    """Zero, or nonzero lambdas of both signs and the size fits have (the contract does not depend on their values)."""
    return [0.0] * nfe if kind == "zero" else [0.0, *(0.3 * (-1) ** i * (i + 1) / nfe for i in range(nfe - 1))]


def wrapped(model, solver: str, kind: str) -> dode.DODEScheduler:
    steps = get_solver(solver).steps_for(NFE)
    return dode.DODEScheduler(dode.make_scheduler(solver, model), lambdas_of(kind, NFE), steps)


def lockstep(scheduler, steps=None):
    """``scheduler`` and a copy of its base, both after ``set_timesteps`` (the base driven by hand beside it)."""
    base = copy.deepcopy(scheduler.base_scheduler)
    steps = scheduler.num_inference_steps if steps is None else steps
    scheduler.set_timesteps(steps)
    base.set_timesteps(steps)
    return scheduler, base


def public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def start(model, scheduler, seed: int = 0, num: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, *model.sample_shape, generator=generator) * float(scheduler.init_noise_sigma)


def run(model, scheduler, x, timesteps, **step_options) -> torch.Tensor:
    """The scheduler's own loop (a pipeline's)."""
    for t in timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_options).prev_sample
    return x


def by_hand(model, base, lambdas, x, timesteps, first: int = 0, **step_options) -> torch.Tensor:
    """The base scheduler's loop on D-ODE corrected outputs, written out: evaluation ``first + j`` gets
    lambdas[first + j], the first of the loop none (it has no previous output)."""
    previous = None
    for j, t in enumerate(timesteps):
        out = model(base.scale_model_input(x, t), t)
        lam = lambdas[first + j]
        corrected = out if previous is None or lam == 0.0 else out + lam * (out - previous)
        previous = out
        x = base.step(corrected, t, x, **step_options).prev_sample
    return x


# -- persistence and configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, kind", KINDS)
def test_save_load_and_from_config_round_trips(gmm, solver, kind, tmp_path):
    scheduler = wrapped(gmm, solver, kind)
    scheduler.save_pretrained(tmp_path)
    for again in (dode.DODEScheduler.from_pretrained(tmp_path), dode.DODEScheduler.from_config(scheduler.config)):
        assert public(again.config) == public(scheduler.config)
        for s in (scheduler, again):
            s.set_timesteps(s.num_inference_steps)
        x = start(gmm, scheduler)
        assert torch.equal(run(gmm, again, x, again.timesteps), run(gmm, scheduler, x, scheduler.timesteps))


def test_ipndm_save_load_and_from_config_round_trips(gmm, tmp_path):
    scheduler = dode.make_scheduler("ipndm", gmm)
    scheduler.save_pretrained(tmp_path)
    for again in (IPNDMDiscreteScheduler.from_pretrained(tmp_path), IPNDMDiscreteScheduler.from_config(scheduler.config)):
        assert public(again.config) == public(scheduler.config)
        for s in (scheduler, again):
            s.set_timesteps(NFE)
        x = start(gmm, scheduler)
        assert torch.equal(run(gmm, again, x, again.timesteps), run(gmm, scheduler, x, scheduler.timesteps))


@pytest.mark.parametrize("solver", SOLVERS)
def test_switching_to_each_compatible_class_is_switching_from_the_base(solver):
    """``Other.from_config(dode.config)`` is ``Other.from_config(base.config)`` for every compatible class, also for
    a base built on default values (diffusers' ``_use_default_values``: a class switched to takes its own
    defaults there), and it warns that the lambdas are dropped."""
    base = type(dode.make_scheduler(solver, dode.load_model("gmm-digits", device="cpu")))()  # every value a default
    scheduler = dode.DODEScheduler(base, lambdas_of("fitted", NFE), get_solver(solver).steps_for(NFE))
    assert scheduler.compatibles == base.compatibles
    switched_to = 0
    for other in scheduler.compatibles:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = other.from_config(base.config)
            except ImportError:  # a class whose optional dependency (torchsde, scipy) is not installed
                continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            switched = other.from_config(scheduler.config)
        assert [str(w.message).split(" was built")[0] for w in caught
                if w.category is LambdasDroppedWarning] == [other.__name__]
        switched_to += 1
        # (diffusers keeps the keys a class does not take in its config: the D-ODE keys, here)
        kept = {key: value for key, value in public(switched.config).items() if key not in OWN_KEYS}
        assert type(switched) is other and kept == public(expected.config), other.__name__
    assert switched_to >= 10


def test_ipndm_switches_to_compatible_classes_as_any_scheduler(gmm):
    scheduler = dode.make_scheduler("ipndm", gmm)
    switched = DDIMScheduler.from_config(scheduler.config)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert switched.config[key] == scheduler.config[key]
    assert public(IPNDMDiscreteScheduler.from_config(switched.config).config) == {
        **public(scheduler.config), "timestep_spacing": switched.config.timestep_spacing}


@pytest.mark.parametrize("solver", SOLVERS)
def test_config_fix_ups_reach_the_base(gmm, solver):
    """Pipelines patch configs in place (``scheduler._internal_dict = FrozenDict({**config, "steps_offset": 1})``,
    35 sites in diffusers) or call ``register_to_config``: the base scheduler gets it, as a plain one would."""
    for write in ("internal_dict", "register"):
        plain = dode.make_scheduler(solver, gmm)
        scheduler = dode.DODEScheduler(copy.deepcopy(plain), lambdas_of("fitted", NFE), get_solver(solver).steps_for(NFE))
        for s in (plain, scheduler):
            if write == "internal_dict":
                s._internal_dict = FrozenDict({**s.config, "steps_offset": 1})
            else:
                s.register_to_config(steps_offset=1)
        assert scheduler.config["steps_offset"] == 1 == scheduler.base_scheduler.config["steps_offset"]
        plain.set_timesteps(scheduler.num_inference_steps)
        scheduler.set_timesteps(scheduler.num_inference_steps)
        assert torch.equal(plain.timesteps, scheduler.timesteps), (solver, write)
    # its own keys change the fit, with the constructor's checks
    scheduler.register_to_config(lambdas=[0.0, 0.1, 0.2, 0.3, 0.4][: scheduler.nfe])
    assert scheduler.lambdas == [0.0, 0.1, 0.2, 0.3, 0.4][: scheduler.nfe]
    with pytest.raises(ValueError, match="finite"):
        scheduler.register_to_config(lambdas=[float("nan")] * scheduler.nfe)
    with pytest.raises(ValueError, match="cannot change"):
        scheduler._internal_dict = FrozenDict({**scheduler.config, "base_scheduler": "EulerDiscreteScheduler"})


# -- one step, and what pipelines call around it -----------------------------------------------------------------
@pytest.mark.parametrize("solver, kind", KINDS)
def test_step_shapes_add_noise_scale_model_input_and_timesteps_are_the_bases(gmm, solver, kind):
    scheduler, base = lockstep(wrapped(gmm, solver, kind))
    assert scheduler.timesteps.dtype == base.timesteps.dtype and torch.equal(scheduler.timesteps, base.timesteps)
    x = start(gmm, scheduler)
    clean, noise = torch.randn_like(x), torch.randn_like(x)
    t = scheduler.timesteps[1:2]
    assert torch.equal(scheduler.add_noise(clean, noise, t), base.add_noise(clean, noise, t))
    t = scheduler.timesteps[0]
    assert torch.equal(scheduler.scale_model_input(x, t), base.scale_model_input(x, t))  # (later ones: full loops)
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        out = gmm(scaled, t)
        step = scheduler.step(out, t, x)
        assert step.prev_sample.shape == x.shape == out.shape
        assert scheduler.step_index == i + 1
        x = step.prev_sample
    scheduler.set_timesteps(scheduler.num_inference_steps)
    assert scheduler.step_index is None and scheduler.begin_index is None
    t = scheduler.timesteps[0]
    tuple_out = scheduler.step(gmm(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)
    assert isinstance(tuple_out, tuple) and tuple_out[0].shape == x.shape


@pytest.mark.parametrize("solver, kind", KINDS)
def test_a_full_loop_is_the_base_loop_on_corrected_outputs(gmm, solver, kind):
    scheduler, base = lockstep(wrapped(gmm, solver, kind))
    x = start(gmm, scheduler, seed=1)
    assert torch.equal(run(gmm, scheduler, x, scheduler.timesteps),
                       by_hand(gmm, base, scheduler.lambdas, x, base.timesteps))


@pytest.mark.parametrize("begin", ["set_begin_index", "timesteps[k:]"])
@pytest.mark.parametrize("solver, kind", KINDS)
def test_a_loop_from_timesteps_k_gets_the_lambdas_from_k(gmm, solver, kind, begin):
    """Image-to-image: a loop over ``timesteps[k:]`` (after ``set_begin_index(k)``, as Stable Diffusion's img2img
    does, or from the first step's timestep alone, as DDPM-style loops do) is the base's same loop on outputs
    corrected with lambdas[k], lambdas[k + 1], ..., the first uncorrected."""
    k = 2  # a whole step into the run for every base (Heun's timesteps pair its stages after the first)
    scheduler, base = lockstep(wrapped(gmm, solver, kind))
    if begin == "set_begin_index":
        scheduler.set_begin_index(k)
        assert scheduler.begin_index == k
        if hasattr(base, "set_begin_index"):
            base.set_begin_index(k)
    x = start(gmm, scheduler, seed=2)
    got = run(gmm, scheduler, x, scheduler.timesteps[k:])
    assert scheduler.step_index == len(scheduler.timesteps)
    assert torch.equal(got, by_hand(gmm, base, scheduler.lambdas, x, base.timesteps[k:], first=k))
    if kind == "fitted":  # and not the lambdas from the first (the bug this fixes)
        again = copy.deepcopy(scheduler.base_scheduler)
        again.set_timesteps(scheduler.num_inference_steps)
        if begin == "set_begin_index" and hasattr(again, "set_begin_index"):
            again.set_begin_index(k)
        assert not torch.equal(got, by_hand(gmm, again, scheduler.lambdas, x, again.timesteps[k:], first=0))


# -- custom grids ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, kind", KINDS)
def test_custom_timesteps_and_sigmas(gmm, solver, kind):
    """Zero lambdas: a custom grid goes to the base as it is (its result, or its own error). Nonzero lambdas: the
    grid they were fitted on is taken (timesteps, or noise levels with or without the final 0), through diffusers'
    ``retrieve_timesteps`` too; any other is refused, saying what to do."""
    scheduler = wrapped(gmm, solver, kind)
    steps = scheduler.num_inference_steps
    names = inspect.signature(scheduler.set_timesteps).parameters
    assert {"timesteps", "sigmas"} <= set(names)  # retrieve_timesteps looks for them
    own = copy.deepcopy(scheduler)
    own.set_timesteps(steps)
    own_timesteps, own_levels = own.timesteps.tolist(), TimeGrid.of(own).steps.tolist()
    x = start(gmm, scheduler, seed=3)
    expected = run(gmm, own, x, own.timesteps)
    base_takes = set(inspect.signature(scheduler.base_scheduler.set_timesteps).parameters)
    custom_timesteps = [t + 1 if i else t for i, t in enumerate(own_timesteps)][: len(set(own_timesteps))]
    if kind == "zero":
        for key, value in (("timesteps", custom_timesteps), ("sigmas", own_levels[:-1] if own_levels[-1] == 0 else own_levels)):
            base = copy.deepcopy(scheduler.base_scheduler)
            if key not in base_takes:
                with pytest.raises(TypeError):
                    scheduler.set_timesteps(**{key: value})
                continue
            try:
                base.set_timesteps(**{key: value})
            except ValueError as err:  # the base's own refusal comes through as it is
                with pytest.raises(ValueError, match=re.escape(str(err)[:40])):
                    scheduler.set_timesteps(**{key: value})
                continue
            scheduler.set_timesteps(**{key: value})
            assert torch.equal(scheduler.timesteps, base.timesteps)
            assert torch.equal(run(gmm, scheduler, x, scheduler.timesteps), run(gmm, base, x, base.timesteps))
        return
    for given in ({"timesteps": own_timesteps}, {"sigmas": own_levels}, {"sigmas": [*own_levels, 0.0]}):
        again = copy.deepcopy(scheduler)
        again.set_timesteps(**given)
        assert torch.equal(run(gmm, again, x, again.timesteps), expected), given
    again = copy.deepcopy(scheduler)
    timesteps, count = retrieve_timesteps(again, timesteps=own_timesteps)
    assert timesteps.tolist() == own_timesteps and torch.equal(run(gmm, again, x, timesteps), expected)
    for given in ({"timesteps": custom_timesteps[:-1]}, {"sigmas": [v * 1.1 for v in own_levels]}):
        with pytest.raises(ValueError, match=r"fitted on their own grid.*set_timesteps\(num_inference_steps\)"):
            copy.deepcopy(scheduler).set_timesteps(**given)


# -- eta and generator ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, kind", KINDS)
def test_eta_and_generator_reach_the_base(gmm, solver, kind):
    """``step`` names ``eta`` and ``generator``, so pipelines that pass only what its signature names
    (``prepare_extra_step_kwargs``) pass them; they reach a base that takes them, a nonzero eta for a base without
    one raises, and a generator a deterministic base does not take is dropped."""
    scheduler = wrapped(gmm, solver, kind)
    names = set(inspect.signature(scheduler.step).parameters)
    assert {"eta", "generator"} <= names
    base = scheduler.base_scheduler
    seen = []
    original = base.step

    def spy(*args, **kwargs):
        seen.append(set(kwargs))
        return original(*args, **kwargs)

    spy.__signature__ = inspect.signature(original)
    object.__setattr__(base, "step", spy)
    takes = set(inspect.signature(original).parameters)
    scheduler.set_timesteps(scheduler.num_inference_steps)
    x = start(gmm, scheduler)
    t = scheduler.timesteps[0]
    out = gmm(scheduler.scale_model_input(x, t), t)
    scheduler.step(out, t, x, eta=0.0, generator=torch.Generator().manual_seed(0))
    assert seen[-1] & {"eta", "generator"} == takes & {"eta", "generator"}
    if "eta" not in takes:
        with pytest.raises(ValueError, match="has no eta"):
            scheduler.step(out, scheduler.timesteps[1], x, eta=0.5)


@pytest.mark.parametrize("kind", ["zero", "fitted"])
def test_ddim_eta_with_a_generator_is_ddims(gmm, kind):
    """DDIM's stochastic sampler (eta = 1) through the D-ODE scheduler is DDIM's on the corrected outputs, the same
    noise from the same generator seed (diffusers' test_eta, with the lambdas)."""
    scheduler, base = lockstep(wrapped(gmm, "ddim", kind), NFE)
    x = start(gmm, scheduler, seed=4)
    got = run(gmm, scheduler, x, scheduler.timesteps, eta=1.0, generator=torch.Generator().manual_seed(5))
    expected = by_hand(gmm, base, scheduler.lambdas, x, base.timesteps, eta=1.0,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    scheduler.set_timesteps(NFE)
    assert not torch.equal(got, run(gmm, scheduler, x, scheduler.timesteps))  # eta did something


# -- pipelines that would drop the lambdas ------------------------------------------------------------------------
def test_ddim_pipeline_says_loudly_that_it_drops_the_lambdas(unet, tmp_path):
    """DDIMPipeline turns any scheduler into a DDIMScheduler, when built and when loaded: a warning on the console
    (``warnings``, not only diffusers' log) says so and how to keep D-ODE."""
    scheduler = dode.DODEScheduler(DDIMScheduler(), lambdas_of("fitted", NFE), NFE)
    with pytest.warns(LambdasDroppedWarning, match=r"DDIMScheduler was built.*dode.use_dode\(pipe, scheduler\)"):
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    assert type(pipe.scheduler) is DDIMScheduler
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)  # DDPMPipeline keeps it
    with pytest.warns(LambdasDroppedWarning):
        DDIMPipeline.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambdasDroppedWarning)
        assert isinstance(DDPMPipeline.from_pretrained(tmp_path).scheduler, dode.DODEScheduler)
        DDIMScheduler.from_config(DDPMScheduler().config)  # no D-ODE config, no warning


def test_ipndm_keeps_the_contract_itself(gmm):
    """IPNDMDiscreteScheduler (dode's own diffusers scheduler) against DDIM on the same config: the same training
    schedule, add_noise and (identity) scale_model_input, integer timesteps, step shapes, DDIM's step arguments,
    and Euler's step_index / begin_index (tests/test_ipndm.py has its partial loops)."""
    scheduler = dode.make_scheduler("ipndm", gmm)
    ddim = DDIMScheduler.from_config({**gmm.scheduler_config, "timestep_spacing": "leading", "set_alpha_to_one": True})
    for s in (scheduler, ddim):
        s.set_timesteps(NFE)
    assert scheduler.timesteps.dtype == ddim.timesteps.dtype and torch.equal(scheduler.timesteps, ddim.timesteps)
    assert torch.equal(scheduler.betas, ddim.betas) and torch.equal(scheduler.alphas_cumprod, ddim.alphas_cumprod)
    x = start(gmm, scheduler)
    clean, noise = torch.randn_like(x), torch.randn_like(x)
    t = scheduler.timesteps[2:3]
    assert torch.equal(scheduler.add_noise(clean, noise, t), ddim.add_noise(clean, noise, t))
    assert list(inspect.signature(scheduler.step).parameters)[:4] == list(inspect.signature(ddim.step).parameters)[:4]
    assert scheduler.step_index is None and scheduler.begin_index is None
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(scheduler.scale_model_input(x, t), ddim.scale_model_input(x, t))
        step = scheduler.step(gmm(x, t), t, x, 0.0, generator=torch.Generator().manual_seed(0))
        assert step.prev_sample.shape == x.shape and scheduler.step_index == i + 1
        x = step.prev_sample
    scheduler.set_timesteps(NFE)
    scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2 and scheduler.step_index is None
    with pytest.raises(ValueError, match="deterministic"):
        scheduler.step(gmm(x, scheduler.timesteps[2]), scheduler.timesteps[2], x, eta=0.5)


def test_a_class_outside_the_compatibles_takes_its_own_defaults_too():
    """DODE(Euler)'s config into EDMEulerScheduler, which crashed on Euler's default sigma_min=None before the
    config kept ``_use_default_values``: now it is what Euler's own config gives."""
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

    scheduler = dode.DODEScheduler(EulerDiscreteScheduler(), [0.0, 0.2, 0.1], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        switched = EDMEulerScheduler.from_config(scheduler.config)
        expected = EDMEulerScheduler.from_config(EulerDiscreteScheduler().config)
    kept = {key: value for key, value in public(switched.config).items() if key not in OWN_KEYS}
    assert kept == public(expected.config) and switched.config.sigma_min == expected.config.sigma_min
