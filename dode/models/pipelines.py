"""D-ODE in diffusers pipelines (DDPM, DDIM, LDM, Stable Diffusion 1.x/2.x, and the SD3- and Flux-style flow-matching
pipelines: docs/flow.md): the pipeline's denoiser as a dode model, with its guidance, and its D-ODE scheduler installed
as ``pipe.scheduler``::

    pipe = dode.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or any UNet pipeline
    model = dode.pipeline_model(pipe, ["a photo of a cat", "a red car"], guidance_scale=7.5)
    scheduler = dode.distill(model, "dpm_solver_pp_2m", nfe=5, batch_size=20)  # a multiple of the 2 prompts
    latents = dode.sample(model, scheduler, nfe=5, num_samples=8, seed=100)
    dode.use_dode(pipe, scheduler)
    images = pipe(**model.pipeline_inputs(8, seed=100), num_inference_steps=scheduler.num_inference_steps).images

The pipeline then starts from the same noise, with the same prompts and guidance, as ``dode.sample``, and its
latents are ``latents`` (``output_type="latent"``); ``model.decode(latents)`` gives the images in [-1, 1].
"""
from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import torch
from torch import nn

from ..util.hub import fetch
from .networks import DiffusersModel
from ..core.flowmatch import trailing_sigmas
from ..core.schedule import FLOW_SCHEDULE, schedule_config
from ..core.scheduler import DODEScheduler


def load_pipeline(name_or_path, **kwargs):
    """``diffusers.DiffusionPipeline.from_pretrained`` on a local folder or hub id (``kwargs`` go to it, e.g.
    ``torch_dtype``). A hub id not in the local cache fails at once without network, with
    ``dode.ModelNotFoundError`` saying how to use a local folder instead."""
    from diffusers import DiffusionPipeline

    def load(path, **options):
        return DiffusionPipeline.from_pretrained(path, **{"low_cpu_mem_usage": False, **kwargs, **options})

    return fetch(load, name_or_path, what="diffusers pipeline", loader="dode.load_pipeline")


