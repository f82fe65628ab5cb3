"""Image-to-image with fitted D-ODE schedulers against the same loop written out by hand, and one scheduler that
holds fits for several step counts (``distill(nfe=[...])``, ``DODEScheduler.combine``) against the single-count
schedulers (issue 26, docs/diffusers.md)."""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

import dode
from dode.core.distill import VALIDATION_SEED
from dode.core.reference import clear_cache
from dode.models.pipelines import pipeline_model, use_dode

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6
STRENGTH = 0.5
#: Adams-Bashforth coefficients, newest first, written here (independent of dode.core.ipndm)
AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def alphas_cumprod(config) -> torch.Tensor:
    """abar_t of the linear DDPM schedule, computed here in float64."""
    betas = torch.linspace(config["beta_start"], config["beta_end"], config["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def fitted(gmm):
    """Plain greedy fits (guard off, so the lambdas are the fit's), DDIM and iPNDM at 6 steps."""
    return {solver: dode.distill(gmm, solver, STEPS, batch_size=20, guard=False, progress=False)
            for solver in ("ddim", "ipndm")}


def img2img(model, scheduler, clean, noise, begin: bool) -> torch.Tensor:
    """A DDPM-style image-to-image loop at STRENGTH: the scheduler's own steps from timesteps[k:]."""
    scheduler.set_timesteps(STEPS)
    k = STEPS - int(STEPS * STRENGTH)
    if begin:
        scheduler.set_begin_index(k)
    timesteps = scheduler.timesteps[k:]
    x = scheduler.add_noise(clean, noise, timesteps[:1])
    for t in timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def by_hand(model, lambdas, clean, noise, order: int) -> torch.Tensor:
    """The same loop written out: DDIM's leading timesteps (t = 0, T/n, ..., descending), noise added at the first
    used, evaluation k + j corrected by lambdas[k + j] (the first of the loop not), and Adams-Bashforth of up to
    ``order`` on the noise predictions (1: DDIM) with the DDIM transfer, in float64."""
    abar = alphas_cumprod(model.scheduler_config)
    timesteps = [i * (1000 // STEPS) for i in range(STEPS)][::-1]
    k = STEPS - int(STEPS * STRENGTH)
    a = abar[timesteps[k]]
    x = (a.sqrt() * clean.double() + (1 - a).sqrt() * noise.double())
    previous, history = None, []
    for j, t in enumerate(timesteps[k:]):
        eps = model(x.float(), torch.tensor(t)).double()
        lam = lambdas[k + j]
        corrected = eps if previous is None else eps + lam * (eps - previous)
        previous = eps
        history = [corrected, *history][:order]
        combined = sum(c * e for c, e in zip(AB[len(history)], history))
        a, a_next = abar[t], (abar[timesteps[k + j + 1]] if k + j + 1 < STEPS else torch.tensor(1.0, dtype=torch.float64))
        x0 = (x - (1 - a).sqrt() * combined) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * combined
    return x.float()


@pytest.mark.parametrize("begin", [True, False], ids=["set_begin_index", "timesteps[k:]"])
@pytest.mark.parametrize("solver, order", [("ddim", 1), ("ipndm", 4)])
def test_img2img_with_a_fitted_dode_scheduler_is_the_loop_by_hand(gmm, fitted, solver, order, begin):
    scheduler = fitted[solver]
    assert any(abs(v) > 0.05 for v in scheduler.lambdas[3:])  # the lambdas the loop uses matter
    generator = torch.Generator().manual_seed(0)
    clean = dode.sample(gmm, "ddim", 10, 8, seed=5, progress=False)
    noise = torch.randn(clean.shape, generator=generator)
    got = img2img(gmm, scheduler, clean, noise, begin)
    expected = by_hand(gmm, scheduler.lambdas, clean, noise, order)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # float32 against float64
    # and not with the lambdas counted from the first evaluation (what a partial loop used to get)
    wrong = by_hand(gmm, [0.0] * 3 + scheduler.lambdas[:3], clean, noise, order)
    assert (got - wrong).abs().max() > 1e-2


# -- several step counts in one scheduler -----------------------------------------------------------------------
def test_one_scheduler_for_several_step_counts_in_ddpm_pipeline(unet, tmp_path):
    """distill(nfe=[3, 5, 10]) gives one scheduler; saved, reloaded and installed in DDPMPipeline it samples at
    num_inference_steps 3, 5 and 10 exactly as the scheduler distilled for that count alone does; its fits share one
    validation reference (computed at the first count), and a count without a fit raises, naming those it has."""
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction", beta_end=0.015))
    pipe.set_progress_bar_config(disable=True)
    model = pipeline_model(pipe)
    validation = dode.Teacher(model, batch_size=8, seed=VALIDATION_SEED, substeps="fine")
    clear_cache()
    multi = dode.distill(model, "dpm_solver_pp_2m", [3, 5, 10], batch_size=8, validation=validation, progress=False)
    assert multi.counts == [3, 5, 10] and multi.nfes == {3: 3, 5: 5, 10: 10}
    shared = [multi.for_steps(n).fit_info["cost"]["reference_shared"] for n in (3, 5, 10)]
    assert shared == [False, True, True]
    multi.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert sorted(saved["fits"]) == ["10", "3", "5"] and saved["num_inference_steps"] == 3
    reloaded = dode.DODEScheduler.from_pretrained(tmp_path)
    for steps in (3, 5, 10):
        single = dode.distill(model, "dpm_solver_pp_2m", steps, batch_size=8, validation=validation, progress=False)
        assert reloaded.for_steps(steps).lambdas == single.lambdas
        use_dode(pipe, single)
        expected = pipe(**model.pipeline_inputs(4, seed=2), num_inference_steps=steps, output_type="pt").images
        use_dode(pipe, reloaded)
        got = pipe(**model.pipeline_inputs(4, seed=2), num_inference_steps=steps, output_type="pt").images
        assert torch.equal(got, expected), steps
    assert torch.equal(dode.sample(model, reloaded, 5, 3, progress=False),
                       dode.sample(model, reloaded.for_steps(5), 5, 3, progress=False))
    with pytest.raises(ValueError, match=r"num_inference_steps=3 \(3 NFE\) and num_inference_steps=5 .* got 4"):
        pipe(batch_size=1, num_inference_steps=4)
    with pytest.raises(ValueError, match="fitted for NFE 3 and 5 and 10, not 4"):
        dode.sample(model, reloaded, 4, 2, progress=False)


def test_combine_and_distill_refuse_what_cannot_be_one_scheduler(gmm):
    three = dode.distill(gmm, "ddim", 3, batch_size=10, guard=False, progress=False)
    again = dode.distill(gmm, "ddim", 3, batch_size=10, seed=1, guard=False, progress=False)
    other = dode.distill(gmm, "dpm_solver_pp_2m", 4, batch_size=10, guard=False, progress=False)
    with pytest.raises(ValueError, match="each step count once"):
        dode.DODEScheduler.combine([three, again])
    with pytest.raises(ValueError, match="one base scheduler class"):
        dode.DODEScheduler.combine([three, other])
    with pytest.raises(ValueError, match="list of distinct ones"):
        dode.distill(gmm, "ddim", [3, 3], progress=False)
    with pytest.raises(ValueError, match="an explicit grid fixes one step count"):
        dode.distill(gmm, "ipndm", [3, 4], spacing=[10.0, 1.0, 0.1], progress=False)
    with pytest.raises(ValueError, match="at least 2 model evaluations"):  # every count checked before any work
        dode.distill(gmm, "ddim", [3, 1], progress=False)


def test_the_interpolation_rule_of_the_count_study_against_closed_forms():
    """dode.tools.count_interpolation (the measurement behind offering no interpolation, results/
    count_interpolation.md): a count with a fit gets its own lambdas; lambdas linear in log noise level on both
    neighbours come back exactly on that line, weighted by the count's distance to each; beyond a fit's levels its
    end value holds; lambda_0 is 0."""
    from dode.tools.count_interpolation import interpolated_lambdas

    def line(levels, slope, offset):
        return [0.0, *(slope * np.log(levels[1:]) + offset)]

    three, ten = np.geomspace(80.0, 0.05, 3), np.geomspace(80.0, 0.05, 10)
    fits = {3: (three, line(three, 0.1, 0.5)), 10: (ten, line(ten, 0.3, -0.2))}
    assert interpolated_lambdas(fits, three, 3) == fits[3][1]
    levels = np.geomspace(3.0, 0.06, 5)  # evaluations 1-4 inside both fits' ranges (their evaluations 1 on)
    w = (5 - 3) / (10 - 3)
    expected = [(1 - w) * a + w * b for a, b in zip(line(levels, 0.1, 0.5), line(levels, 0.3, -0.2))]
    np.testing.assert_allclose(interpolated_lambdas(fits, levels, 5), expected, rtol=1e-12, atol=1e-12)
    wide = np.array([200.0, 100.0, 0.01])  # beyond the fitted levels at both ends: the fits' end values
    got = interpolated_lambdas({3: fits[3]}, wide, 4)
    assert got[0] == 0.0 and got[1] == fits[3][1][1] and got[2] == fits[3][1][-1]
