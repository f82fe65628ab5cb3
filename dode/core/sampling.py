"""Sampling: one loop that drives any scheduler over a model, with per-sample seeds."""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ..util.runtime import resolve_device
from .scheduler import DODEScheduler, grid_scheduler, make_scheduler
from .solvers import Solver, get_solver, solver_of
from .timegrid import TimeGrid


class Meter:
    """Model evaluations counted while ``count_evaluations`` is open: ``calls`` (forward passes) and
    ``sample_evaluations`` (samples through the network, the machine-independent cost: a call on a batch of 100 is
    100)."""

    def __init__(self):
        self.calls = 0
        self.sample_evaluations = 0

    def __repr__(self):
        return f"Meter(calls={self.calls}, sample_evaluations={self.sample_evaluations})"


@contextlib.contextmanager
def count_evaluations(model):
    """Count ``model``'s forward passes inside the block (a forward pre-hook, removed on exit); yields a ``Meter``.
    Every path counts alike (sampling, the teacher, the fit, the reference, the refinement); meters nest."""
    meter = Meter()

    def hook(module, args):
        meter.calls += 1
        meter.sample_evaluations += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield meter
    finally:
        handle.remove()


class Trajectory(NamedTuple):
    """States in the DDPM convention: the initial one, then one after each model evaluation."""

    states: torch.Tensor  # (nfe + 1, num_samples, *sample_shape)
    sigmas: torch.Tensor  # (nfe + 1,) noise level of each state, float64


