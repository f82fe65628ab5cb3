"""``DODEScheduler``: any diffusers scheduler with D-ODE's one scalar per model evaluation.

Before the base scheduler sees model output o_i it becomes o_i + lambda_i (o_i - o_{i-1}) (lambda_0 = 0).
A learned time grid (``distill(refine="joint+timesteps")``), when there is one, replaces the base
scheduler's noise levels after every ``set_timesteps``. Everything else (``timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``order``, ...) is the base scheduler's, so a DODEScheduler drops in wherever the base
scheduler is used.

It is a diffusers ``SchedulerMixin`` and ``ConfigMixin``: ``config`` is the base scheduler's config (every key of
it, so ``OtherScheduler.from_config(scheduler.config)`` gives that scheduler on the same noise schedule, as for any
diffusers scheduler) plus the D-ODE keys ``OWN_KEYS``: ``base_scheduler`` (the base's class name),
``num_inference_steps``, ``nfe``, ``lambdas``, ``grid`` (noise levels or null), ``spacing`` and ``fit_info`` (how
it was fitted: a record for users, which no dode code reads). ``save_pretrained`` writes it as one
``scheduler_config.json`` whose ``_class_name`` is ``DODEScheduler``; ``from_pretrained`` (a folder, a pipeline
folder with ``subfolder="scheduler"``, or a hub id), ``from_config``, ``load_config`` and ``push_to_hub`` work as
for diffusers' own schedulers, and ``DiffusionPipeline.from_pretrained`` restores a pipeline saved with one
(model_index.json: ["dode.core.scheduler", "DODEScheduler"]). A base scheduler class loading such a folder gets
its base config, and diffusers warns that the D-ODE keys (the lambdas) "are not expected and will be ignored".
The reading, checking and splitting of saved configs is ``dode.core.persistence``'s.

``make_scheduler`` gives a solver's diffusers scheduler on a named spacing, ``grid_scheduler`` the same solver on
an explicit grid of noise levels (a DODEScheduler with every lambda 0), ``to_grid_form`` a DODEScheduler that can
take any grid.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import re
import sys
import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from .persistence import CONFIG_FILE, OWN_KEYS, check_save_folder, jsonable, load_record, overridden, split_record
from .solvers import (GRID_SOLVERS, check_kind, flow_config, get_solver, grid_form_scheduler, scheduler_class_named,
                      set_grid, solver_of, spacing_of)
from .schedule import schedule_config
from .timegrid import TimeGrid

__all__ = ["CONFIG_FILE", "OWN_KEYS", "DODEScheduler", "LambdasDroppedWarning", "grid_scheduler", "make_scheduler",
           "to_grid_form"]

#: what the wrapper itself holds; any other attribute write goes to the base scheduler (or is refused)
_OWN_ATTRIBUTES = frozenset({"base_scheduler", "lambdas", "num_inference_steps", "fit_info", "grid", "_spacing",
                             "_evaluation", "_previous_output", "_internal_dict", "_fits", "_begin", "_passthrough"})
#: one count's fit, as ``DODEScheduler.combine`` switches between counts
_FIT_ATTRIBUTES = ("base_scheduler", "num_inference_steps", "lambdas", "fit_info", "grid", "_spacing")
#: the config key of a scheduler with fits for several step counts ({steps: that count's whole config})
FITS_KEY = "fits"


class LambdasDroppedWarning(UserWarning):
    """A diffusers scheduler class was built from a DODEScheduler's config: the lambdas are not carried over."""


