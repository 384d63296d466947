"""Sampling smalldiffusion-style small models (2-D toys and small images) with the gradient-estimation sampler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...loading import StrictPipelineMixin
from .. import validation
from ...models.small.small_utils import SmallDiffusionModel
from ...schedulers.scheduling_gradient_estimation import GradientEstimationScheduler
from ..offload import SequentialOffloadMixin

OUTPUT_TYPES = ("pt", "np", "pil")


@dataclass
class SmallDiffusionPipelineOutput(BaseOutput):
    """``images``: the samples as tensors ``[B, *input_dims]`` (``pt``), a numpy array, or PIL images for image models
    (named as in diffusers' ``ImagePipelineOutput`` for every model, 2-D toys included)."""

    images: object


class SmallDiffusionPipeline(StrictPipelineMixin, SequentialOffloadMixin, DiffusionPipeline):
    r"""
    Samples a [`SmallDiffusionModel`] with [`GradientEstimationScheduler`] (set its `gam` / `mu`).

    The model is called with the scheduler's sigma (or flow time) directly, as smalldiffusion does; classifier-free
    guidance uses the model's ``predict_eps_cfg`` ("1 + w" convention). The last sample is returned (at the
    schedule's smallest sigma unless the scheduler's ``final_sigmas_type`` is ``"zero"``).
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model: SmallDiffusionModel, scheduler: GradientEstimationScheduler):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @property
    def num_timesteps(self) -> int:
        """Steps of the last call (read by diffusers' callbacks)."""
        return self._num_timesteps

    def check_inputs(self, batch_size, num_inference_steps, class_labels, guidance_scale, generator, latents,
                     output_type, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None) -> torch.Tensor | None:
        """Raises on a bad argument; returns the class labels as a long tensor (or None)."""
        validation.check_positive_int("batch_size", batch_size)
        validation.check_positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES or (output_type == "pil" and len(self.model.input_dims) != 3):
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES} ('pil' for image models only), got {output_type!r}.")
        validation.check_guidance_scale(guidance_scale)
        validation.check_generator(generator)
        validation.check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        validation.check_callback(callback_on_step_end)
        if latents is not None:
            validation.check_tensor("latents", latents, (batch_size,) + tuple(self.model.input_dims))
        if not self.model.is_conditional:
            if class_labels is not None or guidance_scale != 0:
                raise ValueError(
                    "`class_labels` and `guidance_scale` need a conditional model; this one is unconditional "
                    "(leave class_labels=None, guidance_scale=0)."
                )
            return None
        num_classes = self.model.cond_embed.null_cond
        if class_labels is None:
            raise ValueError(f"this model is conditional: pass `class_labels` (ints in [0, {num_classes})).")
        labels = class_labels if isinstance(class_labels, torch.Tensor) else None
        if labels is None:
            items = class_labels if isinstance(class_labels, (list, tuple, np.ndarray)) else [class_labels]
            items = np.asarray(items, dtype=object).reshape(-1).tolist()
            if not all(validation.is_int(item) for item in items):
                raise ValueError(f"`class_labels` must be ints in [0, {num_classes}), got {class_labels!r}.")
            labels = torch.tensor([int(item) for item in items], dtype=torch.long)
        elif labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex() or labels.device.type == "meta":
            raise ValueError(f"`class_labels` must be ints in [0, {num_classes}), got a {labels.dtype} tensor.")
        labels = labels.reshape(-1).long()
        if len(labels) != batch_size:
            raise ValueError(f"`class_labels` must hold one label per sample ({batch_size}), got {len(labels)}.")
        if len(labels) and not bool(((labels >= 0) & (labels < num_classes)).all()):
            raise ValueError(
                f"`class_labels` must be ints in [0, {num_classes}) (label {num_classes} is the unconditional one), "
                f"got {labels.tolist()}."
            )
        return labels

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 20, class_labels=None, guidance_scale: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None, output_type: str = "pt",
                 return_dict: bool = True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Draws ``batch_size`` samples; ``class_labels`` (ints in ``[0, num_classes)``, one per sample) for
        conditional models; ``guidance_scale`` w > 0 (classifier-free guidance) needs them.
        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` runs after every step and may return new ``latents``."""
        device = self._execution_device
        cond = self.check_inputs(batch_size, num_inference_steps, class_labels, guidance_scale, generator, latents,
                                 output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        cond = None if cond is None else cond.to(device)
        shape = (batch_size,) + tuple(self.model.input_dims)
        if latents is None:
            validation.check_generator(generator, batch_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        x = latents * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            sigma = self.scheduler.sigmas[i].to(device, self.model.dtype)
            direction = self.model.predict_eps_cfg(x.to(self.model.dtype), sigma, cond, guidance_scale).float()
            x = self.scheduler.step(direction, t, x, generator=generator).prev_sample
            if callback_on_step_end is not None:
                x = validation.callback_outputs(callback_on_step_end(self, i, t, {"latents": x})).pop("latents", x)
            validation.check_finite_step(x, i, self.scheduler.sigmas[i])
        samples = x
        if output_type != "pt":
            samples = self.image_processor.postprocess(x, output_type=output_type) if x.ndim == 4 else x.cpu().numpy()
        if not return_dict:
            return (samples,)
        return SmallDiffusionPipelineOutput(images=samples)
