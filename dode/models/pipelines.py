"""D-ODE in diffusers pipelines (DDPM, DDIM, LDM, Stable Diffusion 1.x/2.x, and SD3-style flow-matching pipelines): the
pipeline's denoiser as a dode model, with classifier-free guidance, and its D-ODE scheduler installed as
``pipe.scheduler``::

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

import inspect

import torch
from torch import nn

from ..util.hub import fetch
from .networks import DiffusersModel
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
                   negative_prompt_embeds=None, **flow_embeds) -> PipelineModel:
    """A diffusers pipeline's denoiser as a dode model, for ``dode.distill``, ``dode.sample`` and ``dode.Teacher``.

    Unconditional pipelines (DDPM, DDIM, LDM) take no prompts. Text-conditioned ones (Stable Diffusion) take
    ``prompts`` (a string or list; encoded by ``pipe.encode_prompt``, with ``negative_prompt``) or ready
    ``prompt_embeds`` (and ``negative_prompt_embeds``); with ``guidance_scale`` > 1 the output is the guided one.
    Sample k uses prompt k mod P: use batch sizes and sample counts that are multiples of the P prompts.
    SD3-style pipelines (a ``transformer``: flow matching) go to ``flow_pipeline_model``, which also takes
    ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` (``flow_embeds``); use the flow solvers
    (``dode.core.solvers.FLOW_SOLVERS``) on them.
    """
    if getattr(pipe, "transformer", None) is not None:  # SD3-style: the flow-matching pipelines
        return flow_pipeline_model(pipe, prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                   prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                   **flow_embeds)
    if flow_embeds:
        raise ValueError(f"{', '.join(flow_embeds)}: for SD3-style pipelines only")
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


def _transformer(pipe):
    """The SD3-style transformer of a flow-matching pipeline (``SD3Transformer2DModel``), or ValueError."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or "pooled_projections" not in inspect.signature(transformer.forward).parameters or \
            "txt_ids" in inspect.signature(transformer.forward).parameters:
        raise ValueError(f"{type(pipe).__name__} is not an SD3-style pipeline (a transformer taking "
                         "encoder_hidden_states and pooled_projections); Flux-style pipelines (packed latents, "
                         "txt_ids) are not supported yet")
    return transformer


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


def flow_pipeline_model(pipe, prompts=None, *, guidance_scale: float = 7.0, negative_prompt=None, prompt_embeds=None,
                        pooled_prompt_embeds=None, negative_prompt_embeds=None,
                        negative_pooled_prompt_embeds=None) -> FlowPipelineModel:
    """``pipeline_model`` for an SD3-style (flow-matching) pipeline: ``prompts`` are encoded by ``pipe.encode_prompt``
    (all three text encoders), or ready embeddings are given (``prompt_embeds`` with ``pooled_prompt_embeds``, and the
    negative ones for guidance)."""
    _transformer(pipe)
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] or prompt_embeds=... "
                         "(with pooled_prompt_embeds), not both")
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
        _transformer(pipe)
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
