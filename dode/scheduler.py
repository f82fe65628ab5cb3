"""``DODEScheduler``: any diffusers scheduler with D-ODE's one scalar per model evaluation.

Before the base scheduler sees model output o_i it becomes o_i + lambda_i (o_i - o_{i-1}) (lambda_0 = 0).
A learned time grid (``distill(refine="joint+timesteps")``), when there is one, replaces the base
scheduler's noise levels after every ``set_timesteps``. Everything else (``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``config``, ...) is the base
scheduler's, so a DODEScheduler drops in wherever the base scheduler is used.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .solvers import scheduler_class_named, set_grid, solver_of

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