def seed_generators(num_samples: int, seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded seed, seed + 1, ...: as ``generator=`` of a pipeline, the initial noise
    of ``dode.sample(..., seed=seed)`` (``dode.seeded_noise``)."""
    return [torch.Generator().manual_seed(seed + k) for k in range(num_samples)]


def _unet(pipe):
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no `unet`; dode works with UNet pipelines (DDPM, DDIM, LDM, "
                         "Stable Diffusion 1.x and 2.x)")
    if unet.config.get("addition_embed_type") or unet.config.get("time_cond_proj_dim"):
        raise ValueError(f"{type(pipe).__name__}'s UNet takes extra conditioning (addition_embed_type or "
                         "time_cond_proj_dim: SDXL, LCM, ...), which dode does not pass")
    return unet


class PipelineModel(DiffusersModel):
    """A pipeline's UNet as a dode model: ``model(x_t, t)`` is its output, as the pipeline hands it to its scheduler
    (guided: uncond + s (cond - uncond) when the guidance scale s > 1, as in Stable Diffusion).

    Prompts: row k of every batch gets prompt k mod P (P prompts), so batch sizes (of ``dode.distill``, the teacher
    and ``dode.sample``) must be multiples of P. ``decode`` turns samples (latents) into images.
    """

    def __init__(self, pipe, prompt_embeds=None, negative_prompt_embeds=None, guidance_scale: float = 1.0):
        super().__init__(_unet(pipe), pipe.scheduler.config, pipe.name_or_path or type(pipe).__name__)
        self.autoencoder = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)
        self.guidance_scale = float(guidance_scale)
        if self.guided and prompt_embeds is not None and (
                negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape):
            raise ValueError("guidance needs negative_prompt_embeds of the shape of prompt_embeds "
                             f"{tuple(prompt_embeds.shape)}, got {getattr(negative_prompt_embeds, 'shape', None)}")
        self.register_buffer("prompt_embeds", prompt_embeds)
        self.register_buffer("negative_prompt_embeds", negative_prompt_embeds if self.guided else None)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def rows(self, embeds: torch.Tensor, batch: int) -> torch.Tensor:
        """``embeds`` (P, ...) for a batch: row k gets prompt k mod P."""
        if batch % len(embeds):
            raise ValueError(f"a batch of {batch} samples does not line up with {len(embeds)} prompts: row k of a "
                             f"batch gets prompt k mod {len(embeds)}, so batch sizes and num_samples must be "
                             f"multiples of {len(embeds)}")
        return embeds.repeat(batch // len(embeds), *[1] * (embeds.dim() - 1))

    def forward(self, x_t, t):
        if self.prompt_embeds is None:
            return super().forward(x_t, t)
        cond = self.rows(self.prompt_embeds, len(x_t))
        if not self.guided:
            return super().forward(x_t, t, encoder_hidden_states=cond)
        uncond = self.rows(self.negative_prompt_embeds, len(x_t))
        both = super().forward(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([uncond, cond]))
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def pipeline_inputs(self, num_samples: int, seed: int = 0) -> dict:
        """Keyword arguments for ``pipe(...)`` that start from the noise of ``dode.sample(..., num_samples,
        seed=seed)`` with this model's prompts and guidance; add ``num_inference_steps``."""
        inputs = {"generator": seed_generators(num_samples, seed)}
        if self.prompt_embeds is None:
            return {**inputs, "batch_size": num_samples}
        inputs.update(prompt_embeds=self.rows(self.prompt_embeds, num_samples), guidance_scale=self.guidance_scale)
        if self.guided:
            inputs["negative_prompt_embeds"] = self.rows(self.negative_prompt_embeds, num_samples)
        return inputs

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1]: latents decoded by the pipeline's autoencoder (to the CPU), pixel samples as they are."""
        if self.autoencoder is None:
            return samples
        scale = self.autoencoder.config.scaling_factor
        parameter = next(self.autoencoder.parameters())
        return torch.cat([self.autoencoder.decode(chunk.to(parameter) / scale).sample.float().cpu()
                          for chunk in samples.split(batch_size)])


def pipeline_model(pipe, prompts=None, *, guidance_scale: float = 7.5, negative_prompt=None, prompt_embeds=None,
                   negative_prompt_embeds=None, **flow_embeds) -> nn.Module:
    """A diffusers pipeline's denoiser as a dode model, for ``dode.distill``, ``dode.sample`` and ``dode.Teacher``.

    Unconditional pipelines (DDPM, DDIM, LDM) take no prompts. Text-conditioned ones (Stable Diffusion) take
    ``prompts`` (a string or list; encoded by ``pipe.encode_prompt``, with ``negative_prompt``) or ready
    ``prompt_embeds`` (and ``negative_prompt_embeds``); with ``guidance_scale`` > 1 the output is the guided one.
    Sample k uses prompt k mod P: use batch sizes and sample counts that are multiples of the P prompts.
    SD3- and Flux-style pipelines (a ``transformer``: flow matching) go to ``flow_pipeline_model``, which also takes
    ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` and, for Flux, ``height``, ``width`` and
    ``true_cfg_scale`` (``flow_embeds``); use the flow solvers (``dode.core.solvers.FLOW_SOLVERS``) on them.
    """
    if getattr(pipe, "transformer", None) is not None:  # SD3- and Flux-style: the flow-matching pipelines
        return flow_pipeline_model(pipe, prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                   prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                   **flow_embeds)
    if flow_embeds:
        raise ValueError(f"{', '.join(flow_embeds)}: for flow-matching (SD3- and Flux-style) pipelines only")
    unet = _unet(pipe)
    given = prompts is not None or prompt_embeds is not None
    if "encoder_hidden_states" not in inspect.signature(unet.forward).parameters:
        if given or negative_prompt is not None or negative_prompt_embeds is not None:
            raise ValueError(f"{type(pipe).__name__} is unconditional: it takes no prompts")
        return PipelineModel(pipe)
    if not given:
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] or prompt_embeds=...")
    if prompts is not None and prompt_embeds is not None:
        raise ValueError("pass prompts or prompt_embeds, not both")
    guided = guidance_scale > 1
    if hasattr(pipe, "encode_prompt"):
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompts, pipe.device, 1, guided, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds)
    elif prompts is not None:
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt: pass prompt_embeds (and, for guidance, "
                         "negative_prompt_embeds)")
    return PipelineModel(pipe, prompt_embeds, negative_prompt_embeds, guidance_scale)


