"""Saving and loading a ``DODEScheduler``: its one ``scheduler_config.json``, as plain functions.

A saved DODEScheduler is a folder with one ``scheduler_config.json`` (diffusers' ``SCHEDULER_CONFIG_NAME``) whose
``_class_name`` is ``DODEScheduler``: its base scheduler's config plus the D-ODE keys ``OWN_KEYS``. Here:

- ``resolve_folder``: the local folder of a folder, a pipeline's subfolder or a hub id (``dode.util.hub.fetch``:
  the local cache first, then the hub, failing fast offline);
- ``read_record``: the config record saved there, with the file checks (missing, corrupt, another class's);
- ``load_record``: both, taking ``from_pretrained``'s and ``load_config``'s keyword arguments;
- ``overridden``: a record with the keyword overrides it takes, and the rest;
- ``split_record``: a record as its base scheduler (built) and the D-ODE constructor arguments, with the
  consistency checks (unknown scheduler, lambdas vs ``nfe`` vs the solver's NFE rule);
- ``jsonable``: a value as the plain JSON types a config holds.

``DODEScheduler`` (``dode.core.scheduler``, above this module) delegates to these; nothing here imports it.
"""
from __future__ import annotations

import copy
import inspect
import json
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME, SchedulerMixin

from ..util.hub import fetch, is_hub_id
from .solvers import scheduler_class_named, solver_of

#: the saved config, as every diffusers scheduler names it
CONFIG_FILE = SCHEDULER_CONFIG_NAME
#: the ``_class_name`` of a saved DODEScheduler's config
CLASS_NAME = "DODEScheduler"
#: the D-ODE keys of a DODEScheduler's config; every other public key is the base scheduler's config
OWN_KEYS = ("base_scheduler", "num_inference_steps", "nfe", "lambdas", "grid", "spacing", "fit_info")
#: ``from_pretrained``/``load_config`` options handed to the hub download
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "revision", "token")
#: diffusers' loading options that mean nothing for a local JSON file (dropped)
IGNORED_OPTIONS = ("user_agent", "mirror", "proxies")
#: how errors name what is loaded, and the function to hand a local folder to
_WHAT, _LOADER = f"saved {CLASS_NAME}", f"dode.{CLASS_NAME}.from_pretrained"


def jsonable(value):
    """``value`` as plain JSON types (nested dicts and lists of str, int, float, bool, None): what the config holds."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Path):
        return value.as_posix()
    return value


def check_save_folder(save_directory) -> str:
    """``save_directory`` as a str, created if missing; ValueError when it is a file."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file: save_pretrained takes a folder")
    os.makedirs(save_directory, exist_ok=True)
    return save_directory


def resolve_folder(name_or_path, subfolder: str | None = None, **options) -> Path:
    """The local folder of a saved scheduler: ``name_or_path`` itself (``/ subfolder``), or a hub id's snapshot
    of its JSON files (``dode.util.hub.fetch``: the local cache first, then the hub, failing fast offline with
    ``dode.ModelNotFoundError``). ``options``: ``HUB_OPTIONS``, for the download."""
    if name_or_path is None:
        raise ValueError("from_pretrained needs a folder or hub id")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(name):
        if not path.exists():  # neither a folder nor a hub id: fetch's clear error
            fetch(lambda p, **o: None, name, what=_WHAT, loader=_LOADER)
        return path / subfolder if subfolder else path

    def download(repo_id, **extra):
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*.json"] if subfolder else ["*.json"]
        return snapshot_download(repo_id, allow_patterns=patterns, **{**options, **extra})

    snapshot = Path(fetch(download, name, what=_WHAT, loader=_LOADER))
    return snapshot / subfolder if subfolder else snapshot


def read_record(folder: Path, class_name: str = CLASS_NAME) -> tuple[dict, str]:
    """The config record of the scheduler saved in ``folder`` and the file it came from (for messages).

    FileNotFoundError when ``folder`` holds no ``scheduler_config.json``; ValueError when it is corrupt or another
    scheduler's config (its ``_class_name`` not ``class_name``), e.g. a base scheduler's own."""
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE} of a {class_name}: not a saved {class_name}")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is corrupt: {err!r}") from err
    if config.get("_class_name") != class_name:
        raise ValueError(f"{config_path} is a {config.get('_class_name', 'scheduler')}'s config, not a saved "
                         f"{class_name} (its _class_name would be {class_name!r}); load it with its own class")
    return config, str(config_path)


def load_record(name_or_path, subfolder: str | None, kwargs: dict,
                class_name: str = CLASS_NAME) -> tuple[dict, str, dict]:
    """(record, the file it came from, the other ``kwargs``) of a saved scheduler: a folder (``/ subfolder``) or
    a hub id. ``kwargs`` (``from_pretrained``'s or ``load_config``'s) lose the hub options, which go to the
    download, and diffusers' options that mean nothing here (``IGNORED_OPTIONS``)."""
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
    for ignored in IGNORED_OPTIONS:
        kwargs.pop(ignored, None)
    record, where = read_record(resolve_folder(name_or_path, subfolder, **options), class_name)
    return record, where, kwargs


def overridden(config: dict, overrides: dict) -> tuple[dict, dict]:
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


def split_record(record: dict, where: str, class_name: str = CLASS_NAME) -> tuple[SchedulerMixin, dict]:
    """A DODEScheduler's config record as (its base scheduler, built from the base config; the D-ODE constructor
    arguments: ``lambdas``, ``num_inference_steps``, ``fit_info``, ``grid``, ``spacing``), with the checks a saved
    file gets. ``where`` names the record in errors (ValueError: another scheduler's config, corrupt values, an
    unknown scheduler, lambdas inconsistent with ``nfe`` or with the solver's NFE rule)."""
    if record.get("_class_name", class_name) != class_name or "base_scheduler" not in record:
        raise ValueError(f"{where} is a {record.get('_class_name', 'plain scheduler')}'s config, not a "
                         f"{class_name}'s (no base_scheduler, lambdas, ...); wrap a scheduler instead: "
                         f"{class_name}(SchedulerClass.from_config(config), lambdas, num_inference_steps)")
    try:
        base_name = record["base_scheduler"]
        steps, lambdas = int(record["num_inference_steps"]), [float(v) for v in record["lambdas"]]
        nfe = int(record.get("nfe", len(lambdas)))
        grid = None if record.get("grid") is None else [float(v) for v in record["grid"]]
        fit_info = copy.deepcopy(record.get("fit_info") or {})
        if not isinstance(fit_info, dict):
            raise TypeError(f"fit_info must be a dict, got {type(fit_info).__name__}")
        spacing = record.get("spacing")
        if spacing is not None and not isinstance(spacing, str):
            raise TypeError(f"spacing must be a name or null, got {type(spacing).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where} is corrupt: {err!r} (a {class_name}'s config holds {', '.join(OWN_KEYS)} "
                         "beside its base scheduler's config)") from err
    scheduler_class = scheduler_class_named(base_name)
    if scheduler_class is None or not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(f"{where} names an unknown scheduler {base_name!r}")
    base_config = {key: value for key, value in record.items() if key not in OWN_KEYS and not key.startswith("_")}
    defaults = record.get("_use_default_values")
    if isinstance(defaults, (list, tuple)):  # in memory only (never saved): keys the base took its defaults for
        base_config["_use_default_values"] = [key for key in defaults if key in base_config]
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
    return base, {"lambdas": lambdas, "num_inference_steps": steps, "fit_info": fit_info, "grid": grid,
                  "spacing": spacing}
