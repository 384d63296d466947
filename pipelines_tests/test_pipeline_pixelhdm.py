import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pixel_diffusers import PixelFlowMatchScheduler, PixelHDMPipeline
from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

SIZE = 32
PROMPTS = ["a red circle on a blue background", "a small green square"]


def call(pipe, prompt=PROMPTS[0], seed=0, **kwargs):
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 3.0)
    kwargs.setdefault("output_type", "pt")
    if "latents" not in kwargs and "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return pipe(prompt, **kwargs).images


def with_scheduler(pipe, scheduler):
    components = dict(pipe.components, scheduler=scheduler)
    new = PixelHDMPipeline(**components)
    new.set_progress_bar_config(disable=True)
    return new


def test_output_types_and_range(tiny_pipe):
    pt = call(tiny_pipe)
    assert pt.shape == (1, 3, SIZE, SIZE) and pt.dtype == torch.float32
    assert torch.isfinite(pt).all() and pt.min() >= 0 and pt.max() <= 1
    np_images = call(tiny_pipe, output_type="np")
    assert np_images.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = call(tiny_pipe, output_type="pil")
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (SIZE, SIZE)
    raw = call(tiny_pipe, output_type="latent")
    torch.testing.assert_close((raw / 2 + 0.5).clamp(0, 1), pt)
    image, = tiny_pipe(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt", return_dict=False)
    assert image.shape == (1, 3, SIZE, SIZE)


def test_deterministic_and_seed_dependent(tiny_pipe):
    first, again, other = call(tiny_pipe, seed=1), call(tiny_pipe, seed=1), call(tiny_pipe, seed=2)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3


def test_prompt_changes_the_image(tiny_pipe):
    a, b = call(tiny_pipe, PROMPTS[0]), call(tiny_pipe, PROMPTS[1])
    assert (a - b).abs().max() > 1e-4


def test_padding_to_longest_equals_padding_to_511(tiny_pipe):
    tokens = tiny_pipe.tokenizer(PROMPTS, padding="max_length", max_length=511, padding_side="right", return_tensors="pt")
    hidden = tiny_pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    hidden = hidden * tokens.attention_mask[..., None]
    latents = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    longest = call(tiny_pipe, PROMPTS, latents=latents)
    full = call(
        tiny_pipe,
        None,
        latents=latents,
        prompt_embeds=hidden,
        prompt_attention_mask=tokens.attention_mask,
    )
    assert hidden.shape[1] == 511
    torch.testing.assert_close(longest, full, atol=5e-5, rtol=0)  # only the attention reduction order differs


def test_prompt_embeds_match_prompt(tiny_pipe):
    embeds, mask, negative, negative_mask = tiny_pipe.encode_prompt(PROMPTS, negative_prompt="blurry")
    assert negative.shape[0] == 2 and mask.shape == embeds.shape[:2]
    latents = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    from_text = call(tiny_pipe, PROMPTS, negative_prompt="blurry", latents=latents)
    from_embeds = call(
        tiny_pipe,
        None,
        latents=latents,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
    )
    torch.testing.assert_close(from_text, from_embeds, atol=1e-6, rtol=0)


def test_empty_prompt_gives_finite_images_and_zero_pooled(tiny_pipe):
    embeds, mask, _, _ = tiny_pipe.encode_prompt("", do_classifier_free_guidance=False)
    assert mask.sum() == 0 and torch.isfinite(embeds).all()
    assert torch.all(tiny_pipe.pool_prompt_embeds(embeds, mask) == 0)
    assert torch.isfinite(call(tiny_pipe, "")).all()
    assert torch.isfinite(call(tiny_pipe, ["", PROMPTS[0]], negative_prompt=["", ""])).all()


def test_pooled_embedding_is_last_real_token(tiny_pipe):
    embeds, mask, _, _ = tiny_pipe.encode_prompt(["ab", "abcd"], do_classifier_free_guidance=False)
    pooled = tiny_pipe.pool_prompt_embeds(embeds, mask)
    torch.testing.assert_close(pooled[0], embeds[0, 1])
    torch.testing.assert_close(pooled[1], embeds[1, 3])


def test_batch_matches_single_calls_with_generator_list(tiny_pipe):
    generators = [torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)]
    batch = call(tiny_pipe, PROMPTS, num_images_per_prompt=2, generator=generators)
    assert batch.shape == (4, 3, SIZE, SIZE)
    for index, seed in enumerate((10, 11, 12, 13)):
        single = call(tiny_pipe, PROMPTS[index // 2], generator=[torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(batch[index : index + 1], single, atol=1e-4, rtol=0)  # padding differs


def test_user_latents_are_used(tiny_pipe):
    latents = torch.randn(1, 3, SIZE, SIZE)
    torch.testing.assert_close(call(tiny_pipe, latents=latents), call(tiny_pipe, latents=latents.clone()))


def test_diffusers_flow_match_euler_gives_the_same_images(tiny_pipe):
    sigmas = [0.95, 0.8, 0.6, 0.4, 0.2, 0.05]
    ours = with_scheduler(tiny_pipe, PixelFlowMatchScheduler(solver="euler"))
    theirs = with_scheduler(tiny_pipe, FlowMatchEulerDiscreteScheduler())
    a = call(ours, sigmas=sigmas, output_type="latent")
    b = call(theirs, sigmas=sigmas, output_type="latent")
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "scheduler",
    [
        UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0),
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0),
    ],
    ids=["unipc", "dpmsolver"],
)
def test_diffusers_flow_solvers_run(tiny_pipe, scheduler):
    images = call(with_scheduler(tiny_pipe, scheduler), num_inference_steps=4)
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpmpp_2s"])
def test_every_solver_runs(tiny_pipe, solver):
    images = call(with_scheduler(tiny_pipe, PixelFlowMatchScheduler(solver=solver)))
    assert torch.isfinite(images).all()


