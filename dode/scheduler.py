"""``DODEScheduler``: any diffusers scheduler with D-ODE's one scalar per model evaluation.

Before the base scheduler sees model output o_i it becomes o_i + lambda_i (o_i - o_{i-1}) (lambda_0 = 0).
A learned time grid (``distill(refine="joint+timesteps")``), when there is one, replaces the base
scheduler's noise levels after every ``set_timesteps``. Everything else (``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``config``, ...) is the base
scheduler's, so a DODEScheduler drops in wherever the base scheduler is used.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .grids import TimeGrid
from .solvers import GRID_SOLVERS, get_solver, grid_form_scheduler, scheduler_class_named, set_grid, solver_of

LAMBDAS_FILE = "dode_lambdas.json"


class DODEScheduler(SchedulerMixin):
    """A diffusers scheduler (SchedulerMixin, so pipelines save and load it) wrapping a base scheduler."""

    def __init__(self, base_scheduler, lambdas, num_inference_steps: int, fit_info: dict | None = None,
                 grid=None):
        lambdas = [float(v) for v in lambdas]
        if not lambdas:
            raise ValueError("a DODEScheduler needs one lambda per model evaluation; got none")
        if not all(math.isfinite(v) for v in lambdas):
            raise ValueError(f"lambdas must be finite, got {lambdas}")
        self.base_scheduler = base_scheduler
        self.lambdas = lambdas
        self.num_inference_steps = int(num_inference_steps)
        self.fit_info = dict(fit_info or {})
        #: the noise level of every step (``dode.solvers.time_grid``), or None for the base scheduler's own
        self.grid = None if grid is None else [float(v) for v in grid]
        self._reset()

    @property
    def nfe(self) -> int:
        """Model evaluations per sampling run: one per lambda."""
        return len(self.lambdas)

    def _reset(self):
        self._evaluation = 0
        self._previous_output = None

    def __getattr__(self, name):
        # Only called for attributes this object lacks: hand them to the base scheduler.
        if name.startswith("__") or "base_scheduler" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.base_scheduler, name)

    def __repr__(self):
        lams = ", ".join(f"{v:+.3f}" for v in self.lambdas)
        grid = "" if self.grid is None else ", grid=[" + ", ".join(f"{v:.4g}" for v in self.grid) + "]"
        spacing = f", spacing={self.fit_info['spacing']!r}" if "spacing" in self.fit_info else ""
        return (f"DODEScheduler({type(self.base_scheduler).__name__}{spacing}, nfe={self.nfe}, "
                f"lambdas=[{lams}]{grid})")

    def set_timesteps(self, num_inference_steps: int | None = None, *args, **kwargs):
        if num_inference_steps is not None and int(num_inference_steps) != self.num_inference_steps:
            raise ValueError(
                f"these lambdas were fitted for num_inference_steps={self.num_inference_steps} "
                f"({self.nfe} NFE); got {num_inference_steps}. In a pipeline, call it with "
                f"num_inference_steps={self.num_inference_steps}; distil again for another step count."
            )
        self.base_scheduler.set_timesteps(self.num_inference_steps, *args, **kwargs)
        if self.grid is not None:
            set_grid(self.base_scheduler, self.grid)
        self._reset()

    def corrected_output(self, model_output: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """o~_i = o_i + lambda_i (o_i - o_{i-1}) for the evaluation about to be stepped (no state change)."""
        lam = self.lambdas[self._evaluation] if lam is None else lam
        # a tensor lambda (the refinement's) stays in the graph even at 0, so that its gradient exists
        if self._previous_output is None or (not torch.is_tensor(lam) and lam == 0.0):
            return model_output
        return model_output + lam * (model_output - self._previous_output)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, lam: float | None = None, **kwargs):
        """The base scheduler's ``step`` on the corrected output. ``lam`` overrides this step's lambda."""
        if self._evaluation >= self.nfe:
            raise RuntimeError(
                f"step() called {self._evaluation + 1} times, but the lambdas cover {self.nfe} model evaluations; "
                "call set_timesteps() before every sampling run"
            )
        corrected = self.corrected_output(model_output, lam)
        self._previous_output = model_output
        self._evaluation += 1
        # pipelines pass what their own scheduler takes (DDPMPipeline: generator); hand on what this one takes
        if kwargs:
            accepted = inspect.signature(self.base_scheduler.step).parameters
            kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        return self.base_scheduler.step(corrected, timestep, sample, *args, **kwargs)

    # -- persistence, in diffusers' layout: the base scheduler's config plus the lambdas ---------------------
    def save_pretrained(self, save_directory):
        save_directory = Path(save_directory)
        self.base_scheduler.save_pretrained(save_directory)
        record = {
            "base_scheduler": type(self.base_scheduler).__name__,
            "num_inference_steps": self.num_inference_steps,
            "nfe": self.nfe,
            "lambdas": self.lambdas,
            "grid": self.grid,
            "fit": self.fit_info,
        }
        (save_directory / LAMBDAS_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> "DODEScheduler":
        directory = Path(directory)
        path = directory / LAMBDAS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no {LAMBDAS_FILE}: not a saved DODEScheduler")
        try:
            record = json.loads(path.read_text())
            class_name, steps, nfe = record["base_scheduler"], int(record["num_inference_steps"]), int(record["nfe"])
            lambdas = [float(v) for v in record["lambdas"]]
            grid = None if record.get("grid") is None else [float(v) for v in record["grid"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is corrupt: {err!r}") from err
        scheduler_class = scheduler_class_named(class_name)
        if scheduler_class is None:
            raise ValueError(f"{path} names an unknown scheduler {class_name!r}")
        base = scheduler_class.from_pretrained(directory)
        if len(lambdas) != nfe:
            raise ValueError(f"{path} is inconsistent: {len(lambdas)} lambdas for nfe={nfe}")
        try:
            solver = solver_of(base)
        except ValueError:  # a scheduler without an NFE rule: trust the stored count
            solver = None
        if solver is not None and solver.nfe_of_steps(steps) != nfe:
            raise ValueError(
                f"{path} is inconsistent: {solver.name} with num_inference_steps={steps} makes "
                f"{solver.nfe_of_steps(steps)} model evaluations, but {nfe} lambdas are stored"
            )
        dode = cls(base, lambdas, steps, record.get("fit"), grid=grid)
        if grid is not None:
            try:  # check the grid against the schedule now rather than at the first sampling run
                dode.set_timesteps(steps)
            except ValueError as err:
                raise ValueError(f"{path} holds a grid this scheduler cannot use: {err}") from err
        return dode


def make_scheduler(name: str, model, spacing=None, **overrides):
    """A diffusers scheduler for solver ``name`` on ``model``'s noise schedule, as the paper configures it.

    ``spacing``: one of the solver's ``spacings`` (default: the paper's, ``Solver.default_spacing``), or an
    explicit list of noise levels, one per step, for the solvers in ``GRID_SOLVERS``: then the result is a
    ``DODEScheduler`` with every lambda 0 (the base solver on that grid) for exactly that many steps.
    ``overrides`` go to the scheduler's config last.
    """
    solver = get_solver(name)
    spacing = solver.check_spacing(spacing)
    named = spacing if isinstance(spacing, str) else solver.default_spacing
    config = {**model.scheduler_config, **solver.settings, **solver.spacings[named], **overrides}
    scheduler = solver.scheduler_class.from_config(config)
    if isinstance(spacing, str):
        return scheduler
    if not solver.custom_grid:  # DDIM: the scheduler that makes its update on any levels
        scheduler = grid_form_scheduler(solver, scheduler.config)
    # a grid lives in the D-ODE scheduler, which re-applies it after every set_timesteps
    steps = len(spacing)  # one level per step (Heun: per step of two stages)
    return DODEScheduler(scheduler, [0.0] * solver.nfe_of_steps(steps), steps, grid=list(spacing))


def to_grid_form(dode):
    """A DODEScheduler (same lambdas and step count) that can take any grid, on ``dode``'s own grid: ``dode``
    itself when its scheduler steps on ``scheduler.sigmas``; for DDIM, iPNDM of order 1 on DDIM's noise levels.

    The same sampler where DDIM's next state is at the timestep it evaluates next: always with "leading", and with
    "trailing" when the step count divides the training steps; "linspace" (and "trailing" otherwise) round their
    timesteps apart from DDIM's ``t - T // n`` steps, so there the grid form differs slightly from DDIM."""
    solver = solver_of(dode)
    if solver.custom_grid:
        return dode
    if solver.grid_form is None:
        raise ValueError(f"{solver.name} cannot take a custom time grid: its diffusers scheduler steps on integer "
                         f"timesteps and no scheduler makes exactly its update on other levels; solvers that can: "
                         f"{', '.join(GRID_SOLVERS)}")
    probe = copy.deepcopy(dode)
    probe.set_timesteps(probe.num_inference_steps)
    base = grid_form_scheduler(solver, dode.base_scheduler.config)
    return DODEScheduler(base, list(dode.lambdas), dode.num_inference_steps, copy.deepcopy(dode.fit_info),
                         grid=list(TimeGrid.of(probe).steps))
