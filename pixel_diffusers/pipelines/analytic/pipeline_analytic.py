"""Unconditional sampling with analytic (closed-form) denoisers, the Analytic Diffusion Studio's DDIM loop."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...loading import StrictPipelineMixin
from .. import validation
from ...models.analytic.analytic_utils import AnalyticDenoiser
from ..offload import SequentialOffloadMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class AnalyticPipelineOutput(BaseOutput):
    """Output of [`AnalyticDiffusionPipeline`].

    Args:
        images: the last x0 estimate of each sample (the studio's result), as PIL images, a numpy array or a tensor.
        timesteps (`list[int]`, *optional*): the timestep of every step (with ``return_trajectory=True``).
        trajectory_xt (`list[torch.Tensor]`, *optional*): the sample fed into every step (the first is x_T).
        trajectory_x0 (`list[torch.Tensor]`, *optional*): the x0 estimate of every step, unclipped.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    timesteps: list[int] | None = None
    trajectory_xt: list[torch.Tensor] | None = None
    trajectory_x0: list[torch.Tensor] | None = None


def studio_scheduler(**kwargs) -> DDIMScheduler:
    """The studio's scheduler: diffusers' DDIM with linear betas 1e-4..0.02 and its defaults (leading spacing,
    ``clip_sample=True``, ``set_alpha_to_one=True``), so 10 steps are ``[900, 800, ..., 0]``."""
    return DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon", **kwargs)


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the batch of the per-sample mean squared difference."""
    return (x - y).float().square().flatten(1).mean(1).mean().item()


def r2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the batch of ``1 - sum (x - y)^2 / (n var(y))`` per sample, ``y`` the reference (unbiased
    variance; a zero variance counts as 1), the studio's r^2."""
    x, y = x.float().flatten(1), y.float().flatten(1)
    variance = y.var(1, unbiased=True)
    variance = torch.where(variance == 0, torch.ones_like(variance), variance)
    return (1 - (x - y).square().sum(1) / (y.shape[1] * variance)).mean().item()


class AnalyticDiffusionPipeline(StrictPipelineMixin, SequentialOffloadMixin, DiffusionPipeline):
    r"""
    Unconditional image generation with an analytic denoiser in pixel space.

    Components:
        denoiser: an analytic denoiser from `pixel_diffusers.models.analytic` (an x0 predictor), or a diffusers
            `UNet2DModel` predicting epsilon (a trained reference network to compare trajectories with).
        scheduler: [`DDIMScheduler`] set up as in the studio by default ([`studio_scheduler`]); any diffusers
            discrete-time scheduler of the same betas works (the x0 estimate is converted to its `prediction_type`
            and its `scale_model_input` is honoured).

    Each step predicts ``x0``, converts it to ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a + 1e-8)`` as the studio does
    and lets the scheduler step; DDIM clips its own x0 copy (``clip_sample``) while the returned image is the
    denoiser's unclipped last x0 estimate (``output_type="latent"`` returns the final sample instead).
    """

    model_cpu_offload_seq = "denoiser"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, denoiser, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    def _alpha_bar(self, timestep) -> torch.Tensor:
        if isinstance(self.denoiser, AnalyticDenoiser):
            return self.denoiser.alpha_bar(int(round(float(timestep))))
        return self.scheduler.alphas_cumprod[int(round(float(timestep)))].float()

    @torch.no_grad()
    def predict_x0(self, sample: torch.Tensor, timestep, generator=None) -> torch.Tensor:
        """The denoiser's x0 estimate of the variance-preserving ``sample`` at ``timestep``."""
        if isinstance(self.denoiser, AnalyticDenoiser):
            return self.denoiser(sample, int(round(float(timestep))), generator=generator)
        a = self._alpha_bar(timestep).to(sample.device)
        eps = self.denoiser(sample, timestep).sample
        return (sample - (1 - a).sqrt() * eps) / a.sqrt()

    def _to_prediction(self, x0: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        a = self._alpha_bar(timestep).to(sample.device)
        eps = (sample - a.sqrt() * x0) / (1 - a + 1e-8).sqrt()
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'.")

    @property
    def num_timesteps(self) -> int:
        """Steps of the last call (read by diffusers' callbacks)."""
        return self._num_timesteps

    def _shape(self):
        config = self.denoiser.config
        channels = config.get("in_channels", 3)
        return channels, config.sample_size, config.sample_size

    def check_inputs(self, batch_size, num_inference_steps, output_type, latents, callback_on_step_end_tensor_inputs,
                     generator=None, callback_on_step_end=None):
        validation.check_positive_int("batch_size", batch_size)
        validation.check_positive_int("num_inference_steps", num_inference_steps)
        validation.check_generator(generator, batch_size)
        validation.check_sampling_call(
            self, output_type, OUTPUT_TYPES, callback_on_step_end_tensor_inputs, callback_on_step_end, generator,
            latents, (batch_size,) + self._shape(),
        )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 10,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> AnalyticPipelineOutput | tuple:
        r"""
        Generates `batch_size` images.

        Args:
            batch_size (`int`, defaults to 1): images to generate.
            num_inference_steps (`int`, defaults to 10): scheduler steps (denoiser calls).
            generator (`torch.Generator` or a list of one per image, *optional*): draws the initial noise and any
                noise of stochastic denoisers ([`SmoothedCFDMDenoiser`]) and schedulers (a list: each image's own).
            latents (`torch.Tensor`, *optional*): the initial noise `[B, C, H, W]` (before `init_noise_sigma`).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"`, or `"latent"` for the final sample.
            return_dict (`bool`, defaults to True): return an [`AnalyticPipelineOutput`] instead of a tuple.
            return_trajectory (`bool`, defaults to False): also return `timesteps`, `trajectory_xt` and
                `trajectory_x0` (on the CPU).
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, i, t, {"latents": ...})` after
                every step; may return a replacement `latents`.
        """
        self.check_inputs(batch_size, num_inference_steps, output_type, latents, callback_on_step_end_tensor_inputs,
                          generator, callback_on_step_end)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor((batch_size,) + self._shape(), generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        timesteps, trajectory_xt, trajectory_x0 = [], [], []
        x0 = None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            x0 = self.predict_x0(model_input, t, generator=generator)
            if return_trajectory:
                timesteps.append(int(t))
                trajectory_xt.append(model_input.cpu())
                trajectory_x0.append(x0.cpu())
            prediction = self._to_prediction(x0, model_input, t)
            latents = self.scheduler.step(prediction, t, latents, return_dict=False, **step_kwargs)[0]
            if callback_on_step_end is not None:
                outputs = validation.callback_outputs(callback_on_step_end(self, i, t, {"latents": latents}))
                latents = outputs.pop("latents", latents)
            validation.check_finite_step(latents, i, t)

        image = latents if output_type == "latent" else self.image_processor.postprocess(x0, output_type=output_type)
        self.maybe_free_model_hooks()
        trajectory = (timesteps, trajectory_xt, trajectory_x0) if return_trajectory else (None, None, None)
        if not return_dict:
            return (image, *trajectory)
        return AnalyticPipelineOutput(image, *trajectory)

    @torch.no_grad()
    def compare_trajectories(self, reference: "AnalyticDiffusionPipeline", output: AnalyticPipelineOutput,
                             reference_output: AnalyticPipelineOutput | None = None) -> dict:
        """MSE and r^2 of this run's x0 trajectory against a reference model's, step by step (the studio's metrics).

        ``output`` comes from this pipeline with ``return_trajectory=True``; ``reference_output`` from ``reference``
        on the same initial noise. Per step ``step_{T - t}``: ``*_vs_reference`` compares the two x0 trajectories,
        ``*_vs_reference_single`` compares this x0 with the reference model's x0 on *this* run's ``x_t``. The final
        step's values are repeated as ``r2_final`` / ``mse_final``.
        """
        if output.trajectory_x0 is None:
            raise ValueError("`output` must come from a call with `return_trajectory=True`.")
        details = {}
        for i, t in enumerate(output.timesteps):
            x0 = output.trajectory_x0[i]
            single = reference.predict_x0(output.trajectory_xt[i].to(reference.device), t).cpu()
            step = {"timestep": t, "r2_vs_reference_single": r2(x0, single), "mse_vs_reference_single": mse(x0, single)}
            if reference_output is not None:
                other = reference_output.trajectory_x0[i]
                step.update({"r2_vs_reference": r2(x0, other), "mse_vs_reference": mse(x0, other)})
            details[f"step_{self.scheduler.config.num_train_timesteps - t}"] = step
        last = details[f"step_{self.scheduler.config.num_train_timesteps - output.timesteps[-1]}"]
        key = "vs_reference" if reference_output is not None else "vs_reference_single"
        return {"steps": details, "r2_final": last[f"r2_{key}"], "mse_final": last[f"mse_{key}"]}