def _transformer(pipe, kind: str = "sd3"):
    """The transformer of a flow-matching pipeline: SD3-style (``SD3Transformer2DModel``: encoder_hidden_states and
    pooled_projections) or, with ``kind="flux"``, Flux-style (``FluxTransformer2DModel``: packed latents, txt_ids and
    img_ids); ValueError otherwise."""
    transformer = getattr(pipe, "transformer", None)
    parameters = inspect.signature(transformer.forward).parameters if transformer is not None else {}
    found = None if "pooled_projections" not in parameters else "flux" if "txt_ids" in parameters else "sd3"
    if found != kind:
        raise ValueError(f"{type(pipe).__name__} is not an {'SD3' if kind == 'sd3' else 'Flux'}-style pipeline; dode "
                         "runs SD3-style (encoder_hidden_states, pooled_projections) and Flux-style (packed latents, "
                         "txt_ids, img_ids) flow-matching pipelines")
    return transformer


def _flow_kind(pipe) -> str | None:
    """"sd3" or "flux" for a flow-matching pipeline with a transformer dode runs, else None."""
    for kind in ("sd3", "flux"):
        try:
            _transformer(pipe, kind)
            return kind
        except ValueError:
            continue
    return None


class FlowPipelineModel(nn.Module):
    """An SD3-style pipeline's transformer as a dode flow model: ``model(x_t, t)`` is the velocity the pipeline hands
    its scheduler at latents ``x_t`` and timestep ``t`` (s * 1000), guided as SD3 guides it (uncond + g (cond -
    uncond), one batched call, when the guidance scale g > 1). Prompts as for ``PipelineModel``: row k of a batch gets
    prompt k mod P. ``scheduler_config``: the flow schedule and the pipeline scheduler's ``shift``."""

    def __init__(self, pipe, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, guidance_scale: float = 1.0):
        super().__init__()
        self.transformer = _transformer(pipe)
        self.autoencoder = getattr(pipe, "vae", None)
        config = pipe.scheduler.config
        self.scheduler_config = {**FLOW_SCHEDULE, "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                                 "shift": float(config.get("shift", config.get("flow_shift", 1.0)))}
        size = self.transformer.config.sample_size
        self.sample_shape = (self.transformer.config.in_channels, size, size)
        self.name = pipe.name_or_path or type(pipe).__name__
        self.guidance_scale = float(guidance_scale)
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        if self.guided and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            raise ValueError("guidance needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        self.register_buffer("prompt_embeds", prompt_embeds)
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds)
        self.register_buffer("negative_prompt_embeds", negative_prompt_embeds if self.guided else None)
        self.register_buffer("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds if self.guided else None)

    guided = PipelineModel.guided
    rows = PipelineModel.rows

    def forward(self, x_t, t):
        batch = len(x_t)
        cond, pooled = self.rows(self.prompt_embeds, batch), self.rows(self.pooled_prompt_embeds, batch)
        x = x_t.to(self.transformer.dtype)
        if self.guided:
            cond = torch.cat([self.rows(self.negative_prompt_embeds, batch), cond])
            pooled = torch.cat([self.rows(self.negative_pooled_prompt_embeds, batch), pooled])
            x = torch.cat([x, x])
        timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
        out = self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                               pooled_projections=pooled, return_dict=False)[0]
        if self.guided:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return out.to(x_t.dtype)

    def pipeline_inputs(self, num_samples: int, seed: int = 0) -> dict:
        """Keyword arguments for ``pipe(...)`` that start from the noise of ``dode.sample(..., num_samples,
        seed=seed)`` with this model's prompts, guidance and latent size; add ``num_inference_steps``."""
        size = self.sample_shape[-1] * self.vae_scale_factor
        inputs = {"generator": seed_generators(num_samples, seed), "height": size, "width": size,
                  "prompt_embeds": self.rows(self.prompt_embeds, num_samples),
                  "pooled_prompt_embeds": self.rows(self.pooled_prompt_embeds, num_samples),
                  "guidance_scale": self.guidance_scale}
        if self.guided:
            inputs.update(negative_prompt_embeds=self.rows(self.negative_prompt_embeds, num_samples),
                          negative_pooled_prompt_embeds=self.rows(self.negative_pooled_prompt_embeds, num_samples))
        return inputs

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1]: latents decoded as SD3 decodes them (``/ scaling_factor + shift_factor``)."""
        if self.autoencoder is None:
            return samples
        config = self.autoencoder.config
        parameter = next(self.autoencoder.parameters())
        return torch.cat([self.autoencoder.decode((chunk.to(parameter) / config.scaling_factor)
                                                  + (config.shift_factor or 0.0)).sample.float().cpu()
                          for chunk in samples.split(batch_size)])


class FluxPipelineModel(nn.Module):
    """A Flux-style pipeline's transformer as a dode flow model at one image size: ``model(x_t, t)`` is the velocity
    at latents ``x_t`` (unpacked, (C, H, W); the pipeline packs them into 2x2 patches, which the scheduler's
    element-wise steps do not see) and timestep ``t`` (s * 1000; Flux's transformer gets t / 1000), with the
    embedded guidance (``guidance_scale``, where the transformer has ``guidance_embeds``) and, with negative
    embeddings and ``true_cfg_scale`` > 1, Flux's true classifier-free guidance.

    The pipeline samples on sigmas linspace(1, 1/n, n) shifted by e^mu, mu from the image size
    (``calculate_shift``): ``scheduler_config["shift"]`` is that e^mu, and ``pipeline_grid(n)`` the levels the
    pipeline uses at ``num_inference_steps=n`` (fit D-ODE on them: ``dode.distill(model, "flow_euler", n,
    spacing=model.pipeline_grid(n))``)."""

    def __init__(self, pipe, prompt_embeds, pooled_prompt_embeds, *, height: int | None = None,
                 width: int | None = None, guidance_scale: float = 3.5, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, true_cfg_scale: float = 1.0):
        super().__init__()
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        self.transformer = _transformer(pipe, "flux")
        self.pipe_class, self.autoencoder = type(pipe), getattr(pipe, "vae", None)
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.height = int(height or pipe.default_sample_size * self.vae_scale_factor)
        self.width = int(width or pipe.default_sample_size * self.vae_scale_factor)
        rows, cols = (2 * (int(v) // (self.vae_scale_factor * 2)) for v in (self.height, self.width))
        self.sample_shape = (self.transformer.config.in_channels // 4, rows, cols)
        config = pipe.scheduler.config
        self.mu = calculate_shift(rows * cols // 4, config.get("base_image_seq_len", 256),
                                  config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                  config.get("max_shift", 1.15))
        shift = math.exp(self.mu) if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))
        self.scheduler_config = {**FLOW_SCHEDULE, "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                                 "shift": shift, **{k: config[k] for k in ("base_image_seq_len", "max_image_seq_len",
                                                                          "base_shift", "max_shift") if k in config}}
        self._scheduler = copy.deepcopy(pipe.scheduler)
        self.name = pipe.name_or_path or type(pipe).__name__
        self.guidance_scale, self.true_cfg_scale = float(guidance_scale), float(true_cfg_scale)
        if self.true_cfg and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            raise ValueError("true_cfg_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        negatives = (negative_prompt_embeds, negative_pooled_prompt_embeds) if self.true_cfg else (None, None)
        for name, value in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds),
                            ("negative_prompt_embeds", negatives[0]), ("negative_pooled_prompt_embeds", negatives[1])):
            self.register_buffer(name, value)
        self.register_buffer("img_ids", pipe._prepare_latent_image_ids(1, rows // 2, cols // 2, "cpu",
                                                                       prompt_embeds.dtype), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(prompt_embeds.shape[1], 3, dtype=prompt_embeds.dtype),
                             persistent=False)

    rows = PipelineModel.rows

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) as the pipeline holds them (B, H W / 4, 4 C)."""
        return self.pipe_class._pack_latents(x, len(x), *self.sample_shape)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return self.pipe_class._unpack_latents(packed, self.height, self.width, self.vae_scale_factor)

    def _call(self, packed, timestep, embeds, pooled):
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=packed.device, dtype=torch.float32)
            guidance = guidance.expand(len(packed))
        return self.transformer(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=self.txt_ids,
                                img_ids=self.img_ids, return_dict=False)[0]

    def forward(self, x_t, t):
        batch = len(x_t)
        packed = self.pack(x_t.to(self.transformer.dtype))
        timestep = torch.as_tensor(t, device=packed.device).reshape(-1).expand(batch).to(packed.dtype)
        out = self._call(packed, timestep, self.rows(self.prompt_embeds, batch),
                         self.rows(self.pooled_prompt_embeds, batch))
        if self.true_cfg:
            negative = self._call(packed, timestep, self.rows(self.negative_prompt_embeds, batch),
                                  self.rows(self.negative_pooled_prompt_embeds, batch))
            out = negative + self.true_cfg_scale * (out - negative)
        return self.unpack(out).to(x_t.dtype)

    def pipeline_grid(self, num_inference_steps: int) -> list:
        """The flow levels the pipeline steps through at ``num_inference_steps`` (its sigmas after the shift)."""
        scheduler = copy.deepcopy(self._scheduler)
        sigmas = trailing_sigmas(num_inference_steps)  # Flux's: linspace(1, 1/n, n)
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas,
                                **({"mu": self.mu} if scheduler.config.get("use_dynamic_shifting") else {}))
        return [float(v) for v in scheduler.sigmas[:-1]]

    def pipeline_inputs(self, num_samples: int, seed: int = 0) -> dict:
        """Keyword arguments for ``pipe(...)`` that start from the noise of ``dode.sample(..., num_samples,
        seed=seed)`` at this model's size, prompts and guidance; add ``num_inference_steps``. Its latents
        (``output_type="latent"``) are ``model.pack`` of dode's samples."""
        inputs = {"generator": seed_generators(num_samples, seed), "height": self.height, "width": self.width,
                  "prompt_embeds": self.rows(self.prompt_embeds, num_samples),
                  "pooled_prompt_embeds": self.rows(self.pooled_prompt_embeds, num_samples),
                  "guidance_scale": self.guidance_scale}
        if self.true_cfg:
            inputs.update(negative_prompt_embeds=self.rows(self.negative_prompt_embeds, num_samples),
                          negative_pooled_prompt_embeds=self.rows(self.negative_pooled_prompt_embeds, num_samples),
                          true_cfg_scale=self.true_cfg_scale)
        return inputs

    decode = FlowPipelineModel.decode