def test_dynamic_shifting_uses_image_size(tiny_pipe):
    pipe = with_scheduler(tiny_pipe, PixelFlowMatchScheduler(solver="euler", use_dynamic_shifting=True))
    call(pipe, num_inference_steps=4)
    shifted = pipe.scheduler.sigmas.clone()
    call(pipe, num_inference_steps=4, height=64, width=64)
    assert not torch.allclose(shifted, pipe.scheduler.sigmas)


def test_guidance_interval_and_rescale(tiny_pipe):
    latents = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    unguided = call(tiny_pipe, latents=latents, guidance_scale=1.0)
    guided = call(tiny_pipe, latents=latents, guidance_scale=5.0)
    assert (unguided - guided).abs().max() > 1e-4
    outside = call(tiny_pipe, latents=latents, guidance_scale=5.0, guidance_interval=(0.0, 0.01))
    torch.testing.assert_close(outside, unguided, atol=1e-6, rtol=0)
    everywhere = call(tiny_pipe, latents=latents, guidance_scale=5.0, guidance_interval=(0.0, 1.0))
    torch.testing.assert_close(everywhere, guided, atol=1e-6, rtol=0)
    rescaled = call(tiny_pipe, latents=latents, guidance_scale=5.0, guidance_rescale=0.7)
    assert (rescaled - guided).abs().max() > 1e-5


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipe):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tensors["latents"].shape, tensors["prompt_embeds"].shape[0]))
        return {"latents": torch.zeros_like(tensors["latents"])}

    images = call(
        tiny_pipe,
        guidance_scale=1.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        output_type="latent",
    )
    assert [s[0] for s in seen] == list(range(tiny_pipe.num_timesteps))
    assert seen[0][1] == (1, 3, SIZE, SIZE) and seen[0][2] == 1
    assert torch.all(images == 0)


def test_bfloat16_pipeline_runs(tiny_pipe):
    pipe = make_tiny_pixelhdm_pipeline(seed=0).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    images = call(pipe)
    reference = call(tiny_pipe)
    assert torch.isfinite(images).all()
    assert (images - reference).abs().mean() < 0.05


def test_model_cpu_offload(tiny_pipe):
    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(call(pipe), call(tiny_pipe), atol=1e-6, rtol=0)


def test_save_and_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    expected = call(tiny_pipe)
    for loader in (PixelHDMPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is PixelHDMPipeline
        assert type(loaded.scheduler) is PixelFlowMatchScheduler
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(call(loaded), expected, atol=0, rtol=0)


def test_lora_round_trip(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    base = call(pipe)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted = call(pipe)
    assert (adapted - base).abs().max() > 1e-4
    PixelHDMPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))

    fresh = make_tiny_pixelhdm_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(call(fresh), adapted, atol=1e-5, rtol=0)
    fresh.set_adapters(fresh.get_active_adapters(), 0.0)
    torch.testing.assert_close(call(fresh), base, atol=1e-5, rtol=0)


BAD_CALLS = [
    ("prompt", dict(prompt=None)),
    ("prompt", dict(prompt=3)),
    ("prompt_embeds", dict(prompt_embeds=torch.zeros(1, 4, 256))),
    ("negative_prompt", dict(negative_prompt=["a", "b"])),
    ("height", dict(height=30)),
    ("width", dict(width=-16)),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("guidance_scale", dict(guidance_scale=-1.0)),
    ("guidance_rescale", dict(guidance_rescale=1.5)),
    ("guidance_interval", dict(guidance_interval=(0.8, 0.2))),
    ("num_images_per_prompt", dict(num_images_per_prompt=0)),
    ("output_type", dict(output_type="jpeg")),
    ("callback_on_step_end_tensor_inputs", dict(callback_on_step_end_tensor_inputs=["noise"])),
    ("max_sequence_length", dict(max_sequence_length=512)),
    ("latents", dict(latents=torch.zeros(1, 3, 16, 16))),
    ("generator", dict(generator=[torch.Generator(), torch.Generator()])),
]


@pytest.mark.parametrize("argument, kwargs", BAD_CALLS, ids=[b[0] + str(i) for i, b in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_value_error_naming_them(tiny_pipe, argument, kwargs):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPTS[0])
    if "prompt_embeds" in kwargs:
        prompt = PROMPTS[0]
    with pytest.raises(ValueError, match=f"`{argument}`"):
        tiny_pipe(prompt, height=kwargs.pop("height", SIZE), width=kwargs.pop("width", SIZE), **kwargs)
