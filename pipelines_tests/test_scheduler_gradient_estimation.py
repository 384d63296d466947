"""GradientEstimationScheduler: smalldiffusion's sampler, exact against diffusers' DDIM / DDPM and smalldiffusion."""

import importlib
import importlib.util
import math
from itertools import pairwise

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pixel_diffusers.schedulers.scheduling_gradient_estimation import (
    SCHEDULES,
    GradientEstimationScheduler,
    training_sigmas,
    trailing_indices,
)


class KeyedModel:
    """A fixed 'model' whose epsilon is a seeded function of the input and the noise level."""

    def __init__(self, shape=(3, 2, 5, 4)):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(shape, generator=generator)

    def __call__(self, x, sigma):
        return torch.tanh(0.3 * x + self.weight * torch.log(torch.as_tensor(sigma, dtype=torch.float32) + 0.5))


def reference_samples(model, sigmas, gam, mu, xt):
    """smalldiffusion's `samples` update, restated from the spec (gam, mu; noise from the global generator)."""
    eps = None
    outputs = []
    for i, (sig, sig_next) in enumerate(pairwise(sigmas)):
        eps_prev, eps = eps, model(xt, sig.to(xt))
        eps_av = eps * gam + eps_prev * (1 - gam) if i > 0 else eps
        sig_p = (sig_next / sig**mu) ** (1 / (1 - mu))
        eta = (sig_next**2 - sig_p**2).sqrt()
        xt = xt - (sig - sig_p) * eps_av + eta * torch.randn(xt.shape)
        outputs.append(xt)
    return outputs


def run_ours(scheduler, model, xt, steps, seed=None):
    scheduler.set_timesteps(steps)
    if seed is not None:
        torch.manual_seed(seed)
    outputs = []
    for i, t in enumerate(scheduler.timesteps):
        xt = scheduler.step(model(xt, scheduler.sigmas[i]), t, xt).prev_sample
        outputs.append(xt)
    return outputs


def smalldiffusion_module():
    """smalldiffusion's diffusion module; its package __init__ also imports torchvision, which is not needed here."""
    spec = importlib.util.find_spec("smalldiffusion")
    if spec is None:
        pytest.skip("smalldiffusion is not installed (run `pip install smalldiffusion --no-deps` for the parity tests)")
    try:
        return importlib.import_module("smalldiffusion")
    except ImportError:
        path = spec.submodule_search_locations[0] + "/diffusion.py"
        module_spec = importlib.util.spec_from_file_location("smalldiffusion_diffusion", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module


@pytest.mark.parametrize("schedule", ["ddpm", "ldm", "sigmoid", "cosine"])
@pytest.mark.parametrize("n,beta_start,beta_end", [(1000, 1e-4, 0.02), (100, 0.01, 0.02), (659, 0.001, 0.02)])
def test_training_sigmas_equal_diffusers_alphas_cumprod(schedule, n, beta_start, beta_end):
    beta_schedule = {"ddpm": "linear", "ldm": "scaled_linear", "sigmoid": "sigmoid", "cosine": "squaredcos_cap_v2"}
    reference = DDPMScheduler(n, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule[schedule])
    ours = training_sigmas(schedule, n, beta_start, beta_end)
    assert torch.equal(ours, (1 / reference.alphas_cumprod - 1).sqrt())


def test_trailing_indices():
    assert trailing_indices(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0]
    assert trailing_indices(200, 20)[:3] == [199, 189, 179]
    for steps in range(1, 100):
        assert len(trailing_indices(1000, steps)) == steps + 1
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(25)
    assert trailing_indices(1000, 25)[:-1] == ddim.timesteps.tolist()


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("final_sigmas_type", ["sigma_min", "zero"])
def test_gam1_mu0_is_diffusers_ddim(steps, final_sigmas_type):
    model = KeyedModel()
    ours = GradientEstimationScheduler(final_sigmas_type=final_sigmas_type)
    ddim = DDIMScheduler(
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=final_sigmas_type == "zero"
    )
    ddim.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ddim.timesteps)
    noise = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(1))
    x_ours, x_ddim = noise * ours.init_noise_sigma, noise * ddim.init_noise_sigma
    for i, t in enumerate(ours.timesteps):
        eps = model(ours.scale_model_input(x_ours, t), ours.sigmas[i])
        x_ours = ours.step(eps, t, x_ours).prev_sample
        x_ddim = ddim.step(model(x_ddim, ours.sigmas[i]), t, x_ddim).prev_sample
        scale = (1 + ours.sigmas[i + 1].double() ** 2) ** -0.5
        torch.testing.assert_close(x_ours * scale.float(), x_ddim, atol=2e-5, rtol=1e-5)