def seeded_noise(shape, num: int, seed: int) -> torch.Tensor:
    """Standard normal noise (num, *shape), float32 on the CPU; sample k comes from seed + k alone."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + k)) for k in range(num)])


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_batch_size(batch_size) -> int:
    return positive_int(batch_size, "batch_size")


#: the ``autocast`` options: half-precision model calls, the scheduler's arithmetic stays in float32
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_autocast(autocast) -> torch.dtype | None:
    """The torch dtype of an ``autocast`` option (None: full precision)."""
    if autocast is None:
        return None
    if not isinstance(autocast, str) or autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {', '.join(map(repr, AUTOCAST_DTYPES))}, got {autocast!r}")
    return AUTOCAST_DTYPES[autocast]


def model_precision(device: torch.device, autocast):
    """The context of each model call: ``torch.autocast`` in the ``autocast`` dtype, or nothing for None."""
    dtype = check_autocast(autocast)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def prepare_scheduler(model, solver_or_scheduler, nfe: int, spacing=None):
    """(scheduler, num_inference_steps) for a solver name (on ``spacing``: a name, or a list of noise levels), a
    diffusers scheduler or a DODEScheduler."""
    if isinstance(solver_or_scheduler, (str, Solver)):
        solver = get_solver(solver_or_scheduler)
        if spacing is None or isinstance(spacing, str):
            return make_scheduler(solver.name, model, spacing), solver.steps_for(nfe)
        scheduler = grid_scheduler(solver.name, model, spacing)  # an explicit grid fixes the step count
        if scheduler.nfe != nfe:
            raise ValueError(f"a grid of {scheduler.num_inference_steps} noise levels makes {scheduler.nfe} "
                             f"model evaluations with {solver.name}, not {nfe}")
        return scheduler, scheduler.num_inference_steps
    if spacing is not None:
        raise ValueError("spacing goes with a solver name; a scheduler brings its own")
    if isinstance(solver_or_scheduler, DODEScheduler):  # one fit per step count: the one with this NFE
        steps = [n for n, k in solver_or_scheduler.nfes.items() if k == nfe]
        if not steps:
            raise ValueError(f"this DODEScheduler was fitted for NFE "
                             f"{' and '.join(map(str, solver_or_scheduler.nfes.values()))}, not {nfe}")
        return solver_or_scheduler, steps[0]
    return solver_or_scheduler, solver_of(solver_or_scheduler).steps_for(nfe)


def model_output(model, scheduler, x: torch.Tensor, t, k: int, precision=contextlib.nullcontext(),
                 check: bool = True) -> torch.Tensor:
    """Evaluation ``k`` of a run: the model's output at state ``x`` and timestep ``t``, in the state's dtype;
    ``check``: a NaN or inf in it raises FloatingPointError (naming the evaluation) instead of spreading."""
    scale = getattr(scheduler, "scale_model_input", None)  # the FlowMatch schedulers have none: x as it is
    with precision:
        output = model(x if scale is None else scale(x, t), t)
    output = output.to(x.dtype)
    if check and not torch.isfinite(output).all():
        raise FloatingPointError(
            f"the model output at evaluation {k + 1} of {len(scheduler.timesteps)} (timestep {float(t):g}) "
            "contains NaN or inf"
        )
    return output


def integrate(
    model,
    scheduler,
    num_inference_steps: int | None,
    noise: torch.Tensor,
    *,
    before_step: Callable | None = None,
    record: bool = False,
    autocast: str | None = None,
    lambdas=None,
    grad: bool = False,
    progress: str | None = None,
):
    """Solve from ``noise`` (the state ``noise * init_noise_sigma``) with ``scheduler``; returns (final sample,
    states or None). The one integration loop of the package: sampling, the teacher, the fit and the refinement.

    ``num_inference_steps``: passed to ``set_timesteps`` first; None when the caller has set the timesteps (a
    teacher on an explicit grid). ``before_step(k, model_output, t, x)`` runs between each model evaluation and
    its ``step`` (distillation hooks in there). States are recorded in the DDPM convention, the initial state
    first, at the levels of ``TimeGrid.of(scheduler)``. ``lambdas`` (a DODEScheduler's, floats or tensors)
    replace its own for this run; ``grad`` keeps autograd on (the refinement differentiates through the run).
    ``autocast`` (``"float16"``, ``"bfloat16"``) runs the model calls under ``torch.autocast``; their outputs are
    cast back to the state's dtype before the scheduler sees them. ``progress``: a progress bar over the model
    evaluations, with this description (long runs: the fine teacher, the validation reference).
    """
    precision = model_precision(noise.device, autocast)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    times = TimeGrid.of(scheduler)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # the FlowMatch schedulers have none: pure noise
    states = [times.to_ddpm(x, times.start).cpu()] if record else None
    with torch.set_grad_enabled(grad):
        steps = scheduler.timesteps
        for k, t in enumerate(steps if progress is None else tqdm(steps, desc=progress, leave=False)):
            output = model_output(model, scheduler, x, t, k, precision, check=not grad)
            if before_step is not None:
                before_step(k, output, t, x)
            if lambdas is None:
                x = scheduler.step(output, t, x).prev_sample
            else:
                lam = lambdas[k].to(output.dtype) if torch.is_tensor(lambdas[k]) else lambdas[k]
                x = scheduler.step(output, t, x, lam=lam).prev_sample
            if record:
                state = times.to_ddpm(x, times.after[k])
                states.append(state if grad else state.cpu())
    return x, (torch.stack(states) if record and not grad else states)


def sample(
    model,
    solver_or_scheduler,
    nfe: int,
    num_samples: int,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    device="auto",
    return_trajectory: bool = False,
    progress: bool = True,
    autocast: str | None = None,
    spacing=None,
):
    """Draw ``num_samples`` samples with exactly ``nfe`` model evaluations each.

    ``solver_or_scheduler`` is a solver name (see ``dode.SOLVERS``), a diffusers scheduler or a
    ``DODEScheduler``; ``spacing`` goes with a solver name (``dode.make_scheduler``). Sample k starts from the noise of seed + k, so results do not depend on
    ``batch_size``. ``autocast`` (``"float16"``, ``"bfloat16"``) runs the model in half precision under
    ``torch.autocast`` (for UNets; the scheduler's arithmetic stays in float32). Returns a CPU tensor
    (num_samples, *model.sample_shape), and a ``Trajectory`` when ``return_trajectory``.
    """
    positive_int(num_samples, "num_samples")
    check_autocast(autocast)
    scheduler, steps = prepare_scheduler(model, solver_or_scheduler, nfe, spacing)
    batch_size = check_batch_size(num_samples if batch_size is None else batch_size)
    device = resolve_device(device)
    model.to(device)
    samples, trajectories = [], []
    starts = range(0, num_samples, batch_size)
    for start in tqdm(starts, desc=f"sampling {nfe} NFE", disable=not progress or len(starts) < 2):
        noise = seeded_noise(model.sample_shape, min(batch_size, num_samples - start), seed + start).to(device)
        x, states = integrate(model, scheduler, steps, noise, record=return_trajectory, autocast=autocast)
        if len(scheduler.timesteps) != nfe:
            raise RuntimeError(f"{type(scheduler).__name__} made {len(scheduler.timesteps)} evaluations, not {nfe}")
        samples.append(x.float().cpu())
        trajectories.append(states)
    samples = torch.cat(samples)
    if not return_trajectory:
        return samples
    sigmas = torch.from_numpy(TimeGrid.of(scheduler).states)
    return samples, Trajectory(torch.cat(trajectories, dim=1), sigmas)
