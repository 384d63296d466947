"""PixelSDXLPipeline: upstream's sampler reproduced, diffusers' flow scheduler swaps in, SDXL conditioning, errors."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pixel_diffusers.pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline
from pixel_diffusers.testing import make_tiny_pixel_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = make_tiny_pixel_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a red circle", **kwargs):
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 4, "output_type": "latent", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def upstream_sample(pipe, prompt, negative, steps, cfg, shift, size=32):
    """Upstream's inference loop: sigma grid linspace(1, 0, N + 1) with the static flow shift, two separate model
    calls per step, guidance on the x0 estimates, then the x0 -> noise re-noising step with t' = max(t, 0.05)."""
    device = torch.device("cpu")
    cond, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device)
    uncond, _, pooled_uncond, _ = pipe.encode_prompt(negative, do_classifier_free_guidance=False, device=device)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    grid = shift * grid / (1 + (shift - 1) * grid)
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        timestep = torch.tensor([t * 1000.0], dtype=torch.float32)  # the model embeds t * 999
        with torch.no_grad():
            x0_c = pipe.unet(x, timestep, cond, {"text_embeds": pooled, "time_ids": time_ids}).sample
            x0_u = pipe.unet(x, timestep, uncond, {"text_embeds": pooled_uncond, "time_ids": time_ids}).sample
        x0 = x0_u + cfg * (x0_c - x0_u)
        t_clamped = max(t, 0.05)
        eps = (x - (1 - t_clamped) * x0) / t_clamped
        x = (1 - s) * x0 + s * eps
    return x


def test_reproduces_upstream_sampler(pipe):
    ours = run(pipe, "a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.0)
    reference = upstream_sample(pipe, "a red circle", "blurry", steps=5, cfg=7.0, shift=3.0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_diffusers_flow_euler_gives_the_same_images(pipe):
    ours = run(pipe, guidance_scale=5.0)
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        theirs = run(pipe, guidance_scale=5.0)
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_output_types_and_determinism(pipe):
    images = run(pipe, ["a red circle", "a blue square"], output_type="np", num_images_per_prompt=2)
    assert images.shape == (4, 32, 32, 3) and 0.0 <= images.min() and images.max() <= 1.0
    again = run(pipe, ["a red circle", "a blue square"], output_type="np", num_images_per_prompt=2)
    np.testing.assert_array_equal(images, again)
    pil = run(pipe, output_type="pil")
    assert pil[0].size == (32, 32)
    assert not np.allclose(images[0], images[2])  # different prompts give different images


def test_prompt_embeds_match_prompts(pipe):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red circle", negative_prompt="blurry")
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    direct = run(pipe, "a red circle", negative_prompt="blurry")
    from_embeds = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        height=32,
        width=32,
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    torch.testing.assert_close(from_embeds, direct)


def test_text_encoding_follows_sdxl(pipe):
    """Context = [CLIP-L penultimate, bigG penultimate]; pooled = bigG's projected end-of-text state; pad id 0."""
    ids_2 = pipe.tokenizer_2(["a red"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids_2[0, -1].item() == 0 and ids_2[0].argmax().item() == 5  # <start> a</w> r e d</w> <end>: the EOS is the max id
    embeds, _, pooled, _ = pipe.encode_prompt("a red", do_classifier_free_guidance=False)
    with torch.no_grad():
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        ids_1 = pipe.tokenizer(["a red"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden_1 = pipe.text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(embeds, torch.cat([hidden_1, out_2.hidden_states[-2]], -1))
    expected = pipe.text_encoder_2.text_projection(out_2.last_hidden_state[0, 5])
    torch.testing.assert_close(pooled[0], expected)


def test_size_conditioning(pipe):
    assert PixelSDXLPipeline.get_time_ids((512, 768), (8, 16), (256, 384), 2, "cpu").tolist() == [[512, 768, 8, 16, 256, 384]] * 2
    default = run(pipe)
    explicit = run(pipe, original_size=(32, 32), target_size=(32, 32), crops_coords_top_left=(0, 0))
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(run(pipe, original_size=(1024, 512)), default)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = PixelSDXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer_2.pad_token_id == 0
    torch.testing.assert_close(run(loaded), run(pipe))


def test_callback_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = run(pipe, callback_on_step_end=callback)
    assert seen == [0, 1, 2, 3]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 40}, "`height` must be a positive multiple of the patch size 16"),
        ({"width": 24}, "`width`"),
        ({"output_type": "jpg"}, "output_type"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
        ({"original_size": (32,)}, "original_size"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_raise(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


def test_prompt_embeds_need_pooled(pipe):
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 77, 64), height=32, width=32)
    with pytest.raises(ValueError, match="`prompt` or `prompt_embeds`"):
        pipe(height=32, width=32)


def test_lora_round_trip(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = make_tiny_pixel_sdxl_pipeline(seed=0)
    trained.set_progress_bar_config(disable=True)
    base = run(trained)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in trained.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    adapted = run(trained)
    assert not torch.allclose(adapted, base)
    PixelSDXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet))
    fresh = make_tiny_pixel_sdxl_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(run(fresh), adapted)
    torch.testing.assert_close(run(fresh, cross_attention_kwargs={"scale": 0.0}), base)