def test_gam1_mu_half_is_diffusers_ddpm_ancestral_step():
    model = KeyedModel()
    ours = GradientEstimationScheduler(mu=0.5, final_sigmas_type="zero")
    ddpm = DDPMScheduler(timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(10)
    ddpm.set_timesteps(10)
    assert torch.equal(ours.timesteps, ddpm.timesteps)
    noise = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(2))
    g_ours, g_ddpm = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ours, x_ddpm = noise * ours.init_noise_sigma, noise
    for i, t in enumerate(ours.timesteps):
        x_ours = ours.step(model(ours.scale_model_input(x_ours, t), ours.sigmas[i]), t, x_ours, generator=g_ours).prev_sample
        x_ddpm = ddpm.step(model(x_ddpm, ours.sigmas[i]), t, x_ddpm, generator=g_ddpm).prev_sample
        scale = (1 + ours.sigmas[i + 1].double() ** 2) ** -0.5
        torch.testing.assert_close(x_ours * scale.float(), x_ddpm, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("gam,mu", [(1.0, 0.0), (2.0, 0.0), (1.6, 0.0), (1.0, 0.5), (1.5, 0.3)])
def test_reproduces_smalldiffusion_update(schedule, gam, mu):
    """Self-contained: the spec's formula, the same model, the same initial noise and (for mu > 0) the same seed."""
    model = KeyedModel()
    ours = GradientEstimationScheduler(schedule=schedule, gam=gam, mu=mu, prediction_type="flow_prediction" if schedule == "flow" else "epsilon")
    ours.set_timesteps(13)
    xt = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(4)) * ours.sigmas[0]
    torch.manual_seed(5)
    expected = reference_samples(model, ours._sigmas, gam, mu, xt)
    got = run_ours(ours, model, xt, 13, seed=5)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("gam,mu", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5)])
def test_reproduces_installed_smalldiffusion_exactly(schedule, gam, mu):
    sd = smalldiffusion_module()
    classes = {"log_linear": sd.ScheduleLogLinear, "ddpm": sd.ScheduleDDPM, "ldm": sd.ScheduleLDM,
               "sigmoid": sd.ScheduleSigmoid, "cosine": sd.ScheduleCosine, "flow": sd.ScheduleFlow}
    table = classes[schedule](1000) if schedule != "flow" else sd.ScheduleFlow()
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "ldm" else {}
    ours = GradientEstimationScheduler(schedule=schedule, gam=gam, mu=mu, prediction_type="flow_prediction" if schedule == "flow" else "epsilon", **kwargs)
    assert torch.equal(ours.train_sigmas, table.sigmas)
    keyed = KeyedModel()

    class Model(torch.nn.Module):
        def rand_input(self, batchsize):
            return torch.randn((batchsize, 2, 5, 4))

        def predict_eps_cfg(self, x, sigma, cond, cfg_scale):
            return keyed(x, sigma)

    xt = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(6)) * table.sample_sigmas(20)[0].float()
    torch.manual_seed(7)
    expected = list(sd.samples(Model(), table.sample_sigmas(20), gam=gam, mu=mu, batchsize=3, xt=xt))
    got = run_ours(ours, keyed, xt, 20, seed=7)
    assert len(got) == len(expected) == 20
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_prediction_types_agree():
    """The same denoiser expressed as epsilon, x0 and v gives the same run."""
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8)).clamp(-1, 1)
    runs = []
    for kind in ("epsilon", "sample", "v_prediction"):
        scheduler = GradientEstimationScheduler(prediction_type=kind, gam=2.0)
        scheduler.set_timesteps(8)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i]
            eps = (x - 0.7 * x0) / sigma  # a fixed (not ideal) x0 estimate 0.7 x0
            alpha = 1 / (1 + sigma**2)
            output = {"epsilon": eps, "sample": x - sigma * eps,
                      "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * (x - sigma * eps)}[kind]
            x = scheduler.step(output, t, x).prev_sample
        runs.append(x)
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs[0], runs[2], atol=1e-4, rtol=1e-4)


