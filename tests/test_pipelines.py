"""D-ODE in diffusers pipelines, checked against the pipelines themselves (tiny random networks, no download)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

import dode
from dode.core.distill import VALIDATION_SEED
from dode.models.pipelines import load_pipeline, pipeline_model, use_dode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see the repository's conftest.py
NFE = 4
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                   skip_prk_steps=True, set_alpha_to_one=False)


def unconditional(pipeline_class, unet):
    """A pipeline around the tiny UNet on a v-prediction DDPM schedule (with clipping, which dode's solvers drop)."""
    pipe = pipeline_class(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction", beta_end=0.015))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zero_dode(model, solver, nfe=NFE):
    return dode.DODEScheduler(dode.make_scheduler(solver, model), [0.0] * nfe, dode.get_solver(solver).steps_for(nfe))


def images(pipe, model, scheduler, num, seed):
    """The pipeline's images (output_type="pt", in [0, 1]) with ``scheduler``, from the noise of dode's seeds."""
    if isinstance(scheduler, dode.DODEScheduler):
        use_dode(pipe, scheduler)
        steps = scheduler.num_inference_steps
    else:
        pipe.scheduler = scheduler
        steps = dode.core.solvers.solver_of(scheduler).steps_for(NFE)
    return pipe(**model.pipeline_inputs(num, seed), num_inference_steps=steps, output_type="pt").images


@pytest.mark.parametrize("pipeline_class, solver", [(DDPMPipeline, "ddim"), (DDPMPipeline, "dpm_solver_pp_2m"),
                                                    (DDIMPipeline, "ddim")])
def test_zero_lambdas_give_the_base_pipeline_images_and_dode_sample_the_same(unet, pipeline_class, solver):
    pipe = unconditional(pipeline_class, unet)
    model = pipeline_model(pipe)
    assert model.scheduler_config["prediction_type"] == "v_prediction" and model.sample_shape == (1, 8, 8)
    base = images(pipe, model, dode.make_scheduler(solver, model), 6, seed=3)
    wrapped = images(pipe, model, zero_dode(model, solver), 6, seed=3)
    assert isinstance(pipe.scheduler, dode.DODEScheduler)
    assert torch.equal(base, wrapped)
    sampled = dode.sample(model, solver, NFE, 6, seed=3, progress=False)
    torch.testing.assert_close(base, (sampled / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pipeline_class", [DDPMPipeline, DDIMPipeline])
def test_fitted_lambdas_in_the_pipeline_give_dode_sample(unet, pipeline_class, tmp_path):
    pipe = unconditional(pipeline_class, unet)
    model = pipeline_model(pipe)
    # guarded on a few validation seeds (a fine run per model: keep it small)
    validation = dode.Teacher(model, batch_size=8, seed=VALIDATION_SEED, substeps="fine")
    fitted = dode.distill(model, "ddim", NFE, batch_size=8, validation=validation)
    assert fitted.fit_info["validation"]["guarded"] <= fitted.fit_info["validation"]["base"]
    expected = (dode.sample(model, fitted, NFE, 6, seed=11, progress=False) / 2 + 0.5).clamp(0, 1)
    got = images(pipe, model, fitted, 6, seed=11)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - images(pipe, model, zero_dode(model, "ddim"), 6, seed=11)).abs().max() > 1e-3  # lambdas matter
    # or from the folder it was saved to
    fitted.save_pretrained(tmp_path)
    use_dode(pipe, tmp_path)
    again = pipe(**model.pipeline_inputs(6, 11), num_inference_steps=fitted.num_inference_steps, output_type="pt")
    torch.testing.assert_close(again.images, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(batch_size=1, num_inference_steps=50)


def test_a_pipeline_saves_and_reloads_its_dode_scheduler(unet, tmp_path):
    pipe = unconditional(DDPMPipeline, unet)
    model = pipeline_model(pipe)
    fitted = dode.distill(model, "unipc", NFE, batch_size=8, refine="joint+timesteps", refine_iterations=2,
                          guard=False)
    use_dode(pipe, fitted)
    expected = pipe(**model.pipeline_inputs(3, 5), num_inference_steps=fitted.num_inference_steps, output_type="pt")
    pipe.save_pretrained(tmp_path)
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, dode.DODEScheduler)
    assert reloaded.scheduler.lambdas == fitted.lambdas and reloaded.scheduler.grid == fitted.grid
    got = reloaded(**model.pipeline_inputs(3, 5), num_inference_steps=fitted.num_inference_steps, output_type="pt")
    torch.testing.assert_close(got.images, expected.images, rtol=0, atol=0)


@pytest.mark.parametrize("solver, nfe", [("heun", 5), ("deis", 4)])
def test_latent_diffusion_pipeline_decodes_dode_samples(solver, nfe):
    """LDMPipeline scales its noise by init_noise_sigma before set_timesteps and decodes with a VQ autoencoder."""
    from diffusers import LDMPipeline, VQModel

    torch.manual_seed(2)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
                    num_vq_embeddings=16, sample_size=8).eval()
    latent_unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                              block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = LDMPipeline(vqvae=vqvae, unet=latent_unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    model = pipeline_model(pipe)
    fitted = dode.distill(model, solver, nfe, batch_size=8, guard=False)
    expected = (model.decode(dode.sample(model, fitted, nfe, 4, seed=8, progress=False)) / 2 + 0.5).clamp(0, 1)
    use_dode(pipe, fitted)
    got = pipe(**model.pipeline_inputs(4, seed=8), num_inference_steps=fitted.num_inference_steps, output_type="np")
    torch.testing.assert_close(torch.from_numpy(got.images).permute(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def test_use_dode_refuses_a_mismatched_schedule_and_sigma_space_in_ddpm_pipelines(unet):
    pipe = unconditional(DDPMPipeline, unet)
    eps_model = dode.models.registry.DiffusersModel(unet, DDPMScheduler(beta_end=0.015).config, "epsilon")
    with pytest.raises(ValueError, match="fitted for the noise schedule"):
        use_dode(pipe, zero_dode(eps_model, "ddim"))
    with pytest.raises(ValueError, match="scale_model_input"):
        use_dode(pipe, zero_dode(pipeline_model(pipe), "heun", 5))
    assert isinstance(pipe.scheduler, DDPMScheduler)  # untouched


def test_pipeline_model_errors(unet):
    pipe = unconditional(DDPMPipeline, unet)
    with pytest.raises(ValueError, match="no `unet`"):
        pipeline_model(SimpleNamespace(unet=None))
    with pytest.raises(ValueError, match="unconditional"):
        pipeline_model(pipe, ["a cat"])


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion: a tiny text encoder, tokenizer, UNet and VAE, all random
# ---------------------------------------------------------------------------------------------------------------
def tiny_stable_diffusion():
    """A StableDiffusionPipeline of tiny random networks: tokenizer (letters only), CLIP text encoder, UNet, VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(1)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_stable_diffusion()


def encode(pipe, texts):
    """The text encoder's last hidden states of padded token ids, computed here without the pipeline."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


PROMPTS = ["a cat", "dog"]


def test_guided_output_is_the_manual_classifier_free_guidance(sd_pipe):
    model = pipeline_model(sd_pipe, PROMPTS, guidance_scale=3.0, negative_prompt=["blur", "dark"])
    cond, uncond = encode(sd_pipe, PROMPTS), encode(sd_pipe, ["blur", "dark"])
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(637)
    with torch.no_grad():
        got = model(x, t)
        for k in range(4):  # row k gets prompt k mod 2; one UNet call per row and prompt
            out_cond = sd_pipe.unet(x[k:k + 1], t, encoder_hidden_states=cond[k % 2:k % 2 + 1]).sample
            out_uncond = sd_pipe.unet(x[k:k + 1], t, encoder_hidden_states=uncond[k % 2:k % 2 + 1]).sample
            torch.testing.assert_close(got[k:k + 1], out_uncond + 3.0 * (out_cond - out_uncond), rtol=1e-4, atol=1e-5)
        unguided = pipeline_model(sd_pipe, prompt_embeds=cond, guidance_scale=1.0)(x, t)
        torch.testing.assert_close(unguided[1:2], sd_pipe.unet(x[1:2], t, encoder_hidden_states=cond[1:2]).sample,
                                   rtol=1e-4, atol=1e-5)
    assert (got - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[:3], t)


@pytest.mark.parametrize("solver, nfe", [("dpm_solver_pp_2m", 4), ("heun", 5)])
def test_distilled_stable_diffusion_pipeline_gives_dode_sample(sd_pipe, solver, nfe):
    """Distil on the guided wrapper, install into the pipeline: its latents and images are dode.sample's."""
    model = pipeline_model(sd_pipe, PROMPTS, guidance_scale=3.0)
    fitted = dode.distill(model, solver, nfe, batch_size=4, guard=False)
    assert len(fitted.lambdas) == nfe and any(v != 0 for v in fitted.lambdas)
    latents = dode.sample(model, fitted, nfe, 4, seed=20, progress=False)
    use_dode(sd_pipe, fitted)
    steps = fitted.num_inference_steps
    got = sd_pipe(**model.pipeline_inputs(4, seed=20), num_inference_steps=steps, output_type="latent").images
    torch.testing.assert_close(got, latents, rtol=1e-4, atol=1e-4)
    decoded = sd_pipe(**model.pipeline_inputs(4, seed=20), num_inference_steps=steps, output_type="pt").images
    torch.testing.assert_close(decoded, (model.decode(latents) / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    # by prompt: the pipeline encodes the same prompts itself
    by_prompt = sd_pipe(PROMPTS * 2, generator=dode.models.pipelines.seed_generators(4, 20), guidance_scale=3.0,
                        num_inference_steps=steps, output_type="latent").images
    torch.testing.assert_close(by_prompt, latents, rtol=1e-4, atol=1e-4)
    sd_pipe.scheduler = PNDMScheduler(**SD_SCHEDULE)


def test_conditional_pipeline_errors(sd_pipe):
    with pytest.raises(ValueError, match="text-conditioned"):
        pipeline_model(sd_pipe)
    with pytest.raises(ValueError, match="not both"):
        pipeline_model(sd_pipe, PROMPTS, prompt_embeds=encode(sd_pipe, PROMPTS))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        dode.models.pipelines.PipelineModel(sd_pipe, encode(sd_pipe, PROMPTS), None, guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def test_load_pipeline_from_a_folder(unet, tmp_path):
    pipe = unconditional(DDIMPipeline, unet)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert type(loaded) is DDIMPipeline
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, 100).sample, unet(x, 100).sample)
    with pytest.raises(dode.ModelNotFoundError, match="not a loadable diffusers pipeline"):
        load_pipeline(tmp_path / "unet")  # a bare UNet folder is not a pipeline


def test_load_pipeline_offline_fails_fast_with_local_folder_hint(monkeypatch):
    monkeypatch.setattr(dode.util.hub, "_hub_reachable", lambda timeout=3.0: False)
    began = time.perf_counter()
    with pytest.raises(dode.ModelNotFoundError) as info:
        load_pipeline("dode-tests/no-such-pipeline")
    assert time.perf_counter() - began < 10
    message = str(info.value)
    assert "unreachable" in message and "dode.load_pipeline('./my-model')" in message
    assert "dode-tests/no-such-pipeline" in message
    assert not dode.models.registry.is_available("dode-tests/no-such-pipeline")
