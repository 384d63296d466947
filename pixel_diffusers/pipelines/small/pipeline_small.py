"""Sampling smalldiffusion-style small models (2-D toys and small images) with the gradient-estimation sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...loading import StrictPipelineMixin
from ...models.small.small_utils import SmallDiffusionModel
from ...schedulers.scheduling_gradient_estimation import GradientEstimationScheduler

OUTPUT_TYPES = ("pt", "np", "pil")


@dataclass
class SmallDiffusionPipelineOutput(BaseOutput):
    """``images``: the samples as tensors ``[B, *input_dims]`` (``pt``), a numpy array, or PIL images for image models
    (named as in diffusers' ``ImagePipelineOutput`` for every model, 2-D toys included)."""

    images: object


class SmallDiffusionPipeline(StrictPipelineMixin, DiffusionPipeline):
    r"""
    Samples a [`SmallDiffusionModel`] with [`GradientEstimationScheduler`] (set its `gam` / `mu`).

    The model is called with the scheduler's sigma (or flow time) directly, as smalldiffusion does; classifier-free
    guidance uses the model's ``predict_eps_cfg`` ("1 + w" convention). The last sample is returned (at the
    schedule's smallest sigma unless the scheduler's ``final_sigmas_type`` is ``"zero"``).
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: SmallDiffusionModel, scheduler: GradientEstimationScheduler):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 20, class_labels=None, guidance_scale: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None, output_type: str = "pt",
                 return_dict: bool = True):
        """Draws ``batch_size`` samples; ``class_labels`` (ints, one per sample) for conditional models."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if output_type not in OUTPUT_TYPES or (output_type == "pil" and len(self.model.input_dims) != 3):
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES} ('pil' for image models only), got {output_type!r}.")
        device = self._execution_device
        cond = None
        if class_labels is not None:
            cond = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            if len(cond) != batch_size:
                raise ValueError(f"`class_labels` must hold one label per sample ({batch_size}), got {len(cond)}.")
        if self.model.is_conditional and cond is None:
            raise ValueError("this model is conditional: pass `class_labels`.")
        shape = (batch_size,) + tuple(self.model.input_dims)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {list(shape)}, got {list(latents.shape)}.")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = latents.to(device) * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            direction = self.model.predict_eps_cfg(x, self.scheduler.sigmas[i].to(device), cond, guidance_scale)
            x = self.scheduler.step(direction, t, x, generator=generator).prev_sample
        samples = x
        if output_type != "pt":
            samples = self.image_processor.postprocess(x, output_type=output_type) if x.ndim == 4 else x.cpu().numpy()
        if not return_dict:
            return (samples,)
        return SmallDiffusionPipelineOutput(images=samples)
