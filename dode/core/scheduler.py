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
import math

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from .persistence import CONFIG_FILE, OWN_KEYS, check_save_folder, jsonable, load_record, overridden, split_record
from .solvers import GRID_SOLVERS, get_solver, grid_form_scheduler, scheduler_class_named, set_grid, solver_of, spacing_of
from .timegrid import TimeGrid

__all__ = ["CONFIG_FILE", "OWN_KEYS", "DODEScheduler", "grid_scheduler", "make_scheduler", "to_grid_form"]

#: what the wrapper itself holds; any other attribute write goes to the base scheduler (or is refused)
_OWN_ATTRIBUTES = frozenset({"base_scheduler", "lambdas", "num_inference_steps", "fit_info", "grid", "_spacing",
                             "_evaluation", "_previous_output", "_internal_dict"})


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
        clash = sorted(set(base_scheduler.config) & set(OWN_KEYS))
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
        self._reset()
        self._sync_config()

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
    def _config_values(self) -> dict:
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

    def _sync_config(self) -> None:
        self.__dict__.pop("_internal_dict", None)  # a fresh config, not merged into the previous one
        self.register_to_config(**self._config_values())

    @property
    def config(self) -> FrozenDict:
        """The base scheduler's config plus the D-ODE keys (``OWN_KEYS``), as they are now."""
        self._sync_config()
        return self._internal_dict

    def to_json_string(self) -> str:
        self._sync_config()
        return super().to_json_string()

    # -- everything else is the base scheduler's ------------------------------------------------------------------
    def __getattr__(self, name):
        # Only called for attributes this object lacks: hand them to the base scheduler.
        if name.startswith("__") or name in _OWN_ATTRIBUTES or "base_scheduler" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(self.base_scheduler, name)

    def __setattr__(self, name, value):
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
                                 f"{name!r}: ...}})) and wrap that")
        raise AttributeError(f"cannot set {name!r} on a DODEScheduler: neither it nor its {base_name} has such an "
                             f"attribute (its own: {', '.join(sorted(a for a in _OWN_ATTRIBUTES if a[0] != '_'))})")

    def __repr__(self):
        lams = ", ".join(f"{v:+.3f}" for v in self.lambdas)
        grid = "" if self.grid is None else ", grid=[" + ", ".join(f"{v:.4g}" for v in self.grid) + "]"
        spacing = "" if self._spacing is None else f", spacing={self._spacing!r}"
        return (f"DODEScheduler({type(self.base_scheduler).__name__}{spacing}, nfe={self.nfe}, "
                f"lambdas=[{lams}]{grid})")

    # -- sampling: the base scheduler's, on corrected outputs -----------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, *args, **kwargs):
        """Set the timesteps of a sampling run (call it before each): the base scheduler's, on this scheduler's
        grid where it has one, with the lambdas starting again from the first.

        Args:
            num_inference_steps (`int`, *optional*):
                The step count the lambdas were fitted for (``self.num_inference_steps``, also when None); any
                other raises ValueError, since the lambdas hold for that step count only.
            args, kwargs:
                For the base scheduler's ``set_timesteps`` (``device``, ...).
        """
        # 1. the lambdas hold for one step count
        if num_inference_steps is not None and int(num_inference_steps) != self.num_inference_steps:
            raise ValueError(
                f"these lambdas were fitted for num_inference_steps={self.num_inference_steps} "
                f"({self.nfe} NFE); got {num_inference_steps}. In a pipeline, call it with "
                f"num_inference_steps={self.num_inference_steps}; distil again for another step count."
            )
        # 2. the base scheduler's timesteps and noise levels
        self.base_scheduler.set_timesteps(self.num_inference_steps, *args, **kwargs)
        # 3. a grid of its own replaces the base's noise levels
        if self.grid is not None:
            set_grid(self.base_scheduler, self.grid)
        # 4. the next step is the first model evaluation: lambda_0, no previous output
        self._reset()

    def _reset(self):
        self._evaluation = 0
        self._previous_output = None

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
        # 1. lambda_i: this evaluation's, unless given
        lam = self.lambdas[self._evaluation] if lam is None else lam
        # 2. nothing to correct at the first evaluation or with lambda_i = 0; a tensor lambda (the refinement's)
        #    stays in the graph even at 0, so that its gradient exists
        if self._previous_output is None or (not torch.is_tensor(lam) and lam == 0.0):
            return model_output
        # 3. o_i + lambda_i (o_i - o_{i-1})
        return model_output + lam * (model_output - self._previous_output)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, lam: float | None = None, **kwargs):
        """Advance ``sample`` by one model evaluation: the base scheduler's ``step`` on the D-ODE corrected output
        o_i + lambda_i (o_i - o_{i-1}).

        Args:
            model_output (`torch.Tensor`):
                o_i, the direct output of the model at this evaluation (in the base scheduler's prediction type).
            timestep (`int` or `torch.Tensor`):
                The current timestep, one of ``timesteps`` (the base scheduler's).
            sample (`torch.Tensor`):
                The current sample (state) the model was evaluated at.
            lam (`float` or `torch.Tensor`, *optional*):
                lambda_i for this step in place of ``lambdas[i]`` (the refinement passes tensors, to differentiate
                through a run).
            args, kwargs:
                For the base scheduler's ``step`` (``return_dict``, ``generator``, ``eta``, ...). Keyword arguments
                it does not take are dropped: pipelines pass what their own scheduler takes (DDPMPipeline:
                ``generator``).

        Returns:
            What the base scheduler's ``step`` returns: its ``SchedulerOutput`` (``prev_sample``, ...), or a tuple
            whose first element is the previous sample with ``return_dict=False``.
        """
        if self._evaluation >= self.nfe:
            raise RuntimeError(
                f"step() called {self._evaluation + 1} times, but the lambdas cover {self.nfe} model evaluations; "
                "call set_timesteps() before every sampling run"
            )
        # 1. the correction o_i + lambda_i (o_i - o_{i-1})
        corrected = self.corrected_output(model_output, lam)
        # 2. remember o_i (uncorrected) for the next evaluation
        self._previous_output = model_output
        self._evaluation += 1
        # 3. the keyword arguments the base scheduler's step takes
        if kwargs:
            accepted = inspect.signature(self.base_scheduler.step).parameters
            kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        # 4. the base scheduler's step on the corrected output
        return self.base_scheduler.step(corrected, timestep, sample, *args, **kwargs)

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
        base, values = split_record(record, where, cls.__name__)
        scheduler = cls(base, **values)
        if scheduler.grid is not None:
            try:  # check the grid against the schedule now rather than at the first sampling run
                scheduler.set_timesteps(scheduler.num_inference_steps)
            except ValueError as err:
                raise ValueError(f"{where} holds a grid this scheduler cannot use: {err}") from err
        return scheduler


def _configured(solver, model, spacing: str, overrides: dict):
    """``solver``'s diffusers scheduler on ``model``'s noise schedule and the named ``spacing``."""
    config = {**model.scheduler_config, **solver.settings, **solver.spacings[spacing], **overrides}
    return solver.scheduler_class.from_config(config)


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
