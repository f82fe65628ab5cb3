"""The validation reference: the ODE solution of the validation seeds, which the guard judges every student against.

What any spacing's samples should be, known without data: the probability-flow ODE solved from pure noise at the
first training noise level. By default a high-order solver on a fine-enough grid (``REFERENCE``: UniPC on 30 Karras
steps): the cheapest of those compared whose guard decisions agree with the 1000-step DDIM run's
(``Reference("fine")``) on at least 95 % of every solver x NFE cell of both embedded models, at a thirty-third of
its cost (results/guard_reference.md; docs/grids-and-guard.md, "The validation reference").

A reference is computed once per process for each model, seeds and settings (``reference_solution``): the key is a
hash of the model's parameters and buffers (``fingerprint``), so a model changed in place gets a new one.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ..util.runtime import resolve_device
from .sampling import count_evaluations, integrate, positive_int, seeded_noise
from .scheduler import make_scheduler
from .schedule import is_flow, training_sigmas
from .solvers import get_solver
from .teacher import Teacher
from .timegrid import TimeGrid


@dataclass(frozen=True)
class Reference:
    """How the reference is solved: ``solver`` on ``spacing`` with ``steps`` model evaluations, from pure noise at the
    first training noise level (a spacing that starts there: "linspace", "trailing", or a sigma spacing).
    ``Reference("fine")``: DDIM through every training timestep (1000 evaluations on a DDPM schedule), the reference
    before this one, kept for comparison."""

    solver: str = "unipc"
    spacing: str | None = "karras"
    steps: int = 30

    def __post_init__(self):
        if self.solver == "fine":
            return
        solver = get_solver(self.solver)
        solver.check_spacing(self.spacing)
        positive_int(self.steps, "the reference's steps")
        solver.steps_for(self.steps)

    @property
    def label(self) -> str:
        if self.solver == "fine":
            return "fine (every training timestep)"
        return f"{self.solver}, {self.spacing}, {self.steps}"

    def record(self, model) -> dict:
        """What ``fit_info`` keeps: solver, spacing, and model evaluations per sample (of ``reference_for`` the
        model)."""
        self = reference_for(model, self)
        return {"solver": self.solver, "spacing": None if self.solver == "fine" else self.spacing,
                "nfe": evaluations_per_sample(self, model)}


#: the default reference (chosen by ``python -m dode.tools.guard_reference``: results/guard_reference.md)
REFERENCE = Reference()
#: the default reference of a flow-matching model (``reference_for``): FlowMatch Heun from s = 1, 30 steps (59
#: evaluations). On gmm-digits-flow its RMSE to the exact ODE (scipy, 1e-9) is 1.0e-3, about that of 1000 Euler
#: steps (7.9e-4) at a seventeenth of the cost (docs/flow.md)
FLOW_REFERENCE = Reference("flow_heun", "linspace", 59)


def reference_for(model, reference: Reference = REFERENCE) -> Reference:
    """The reference ``model`` is judged by: ``reference`` itself, except that the default (``REFERENCE``, a
    diffusion solver) is ``FLOW_REFERENCE`` for a flow-matching model."""
    return FLOW_REFERENCE if reference == REFERENCE and is_flow(model.scheduler_config) else reference


def evaluations_per_sample(reference: Reference, model) -> int:
    """Model evaluations one sample costs in the reference run."""
    if reference.solver == "fine":
        return len(training_sigmas(model.scheduler_config))
    return reference.steps


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, on the CPU (what the hashes here read)."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def fingerprint(model) -> str:
    """A hash of everything that decides ``model``'s outputs here: its class, schedule, prediction type, and every
    parameter and buffer (names, dtypes, shapes, values). A change in place gives another hash."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__qualname__.encode())
    digest.update(repr(sorted(dict(getattr(model, "scheduler_config", {}) or {}).items())).encode())
    digest.update(repr(getattr(model, "prediction_type", None)).encode())
    digest.update(repr(tuple(getattr(model, "sample_shape", ()))).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


@dataclass
class Solution:
    """A reference run: the final samples of the validation seeds, and what it cost (0 when it was shared)."""

    samples: torch.Tensor  # (batch, *shape), on the CPU
    reference: Reference
    sample_evaluations: int  # spent by this call (0: the process had it)
    seconds: float
    shared: bool


_SOLUTIONS: dict = {}  # (fingerprint, reference, seed, batch size, device type) -> samples


def clear_cache() -> None:
    """Forget every reference computed in this process."""
    _SOLUTIONS.clear()


def reference_solution(model, seed: int, batch_size: int, reference: Reference = REFERENCE, device="auto",
                       progress: bool = True) -> Solution:
    """The reference samples of seeds ``seed`` ... ``seed + batch_size - 1``, computed once per process for this
    model (by content, ``fingerprint``), seeds, reference and device type."""
    if not isinstance(reference, Reference):
        raise ValueError(f"reference must be a dode.Reference, got {reference!r}")
    reference = reference_for(model, reference)
    device = resolve_device(device)
    key = (fingerprint(model), reference, seed, batch_size, device.type)
    began = time.perf_counter()
    if key in _SOLUTIONS:
        return Solution(_SOLUTIONS[key], reference, 0, time.perf_counter() - began, True)
    with count_evaluations(model) as meter:
        if reference.solver == "fine":
            samples = Teacher(model, batch_size=batch_size, seed=seed, substeps="fine", device=device).solution()
        else:
            samples = _solve(model, seeded_noise(model.sample_shape, batch_size, seed).to(device), reference, progress)
    _SOLUTIONS[key] = samples
    return Solution(samples, reference, meter.sample_evaluations, time.perf_counter() - began, False)


def _solve(model, noise: torch.Tensor, reference: Reference, progress: bool) -> torch.Tensor:
    scheduler = make_scheduler(reference.solver, model, reference.spacing)
    steps = get_solver(reference.solver).steps_for(reference.steps)
    scheduler.set_timesteps(steps, device=noise.device)
    times = TimeGrid.of(scheduler)
    top = float(training_sigmas(model.scheduler_config)[-1])
    if abs(times.start - top) > 1e-5 * top or abs(times.initial_scale - 1.0) > 1e-5:
        raise ValueError(f"the reference must start from pure noise at the first training noise level "
                         f"(sigma {top:.6g}); {reference.solver} on {reference.spacing!r} starts at sigma "
                         f"{times.start:.6g}: use 'linspace' or 'trailing'")
    with torch.no_grad():
        x, _ = integrate(model, scheduler, None, noise,
                         progress=f"validation reference ({reference.label})" if progress else None)
    return x.float().cpu()
