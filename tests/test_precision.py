"""Fits in float64 (``dode.Teacher(precision=...)``, ``dode.distill(precision=...)``) and what the refinement's
optimiser sees there: the objective and gradient rounded to ``ROUNDING_BITS`` bits (``dode.core.refine.rounded``),
held to their closed form; in float32 nothing is rounded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm

import dode
from dode.core.refine import ROUNDING_BITS, objective_at_start, rounded
from dode.core.sampling import seeded_noise
from dode.core.timegrid import TimeGrid
from dode.experiments.checks import check_parameters


def test_rounded_is_the_nearest_multiple_of_the_step_below_the_largest_entry():
    rng = np.random.default_rng(0)
    for scale in (1e-9, 3e-3, 1.0, 7e4):
        x = rng.normal(size=17) * scale
        step = 2.0 ** (math.frexp(np.max(np.abs(x)))[1] - ROUNDING_BITS)
        r = rounded(x)
        np.testing.assert_array_equal(r / step, np.round(r / step))  # multiples of the step
        assert np.max(np.abs(r - x)) <= step / 2  # the nearest one
        assert np.max(np.abs(r - x)) / np.max(np.abs(x)) <= 2.0 ** -ROUNDING_BITS
        # inputs inside one step's interval, as two BLAS kernels' last bits would be, give the same numbers
        centred = (np.round(x / step) + 0.25) * step
        np.testing.assert_array_equal(rounded(centred), rounded(centred * (1 + 1e-12)))
    np.testing.assert_array_equal(rounded(np.zeros(3)), np.zeros(3))
    np.testing.assert_array_equal(rounded([np.inf, 1.0]), [np.inf, 1.0])
    assert rounded([0.3], bits=2)[0] == 0.25  # 2^-2 <= 0.3 < 2^-1: steps of 2^(-1-2) = 0.125, the nearest 0.25


def test_a_float64_teacher_widens_the_seeds_draws_and_follows_the_float32_one(gmm):
    t32 = dode.Teacher(gmm, batch_size=6, seed=3, substeps=10)
    t64 = dode.Teacher(gmm, batch_size=6, seed=3, substeps=10, precision="float64")
    assert t64.noise.dtype == torch.float64 and t32.noise.dtype == torch.float32
    torch.testing.assert_close(t64.noise, seeded_noise(gmm.sample_shape, 6, 3).double(), rtol=0, atol=0)
    student = dode.make_scheduler("ddim", gmm, "trailing")
    student.set_timesteps(4)
    times = TimeGrid.of(student)
    targets32, targets64 = t32.targets(times), t64.targets(times)
    assert targets64.dtype == torch.float64
    torch.testing.assert_close(targets64, targets32.double(), rtol=0, atol=1e-5)
    assert "precision='float64'" in repr(t64)
    with pytest.raises(ValueError, match="precision must be one of 'float32', 'float64'"):
        dode.Teacher(gmm, precision="half")


def test_distill_in_float64_fits_the_float32_lambdas_and_checks_a_given_teacher(gmm):
    fits = {p: dode.distill(gmm, "ddim", 4, spacing="trailing", guard=False, batch_size=20, precision=p,
                            progress=False) for p in ("float32", "float64")}
    np.testing.assert_allclose(fits["float64"].lambdas, fits["float32"].lambdas, rtol=0, atol=1e-4)
    assert fits["float64"].lambdas != fits["float32"].lambdas  # the float64 fit is its own, not float32's
    teacher = dode.Teacher(gmm, batch_size=20, precision="float64")
    same = dode.distill(gmm, "ddim", 4, spacing="trailing", guard=False, teacher=teacher, progress=False)
    assert same.lambdas == fits["float64"].lambdas  # a given Teacher brings its precision
    with pytest.raises(ValueError, match="precision='float64'; got precision='float32'"):
        dode.distill(gmm, "ddim", 4, spacing="trailing", guard=False, teacher=teacher, precision="float32")


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_the_optimiser_sees_rounded_numbers_in_float64_only(gmm, precision):
    teacher = dode.Teacher(gmm, batch_size=8, substeps="fine", precision=precision)
    student = dode.DODEScheduler(dode.make_scheduler("dpm_solver_pp_2m", gmm, "karras"), [0.0, 0.4, -0.2, 0.3], 4)
    probe = dode.core.scheduler.to_grid_form(student)
    probe.set_timesteps(4)
    f, x0, _ = objective_at_start(gmm, student, teacher.noise, teacher.targets(TimeGrid.of(probe)), timesteps=True)
    f.scale, f.best, f.bar = 0.37, math.inf, tqdm(disable=True)  # as optimise sets them
    theta = x0 + 0.05
    value, gradient = f._value_and_gradient(theta)  # what autograd gives
    seen, slope = f(theta)  # what the optimiser is handed
    if precision == "float64":
        assert seen == rounded([value / 0.37])[0] and seen != value / 0.37
        np.testing.assert_array_equal(slope, rounded(gradient / 0.37))
        assert f.best == seen * 0.37  # the best point is judged by what the optimiser saw
    else:
        assert seen == value / 0.37
        np.testing.assert_array_equal(slope, gradient / 0.37)
        assert f.best == value


def test_notebook_precision_is_checked():
    assert check_parameters(precision="float64").precision == "float64"
    with pytest.raises(ValueError, match="precision: 'double'; valid: 'float32', 'float64'"):
        check_parameters(precision="double")