def flow_pipeline_model(pipe, prompts=None, *, guidance_scale: float = 7.0, negative_prompt=None, prompt_embeds=None,
                        pooled_prompt_embeds=None, negative_prompt_embeds=None,
                        negative_pooled_prompt_embeds=None, **flux_options) -> nn.Module:
    """``pipeline_model`` for a flow-matching pipeline: ``prompts`` are encoded by ``pipe.encode_prompt``, or ready
    embeddings are given (``prompt_embeds`` with ``pooled_prompt_embeds``, and the negative ones for guidance).
    SD3-style: a ``FlowPipelineModel`` (classifier-free guidance at ``guidance_scale``). Flux-style: a
    ``FluxPipelineModel`` at one image size (``flux_options``: ``height``, ``width``, ``true_cfg_scale``; the
    embedded guidance is ``guidance_scale``)."""
    kind = _flow_kind(pipe) or _transformer(pipe)  # the second raises, naming what dode runs
    flux = {key: flux_options.pop(key) for key in ("height", "width", "true_cfg_scale") if key in flux_options}
    if flux_options or (flux and kind != "flux"):
        raise TypeError(f"unexpected options {sorted({*flux_options, *flux})} for {type(pipe).__name__}")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] or prompt_embeds=... "
                         "(with pooled_prompt_embeds), not both")
    if kind == "flux":
        if prompts is not None:
            prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompts, None, device=pipe.device)
            if negative_prompt is not None:
                negative_prompt_embeds, negative_pooled_prompt_embeds, _ = pipe.encode_prompt(
                    negative_prompt, None, device=pipe.device)
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds go with pooled_prompt_embeds (Flux's two text conditionings)")
        return FluxPipelineModel(pipe, prompt_embeds, pooled_prompt_embeds, guidance_scale=guidance_scale,
                                 negative_prompt_embeds=negative_prompt_embeds,
                                 negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **flux)
    guided = guidance_scale > 1
    if prompts is not None:
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
         negative_pooled_prompt_embeds) = pipe.encode_prompt(prompts, None, None, negative_prompt=negative_prompt,
                                                             do_classifier_free_guidance=guided, device=pipe.device)
    elif pooled_prompt_embeds is None:
        raise ValueError("prompt_embeds go with pooled_prompt_embeds (SD3's two text conditionings)")
    return FlowPipelineModel(pipe, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                             negative_pooled_prompt_embeds, guidance_scale)


