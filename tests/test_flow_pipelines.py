"""D-ODE in SD3- and Flux-style (flow-matching) pipelines, built offline from tiny random components configured here:
the pipeline's transformer as a dode flow model with its guidance (``dode.pipeline_model``), and a D-ODE scheduler
installed with ``dode.use_dode``. With zero lambdas the pipeline's latents are bit for bit its own base scheduler's;
with fitted lambdas they are ``dode.sample``'s."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, UniPCMultistepScheduler)

import dode
from dode.core.scheduler import DODEScheduler, make_scheduler
from dode.core.timegrid import TimeGrid
from dode.models.pipelines import FlowPipelineModel, FluxPipelineModel


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.06, scaling_factor=1.5)


def tiny_sd3(shift: float = 3.0) -> StableDiffusion3Pipeline:
    """SD3's pipeline with a one-layer random transformer (8x8x4 latents) and a two-block random VAE, no text
    encoders (prompts come as embeddings): seconds on a CPU, nothing downloaded."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_sd3()
    gen = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(2, 5, 16, generator=gen),
              "pooled_prompt_embeds": torch.randn(2, 8, generator=gen),
              "negative_prompt_embeds": torch.randn(2, 5, 16, generator=gen),
              "negative_pooled_prompt_embeds": torch.randn(2, 8, generator=gen)}
    return pipe, dode.pipeline_model(pipe, guidance_scale=4.0, **embeds)


def latents(pipe, model, steps: int, seed: int = 3, num: int = 4) -> torch.Tensor:
    return pipe(**model.pipeline_inputs(num, seed=seed), num_inference_steps=steps, output_type="latent").images


def test_the_flow_model_is_the_pipelines_guided_velocity(sd3):
    pipe, model = sd3
    assert isinstance(model, FlowPipelineModel) and model.sample_shape == (4, 8, 8)
    assert model.scheduler_config == {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "shift": 3.0}
    # the guided output, computed here from two separate transformer calls
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor(700.0)

    def call(embeds, pooled):
        return pipe.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,
                                pooled_projections=pooled).sample

    with torch.no_grad():
        cond = call(model.prompt_embeds, model.pooled_prompt_embeds)
        uncond = call(model.negative_prompt_embeds, model.negative_pooled_prompt_embeds)
        torch.testing.assert_close(model(x, t), uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_zero_lambdas_in_the_pipeline_are_its_base_bit_for_bit(sd3):
    pipe, model = sd3
    base = latents(pipe, model, 4)
    assert torch.equal(dode.sample(model, "flow_euler", 4, 4, seed=3, spacing="shift3", progress=False), base)
    zero = DODEScheduler(make_scheduler("flow_euler", model, "shift3"), [0.0] * 4, 4)
    images = pipe(**model.pipeline_inputs(4, seed=3), num_inference_steps=4, output_type="pt").images
    original = pipe.scheduler
    try:
        dode.use_dode(pipe, zero)
        assert torch.equal(latents(pipe, model, 4), base)
        assert torch.equal(pipe(**model.pipeline_inputs(4, seed=3), num_inference_steps=4, output_type="pt").images,
                           images)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("solver", ["flow_euler", "flow_unipc"])
def test_fitted_lambdas_in_the_pipeline_are_dode_sample(sd3, solver):
    pipe, model = sd3
    scheduler = dode.distill(model, solver, 4, batch_size=4, guard=False, progress=False)
    assert any(v != 0 for v in scheduler.lambdas)
    original = pipe.scheduler
    try:
        dode.use_dode(pipe, scheduler)
        ours = dode.sample(model, scheduler, 4, 4, seed=3, progress=False)
        torch.testing.assert_close(latents(pipe, model, scheduler.num_inference_steps), ours, rtol=1e-4, atol=1e-4)
        images = pipe(**model.pipeline_inputs(4, seed=3), num_inference_steps=scheduler.num_inference_steps,
                      output_type="pt").images
        torch.testing.assert_close(images * 2 - 1, model.decode(ours).clamp(-1, 1), rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original
    assert isinstance(pipe.scheduler, (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler))


def test_flow_pipelines_refuse_diffusion_solvers_and_missing_embeddings(sd3):
    pipe, model = sd3
    with pytest.raises(ValueError, match="flow-matching model; its solvers: flow_euler"):
        dode.distill(model, "dpm_solver_pp_2m", 4, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="with pooled_prompt_embeds"):
        dode.pipeline_model(pipe, prompt_embeds=model.prompt_embeds, guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds and negative_pooled_prompt_embeds"):
        dode.pipeline_model(pipe, prompt_embeds=model.prompt_embeds, pooled_prompt_embeds=model.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="batch of 3 samples does not line up with 2 prompts"):
        model(torch.zeros(3, 4, 8, 8), torch.tensor(500.0))


# ----------------------------------------------------------------------------------------------------------
# Flux-style: packed latents, embedded guidance, dynamic shifting
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)  # Flux's own scheduler
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    model = dode.pipeline_model(pipe, prompt_embeds=torch.randn(2, 5, 16, generator=gen),
                                pooled_prompt_embeds=torch.randn(2, 8, generator=gen), guidance_scale=3.5,
                                height=16, width=16)
    return pipe, model


def test_the_flux_model_unpacks_the_pipelines_latents_and_its_shift_is_e_to_the_mu(flux):
    pipe, model = flux
    assert isinstance(model, FluxPipelineModel) and model.sample_shape == (4, 8, 8)
    # 16 packed tokens: mu = 0.5 + (16 - 256) (1.15 - 0.5) / (4096 - 256), Flux's calculate_shift
    mu = 0.5 + (16 - 256) * 0.65 / 3840
    assert model.mu == pytest.approx(mu) and model.scheduler_config["shift"] == pytest.approx(math.exp(mu))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.unpack(model.pack(x)), x)
    # the pipeline's levels: linspace(1, 1/n, n) through the dynamic shift, which is the static shift map at e^mu
    s = torch.linspace(1.0, 0.25, 4).double()
    torch.testing.assert_close(torch.tensor(model.pipeline_grid(4)).double(),
                               math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s), rtol=1e-6, atol=1e-7)


