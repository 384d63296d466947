"""PixelDLMPipeline: the DDIM sampler in closed form, diffusers' Euler scheduler, guidance, decoding, outputs."""

import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel
from pixel_diffusers.pipelines.pixeldlm.pipeline_pixeldlm import PixelDLMPipeline, PixelDLMPipelineOutput
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from pixel_diffusers.testing import make_tiny_tokenizer

TINY = dict(architecture="pixeldlm", sample_size=8, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**TINY)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    pipe = PixelDLMPipeline(model.eval(), PixelFlowMatchScheduler(prediction_type="flow_prediction"), make_tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampler_is_ddim_of_the_training_process(pipe):
    """x_t = (1 - t/1000) x0 + (t/1000) eps: deterministic DDIM from t = 999 over N evenly spaced steps."""
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe("hi", num_inference_steps=4, latents=latents, output_type="pt")
    condition, _ = pipe.codec.encode_text(pipe.tokenizer, "hi")
    x, ts = latents, [999 * (1 - k / 4) for k in range(4)] + [0.0]
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x0 = pipe.transformer(x, torch.tensor([t]), condition=condition).sample
            alpha, alpha_next = 1 - t / 1000, 1 - t_next / 1000
            eps = (x - alpha * x0) / (1 - alpha)
            x = alpha_next * x0 + (1 - alpha_next) * eps
    torch.testing.assert_close(out.images, x.clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert out.token_ids == pipe.codec.decode(x.clamp(0, 1))
    assert out.texts == [pipe.tokenizer.decode(ids) for ids in out.token_ids]


def test_diffusers_euler_scheduler_gives_the_same_answers(pipe):
    theirs = PixelDLMPipeline(pipe.transformer, FlowMatchEulerDiscreteScheduler(shift=1.0), pipe.tokenizer)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a", "bc"], num_inference_steps=3, output_type="pt")
    a = pipe(generator=torch.Generator().manual_seed(2), **kwargs)
    b = theirs(generator=torch.Generator().manual_seed(2), **kwargs)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)


def test_guidance(pipe):
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda prompt, **kw: pipe(prompt, num_inference_steps=3, latents=latents, output_type="pt", **kw).images
    unconditional, conditional = run(None), run("hi")
    assert (unconditional - conditional).abs().max() > 1e-4
    torch.testing.assert_close(run("hi", guidance_scale=0.0), unconditional, atol=1e-5, rtol=1e-5)
    assert (run("hi", guidance_scale=3.0) - conditional).abs().max() > 1e-4


def test_outputs(pipe):
    out = pipe(None, num_images_per_prompt=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, PixelDLMPipelineOutput) and len(out.texts) == 2 and isinstance(out.images[0], PIL.Image.Image)
    texts, ids, images = pipe(["x", "y"], num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (2, 8, 8, 3) and len(texts) == len(ids) == 2
    assert all(0 <= i < pipe.codec.vocab_size for row in ids for i in row)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"prompt": 3}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": None, "guidance_scale": 2.0}, "guidance_scale"),
     ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"), ({"prompt": "a", "output_type": "latent"}, "output_type"),
     ({"prompt": "a", "latents": torch.zeros(1, 3, 4, 4)}, "latents")],
)
def test_bad_inputs(pipe, kwargs, match):
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_save_and_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = PixelDLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = loaded("hi", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    b = pipe("hi", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(a.images, b.images)
    assert a.texts == b.texts


def test_color_levels_are_saved_with_the_pipeline(pipe, tmp_path):
    spread = PixelDLMPipeline(pipe.transformer, pipe.scheduler, pipe.tokenizer, color_levels=7)
    assert spread.codec.levels == 7 and pipe.codec.levels == 256
    spread.save_pretrained(tmp_path)
    loaded = PixelDLMPipeline.from_pretrained(tmp_path)
    assert loaded.config.color_levels == 7 and loaded.codec.levels == 7
    condition = loaded.encode_prompt("12+30=", device="cpu")
    assert loaded.codec.decode_text(loaded.tokenizer, condition) == ["12+30="]
    assert torch.allclose(condition * 6, torch.round(condition * 6), atol=1e-6)