class _WarnDroppedLambdas(logging.Filter):
    """On diffusers' log line "The config attributes {...'lambdas'...} were passed to X, but are not expected and
    will be ignored", warn (on the console, not only in the log) that X samples without D-ODE, and how to keep it:
    DDIMPipeline turns any scheduler into a DDIMScheduler this way, when built and when loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record diffusers formats badly is not this filter's business
            return True
        found = re.search(r"were passed to (\w+), but are not expected", message)
        if found and "'lambdas'" in message and "'base_scheduler'" in message:
            warnings.warn(
                f"{found.group(1)} was built from a DODEScheduler's config: it drops the D-ODE lambdas and samples "
                f"as the plain base solver. If a pipeline did this (DDIMPipeline turns any scheduler into a "
                f"DDIMScheduler when it is built or loaded), install the DODEScheduler after it: "
                f"dode.use_dode(pipe, scheduler), or use DDPMPipeline / DiffusionPipeline, which keep it. If you meant "
                f"to switch scheduler, this is what you get.", LambdasDroppedWarning, stacklevel=_outside_stack())
        return True


def _outside_stack() -> int:
    """The ``stacklevel`` of the first caller outside diffusers, logging and this module (for the warning above)."""
    skip = (os.path.dirname(logging.__file__), __file__,
            *(os.path.dirname(sys.modules[name].__file__) for name in ("diffusers", "huggingface_hub")))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


if not any(isinstance(f, _WarnDroppedLambdas) for f in logging.getLogger("diffusers.configuration_utils").filters):
    logging.getLogger("diffusers.configuration_utils").addFilter(_WarnDroppedLambdas())


class DODEScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler wrapping a base scheduler, with one lambda per model evaluation.

    ``DODEScheduler(base_scheduler, lambdas, num_inference_steps, fit_info=None, grid=None, *, spacing=None,
    base_config=None)``: ``base_scheduler`` is a scheduler instance (used as it is), or the name of a scheduler
    class with ``base_config`` its config (the base is then built from it, as ``from_config`` does). ``grid``: the
    noise level of every step, replacing the base scheduler's. ``spacing``: the name of the spacing it was fitted
    on (see ``spacing``). ``fit_info``: how it was fitted, kept in the config as it is.
    """

    config_name = CONFIG_FILE
    #: the schedulers ``from_config(scheduler.config)`` can build (on the base's noise schedule, without the
    #: lambdas); ``compatibles`` gives the base scheduler's own list
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    def __init__(self, base_scheduler, lambdas, num_inference_steps: int, fit_info: dict | None = None,
                 grid=None, *, spacing: str | None = None, base_config: dict | None = None):
        if isinstance(base_scheduler, str):
            scheduler_class = scheduler_class_named(base_scheduler)
            if scheduler_class is None or not issubclass(scheduler_class, SchedulerMixin):
                raise ValueError(f"unknown scheduler {base_scheduler!r}")
            base_scheduler = scheduler_class.from_config(dict(base_config or {}))
        elif base_config is not None:
            raise ValueError("base_config goes with a scheduler class name; a scheduler instance has its own config")
        if not isinstance(base_scheduler, SchedulerMixin) or isinstance(base_scheduler, DODEScheduler):
            raise TypeError(f"base_scheduler must be a diffusers scheduler (not a DODEScheduler) or a scheduler class "
                            f"name, got {type(base_scheduler).__name__}")
        clash = sorted(set(base_scheduler.config) & {*OWN_KEYS, FITS_KEY})
        if clash:
            raise ValueError(f"{type(base_scheduler).__name__}'s config has keys a DODEScheduler's config uses for "
                             f"itself: {clash}")
        lambdas = [float(v) for v in lambdas]
        if not lambdas:
            raise ValueError("a DODEScheduler needs one lambda per model evaluation; got none")
        if not all(math.isfinite(v) for v in lambdas):
            raise ValueError(f"lambdas must be finite, got {lambdas}")
        self.base_scheduler = base_scheduler
        self.lambdas = lambdas
        self.num_inference_steps = int(num_inference_steps)
        self.fit_info = dict(fit_info or {})
        #: the noise level of every step (``TimeGrid.steps``), or None for the base scheduler's own
        self.grid = None if grid is None else [float(v) for v in grid]
        self.spacing = spacing
        self._fits = {}  # several step counts: {steps: DODEScheduler of that count} (``combine``); {} for one
        self._begin = None  # ``set_begin_index``'s, until the next ``set_timesteps``
        self._passthrough = False  # a custom grid handed to the base as it is (every lambda 0, ``set_timesteps``)
        self._reset()
        self._sync_config()

    @classmethod
    def combine(cls, schedulers) -> "DODEScheduler":
        """One scheduler holding the fits of several step counts (``distill(nfe=[...])``): ``set_timesteps(n)``
        samples with n's fit, exactly as that count's own scheduler does, and a count without a fit raises.
        ``schedulers``: single-count DODESchedulers of one base scheduler class and noise schedule, each count once;
        the first is the one in use until ``set_timesteps`` picks another. Saved in one config (``fits``)."""
        schedulers = list(schedulers)
        if not schedulers or not all(isinstance(s, DODEScheduler) for s in schedulers):
            raise TypeError("combine takes DODESchedulers, one per step count")
        singles = [one for s in schedulers for one in s.singles()]
        counts = [one.num_inference_steps for one in singles]
        if len(set(counts)) != len(counts):
            raise ValueError(f"combine takes each step count once, got num_inference_steps {counts}")
        kinds = {type(one.base_scheduler).__name__ for one in singles}
        if len(kinds) > 1:
            raise ValueError(f"combine takes fits of one base scheduler class, got {sorted(kinds)}")
        first = schedule_config(singles[0].base_scheduler.config)
        for one in singles[1:]:
            if schedule_config(one.base_scheduler.config) != first:
                raise ValueError(f"the fits for num_inference_steps {singles[0].num_inference_steps} and "
                                 f"{one.num_inference_steps} are on different noise schedules: "
                                 f"{first} and {schedule_config(one.base_scheduler.config)}")
        combined = copy.deepcopy(singles[0])
        if len(singles) > 1:
            combined._fits = {one.num_inference_steps: copy.deepcopy(one) for one in singles}
        combined._sync_config()
        return combined

    @property
    def counts(self) -> list:
        """The step counts (``num_inference_steps``) it holds a fit for, ascending."""
        return sorted(self._fits) if self._fits else [self.num_inference_steps]

    @property
    def nfes(self) -> dict:
        """{step count: its model evaluations} of every count it holds."""
        return {n: self.nfe if n == self.num_inference_steps else self._fits[n].nfe for n in self.counts}

    def singles(self) -> list:
        """One single-count DODEScheduler per count it holds (copies), in ``counts`` order."""
        return [self.for_steps(n) for n in self.counts]

    def for_steps(self, num_inference_steps: int) -> "DODEScheduler":
        """The single-count DODEScheduler of one of ``counts`` (a copy)."""
        steps = self._count(num_inference_steps)
        if steps == self.num_inference_steps:
            return DODEScheduler(copy.deepcopy(self.base_scheduler), list(self.lambdas), steps,
                                 copy.deepcopy(self.fit_info), self.grid, spacing=self._spacing)
        return copy.deepcopy(self._fits[steps])

    def _count(self, num_inference_steps) -> int:
        """``num_inference_steps`` when it has a fit; ValueError listing the counts that do."""
        steps = int(num_inference_steps)
        if steps not in self.counts:
            solver = _solver_or_none(self.base_scheduler)
            held = " and ".join(f"num_inference_steps={n}" + (f" ({solver.nfe_of_steps(n)} NFE)" if solver else "")
                                for n in self.counts)
            raise ValueError(
                f"these lambdas were fitted for {held}; got {steps}. In a pipeline, call it with "
                f"{'that' if len(self.counts) == 1 else 'one of those'}; distil again for another step count "
                f"(dode.distill(model, solver, nfe=[...]) fits several into one scheduler)."
            )
        return steps

    def _use(self, steps: int) -> None:
        """Make ``steps``'s fit the one in use (several counts): the state of the one in use goes back first."""
        if steps == self.num_inference_steps or not self._fits:
            return
        current, chosen = self._fits[self.num_inference_steps], self._fits[steps]
        for name in _FIT_ATTRIBUTES:
            object.__setattr__(current, name, getattr(self, name))
            object.__setattr__(self, name, getattr(chosen, name))

    def _bases(self) -> list:
        """The base scheduler of every count it holds (one for a single count)."""
        others = [fit.base_scheduler for n, fit in sorted(self._fits.items()) if n != self.num_inference_steps]
        return [self.base_scheduler, *others]

    @property
    def nfe(self) -> int:
        """Model evaluations per sampling run: one per lambda."""
        return len(self.lambdas)

    @property
    def order(self) -> int:
        """The base scheduler's ``order`` (pipelines count their progress by it)."""
        return self.base_scheduler.order

    @property
    def compatibles(self) -> list:
        """The scheduler classes that can be built from this config: the base scheduler's compatibles."""
        return self.base_scheduler.compatibles

    @property
    def spacing(self) -> str | None:
        """The spacing it was fitted on, when given (``spacing=``, or set); else "explicit" with a grid of its own;
        else the one its base config selects (None where no solver's spacing matches)."""
        if self._spacing is not None:
            return self._spacing
        if self.grid is not None:
            return "explicit"
        try:
            return spacing_of(self.base_scheduler)
        except ValueError:  # a scheduler of no dode solver
            return None

    @spacing.setter
    def spacing(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"spacing is the name of a spacing (or None), got {value!r}")
        self._spacing = value

    # -- the config: the base's, plus the D-ODE keys; rebuilt from the current state on every read ---------------
    def _own_values(self) -> dict:
        base = {key: value for key, value in self.base_scheduler.config.items() if not key.startswith("_")}
        return {
            **base,
            "base_scheduler": type(self.base_scheduler).__name__,
            "num_inference_steps": int(self.num_inference_steps),
            "nfe": self.nfe,
            "lambdas": [float(v) for v in self.lambdas],
            "grid": None if self.grid is None else [float(v) for v in self.grid],
            "spacing": self.spacing,
            "fit_info": jsonable(self.fit_info),
        }

    def _config_values(self) -> dict:
        values = self._own_values()
        own = dict(values)
        defaults = self.base_scheduler.config.get("_use_default_values")
        if defaults:  # the keys the base took defaults for: a class switched to takes its own defaults there
            values["_use_default_values"] = sorted(k for k in defaults if k not in OWN_KEYS)
        if self._fits:  # every count's own config; the count in use from its current state
            values[FITS_KEY] = {str(n): own if n == self.num_inference_steps else fit._own_values()
                                for n, fit in sorted(self._fits.items())}
        return values

    def _sync_config(self) -> None:
        # a fresh config, not merged into the previous one (written past ``__setattr__``, which takes a pipeline's
        # ``_internal_dict`` writes as config edits)
        object.__setattr__(self, "_internal_dict", FrozenDict(self._config_values()))

    @property
    def config(self) -> FrozenDict:
        """The base scheduler's config plus the D-ODE keys (``OWN_KEYS``), as they are now."""
        self._sync_config()
        return self._internal_dict

    def to_json_string(self) -> str:
        self._sync_config()
        return super().to_json_string()

    def register_to_config(self, **kwargs) -> None:
        """Change config values: the base scheduler's keys go to the base scheduler (of every count it holds), as
        pipelines' config fix-ups (``steps_offset``, ``clip_sample``, ...) expect; D-ODE keys (``lambdas``,
        ``grid``, ``spacing``, ``fit_info``) change the fit, with the constructor's checks."""
        self._edit_config(kwargs)

    def _edit_config(self, values: dict) -> None:
        current = self._config_values()
        changed = {key: value for key, value in values.items()
                   if not key.startswith("_") and (key not in current or jsonable(value) != current[key])}
        own = {key: changed.pop(key) for key in list(changed) if key in OWN_KEYS or key == FITS_KEY}
        fixed = {"base_scheduler", "nfe", "num_inference_steps", FITS_KEY} & set(own)
        if fixed - ({"nfe"} if "lambdas" in own and len(own["lambdas"]) == own.get("nfe", len(own["lambdas"]))
                    else set()):
            raise ValueError(f"cannot change {sorted(fixed)} of a DODEScheduler's config: build another one "
                             f"(dode.DODEScheduler(base, lambdas, num_inference_steps), or DODEScheduler.combine)")
        if own:  # checked as the constructor checks, then taken
            fit = DODEScheduler(self.base_scheduler, own.get("lambdas", self.lambdas), self.num_inference_steps,
                                own.get("fit_info", self.fit_info), own.get("grid", self.grid),
                                spacing=own.get("spacing", self._spacing))
            if _solver_or_none(self.base_scheduler) is not None and fit.nfe != self.nfe:
                raise ValueError(f"{fit.nfe} lambdas for num_inference_steps={self.num_inference_steps}, which "
                                 f"makes {self.nfe} model evaluations")
            for name in _FIT_ATTRIBUTES[2:]:  # the fit, on the same base and step count
                object.__setattr__(self, name, getattr(fit, name))
        if changed:
            for base in self._bases():
                base.register_to_config(**changed)
        self._sync_config()

    # -- everything else is the base scheduler's ------------------------------------------------------------------
    def __getattr__(self, name):
        # Only called for attributes this object lacks: hand them to the base scheduler.
        if name.startswith("__") or name in _OWN_ATTRIBUTES or "base_scheduler" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(self.base_scheduler, name)

    def __setattr__(self, name, value):
        if name == "_internal_dict" and "_internal_dict" in self.__dict__:
            # a pipeline's config fix-up: ``scheduler._internal_dict = FrozenDict({**scheduler.config, key: value})``
            self._edit_config(dict(value))
            return
        if name in _OWN_ATTRIBUTES or hasattr(type(self), name):  # its own (methods and properties included)
            object.__setattr__(self, name, value)  # a property without a setter raises AttributeError itself
            return
        base = self.__dict__.get("base_scheduler")
        if base is not None and (name in vars(base) or hasattr(type(base), name)):
            setattr(base, name, value)  # state of the base scheduler (timesteps, sigmas, ...): set it there
            return
        base_name = type(base).__name__ if base is not None else "the base scheduler"
        if base is not None and name in base.config:
            raise AttributeError(f"cannot set {name!r} on a DODEScheduler: it is a config value of its {base_name}; "
                                 f"build the base scheduler with it (e.g. {base_name}.from_config({{**config, "
                                 f"{name!r}: ...}})) and wrap that, or scheduler.register_to_config({name}=...)")
        raise AttributeError(f"cannot set {name!r} on a DODEScheduler: neither it nor its {base_name} has such an "
                             f"attribute (its own: {', '.join(sorted(a for a in _OWN_ATTRIBUTES if a[0] != '_'))})")

    def __repr__(self):
        lams = ", ".join(f"{v:+.3f}" for v in self.lambdas)
        grid = "" if self.grid is None else ", grid=[" + ", ".join(f"{v:.4g}" for v in self.grid) + "]"
        spacing = "" if self._spacing is None else f", spacing={self._spacing!r}"
        counts = "" if not self._fits else f", counts={self.counts}"
        return (f"DODEScheduler({type(self.base_scheduler).__name__}{spacing}, nfe={self.nfe}, "
                f"lambdas=[{lams}]{grid}{counts})")

    # -- sampling: the base scheduler's, on corrected outputs -----------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      **kwargs):
        """Set the timesteps of a sampling run (call it before each): the base scheduler's, on this scheduler's
        grid where it has one, with the lambdas starting again from the first.

        Args:
            num_inference_steps (`int`, *optional*):
                A step count it was fitted for (``counts``; None: the one in use); any other raises ValueError,
                since the lambdas hold for their own step count only. With fits for several counts, this picks one.
            device (`str` or `torch.device`, *optional*):
                For the base scheduler's ``set_timesteps``.
            timesteps (`list[int]`, *optional*), sigmas (`list[float]`, *optional*):
                A custom grid. With every lambda 0 and no grid of its own, it goes to the base scheduler as it is
                (the base solver on that grid). With fitted lambdas, only the grid they were fitted on is taken
                (its timesteps, or its noise levels, with or without the final 0); any other raises ValueError.
            kwargs:
                For the base scheduler's ``set_timesteps``.
        """
        self._begin = None
        self._passthrough = False
        if kwargs.get("mu") is not None and not self._is_base():
            self._check_mu(kwargs.pop("mu"))  # a Flux pipeline's dynamic shift: the fitted one, or ValueError
        if timesteps is not None or sigmas is not None:
            if self._is_base():  # the base solver: any grid the base takes
                custom = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas}
                self.base_scheduler.set_timesteps(num_inference_steps, device, **custom, **kwargs)
                self._passthrough = True
                self._reset()
                return
            num_inference_steps = self._fitted_count(num_inference_steps, timesteps, sigmas)
        # 1. the lambdas hold for their own step count: pick it (several counts) or refuse another
        steps = self.num_inference_steps if num_inference_steps is None else self._count(num_inference_steps)
        self._use(steps)
        # 2. the base scheduler's timesteps and noise levels
        self.base_scheduler.set_timesteps(self.num_inference_steps, device, **kwargs)
        # 3. a grid of its own replaces the base's noise levels
        if self.grid is not None:
            set_grid(self.base_scheduler, self.grid)
        # 4. the next step is the first model evaluation: lambda_0, no previous output
        self._reset()

    def _check_mu(self, mu: float) -> None:
        """A pipeline's dynamic shift ``mu`` (Flux: exponential, shift e^mu) for fitted lambdas: their base was fitted
        at a static shift (``dode.pipeline_model`` of a Flux pipeline sets it to e^mu at the model's resolution),
        which must be e^mu; else ValueError saying what to do."""
        config = self.base_scheduler.config
        if config.get("use_dynamic_shifting"):
            raise ValueError("fitted lambdas on a base with dynamic shifting: dode fits at a static shift; build the "
                             "model with dode.pipeline_model(pipe), whose shift is the pipeline's e^mu")
        shift = float(config.get("shift", config.get("flow_shift", 1.0)))
        if not math.isclose(shift, math.exp(mu), rel_tol=1e-6):
            raise ValueError(f"these lambdas were fitted at shift {shift:g}, but the pipeline asks for the dynamic "
                             f"shift e^mu = {math.exp(mu):g} (mu = {mu:g}; it depends on the image size): fit them on "
                             "dode.pipeline_model(pipe, ..., height=..., width=...) at the size you sample")

    def _is_base(self) -> bool:
        return not self._fits and self.grid is None and all(v == 0.0 for v in self.lambdas)

    def _fitted_count(self, num_inference_steps, timesteps, sigmas) -> int:
        """The count whose fitted grid ``timesteps`` (or ``sigmas``) is, else ValueError saying what to do."""
        given = [float(v) for v in (timesteps if timesteps is not None else sigmas)]
        what = "timesteps" if timesteps is not None else "sigmas"
        counts = self.counts if num_inference_steps is None else [self._count(num_inference_steps)]
        fitted = {}
        for steps in counts:
            probe = self.for_steps(steps)
            probe.set_timesteps(steps)
            if timesteps is not None:
                own = [float(v) for v in probe.timesteps]
            else:
                own = [float(v) for v in TimeGrid.of(probe).steps]
                if given and given[-1] == 0.0 and len(given) == len(own) + 1:
                    given = given[:-1]
            fitted[steps] = own
            candidates = [given] if timesteps is not None else [given, _as_made(probe.base_scheduler, given)]
            if any(len(own) == len(g) and all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4) for a, b in zip(own, g))
                   for g in candidates if g is not None):
                return steps
        solver = _solver_or_none(self.base_scheduler)
        hint = (f"dode.distill(model, {solver.name!r}, nfe, spacing=[one noise level per step])"
                if solver is not None and solver.takes_grid else "dode.distill on a spacing that gives it")
        shown = "; ".join(f"num_inference_steps={n}: {[round(v, 4) for v in own]}" for n, own in fitted.items())
        raise ValueError(
            f"these lambdas were fitted on their own grid ({what} {shown}); a custom grid must be exactly that one, "
            f"got {[round(v, 4) for v in given]}. Call set_timesteps(num_inference_steps) (in a pipeline: "
            f"num_inference_steps=...) instead, or fit D-ODE on your grid: {hint}."
        )

    def _reset(self):
        self._evaluation = 0
        self._previous_output = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at position ``begin_index`` of ``timesteps`` (image-to-image pipelines, strength < 1): its
        evaluations then get the lambdas of that position onwards, the first uncorrected (it has no previous
        output). Also the base scheduler's, where it has one. Call after ``set_timesteps``."""
        if isinstance(begin_index, bool) or int(begin_index) != begin_index or begin_index < 0:
            raise ValueError(f"begin_index is a position in timesteps (an integer >= 0), got {begin_index!r}")
        self._begin = int(begin_index)
        if hasattr(self.base_scheduler, "set_begin_index"):
            self.base_scheduler.set_begin_index(self._begin)

    @property
    def begin_index(self) -> int | None:
        """The position in ``timesteps`` a run starts at (``set_begin_index``); None until it is set."""
        return self._begin

    @property
    def step_index(self) -> int | None:
        """The position in ``timesteps`` of the next step (one per model evaluation); None before a run's first
        step."""
        return None if self._previous_output is None and self._evaluation == 0 else self._evaluation

    def _start(self, timestep) -> int:
        """Where a run starts in ``timesteps``: ``set_begin_index``'s position, else that of the first step's
        ``timestep`` (a loop over ``timesteps[k:]``), else 0."""
        if self._begin is not None:
            return self._begin
        timesteps = getattr(self.base_scheduler, "timesteps", None)
        if timesteps is None:
            return 0
        timestep = torch.as_tensor(timestep).to(timesteps.device, timesteps.dtype)
        found = (timesteps == timestep).nonzero().flatten()
        if len(found) == 0:
            return 0
        if hasattr(self.base_scheduler, "index_for_timestep"):  # where the base itself starts
            return int(self.base_scheduler.index_for_timestep(timestep))
        return int(found[1] if len(found) > 1 else found[0])  # diffusers' rule: the second of a repeated timestep

    def corrected_output(self, model_output: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """The D-ODE output o~_i = o_i + lambda_i (o_i - o_{i-1}) of the model evaluation about to be stepped; no
        state changes (``step`` advances).

        Args:
            model_output (`torch.Tensor`):
                o_i, the model's output at this evaluation.
            lam (`float` or `torch.Tensor`, *optional*):
                lambda_i in place of ``lambdas[i]``.

        Returns:
            `torch.Tensor`: o~_i; ``model_output`` itself at the first evaluation (there is no o_{-1}) and where
            lambda_i is the number 0.
        """
        # 1. lambda_i: this evaluation's, unless given (0 past the lambdas: a custom grid handed to the base)
        if lam is None:
            lam = self.lambdas[self._evaluation] if self._evaluation < self.nfe else 0.0
        # 2. nothing to correct at the first evaluation or with lambda_i = 0; a tensor lambda (the refinement's)
        #    stays in the graph even at 0, so that its gradient exists
        if self._previous_output is None or (not torch.is_tensor(lam) and lam == 0.0):
            return model_output
        # 3. o_i + lambda_i (o_i - o_{i-1})
        return model_output + lam * (model_output - self._previous_output)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, eta: float | None = None,
             generator=None, return_dict: bool = True, lam: float | None = None, **kwargs):
        """Advance ``sample`` by one model evaluation: the base scheduler's ``step`` on the D-ODE corrected output
        o_i + lambda_i (o_i - o_{i-1}).

        Args:
            model_output (`torch.Tensor`):
                o_i, the direct output of the model at this evaluation (in the base scheduler's prediction type).
            timestep (`int` or `torch.Tensor`):
                The current timestep, one of ``timesteps`` (the base scheduler's). A run's first step starts the
                lambdas at its position (a loop over ``timesteps[k:]``), or at ``set_begin_index``'s.
            sample (`torch.Tensor`):
                The current sample (state) the model was evaluated at.
            eta (`float`, *optional*), generator (`torch.Generator`, *optional*):
                For a base scheduler whose ``step`` takes them (DDIM: ``eta``; the stochastic ones: ``generator``).
                Named here so that pipelines that pass only what ``step``'s signature names
                (``prepare_extra_step_kwargs``) pass them. A nonzero ``eta`` for a base without it raises; a
                ``generator`` for a deterministic base is not needed and is dropped.
            return_dict (`bool`, defaults to `True`):
                As for the base scheduler.
            lam (`float` or `torch.Tensor`, *optional*):
                lambda_i for this step in place of ``lambdas[i]`` (the refinement passes tensors, to differentiate
                through a run).
            args, kwargs:
                For the base scheduler's ``step``. Keyword arguments it does not take are dropped: pipelines pass
                what their own scheduler takes (DDPMPipeline: ``generator``).

        Returns:
            What the base scheduler's ``step`` returns: its ``SchedulerOutput`` (``prev_sample``, ...), or a tuple
            whose first element is the previous sample with ``return_dict=False``.
        """
        if self._previous_output is None and self._evaluation == 0:  # a run's first step: where it starts
            self._evaluation = self._start(timestep)
        if self._evaluation >= self.nfe and not self._passthrough:
            raise RuntimeError(
                f"step() called for model evaluation {self._evaluation + 1}, but the lambdas cover {self.nfe} model "
                "evaluations; call set_timesteps() before every sampling run"
            )
        # 1. the correction o_i + lambda_i (o_i - o_{i-1})
        corrected = self.corrected_output(model_output, lam)
        # 2. remember o_i (uncorrected) for the next evaluation
        self._previous_output = model_output
        self._evaluation += 1
        # 3. the keyword arguments the base scheduler's step takes
        accepted = inspect.signature(self.base_scheduler.step).parameters
        if eta is not None:
            if "eta" in accepted:
                kwargs["eta"] = eta
            elif eta != 0:
                raise ValueError(f"eta={eta} was given, but {type(self.base_scheduler).__name__}.step has no eta (it "
                                 "is DDIM's stochasticity); D-ODE's lambdas are fitted for the deterministic ODE")
        if generator is not None:
            kwargs["generator"] = generator
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        # 4. the base scheduler's step on the corrected output
        return self.base_scheduler.step(corrected, timestep, sample, *args, return_dict=return_dict, **kwargs)

    # -- persistence: one scheduler_config.json, diffusers' way (dode.core.persistence) ----------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (``config``, ``_class_name`` DODEScheduler) to ``save_directory``;
        ``push_to_hub=True`` (with ``repo_id``, ``token``, ... in ``kwargs``) also uploads it, as diffusers does."""
        self.save_config(check_save_folder(save_directory), push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A DODEScheduler from its ``config`` (a dict, e.g. ``scheduler.config`` or ``load_config``'s); ``kwargs``
        override its keys, D-ODE keys and base-config keys alike (the ones neither takes come back with
        ``return_unused_kwargs=True``)."""
        if "pretrained_model_name_or_path" in kwargs:  # diffusers' deprecated spelling
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is None:
            raise ValueError("Please make sure to provide a config as the first positional argument.")
        if not isinstance(config, dict):  # a folder or hub id, as diffusers still allows
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        record, unused = overridden(config, kwargs)
        scheduler = cls._from_record(record, "the config")
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):
        """The config dict of a saved DODEScheduler (a folder, with ``subfolder``, or a hub id)."""
        subfolder = kwargs.pop("subfolder", None)
        record, _, kwargs = load_record(pretrained_model_name_or_path, subfolder, kwargs, cls.__name__)
        outputs = (record,)
        if return_unused_kwargs:
            outputs += (kwargs,)
        if return_commit_hash:
            outputs += (None,)
        return outputs if len(outputs) > 1 else record

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load a saved DODEScheduler: a folder (``subfolder="scheduler"`` for a pipeline's), or a hub id, from the
        local hub cache or the hub. A hub id that cannot be had (offline, not cached) fails at once with
        ``dode.ModelNotFoundError``; corrupt or inconsistent files fail with ValueError naming the file, a folder
        of another scheduler (or none) with ValueError (FileNotFoundError) saying it is not a saved DODEScheduler.
        Other ``kwargs`` override config keys, as in ``from_config``."""
        kwargs.pop("return_commit_hash", None)
        record, where, kwargs = load_record(pretrained_model_name_or_path, subfolder, kwargs, cls.__name__)
        record, unused = overridden(record, kwargs)  # as diffusers: other kwargs override the config
        scheduler = cls._from_record(record, where)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def _from_record(cls, record: dict, where: str) -> "DODEScheduler":
        """Build from a config record, with the checks a saved file gets (``where`` names it in errors)."""
        record = dict(record)
        fits = record.pop(FITS_KEY, None)
        base, values = split_record(record, where, cls.__name__)
        scheduler = cls(base, **values)
        if scheduler.grid is not None:
            try:  # check the grid against the schedule now rather than at the first sampling run
                scheduler.set_timesteps(scheduler.num_inference_steps)
            except ValueError as err:
                raise ValueError(f"{where} holds a grid this scheduler cannot use: {err}") from err
        if fits is None:
            return scheduler
        # several step counts: the top-level keys are the count in use (overrides apply there), ``fits`` all counts
        if not isinstance(fits, dict) or not all(isinstance(entry, dict) for entry in fits.values()):
            raise ValueError(f"{where} is corrupt: {FITS_KEY} must map step counts to configs")
        others = []
        for key, entry in fits.items():
            one = cls._from_record(entry, f"{where} ({FITS_KEY}[{key!r}])")
            if str(one.num_inference_steps) != str(key):
                raise ValueError(f"{where} is inconsistent: {FITS_KEY}[{key!r}] holds num_inference_steps="
                                 f"{one.num_inference_steps}")
            if one.num_inference_steps != scheduler.num_inference_steps:
                others.append(one)
        if len(others) != len(fits) - 1:
            raise ValueError(f"{where} is inconsistent: {FITS_KEY} has no fit for num_inference_steps="
                             f"{scheduler.num_inference_steps}, the count in use")
        return cls.combine([scheduler, *others])


def _as_made(base, sigmas: list):
    """The levels ``base`` makes of custom ``sigmas`` (a flow scheduler shifts them: a Flux pipeline passes its
    unshifted linspace), or None where its ``set_timesteps`` takes no sigmas."""
    if not sigmas or "sigmas" not in inspect.signature(base.set_timesteps).parameters:
        return None
    probe = copy.deepcopy(base)
    try:
        probe.set_timesteps(sigmas=list(sigmas))
    except (ValueError, TypeError):  # it takes sigmas only in some configurations (UniPC: flow sigmas)
        return None
    return [float(v) for v in TimeGrid.of(probe).steps]


def _solver_or_none(base):
    """The dode solver of a base scheduler, or None for a scheduler of no dode solver."""
    try:
        return solver_of(base)
    except ValueError:
        return None


def _configured(solver, model, spacing: str, overrides: dict):
    """``solver``'s diffusers scheduler on ``model``'s noise schedule and the named ``spacing``."""
    check_kind(solver, model)
    own = flow_config(solver, model.scheduler_config) if solver.flow else model.scheduler_config
    config = {**own, **solver.settings, **solver.spacings[spacing], **overrides}
    return solver.class_for(spacing).from_config(config)


def make_scheduler(name: str, model, spacing: str | None = None, **overrides):
    """A diffusers scheduler for solver ``name`` on ``model``'s noise schedule, as the paper configures it.

    ``spacing``: one of the solver's ``spacings`` (default: the paper's, ``Solver.default_spacing``); for an
    explicit list of noise levels, ``grid_scheduler``. ``overrides`` go to the scheduler's config last.
    """
    solver = get_solver(name)
    if spacing is not None and not isinstance(spacing, str) and solver.takes_grid:
        raise ValueError(f"make_scheduler takes a spacing name (one of {', '.join(map(repr, solver.spacings))}); "
                         f"for an explicit list of noise levels use dode.grid_scheduler({solver.name!r}, "
                         "model, levels): the base solver on that grid, as a DODEScheduler with every lambda 0")
    spacing = solver.check_spacing(spacing)  # a name (a grid for a solver that takes none raises, saying so)
    return _configured(solver, model, spacing, overrides)


def grid_scheduler(name: str, model, levels, **overrides) -> DODEScheduler:
    """Solver ``name`` on ``model``'s noise schedule and an explicit time grid: a ``DODEScheduler`` with every
    lambda 0 (the base solver on that grid) for exactly ``len(levels)`` steps.

    ``levels``: one noise level per step (Heun: per step of two stages), positive and strictly descending, for
    the solvers in ``GRID_SOLVERS``. The grid lives in the DODEScheduler, which re-applies it after every
    ``set_timesteps``; DDIM's base is its grid form (``Solver.grid_form``: the scheduler that makes DDIM's update
    on any levels). ``overrides`` go to the base scheduler's config last.
    """
    solver = get_solver(name)
    if levels is None or isinstance(levels, str):
        raise ValueError(f"grid_scheduler takes a list of noise levels, one per step, got {levels!r}; for a named "
                         f"spacing use dode.make_scheduler({solver.name!r}, model, spacing)")
    grid = solver.check_spacing(levels)
    base = _configured(solver, model, solver.default_spacing, overrides)
    if not solver.custom_grid:  # DDIM: the scheduler that makes its update on any levels
        base = grid_form_scheduler(solver, base.config)
    steps = len(grid)  # one level per step (Heun: per step of two stages)
    return DODEScheduler(base, [0.0] * solver.nfe_of_steps(steps), steps, grid=list(grid))


def to_grid_form(scheduler: DODEScheduler) -> DODEScheduler:
    """A DODEScheduler (same lambdas, step count and spacing) that can take any grid, on ``scheduler``'s own grid:
    ``scheduler`` itself when its base steps on ``base.sigmas``; for DDIM, iPNDM of order 1 on DDIM's noise levels.

    The same sampler where DDIM's next state is at the timestep it evaluates next: always with "leading", and with
    "trailing" when the step count divides the training steps; "linspace" (and "trailing" otherwise) round their
    timesteps apart from DDIM's ``t - T // n`` steps, so there the grid form differs slightly from DDIM."""
    solver = solver_of(scheduler)
    if solver.custom_grid:
        return scheduler
    if solver.grid_form is None:
        raise ValueError(f"{solver.name} cannot take a custom time grid: its diffusers scheduler steps on integer "
                         f"timesteps and no scheduler makes exactly its update on other levels; solvers that can: "
                         f"{', '.join(GRID_SOLVERS)}")
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(probe.num_inference_steps)
    base = grid_form_scheduler(solver, scheduler.base_scheduler.config)
    return DODEScheduler(base, list(scheduler.lambdas), scheduler.num_inference_steps,
                         copy.deepcopy(scheduler.fit_info), grid=list(TimeGrid.of(probe).steps),
                         spacing=scheduler._spacing)
