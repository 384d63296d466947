"""AnalyticDiffusionPipeline: the studio's DDIM loop, trajectories, scheduler swaps, metrics and the CLI."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DModel
from PIL import Image

from pixel_diffusers.models.analytic import OptimalDenoiser, PCALocalityDenoiser, WienerDenoiser
from pixel_diffusers.cli import main
from pixel_diffusers.pipelines.analytic.studio import run
from pixel_diffusers.pipelines.analytic.pipeline_analytic import AnalyticDiffusionPipeline, mse, r2, studio_scheduler
from pixel_diffusers.schedulers.scheduling_gradient_estimation import GradientEstimationScheduler


def training_images(n=24, size=4, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_pipe(denoiser_cls=WienerDenoiser, scheduler=None, **kwargs):
    denoiser = denoiser_cls(sample_size=4, **kwargs).fit(training_images())
    pipe = AnalyticDiffusionPipeline(denoiser=denoiser, scheduler=scheduler or studio_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def studio_loop(denoiser, x, steps):
    """The studio's sampling loop restated from the spec: leading DDIM timesteps, clipped x0 in the update."""
    a_table = denoiser.alphas_cumprod
    timesteps = list(range(0, 1000, 1000 // steps))[::-1]
    x0s, xts = [], []
    for t in timesteps:
        a = a_table[t]
        x0 = denoiser(x, t)
        eps = (x - a.sqrt() * x0) / (1 - a + 1e-8).sqrt()
        clipped = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        a_prev = a_table[t - 1000 // steps] if t - 1000 // steps >= 0 else torch.tensor(1.0)
        xts.append(x)
        x0s.append(x0)
        x = a_prev.sqrt() * clipped + (1 - a_prev).sqrt() * eps
    return timesteps, xts, x0s, x


def test_studio_loop_is_reproduced_with_trajectories():
    pipe = make_pipe()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = pipe(batch_size=2, num_inference_steps=10, latents=noise, output_type="pt", return_trajectory=True)
    timesteps, xts, x0s, final = studio_loop(pipe.denoiser, noise, 10)
    assert out.timesteps == timesteps == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert torch.equal(out.trajectory_xt[0], noise)
    for ours, theirs in zip(out.trajectory_x0, x0s):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the image is the last (unclipped) x0 estimate mapped to [0, 1]
    torch.testing.assert_close(out.images, ((x0s[-1] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)
    latent = pipe(batch_size=2, num_inference_steps=10, latents=noise, output_type="latent").images
    torch.testing.assert_close(latent, final, atol=1e-5, rtol=1e-5)


def test_same_generator_gives_same_images_and_output_types():
    pipe = make_pipe(OptimalDenoiser)
    a = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (3, 4, 4, 3) and np.array_equal(a, b)
    pil = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (4, 4)


def test_optimal_denoiser_samples_training_images():
    """With the exact posterior mean the DDIM ODE ends on training images (memorisation)."""
    pipe = make_pipe(OptimalDenoiser)
    out = pipe(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(3), output_type="pt")
    x0 = out.images * 2 - 1
    distances = torch.cdist(x0.flatten(1), training_images().flatten(1)).min(1).values
    assert distances.max() < 1e-2


def test_swapping_schedulers():
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    ddim = make_pipe(scheduler=DDIMScheduler(beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing", clip_sample=False,
                                             set_alpha_to_one=False))
    ours = make_pipe(scheduler=GradientEstimationScheduler(schedule="ddpm"))
    a = ddim(batch_size=2, num_inference_steps=6, latents=noise, output_type="pt", return_trajectory=True)
    b = ours(batch_size=2, num_inference_steps=6, latents=noise, output_type="pt", return_trajectory=True)
    assert a.timesteps == b.timesteps
    # the same DDIM run in two float32 parameterisations (VP and x_sigma); rounding at sigma ~157 grows to ~1e-3
    for x, y in zip(a.trajectory_x0, b.trajectory_x0):
        torch.testing.assert_close(x, y, atol=3e-3, rtol=0)
    accelerated = make_pipe(scheduler=GradientEstimationScheduler(schedule="ddpm", gam=2.0))
    c = accelerated(batch_size=2, num_inference_steps=6, latents=noise, output_type="pt")
    assert (c.images - b.images).abs().max() > 1e-2
    euler = make_pipe(scheduler=EulerDiscreteScheduler(beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing"))
    images = euler(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 4, 4) and torch.isfinite(images).all()


def test_metrics_and_reference_comparison():
    x = torch.randn(3, 5)
    assert mse(x, x) == 0 and r2(x, x) == 1.0
    y = torch.randn(3, 5)
    expected = (1 - ((x - y) ** 2).sum(1) / (5 * y.var(1))).mean().item()
    assert r2(x, y) == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    reference = AnalyticDiffusionPipeline(denoiser=unet, scheduler=studio_scheduler())
    reference.set_progress_bar_config(disable=True)
    pipe = make_pipe(PCALocalityDenoiser, mask_threshold=0.0)
    out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    ref = reference(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert torch.equal(out.trajectory_xt[0], ref.trajectory_xt[0])
    metrics = pipe.compare_trajectories(reference, out, ref)
    assert set(metrics["steps"]) == {"step_200", "step_400", "step_600", "step_800", "step_1000"}
    last = metrics["steps"]["step_1000"]
    assert last["mse_vs_reference"] == pytest.approx(mse(out.trajectory_x0[-1], ref.trajectory_x0[-1]))
    single = reference.predict_x0(out.trajectory_xt[-1], 0)
    assert last["r2_vs_reference_single"] == pytest.approx(r2(out.trajectory_x0[-1], single), abs=1e-6)


def test_save_and_load_pipeline(tmp_path):
    pipe = make_pipe(PCALocalityDenoiser)
    pipe.save_pretrained(tmp_path)
    loaded = AnalyticDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")
    assert np.array_equal(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images,
                          loaded(generator=torch.Generator().manual_seed(0), **kwargs).images)


def test_bad_inputs():
    pipe = make_pipe()
    for kwargs, name in [({"batch_size": 0}, "batch_size"), ({"num_inference_steps": 0}, "num_inference_steps"),
                         ({"output_type": "jpg"}, "output_type"), ({"latents": torch.zeros(1, 3, 5, 5)}, "latents")]:
        with pytest.raises(ValueError, match=name):
            pipe(**kwargs)


def test_cli_writes_images_grid_and_metrics(tmp_path):
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for index, image in enumerate(training_images(12, size=6)):
        array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:02d}.png")
    config = {"denoiser": "wiener", "dataset": {"source": str(tmp_path / "images"), "resolution": 4, "batch_size": 5},
              "sampling": {"num_samples": 3, "batch_size": 2, "num_inference_steps": 4, "seed": 1},
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    main(["analytic", "--config", str(tmp_path / "config.json")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_training_images"] == 12 and metrics["sampling_time_per_step_s"] > 0
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (12, 4)
    with pytest.raises(ValueError, match="denoiser"):
        run({**config, "denoiser": "gaussian"})