def test_flux_pipeline_with_zero_and_fitted_lambdas(flux):
    pipe, model = flux
    grid = model.pipeline_grid(4)
    base = latents(pipe, model, 4)
    assert torch.equal(model.pack(dode.sample(model, "flow_euler", 4, 4, seed=3, spacing=grid, progress=False)), base)
    original = pipe.scheduler
    try:
        dode.use_dode(pipe, DODEScheduler(original, [0.0] * 4, 4))  # the pipeline's own scheduler, every lambda 0
        assert torch.equal(latents(pipe, model, 4), base)
        fitted = dode.distill(model, "flow_euler", 4, spacing=grid, batch_size=4, guard=False, progress=False)
        assert any(v != 0 for v in fitted.lambdas)
        dode.use_dode(pipe, fitted)  # the pipeline passes its unshifted sigmas and mu: the fitted grid, accepted
        ours = dode.sample(model, fitted, 4, 4, seed=3, progress=False)
        torch.testing.assert_close(latents(pipe, model, 4), model.pack(ours), rtol=1e-4, atol=1e-4)
        images = pipe(**model.pipeline_inputs(4, seed=3), num_inference_steps=4, output_type="pt").images
        torch.testing.assert_close(images * 2 - 1, model.decode(ours).clamp(-1, 1), rtol=1e-4, atol=1e-4)
        # at another image size the pipeline's mu (and grid) is another one: a clear error, not other samples
        with pytest.raises(ValueError, match="fitted at shift 1.58.*dynamic shift e\\^mu"):
            pipe(**{**model.pipeline_inputs(4, seed=3), "height": 32, "width": 32}, num_inference_steps=4,
                 output_type="latent")
    finally:
        pipe.scheduler = original


