"""The model registry: one ``ModelEntry`` per embedded model, and ``load_model`` for those, folders and hub ids.

Every model is ``model(x_t, t) -> output`` on a DDPM-style discrete noise schedule (``dode.core.schedule``) and carries
``sample_shape`` (C, H, W), ``scheduler_config`` (the noise schedule every diffusers scheduler is built from, and
``prediction_type``) and ``name``. The output goes to the scheduler unchanged, as in a diffusers pipeline, so D-ODE
corrects the output in the model's own parametrisation; ``as_prediction_type`` converts it exactly to another one.

A new embedded model is one entry in ``MODELS``: how to load it, whether its ODE is exact (then it is judged
against its own data distribution and the exact ODE; otherwise against fine-solver samples), the feature spaces
and metric it is judged by, and which of ``dode.experiments.parameters``' reproduce profiles ``make reproduce`` runs on it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..util import hub
from ..util.hub import ModelNotFoundError
from .networks import DiffusersModel, load_diffusers, load_unet_digits
from ..util.runtime import WEIGHTS_DIR, resolve_device, use_threads
from ..core.schedule import PREDICTION_TYPES, as_prediction_type, convert_prediction, training_sigmas  # noqa: F401 (API)
from .testbeds import GaussianMixtureDenoiser, GaussianMixtureFlow, gmm_digits, gmm_digits_flow  # noqa: F401 (API)


class ModelEntry(NamedTuple):
    """One embedded model."""

    name: str
    load: Callable[[], nn.Module]  # a fresh model on the CPU
    exact: bool  # its eps-prediction is exact: judged against its data (``sample_data``) and the exact ODE
    features: tuple  # the feature spaces its Frechet distances are computed in, where their weights exist
    metric: str  # the true metric that picks the best base spacing (``fd_pixel`` where its feature is missing)
    profile: str | None  # the ``dode.experiments.parameters.REPRODUCE`` profile that ``make reproduce`` runs on it
    # (None: ``make reproduce`` does not run it yet)
    shipped: Callable[[], bool] = lambda: True  # whether its weights are here (``make models`` makes them)
    description: str = ""


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry("gmm-digits", gmm_digits, exact=True, features=("pixel", "digits"), metric="fd_pixel",
               profile="exact", description="a Gaussian mixture fitted to the 8x8 digits: exact eps, exact ODE"),
    ModelEntry("unet-digits", load_unet_digits, exact=False, features=("pixel", "digits"), metric="fd_digits",
               profile="network", shipped=lambda: (WEIGHTS_DIR / "unet-digits" / "config.json").is_file(),
               description="a small diffusers UNet2DModel trained on the 8x8 digits (dode/models/weights)"),
    ModelEntry("gmm-digits-flow", gmm_digits_flow, exact=True, features=("pixel", "digits"), metric="fd_pixel",
               profile=None, description="gmm-digits' mixture as a rectified flow (flow matching, as SD3 and "
               "Flux): exact velocity, exact ODE"),
)}


def get_model(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name]


def available_models() -> list[str]:
    """The embedded models whose weights are here, in registry order."""
    return [name for name, entry in MODELS.items() if entry.shipped()]


def is_available(name_or_path) -> bool:
    """Whether ``load_model`` / ``dode.load_pipeline`` can get it here without waiting: an embedded model, a local
    folder, a hub id with a copy in the local cache, or any hub id while the hub answers."""
    return str(name_or_path) in MODELS or hub.is_available(name_or_path)


def load_model(name_or_path: str | os.PathLike = "gmm-digits", device: str | torch.device = "auto") -> nn.Module:
    """Load a model by name (``MODELS``: ``"gmm-digits"``, ``"unet-digits"``), local diffusers UNet2DModel folder or
    hub id.

    A folder is a saved pipeline (``unet/``, ``scheduler/``) or a bare UNet (``config.json``, weights and maybe
    ``scheduler_config.json``). The noise schedule and ``prediction_type`` come from the checkpoint's scheduler
    config (DDPM's linear schedule and epsilon when it has none); the model's output is the UNet's, unconverted.
    A hub id not in the local cache fails at once without network (``ModelNotFoundError``, saying what to do).
    The embedded models on the CPU set torch to one thread unless asked otherwise (``use_threads``).
    """
    name = str(name_or_path)
    device = resolve_device(device)
    if name in MODELS:
        if device.type == "cpu":
            use_threads()  # tiny models: one thread unless asked otherwise (use_threads)
        model = MODELS[name].load()
        model.name = name
    elif Path(name).expanduser().exists() or hub.is_hub_id(name):
        model = load_diffusers(name)
    else:
        raise ModelNotFoundError(f"unknown model {name!r}: not an embedded model ({', '.join(MODELS)}), not an "
                                 "existing folder, and not a hub id of the form 'owner/name'")
    return model.to(device).eval()


__all__ = ["MODELS", "ModelEntry", "ModelNotFoundError", "DiffusersModel", "available_models", "get_model",
           "is_available", "load_model"]
