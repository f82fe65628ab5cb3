"""Half-precision model calls (``autocast=``): the network runs in float16/bfloat16, the scheduler in float32.

DODE_TEST_DEVICE=cuda runs these on the GPU (scripts/gpu_check.sh sets it).
"""
from __future__ import annotations

import os

import pytest
import torch

import dode
from dode.core.sampling import integrate

DEVICE = os.environ.get("DODE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def unet():
    return dode.load_model("unet-digits", device=DEVICE)


def draw(model, autocast=None, seed=0, solver="ddim"):
    return dode.sample(model, solver, 5, 64, seed=seed, device=DEVICE, autocast=autocast, progress=False)


def test_half_precision_unet_samples_are_close_not_equal(unet):
    full = draw(unet)
    bf16, fp16 = draw(unet, "bfloat16"), draw(unet, "float16")
    other_seeds = dode.rmse(draw(unet, seed=64), full)
    for half in (bf16, fp16):
        assert half.dtype == torch.float32 and not torch.equal(half, full)
        assert 0 < dode.rmse(half, full) < 0.05 * other_seeds
    assert dode.rmse(fp16, full) < dode.rmse(bf16, full)  # float16 keeps 3 more mantissa bits than bfloat16


def test_model_runs_under_autocast_and_scheduler_in_float32(unet, wrap):
    """Inside the model call autocast is on in the asked dtype; the scheduler sees float32 outputs even from a
    network whose last layer returns the half-precision dtype."""
    seen, stepped = [], []

    def half_output(output, call):
        device = output.device.type
        seen.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        return output.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else output

    model = wrap(unet, alter=half_output)
    noise = dode.seeded_noise(unet.sample_shape, 4, 0).to(DEVICE)
    x, _ = integrate(model, dode.make_scheduler("ddim", unet), 3, noise, autocast="bfloat16",
                     before_step=lambda k, output, t, state: stepped.append((output.dtype, state.dtype)))
    assert seen == [(True, torch.bfloat16)] * 3
    assert stepped == [(torch.float32, torch.float32)] * 3 and x.dtype == torch.float32
    seen.clear()
    draw(model)
    assert {enabled for enabled, _ in seen} == {False}


def test_float64_models_are_untouched(gmm):
    """autocast only lowers float32 operations: gmm-digits computes in float64 and gives identical samples."""
    assert torch.equal(draw(gmm, "bfloat16"), draw(gmm))


@pytest.mark.parametrize("bad", ["fp16", "float32", "bf16", torch.float16, True, ""])
def test_bad_autocast_values(gmm, bad):
    with pytest.raises(ValueError, match="autocast must be None or one of 'float16', 'bfloat16'"):
        dode.sample(gmm, "ddim", 5, 4, autocast=bad, progress=False)