def test_flux_pipeline_grid_is_the_trailing_spacing_and_a_fit_on_it_drives_the_pipeline(flux):
    """On a Flux model (shift e^mu), FlowMatch Euler's named "trailing" spacing is the pipeline's grid (to float32 rounding), so
    ``spacing="trailing"`` (and ``auto``, which tries it) fits on what the pipeline samples."""
    pipe, model = flux
    for steps in (3, 4, 6):
        scheduler = dode.make_scheduler("flow_euler", model, "trailing")
        scheduler.set_timesteps(steps)
        # the static shift e^mu against the pipeline's dynamic (exponential) one: equal up to float32 rounding
        np.testing.assert_allclose(TimeGrid.of(scheduler).steps, model.pipeline_grid(steps), rtol=3e-7)
    original = pipe.scheduler
    try:
        fitted = dode.distill(model, "flow_euler", 4, spacing="trailing", batch_size=4, guard=False, progress=False)
        assert fitted.spacing == "trailing" and any(v != 0 for v in fitted.lambdas)
        dode.use_dode(pipe, fitted)
        ours = dode.sample(model, fitted, 4, 4, seed=3, progress=False)
        torch.testing.assert_close(latents(pipe, model, 4), model.pack(ours), rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("solver", ["flow_dpm_solver_pp_2m", "flow_unipc"])
def test_flux_pipeline_with_multistep_flow_solvers_fitted_on_its_grid(flux, solver):
    """DPM-Solver++ and UniPC on flow sigmas in a Flux pipeline: fitted on the pipeline's levels (their own
    "trailing" grid starts at 0.999, not 1), the pipeline's sigmas and mu are accepted and its latents are
    ``dode.sample``'s to 1e-4."""
    pipe, model = flux
    grid = model.pipeline_grid(4)
    original = pipe.scheduler
    try:
        fitted = dode.distill(model, solver, 4, spacing=grid, batch_size=4, guard=False, progress=False)
        assert any(v != 0 for v in fitted.lambdas)
        dode.use_dode(pipe, fitted)
        ours = dode.sample(model, fitted, 4, 4, seed=3, progress=False)
        torch.testing.assert_close(latents(pipe, model, 4), model.pack(ours), rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original


def test_flux_true_guidance_is_the_negative_plus_the_scaled_difference(flux):
    """Flux's true classifier-free guidance (negative embeddings, ``true_cfg_scale`` > 1): the model is two transformer
    calls combined as the pipeline combines them, and the pipeline with it samples what ``dode.sample`` does."""
    pipe, plain = flux
    gen = torch.Generator().manual_seed(9)
    negative = {"negative_prompt_embeds": torch.randn(2, 5, 16, generator=gen),
                "negative_pooled_prompt_embeds": torch.randn(2, 8, generator=gen)}
    embeds = {"prompt_embeds": plain.prompt_embeds, "pooled_prompt_embeds": plain.pooled_prompt_embeds}
    model = dode.pipeline_model(pipe, **embeds, guidance_scale=3.5, height=16, width=16, true_cfg_scale=2.5,
                                **negative)
    negative_model = dode.pipeline_model(pipe, prompt_embeds=negative["negative_prompt_embeds"],
                                         pooled_prompt_embeds=negative["negative_pooled_prompt_embeds"],
                                         guidance_scale=3.5, height=16, width=16)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor(600.0)
    with torch.no_grad():
        cond, uncond = plain(x, t), negative_model(x, t)
        torch.testing.assert_close(model(x, t), uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    ours = dode.sample(model, "flow_euler", 4, 4, seed=3, spacing=model.pipeline_grid(4), progress=False)
    torch.testing.assert_close(latents(pipe, model, 4), model.pack(ours), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="true_cfg_scale > 1 needs negative_prompt_embeds"):
        dode.pipeline_model(pipe, **embeds, true_cfg_scale=2.0)


# -- prompts encoded by the pipelines' own (tiny, random) text encoders: the path a user with prompt strings takes --

def tiny_clip(folder, with_projection: bool, seed: int):
    """A two-layer random CLIP text encoder (hidden size 8, projection 4) and a character-level CLIP tokenizer,
    written and built here (nothing downloaded)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=4, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    return encoder, tokenizer


def tiny_t5(d_model: int = 16):
    """A one-layer random T5 encoder and a word-level tokenizer (``tokenizers``), built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "red", "car", "blurry"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    torch.manual_seed(7)
    config = T5Config(vocab_size=len(words), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval(), tokenizer


PROMPTS, NEGATIVE = ["a photo of a cat", "a red car"], ["blurry", "blurry"]


def test_sd3_prompts_encoded_by_its_text_encoders_give_the_pipelines_latents(tmp_path):
    """``dode.pipeline_model(pipe, prompts, negative_prompt=...)`` on an SD3 pipeline with two CLIP text encoders
    (no T5: SD3 then pads with zeros): with zero lambdas, ``dode.sample`` is the pipeline called with the prompt
    strings, to float rounding (the pipeline encodes four rows, dode the two prompts once)."""
    pipe = tiny_sd3()
    (pipe.text_encoder, pipe.tokenizer) = tiny_clip(tmp_path / "clip1", True, 1)
    (pipe.text_encoder_2, pipe.tokenizer_2) = tiny_clip(tmp_path / "clip2", True, 2)
    pipe.tokenizer_max_length = 77
    model = dode.pipeline_model(pipe, PROMPTS, negative_prompt=NEGATIVE, guidance_scale=4.0)
    assert isinstance(model, FlowPipelineModel) and model.prompt_embeds.shape[0] == 2
    ours = dode.sample(model, "flow_euler", 4, 4, seed=3, progress=False)
    inputs = {k: v for k, v in model.pipeline_inputs(4, seed=3).items() if "prompt_embeds" not in k}
    theirs = pipe(prompt=PROMPTS * 2, negative_prompt=NEGATIVE * 2, num_inference_steps=4, output_type="latent",
                  **inputs).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_flux_prompts_encoded_by_its_text_encoders_give_the_pipelines_latents(tmp_path, flux):
    """The same for Flux (a CLIP and a T5 text encoder), with the fixture's transformer and guidance."""
    pipe, embedded = flux
    prompted = FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, transformer=pipe.transformer,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    prompted.set_progress_bar_config(disable=True)
    prompted.text_encoder, prompted.tokenizer = tiny_clip(tmp_path / "clip", False, 3)
    prompted.text_encoder_2, prompted.tokenizer_2 = tiny_t5()
    prompted.tokenizer_max_length = 77
    model = dode.pipeline_model(prompted, PROMPTS, guidance_scale=3.5, height=16, width=16)
    assert isinstance(model, FluxPipelineModel)
    ours = dode.sample(model, "flow_euler", 4, 4, seed=3, spacing=model.pipeline_grid(4), progress=False)
    inputs = {k: v for k, v in model.pipeline_inputs(4, seed=3).items() if "prompt_embeds" not in k}
    theirs = prompted(prompt=PROMPTS * 2, num_inference_steps=4, output_type="latent", **inputs).images
    torch.testing.assert_close(theirs, model.pack(ours), rtol=1e-5, atol=1e-5)
