"""The paper's greedy fit: one lambda per model evaluation, in order, so that the student follows the teacher.

Every scheduler is affine in its model output. So for evaluation i, with x0 = step(o_i) and
v = step(o_i + (o_i - o_{i-1})) - x0, the state after the step is x0 + lambda v, and the lambda that brings it
closest to the teacher's state at the same noise level is the one-dimensional least-squares solution
lambda_i = <target - x0, v> / <v, v> (docs/design.md, "The method"). ``greedy_fit`` solves for it, steps with it
and goes on; what is done around the fit (spacings, the guard, refinement) is ``dode.core.distill``'s.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from .sampling import model_output
from .scheduler import DODEScheduler
from .teacher import Teacher
from .timegrid import TimeGrid


class GreedyFit(NamedTuple):
    """What the greedy fit found on the fitting batch."""

    lambdas: list  # one per model evaluation, lambda_0 = 0
    rmse_base: list  # RMSE to the teacher's state after each step with lambda = 0
    rmse_fitted: list  # ... and with the fitted lambda
    targets: torch.Tensor  # the teacher's states at the student's levels (nfe, batch, ...; DDPM convention)
    teacher_nfe: int  # model evaluations the teacher spent on this fit (0 where its run was shared)
    sample_range: float  # the largest |x| of the fitted student's final samples
    teacher_range: float  # ... and of the teacher's (both DDPM convention)


def least_squares_lambda(x_base: torch.Tensor, x_unit: torch.Tensor, target: torch.Tensor) -> float:
    """argmin_lambda ||x_base + lambda (x_unit - x_base) - target||^2, summed over the batch in float64."""
    v = (x_unit.double() - x_base.double()).flatten()
    r = (target.double().to(v.device) - x_base.double()).flatten()
    vv = torch.dot(v, v)
    return 0.0 if vv == 0 else float(torch.dot(r, v) / vv)


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared distance of two batches, in float64 on the CPU."""
    return float(torch.sqrt(torch.mean((x.double().cpu() - y.double().cpu()) ** 2)))


def _trial_step(student: DODEScheduler, output, t, x, lam: float) -> torch.Tensor:
    """The state ``step`` would return with this evaluation's lambda set to ``lam``, on a copy (a step moves the
    scheduler's state on)."""
    return copy.deepcopy(student).step(output, t, x, lam=lam).prev_sample


def greedy_fit(model, student: DODEScheduler, teacher: Teacher) -> GreedyFit:
    """The paper's fit of ``student``'s lambdas (its own are not used), in order, against the teacher's states at the
    student's own noise levels, from the teacher's noise batch. ``student`` is left stepped through the run."""
    device = teacher.noise.device
    student.set_timesteps(student.num_inference_steps, device=device)
    times = TimeGrid.of(student)
    teacher_nfe = teacher.nfe
    targets = teacher.targets(times)
    lambdas, rmse_base, rmse_fitted = [], [], []
    x = teacher.noise * getattr(student, "init_noise_sigma", 1.0)  # FlowMatch schedulers: pure noise
    with torch.no_grad():
        for k, t in enumerate(student.timesteps):
            output = model_output(model, student, x, t, k)
            # the state after this step is x_base + lambda (x_unit - x_base), both in the DDPM convention
            x_base = times.to_ddpm(_trial_step(student, output, t, x, 0.0), times.after[k])
            x_unit = times.to_ddpm(_trial_step(student, output, t, x, 1.0), times.after[k]) if k > 0 else x_base
            # the lambda closest to the teacher there (the first evaluation has no previous output: 0)
            lam = least_squares_lambda(x_base, x_unit, targets[k]) if k > 0 else 0.0
            lambdas.append(lam)
            rmse_base.append(rmse(x_base, targets[k]))
            rmse_fitted.append(rmse(x_base + lam * (x_unit - x_base), targets[k]))
            # step with it, and go on from there
            x = student.step(output, t, x, lam=lam).prev_sample
    final = times.to_ddpm(x, times.after[-1])
    return GreedyFit(lambdas, rmse_base, rmse_fitted, targets, teacher.nfe - teacher_nfe,
                     float(final.abs().max()), float(targets[-1].abs().max()))
