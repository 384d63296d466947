"""JiTPipeline: sampler against upstream's algorithm, diffusers' Euler scheduler, guidance, labels, outputs."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel
from pixel_diffusers.pipelines.jit.pipeline_jit import JiTPipeline
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler

TINY = dict(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=2, bottleneck_dim=8,
            num_classes=3, in_context_len=2, in_context_start=1, id2label={0: "red circle", 1: "blue square, box", 2: "green triangle"})


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**TINY)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def make(transformer, solver="heun"):
    pipe = JiTPipeline(transformer, PixelFlowMatchScheduler(solver=solver, prediction_type="flow_prediction"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def upstream_sampler(model, labels, z, steps, w, interval, method):
    """JiT's Denoiser.generate restated, with the exact velocity (x - z) / (1 - t) (see the pipeline docstring)."""
    times = torch.linspace(0.0, 1.0, steps + 1)
    null = torch.full_like(labels, model.config.num_classes)

    def velocity(z, t):
        x_c = model(z, (1 - t) * 1000, class_labels=labels).sample
        x_u = model(z, (1 - t) * 1000, class_labels=null).sample
        v_c, v_u = (x_c - z) / (1 - t), (x_u - z) / (1 - t)
        scale = w if (t < interval[1] and (interval[0] == 0 or t > interval[0])) else 1.0
        return v_u + scale * (v_c - v_u)

    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        v = velocity(z, t)
        if method == "heun" and i < steps - 1:
            v = 0.5 * (v + velocity(z + (t_next - t) * v, t_next))
        z = z + (t_next - t) * v
    return z


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_matches_the_upstream_sampler(transformer, solver):
    pipe = make(transformer, solver)
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * (16 / 256)
    labels = torch.tensor([0, 2])
    ours = pipe(class_labels=[0, 2], num_inference_steps=5, guidance_scale=2.5, guidance_interval=(0.1, 1.0),
                latents=latents, output_type="latent").images
    with torch.no_grad():
        reference = upstream_sampler(transformer, labels, latents, 5, 2.5, (0.1, 1.0), solver)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_diffusers_euler_scheduler_gives_the_same_images(transformer):
    ours = make(transformer, "euler")
    theirs = JiTPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=1.0))
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1], num_inference_steps=4, output_type="latent")
    a = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scheduler_time_grid_replaces_the_jit_grid(transformer):
    """A scheduler with its own time grid (karras here) samples on that grid, the same as passing its sigmas."""
    scheduler = PixelFlowMatchScheduler(solver="unipc", prediction_type="flow_prediction", time_grid="karras",
                                        sigma_max=1.0, sigma_min=0.02, rho=3.0)
    pipe = JiTPipeline(transformer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    kwargs = dict(class_labels=[0], num_inference_steps=5, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(3), callback_on_step_end=lambda p, i, t, k: seen.append(t) or k,
             **kwargs).images
    expected = scheduler.sigmas[:-1].clone()
    torch.testing.assert_close(torch.stack(seen) / 1000, expected)
    assert expected[1] < 0.8  # not the 1, 0.8, ... grid
    b = make(transformer, "unipc")(generator=torch.Generator().manual_seed(3), sigmas=expected.tolist(),
                                   **kwargs).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_guidance_interval_and_scale(transformer):
    pipe = make(transformer)
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda **kw: pipe(class_labels=[0], num_inference_steps=3, latents=latents, output_type="latent", **kw).images
    plain = run(guidance_scale=1.0)
    torch.testing.assert_close(run(guidance_scale=4.0, guidance_interval=(0.99, 1.0)), plain)  # never inside
    assert (run(guidance_scale=4.0) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("steps, solver, unguided", [(50, "heun", 11), (10, "heun", 3), (10, "euler", 2)])
def test_guidance_interval_boundary_is_upstreams(transformer, steps, solver, unguided):
    """Upstream decides the interval (0.1, 1.0) on its float32 times torch.linspace(0, 1, N + 1): at 50 steps its
    t = 0.1 is 0.09999999 and at 10 steps exactly float32(0.1), so neither call is guided (1 - sigma would be
    0.10000002 and guide them)."""
    times = torch.linspace(0.0, 1.0, steps + 1)
    calls = []  # upstream's model calls: Heun evaluates t and t_next, except in the last step (Euler)
    for i in range(steps):
        calls += [times[i], times[i + 1]] if solver == "heun" and i < steps - 1 else [times[i]]
    expected = [bool(t < 1.0) and bool(t > 0.1) for t in calls]
    pipe = make(transformer, solver)
    if steps > 10:  # the decision alone (a 99-call run is slow on CPU); the short runs go through the pipeline
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
        guided = pipe._guided_calls(pipe.scheduler.timesteps, steps, (0.1, 1.0)).tolist()
    else:
        guided = []
        hook = transformer.register_forward_pre_hook(lambda module, args: guided.append(args[0].shape[0] == 2))
        try:
            pipe(class_labels=[0], num_inference_steps=steps, guidance_scale=2.0, output_type="latent")
        finally:
            hook.remove()
    assert guided == expected and guided.count(False) == unguided


def test_labels_by_name_outputs_and_noise_scale(transformer):
    pipe = make(transformer)
    by_name = pipe(class_labels=["box", "red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    by_id = pipe(class_labels=[1, 0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(by_name, by_id)
    assert by_id.shape == (2, 3, 16, 16) and by_id.min() >= 0 and by_id.max() <= 1
    pil = pipe(class_labels=2, num_images_per_prompt=2, num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image)
    # The initial noise is N(0, I) scaled by JiT's noise scale sample_size / 256.
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * (16 / 256)
    kwargs = dict(class_labels=[0], num_inference_steps=3, output_type="latent")
    torch.testing.assert_close(pipe(generator=torch.Generator().manual_seed(5), **kwargs).images, pipe(latents=noise, **kwargs).images)
    assert JiTTransformer2DModel(**TINY, noise_scale=0.5).noise_scale == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [({"class_labels": "dog"}, "class_labels"), ({"class_labels": [3]}, "class_labels"), ({"class_labels": []}, "class_labels"),
     ({"class_labels": [0], "height": 32}, "height"), ({"class_labels": [0], "guidance_interval": (0.5, 0.2)}, "guidance_interval"),
     ({"class_labels": [0], "output_type": "jpg"}, "output_type"),
     ({"class_labels": [0], "callback_on_step_end_tensor_inputs": ["x0"]}, "callback_on_step_end_tensor_inputs")],
)
def test_bad_inputs(transformer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(transformer)(num_inference_steps=1, **kwargs)


def test_save_and_load(transformer, tmp_path):
    pipe = make(transformer)
    pipe.save_pretrained(tmp_path)
    loaded = JiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=["green triangle"], num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(loaded(generator=torch.Generator().manual_seed(0), **kwargs).images,
                               pipe(generator=torch.Generator().manual_seed(0), **kwargs).images, atol=1e-6)