def test_point_mass_is_recovered_exactly():
    """For a point-mass data distribution the ideal epsilon makes every gam land on the point at sigma 0."""
    point = torch.tensor([0.3, -0.5])
    for gam in (1.0, 2.0):
        scheduler = GradientEstimationScheduler(schedule="log_linear", gam=gam, final_sigmas_type="zero")
        scheduler.set_timesteps(7)
        x = torch.randn(4, 2, generator=torch.Generator().manual_seed(10)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step((x - point) / scheduler.sigmas[i], t, x).prev_sample
        torch.testing.assert_close(x, point.expand(4, 2), atol=1e-5, rtol=0)


def test_flow_schedule_euler_equals_diffusers_flow_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = GradientEstimationScheduler(schedule="flow", prediction_type="flow_prediction", t_min=0.05)
    ours.set_timesteps(6)
    euler = FlowMatchEulerDiscreteScheduler()
    euler.set_timesteps(sigmas=ours.sigmas[:-1].numpy())
    torch.testing.assert_close(euler.timesteps, ours.timesteps)
    x_ours = x_euler = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    for i, t in enumerate(ours.timesteps):
        velocity = torch.sin(x_ours) * ours.sigmas[i]
        x_ours = ours.step(velocity, t, x_ours).prev_sample
        x_euler = euler.step(torch.sin(x_euler) * ours.sigmas[i], t, x_euler).prev_sample
    torch.testing.assert_close(x_ours, x_euler, atol=1e-5, rtol=1e-5)


def test_stable_diffusion_pipeline_offline_gam1_equals_ddim(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import json

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for index, letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[letter] = 3 + 2 * index
        vocab[letter + "</w>"] = 4 + 2 * index
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    ours = GradientEstimationScheduler(schedule="ldm", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ours,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", height=8, width=8, num_inference_steps=5, output_type="np", guidance_scale=3.0)
    image = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(image - reference).max() < 1e-4
    pipe.scheduler = GradientEstimationScheduler.from_config(ours.config, gam=2.0)
    accelerated = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert accelerated.shape == image.shape and abs(accelerated - image).max() > 1e-4


def test_save_load_and_bad_arguments(tmp_path):
    scheduler = GradientEstimationScheduler(schedule="cosine", gam=2.0, mu=0.2)
    scheduler.save_pretrained(tmp_path)
    loaded = GradientEstimationScheduler.from_pretrained(tmp_path)
    assert loaded.config.gam == 2.0 and loaded.config.schedule == "cosine"
    for kwargs, name in [({"schedule": "karras"}, "schedule"), ({"mu": 1.0}, "mu"), ({"gam": 0.0}, "gam"),
                         ({"prediction_type": "flow_prediction"}, "prediction_type"),
                         ({"final_sigmas_type": "last"}, "final_sigmas_type")]:
        with pytest.raises(ValueError, match=name):
            GradientEstimationScheduler(**kwargs)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(3)
    assert math.isclose(scheduler.init_noise_sigma, math.sqrt(1 + float(scheduler.sigmas[0]) ** 2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.zeros(1), 12345, torch.zeros(1))
