"""``DODEScheduler``: any diffusers scheduler with D-ODE's one scalar per model evaluation.

Before the base scheduler sees model output o_i it becomes o_i + lambda_i (o_i - o_{i-1}) (lambda_0 = 0).
A learned time grid (``distill(refine="joint+timesteps")``), when there is one, replaces the base
scheduler's noise levels after every ``set_timesteps``. Everything else (``timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``order``, ...) is the base scheduler's, so a DODEScheduler drops in wherever the base
scheduler is used.

It is a diffusers ``SchedulerMixin`` and ``ConfigMixin``: ``config`` is the base scheduler's config (every key of
it, so ``OtherScheduler.from_config(dode.config)`` gives that scheduler on the same noise schedule, as for any
diffusers scheduler) plus the D-ODE keys ``OWN_KEYS``: ``base_scheduler`` (the base's class name),
``num_inference_steps``, ``nfe``, ``lambdas``, ``grid`` (noise levels or null), ``spacing`` and ``fit_info`` (how
it was fitted). ``save_pretrained`` writes it as one ``scheduler_config.json`` whose ``_class_name`` is
``DODEScheduler``; ``from_pretrained`` (a folder, a pipeline folder with ``subfolder="scheduler"``, or a hub id),
``from_config``, ``load_config`` and ``push_to_hub`` work as for diffusers' own schedulers, and
``DiffusionPipeline.from_pretrained`` restores a pipeline saved with one (model_index.json: ["dode",
"DODEScheduler"]). A base scheduler class loading such a folder gets its base config, and diffusers warns that
the D-ODE keys (the lambdas) "are not expected and will be ignored". Folders of the previous format (the base's own
scheduler_config.json plus ``dode_lambdas.json``) still load, with a FutureWarning saying how to convert them.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME, KarrasDiffusionSchedulers, SchedulerMixin

from .grids import TimeGrid
from .hub import fetch, is_hub_id
from .solvers import GRID_SOLVERS, get_solver, grid_form_scheduler, scheduler_class_named, set_grid, solver_of, spacing_of

#: the saved config, as every diffusers scheduler names it
CONFIG_FILE = SCHEDULER_CONFIG_NAME
#: the previous format's side file (beside the base scheduler's own scheduler_config.json): still read, not written
LAMBDAS_FILE = "dode_lambdas.json"
#: the D-ODE keys of ``DODEScheduler.config``; every other public key is the base scheduler's config
OWN_KEYS = ("base_scheduler", "num_inference_steps", "nfe", "lambdas", "grid", "spacing", "fit_info")
#: what the wrapper itself holds; any other attribute write goes to the base scheduler (or is refused)
_OWN_ATTRIBUTES = frozenset({"base_scheduler", "lambdas", "num_inference_steps", "fit_info", "grid", "_evaluation",
                             "_previous_output", "_internal_dict"})
#: ``from_pretrained``/``load_config`` options handed to the hub download
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "revision", "token")


def _jsonable(value):
    """``value`` as plain JSON types (nested dicts and lists of str, int, float, bool, None): what the config holds."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Path):
        return value.as_posix()
    return value


class DODEScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler wrapping a base scheduler, with one lambda per model evaluation.

    ``DODEScheduler(base_scheduler, lambdas, num_inference_steps, fit_info=None, grid=None)``: ``base_scheduler``
    is a scheduler instance (used as it is), or the name of a scheduler class with ``base_config`` its config (the
    base is then built from it, as ``from_config`` does).
    """

    config_name = CONFIG_FILE
    #: the schedulers ``from_config(dode.config)`` can build (on the base's noise schedule, without the lambdas);
    #: ``compatibles`` gives the base scheduler's own list
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    def __init__(self, base_scheduler, lambdas, num_inference_steps: int, fit_info: dict | None = None,
                 grid=None, *, base_config: dict | None = None):
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
        """The spacing it was fitted on (``fit_info["spacing"]``), else the one its base config selects ("explicit"
        with a grid of its own; None where no solver's spacing matches)."""
        named = self.fit_info.get("spacing")
        if isinstance(named, str):
            return named
        if self.grid is not None:
            return "explicit"
        try:
            return spacing_of(self.base_scheduler)
        except ValueError:  # a scheduler of no dode solver
            return None

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
            "fit_info": _jsonable(self.fit_info),
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

    def _reset(self):
        self._evaluation = 0
        self._previous_output = None

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

    # -- persistence: one scheduler_config.json, diffusers' way ------------------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (``config``, ``_class_name`` DODEScheduler) to ``save_directory``;
        ``push_to_hub=True`` (with ``repo_id``, ``token``, ... in ``kwargs``) also uploads it, as diffusers does.
        A ``dode_lambdas.json`` of the previous format there is removed (it would contradict the new file)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file: save_pretrained takes a folder")
        os.makedirs(save_directory, exist_ok=True)
        stale = Path(save_directory) / LAMBDAS_FILE
        if stale.is_file():
            stale.unlink()
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

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
        record, unused = cls._overridden(config, kwargs)
        scheduler = cls._from_record(record, "the config")
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @staticmethod
    def _overridden(config: dict, overrides: dict) -> tuple[dict, dict]:
        """``config`` with the ``overrides`` that are D-ODE keys or the base scheduler's init arguments, and the
        rest."""
        record = dict(config)
        class_name = overrides.get("base_scheduler", record.get("base_scheduler"))
        scheduler_class = scheduler_class_named(class_name) if isinstance(class_name, str) else None
        accepted = set(OWN_KEYS)
        if scheduler_class is not None:
            accepted |= set(inspect.signature(scheduler_class.__init__).parameters) - {"self", "args", "kwargs"}
        record.update({key: value for key, value in overrides.items() if key in accepted})
        return record, {key: value for key, value in overrides.items() if key not in accepted}

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):
        """The config dict of a saved DODEScheduler (a folder, with ``subfolder``, or a hub id); a folder of the
        previous format gives the same dict, with a FutureWarning saying how to convert it."""
        subfolder = kwargs.pop("subfolder", None)
        options = {key: kwargs.pop(key) for key in _HUB_OPTIONS if key in kwargs}
        for ignored in ("user_agent", "mirror", "proxies"):
            kwargs.pop(ignored, None)
        record, _ = cls._read(cls._folder(pretrained_model_name_or_path, subfolder, **options))
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
        ``dode.ModelNotFoundError``; corrupt or inconsistent files fail with ValueError naming the file. Other
        ``kwargs`` override config keys, as in ``from_config``."""
        options = {key: kwargs.pop(key) for key in _HUB_OPTIONS if key in kwargs}
        for ignored in ("user_agent", "mirror", "proxies", "return_commit_hash"):
            kwargs.pop(ignored, None)
        record, where = cls._read(cls._folder(pretrained_model_name_or_path, subfolder, **options))
        record, unused = cls._overridden(record, kwargs)  # as diffusers: other kwargs override the config
        scheduler = cls._from_record(record, where)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @staticmethod
    def _folder(name_or_path, subfolder: str | None = None, **options) -> Path:
        """The local folder of a saved scheduler: ``name_or_path`` itself (``/ subfolder``), or a hub id's snapshot
        of its JSON files (``dode.hub.fetch``: the local cache first, then the hub, failing fast offline)."""
        if name_or_path is None:
            raise ValueError("from_pretrained needs a folder or hub id")
        name = os.fspath(name_or_path)
        path = Path(name).expanduser()
        if path.exists() or not is_hub_id(name):
            if not path.exists():  # neither a folder nor a hub id: fetch's clear error
                fetch(lambda p, **o: None, name, what="saved DODEScheduler", loader="dode.DODEScheduler.from_pretrained")
            return path / subfolder if subfolder else path

        def download(repo_id, **extra):
            from huggingface_hub import snapshot_download

            patterns = [f"{subfolder}/*.json"] if subfolder else ["*.json"]
            return snapshot_download(repo_id, allow_patterns=patterns, **{**options, **extra})

        snapshot = Path(fetch(download, name, what="saved DODEScheduler", loader="dode.DODEScheduler.from_pretrained"))
        return snapshot / subfolder if subfolder else snapshot

    @classmethod
    def _read(cls, folder: Path) -> tuple[dict, str]:
        """The config record of the scheduler saved in ``folder`` and the file it came from (for messages)."""
        config_path, old_path = folder / CONFIG_FILE, folder / LAMBDAS_FILE
        config = None
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
                if not isinstance(config, dict):
                    raise TypeError(f"a JSON {type(config).__name__}, not an object")
            except (ValueError, TypeError, UnicodeDecodeError) as err:
                raise ValueError(f"{config_path} is corrupt: {err!r}") from err
            if config.get("_class_name") == cls.__name__:
                return config, str(config_path)
        if old_path.is_file():
            return cls._read_previous_format(folder, config), str(old_path)
        if config is not None:
            raise ValueError(f"{config_path} is a {config.get('_class_name', 'scheduler')}'s config, not a saved "
                             f"DODEScheduler (its _class_name would be {cls.__name__!r}); load it with its own class")
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE} of a DODEScheduler (nor a {LAMBDAS_FILE}): not a "
                                "saved DODEScheduler")

    @classmethod
    def _read_previous_format(cls, folder: Path, base_config: dict | None) -> dict:
        """The record of a folder in the previous format: the base scheduler's own scheduler_config.json plus
        ``dode_lambdas.json`` (base_scheduler, num_inference_steps, nfe, lambdas, grid, fit)."""
        path = folder / LAMBDAS_FILE
        try:
            old = json.loads(path.read_text())
            record = {"base_scheduler": old["base_scheduler"], "num_inference_steps": old["num_inference_steps"],
                      "nfe": old["nfe"], "lambdas": old["lambdas"], "grid": old.get("grid"),
                      "fit_info": old.get("fit") or {}}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is corrupt: {err!r}") from err
        if base_config is None:
            raise FileNotFoundError(f"{folder} holds a {LAMBDAS_FILE} but no {CONFIG_FILE} of its base scheduler")
        warnings.warn(
            f"{folder} holds a DODEScheduler in the previous format (the base scheduler's {CONFIG_FILE} plus "
            f"{LAMBDAS_FILE}), which a later version will not read. Convert it: "
            f"dode.DODEScheduler.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r}) (the same "
            f"lambdas, grid and fit record, in one {CONFIG_FILE} with _class_name DODEScheduler).",
            FutureWarning, stacklevel=4)
        base = {key: value for key, value in base_config.items() if not key.startswith("_")}
        return {**base, **record}

    @classmethod
    def _from_record(cls, record: dict, where: str) -> "DODEScheduler":
        """Build from a config record, with the checks a saved file gets (``where`` names it in errors)."""
        if record.get("_class_name", cls.__name__) != cls.__name__ or "base_scheduler" not in record:
            raise ValueError(f"{where} is a {record.get('_class_name', 'plain scheduler')}'s config, not a "
                             "DODEScheduler's (no base_scheduler, lambdas, ...); wrap a scheduler instead: "
                             "DODEScheduler(SchedulerClass.from_config(config), lambdas, num_inference_steps)")
        try:
            class_name = record["base_scheduler"]
            steps, lambdas = int(record["num_inference_steps"]), [float(v) for v in record["lambdas"]]
            nfe = int(record.get("nfe", len(lambdas)))
            grid = None if record.get("grid") is None else [float(v) for v in record["grid"]]
            fit_info = copy.deepcopy(record.get("fit_info") or {})
            if not isinstance(fit_info, dict):
                raise TypeError(f"fit_info must be a dict, got {type(fit_info).__name__}")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where} is corrupt: {err!r} (a DODEScheduler's config holds {', '.join(OWN_KEYS)} "
                             "beside its base scheduler's config)") from err
        scheduler_class = scheduler_class_named(class_name)
        if scheduler_class is None or not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            raise ValueError(f"{where} names an unknown scheduler {class_name!r}")
        base_config = {key: value for key, value in record.items() if key not in OWN_KEYS and not key.startswith("_")}
        base = scheduler_class.from_config(base_config)
        if len(lambdas) != nfe:
            raise ValueError(f"{where} is inconsistent: {len(lambdas)} lambdas for nfe={nfe}")
        try:
            solver = solver_of(base)
        except ValueError:  # a scheduler without an NFE rule: trust the stored count
            solver = None
        if solver is not None and solver.nfe_of_steps(steps) != nfe:
            raise ValueError(
                f"{where} is inconsistent: {solver.name} with num_inference_steps={steps} makes "
                f"{solver.nfe_of_steps(steps)} model evaluations, but {nfe} lambdas are stored"
            )
        dode = cls(base, lambdas, steps, fit_info, grid=grid)
        if grid is not None:
            try:  # check the grid against the schedule now rather than at the first sampling run
                dode.set_timesteps(steps)
            except ValueError as err:
                raise ValueError(f"{where} holds a grid this scheduler cannot use: {err}") from err
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
