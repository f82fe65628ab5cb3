"""A diffusers UNet as a dode model (``DiffusersModel``), loaded from a folder or hub id; the ``unet-digits`` testbed."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from ..util.hub import ModelNotFoundError, fetch
from ..util.runtime import WEIGHTS_DIR
from ..core.schedule import DDPM_SCHEDULE, is_flow, schedule_config


class DiffusersModel(nn.Module):
    """A diffusers UNet as a dode model: ``model(x_t, t)`` is the UNet's output, of the prediction type in
    ``scheduler_config`` (the checkpoint's), handed to the scheduler unchanged as a diffusers pipeline does."""

    def __init__(self, unet, scheduler_config, name: str):
        super().__init__()
        if is_flow(scheduler_config):
            raise ValueError("prediction type 'flow_prediction' (flow matching) is not supported for a UNet "
                             "checkpoint: dode runs flow-matching models as gmm-digits-flow and SD3- and Flux-style "
                             "pipelines (dode.pipeline_model)")
        self.unet = unet
        self.scheduler_config = schedule_config(scheduler_config)
        channels, size = unet.config.in_channels, unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.sample_shape = (channels, *size)
        self.name = name

    def forward(self, x_t, t, **conditioning):
        """The UNet at (x_t, t), in its own dtype; ``conditioning`` (e.g. ``encoder_hidden_states``) goes to it."""
        return self.unet(x_t.to(self.unet.dtype), t, **conditioning).sample.to(x_t.dtype)


def _load_unet(name_or_path: str, local_files_only: bool = False):
    """(UNet2DModel, its scheduler config or None) from a pipeline layout (unet/, scheduler/) or a bare UNet layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    # low_cpu_mem_usage: the default wants `accelerate`, and says so at length
    options = dict(local_files_only=local_files_only, low_cpu_mem_usage=False)
    try:
        unet = UNet2DModel.from_pretrained(name_or_path, subfolder="unet", **options)
    except (OSError, ValueError):
        unet = UNet2DModel.from_pretrained(name_or_path, **options)
    for subfolder in ("scheduler", None):
        try:
            return unet, DDPMScheduler.load_config(name_or_path, subfolder=subfolder, local_files_only=local_files_only)
        except OSError:  # no scheduler config there: try the next place
            continue
    return unet, None


def load_diffusers(name_or_path: str) -> DiffusersModel:
    unet, config = fetch(_load_unet, name_or_path)
    if config is None:
        warnings.warn(f"{name_or_path!r} has no scheduler config: assuming the DDPM schedule {DDPM_SCHEDULE}",
                      stacklevel=3)
    return DiffusersModel(unet, config or DDPM_SCHEDULE, str(name_or_path))


def load_unet_digits(folder: str | os.PathLike = WEIGHTS_DIR / "unet-digits") -> DiffusersModel:
    """The ``unet-digits`` testbed from its folder (default: the shipped weights), with a clear error if broken."""
    folder = Path(folder)
    try:
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"no config.json in {str(folder)!r}")
        model = load_diffusers(str(folder))
    except ModelNotFoundError as err:
        raise ModelNotFoundError(
            f"the unet-digits weights in {str(folder)!r} are missing or corrupt ({err}); `make models` retrains them"
        ) from err
    model.name = "unet-digits"
    return model