def use_dode(pipe, scheduler):
    """Install a ``DODEScheduler`` (or the folder it was saved to) as ``pipe.scheduler``; returns the pipeline.

    Call the pipeline with ``num_inference_steps=scheduler.num_inference_steps`` (or any of ``scheduler.counts``
    for one distilled at several NFE): the lambdas hold for their step count only, and any other raises ValueError
    (the pipelines' defaults, 50 or 1000, do). The lambdas must have
    been fitted on this pipeline's noise schedule and prediction type (``pipeline_model(pipe)``, or
    ``dode.load_model`` of the same checkpoint). DDPMPipeline and DDIMPipeline neither scale the noise by
    ``init_noise_sigma`` nor call ``scale_model_input``, so sigma-space solvers (heun) cannot run in them, and
    they pass ``generator`` (DDIMPipeline also ``eta``) to ``step``, which a DODEScheduler hands on only where its
    base scheduler's ``step`` takes them. ``pipe.save_pretrained`` saves the DODEScheduler with the pipeline;
    DDIMPipeline turns any scheduler into a DDIMScheduler when built (``LambdasDroppedWarning`` says so), so call
    ``use_dode`` again after loading one.
    """
    from diffusers import DDIMPipeline, DDPMPipeline

    if not isinstance(scheduler, DODEScheduler):
        scheduler = DODEScheduler.from_pretrained(scheduler)
    if getattr(pipe, "transformer", None) is not None:
        _flow_kind(pipe) or _transformer(pipe)  # the second raises, naming what dode runs
    else:
        _unet(pipe)
    fitted, own = schedule_config(scheduler.config), schedule_config(pipe.scheduler.config)
    if fitted != own:
        raise ValueError(f"these lambdas were fitted for the noise schedule {fitted}, but the pipeline's is {own}")
    sigma_space = float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1
    if sigma_space and isinstance(pipe, (DDPMPipeline, DDIMPipeline)):
        raise ValueError(f"{type(pipe).__name__} does not scale its noise by init_noise_sigma nor call "
                         f"scale_model_input, so the sigma-space {type(scheduler.base_scheduler).__name__} cannot "
                         "run in it")
    pipe.scheduler = scheduler
    return pipe
