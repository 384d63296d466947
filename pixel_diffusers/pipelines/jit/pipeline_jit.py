"""Class-conditional image generation with JiT, directly in pixel space (no VAE)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ...loading import StrictPipelineMixin
from .. import validation
from ...hub import PixelDiffusersHubMixin
from ...loaders import TransformerLoraLoaderMixin
from ...models.transformers.transformer_jit import JiTTransformer2DModel
from ..flow_utils import current_sigma, progress_total, retrieve_flow_timesteps, starts_a_step, x0_to_prediction
from ..offload import SequentialOffloadMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from pixel_diffusers import JiTPipeline

        >>> pipe = JiTPipeline.from_pretrained("org/jit-b-16")
        >>> image = pipe(class_labels=[207], guidance_scale=3.0).images[0]  # or a name from transformer.config.id2label
        ```
"""


class JiTPipeline(StrictPipelineMixin, SequentialOffloadMixin, PixelDiffusersHubMixin, DiffusionPipeline, TransformerLoraLoaderMixin):
    r"""
    JiT class-conditional image pipeline.

    Components:
        transformer ([`JiTTransformer2DModel`], `architecture="jit"`): predicts the clean image x0.
        scheduler: a flow-matching scheduler: [`PixelFlowMatchScheduler`] (`solver="heun"` for JiT's default sampler)
            or diffusers' `FlowMatchEulerDiscreteScheduler` (the same images as our `solver="euler"`).

    Sampling follows official JiT: noise of std `transformer.noise_scale` (JiT's `sample_size / 256` unless the
    config sets it) at sigma = 1, the uniform grid
    `sigmas = 1, 1 - 1/N, ..., 1/N` (JiT's `t = linspace(0, 1, N + 1)`), Heun with the last step a plain step to the
    clean image, classifier-free guidance `v_u + w (v_c - v_u)` with the null class `num_classes`, applied only inside
    the guidance interval of JiT's time `t = 1 - sigma` (`lo < t < hi`, or `t < hi` when `lo = 0`).

    Default sampler: that recipe, Heun with 50 steps (99 transformer calls), kept from upstream because it gives
    official JiT's images and no trained JiT is measured by `benchmarks/bench_samplers.py`; on the model it does
    measure (PixelHDM) the grids that win on exact-denoiser oracles lose, so only a measurement on the model itself
    should replace it (README, "Few-step sampling"). A scheduler with a `karras`, `log_snr` or `calibrated` grid is
    sampled on that grid instead.

    The transformer's x0 is converted to what the scheduler expects in [`~JiTPipeline.x0_to_prediction`], the one
    place that knows both conventions. Deliberate difference from upstream: upstream divides by `max(1 - t, 0.05)`
    when turning x0 into a velocity, also while sampling, so its last steps (t > 0.95) move only part of the way; here
    the velocity is exact, `(x - x0) / sigma`, and the step into sigma 0 lands on x0.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]
    _model_card_template = "jit.md"
    _pipeline_tag = "unconditional-image-generation"

    def __init__(self, transformer: JiTTransformer2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.default_sample_size = transformer.config.sample_size if transformer is not None else 256

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id from `transformer.config.id2label` (comma-separated synonyms each map to the id)."""
        id2label = self.transformer.config.id2label or {}
        names = {}
        for key, value in id2label.items():
            for name in str(value).split(","):
                names[name.strip()] = int(key)
        return names

    @staticmethod
    def _flatten_labels(label) -> list:
        """A label, a (nested) list or tuple of labels, or an integer tensor / array of any shape (as diffusers' DiT
        pipeline accepts), as a flat list."""
        if isinstance(label, np.ndarray):
            label = torch.from_numpy(label)
        if isinstance(label, torch.Tensor):
            if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
                raise ValueError(f"`class_labels` as a tensor or array must hold integer ids; got dtype {label.dtype}.")
            return label.reshape(-1).tolist()
        if isinstance(label, (list, tuple)):
            return [item for part in label for item in JiTPipeline._flatten_labels(part)]
        return [label]

    def get_label_ids(self, label) -> list[int]:
        """Class ids of labels given as ids or names (names need `id2label` in the transformer config), alone, in
        (nested) lists, or as an integer tensor."""
        labels = self._flatten_labels(label)
        num_classes = self.transformer.config.num_classes
        ids = []
        for item in labels:
            if isinstance(item, str):
                names = self.labels
                if item not in names:
                    shown = sorted(names)[:10]
                    raise ValueError(
                        f"`class_labels` name {item!r} is not a class of this model; known names include {shown} "
                        f"({len(names)} in all, from transformer.config.id2label)."
                    )
                ids.append(names[item])
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < num_classes:
                ids.append(int(item))
            else:
                raise ValueError(f"`class_labels` must be ids in [0, {num_classes}) or class names; got {item!r}.")
        return ids

    def check_inputs(self, class_labels, height, width, num_inference_steps, sigmas, guidance_scale,
                     guidance_interval, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs,
                     latents=None, generator=None, callback_on_step_end=None):
        if class_labels is None or len(self._flatten_labels(class_labels)) == 0:
            raise ValueError("`class_labels` must be a class id or name, or a non-empty list or tensor of them.")
        size = self.transformer.config.sample_size
        for name, value in (("height", height), ("width", width)):
            if not validation.is_int(value) or value != size:
                raise ValueError(f"`{name}` must equal the transformer's sample_size {size}; got {value!r}.")
        validation.check_sigmas(sigmas, num_inference_steps, validation.call_default(self, "num_inference_steps"))
        validation.check_guidance_scale(guidance_scale)
        if guidance_interval is not None and (
            not isinstance(guidance_interval, (list, tuple))
            or len(guidance_interval) != 2
            or not all(validation.is_number(v) for v in guidance_interval)
            or not 0.0 <= guidance_interval[0] < guidance_interval[1] <= 1.0
        ):
            raise ValueError(f"`guidance_interval` must be (t_low, t_high) with 0 <= t_low < t_high <= 1, got {guidance_interval}.")
        validation.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        validation.check_sampling_call(
            self, output_type, OUTPUT_TYPES, callback_on_step_end_tensor_inputs, callback_on_step_end, generator,
            latents, (None, self.transformer.config.in_channels, size, size),
        )

    def x0_to_prediction(self, x0: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Converts the transformer's x0 into the scheduler's prediction type (diffusers' flow schedulers without a
        `prediction_type` expect `flow_prediction`, `noise - x0 = (sample - x0) / sigma`)."""
        return x0_to_prediction(self.scheduler, x0, sample, sigma)

    def _guided_calls(self, timesteps: torch.Tensor, grid_steps: int | None, guidance_interval) -> torch.Tensor:
        """Which model calls are inside the guidance interval, decided as upstream does: on JiT's time t as a float32
        tensor, `t < hi and (lo == 0 or t > lo)` with the bounds rounded to float32. On the default grid of
        `grid_steps` steps, t is upstream's `torch.linspace(0, 1, grid_steps + 1)` entry (at 50 steps its t = 0.1 is
        0.09999999, outside (0.1, 1.0), where `1 - sigma` would give 0.10000002); elsewhere t = 1 - sigma in float32."""
        times = 1.0 - timesteps.detach().float().cpu() / self.scheduler.config.num_train_timesteps
        if grid_steps is not None:
            index = (times * grid_steps).round()
            on_grid = (times * grid_steps - index).abs() < 1e-3  # not e.g. dpmpp_2s's midpoints
            upstream = torch.linspace(0.0, 1.0, grid_steps + 1)
            times = torch.where(on_grid, upstream[index.long().clamp(0, grid_steps)], times)
        if guidance_interval is None:
            return torch.ones_like(times, dtype=torch.bool)
        low, high = guidance_interval
        inside = times < high
        return inside if low == 0 else inside & (times > low)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.0,
        guidance_interval: tuple[float, float] | None = (0.1, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Generates images of the given classes.

        Args:
            class_labels (`int`, `str`, a (nested) list of them, or an integer tensor): class ids, or names from
                `transformer.config.id2label`.
            height, width (`int`, default: the transformer's `sample_size`): must equal it.
            num_inference_steps (`int`, defaults to 50): steps N of the grid `1, 1 - 1/N, ..., 1/N` (Heun evaluates the
                transformer 2N - 1 times).
            sigmas (`list[float]`, *optional*): custom decreasing noise levels in (0, 1] instead of that grid. As in
                diffusers, `sigmas` win: their length is the number of steps (a different `num_inference_steps` given
                beside them is ignored, with a warning).
            guidance_scale (`float`, defaults to 3.0): classifier-free guidance scale w (official evaluation: B 3.0,
                L 2.4, H 2.2 at 256x256); 1 disables guidance.
            guidance_interval (`(t_low, t_high)`, defaults to (0.1, 1.0)): apply guidance only where
                `t_low < t < t_high` in JiT's time t = 1 - sigma (`t_low = 0` includes t = 0), on upstream's float32
                values of t (so the default 50 steps guide the same model calls as upstream); None: everywhere.
            num_images_per_prompt (`int`, defaults to 1): images per class label.
            generator, latents: randomness, or the initial noise (batch, 3, S, S) at sigma = 1 (std `transformer.noise_scale`).
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (in [0, 1]) or "latent" (the raw [-1, 1]
                tensor).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. `{"scale": lora_scale}`).
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after each scheduler step.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        self.check_inputs(class_labels, height, width, num_inference_steps, sigmas, guidance_scale, guidance_interval,
                          num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs, latents, generator,
                          callback_on_step_end)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        config = self.transformer.config

        labels = torch.tensor(self.get_label_ids(class_labels), device=device).repeat_interleave(num_images_per_prompt)
        batch_size = labels.shape[0]
        shape = (batch_size, config.in_channels, height, width)
        if latents is None:
            validation.check_generator(generator, batch_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * self.transformer.noise_scale
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=torch.float32)

        own_grid = self.scheduler.config.get("time_grid", "linear") != "linear"  # karras, log-SNR, calibrated
        steps = num_inference_steps
        timesteps, num_inference_steps = retrieve_flow_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas,  # the native grid unless the scheduler has its own
            default_sigmas=None if sigmas is not None or own_grid
            else np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps),
        )
        default_grid = sigmas is None and not own_grid
        guided_calls = self._guided_calls(timesteps, steps if default_grid else None, guidance_interval)
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        null = torch.full_like(labels, config.num_classes)

        with self.progress_bar(total=progress_total(self.scheduler, timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = current_sigma(self.scheduler, t)
                guided = self.do_classifier_free_guidance and bool(guided_calls[i])
                model_input = latents.to(self.transformer.dtype)
                model_labels = labels
                if guided:
                    model_input, model_labels = torch.cat([model_input, model_input]), torch.cat([labels, null])
                x0 = self.transformer(
                    model_input, t.float().expand(model_input.shape[0]), class_labels=model_labels,
                    attention_kwargs=attention_kwargs, return_dict=False,
                )[0].float()
                if guided:
                    x0_cond, x0_uncond = x0.chunk(2)
                    # Guidance on x0 equals JiT's guidance on the velocity: both are affine in x0 at a fixed sample.
                    x0 = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
                prediction = self.x0_to_prediction(x0, latents, sigma)
                step_begins = starts_a_step(self.scheduler)
                latents = self.scheduler.step(prediction, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = validation.callback_outputs(callback_on_step_end(self, i, t, callback_kwargs))
                    latents = callback_outputs.pop("latents", latents)
                validation.check_finite_step(latents, i, sigma)
                if step_begins:
                    progress_bar.update()

        image = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
