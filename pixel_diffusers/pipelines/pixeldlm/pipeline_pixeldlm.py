"""Text generation with PixelDLM: a diffusion model that writes its answer as a 64 x 64 image of token colours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase

from ...loading import StrictPipelineMixin
from .. import validation
from ...hub import PixelDiffusersHubMixin
from ...loaders import TransformerLoraLoaderMixin
from ...models.transformers.transformer_jit import JiTTransformer2DModel
from ..flow_utils import current_sigma, progress_total, retrieve_flow_timesteps, starts_a_step, x0_to_prediction
from ..offload import SequentialOffloadMixin
from .codec import TextPixelCodec

OUTPUT_TYPES = ("pil", "np", "pt")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from pixel_diffusers import PixelDLMPipeline

        >>> pipe = PixelDLMPipeline.from_pretrained("org/pixeldlm")
        >>> pipe("What is 2 + 3?").texts[0]
        ```
"""


@dataclass
class PixelDLMPipelineOutput(BaseOutput):
    """Output of [`PixelDLMPipeline`].

    Args:
        texts: the decoded answers.
        token_ids: their token ids (EOS and padding removed).
        images: the generated token images (PIL images, or an array / tensor (B, 3, 64, 64) in [0, 1]).
    """

    texts: list[str]
    token_ids: list[list[int]]
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class PixelDLMPipeline(StrictPipelineMixin, SequentialOffloadMixin, PixelDiffusersHubMixin, DiffusionPipeline, TransformerLoraLoaderMixin):
    r"""
    PixelDLM prompt -> answer pipeline.

    Components:
        transformer ([`JiTTransformer2DModel`], `architecture="pixeldlm"`): predicts the clean token image x0.
        scheduler: a flow-matching scheduler, [`PixelFlowMatchScheduler`] (`solver="euler"`) by default;
            `FlowMatchEulerDiscreteScheduler` gives the same answers.
        tokenizer: the tokenizer whose ids the images hold (Qwen2.5's for upstream checkpoints).

    Config:
        color_levels (`int`, defaults to 256): values per colour channel of the [`TextPixelCodec`] layout; 256 is
            upstream's (and its checkpoints'); a small-vocabulary model trained with fewer levels keeps them here
            (saved in `model_index.json`).

    The prompt is written as a condition image with [`TextPixelCodec`] exactly as in training (ids, EOS, pad
    colour); the answer image is sampled and decoded (rounding, clamping, stop at EOS; `snap=True` moves off-vocabulary
    colours to the nearest valid id first).

    Sampler (ours; upstream's `generate` contradicts its training, see below): PixelDLM trains
    `x_t = (1 - t/1000) x0 + (t/1000) noise` with integer t < 1000 and an x0 loss, i.e. flow matching with
    `sigma = t / 1000`. We run the deterministic DDIM sampler of that process: start from `N(0, I)` at sigma = 0.999
    (t = 999), ask the model for x0 at each sigma of `0.999 * (1, 1 - 1/N, ..., 1/N)` and move along the straight line
    `x' = x0 + (sigma' / sigma)(x - x0)` (DDIM's update here, and exactly the flow Euler step), the last step landing
    on x0. Upstream instead tells the model t = 0, 1, ..., N-1 (almost clean) while feeding it noise, re-noises with
    fresh noise at every step but the last, its noise fraction i/N rising from 0 to (N-2)/N (0.90 at its 20 steps),
    and returns unclamped values.

    Default sampler: that DDIM (`PixelFlowMatchScheduler(solver="euler")` on that grid) with 50 steps, kept because no
    trained PixelDLM is measured by `benchmarks/bench_samplers.py` (README, "Few-step sampling"); its answers are read
    by rounding colours, so fewer steps are worth measuring with `benchmarks/eval_pixeldlm.py`. A scheduler with a
    `karras`, `log_snr` or `calibrated` grid is sampled on that grid instead.

    Classifier-free guidance `x0_u + w (x0_c - x0_u)` (the unconditional pass masks the whole condition) needs a model
    trained with condition dropout (ours: `training/train_pixeldlm.py --condition_dropout`); upstream never drops the
    condition, so keep `guidance_scale=1` with upstream checkpoints.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]
    _model_card_template = "pixeldlm.md"
    _pipeline_tag = "text-generation"

    def __init__(
        self,
        transformer: JiTTransformer2DModel,
        scheduler: SchedulerMixin,
        tokenizer: PreTrainedTokenizerBase,
        color_levels: int = 256,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        self.register_to_config(color_levels=color_levels)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=False)
        size = transformer.config.sample_size if transformer is not None else 64
        self.codec = None
        if tokenizer is not None:
            self.codec = TextPixelCodec.from_tokenizer(tokenizer, image_size=size, levels=color_levels)

    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1, device=None) -> torch.Tensor:
        """Prompts -> condition images (B * num_images_per_prompt, 3, S, S) in [0, 1], as in training."""
        images, _ = self.codec.encode_text(self.tokenizer, prompt, truncate=True)
        return images.to(device or self._execution_device).repeat_interleave(num_images_per_prompt, dim=0)

    def check_inputs(self, prompt, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, output_type,
                     callback_on_step_end_tensor_inputs, latents=None, generator=None, snap=False,
                     callback_on_step_end=None):
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` must be None (unconditional), a str or a non-empty list of str; got {prompt!r}.")
        validation.check_sigmas(sigmas, num_inference_steps, validation.call_default(self, "num_inference_steps"))
        validation.check_guidance_scale(guidance_scale)
        if prompt is None and guidance_scale != 1.0:
            raise ValueError("`guidance_scale` needs a `prompt` (unconditional generation has nothing to guide towards).")
        validation.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        validation.check_flag("snap", snap)
        size, channels = self.transformer.config.sample_size, self.transformer.config.in_channels
        validation.check_sampling_call(
            self, output_type, OUTPUT_TYPES, callback_on_step_end_tensor_inputs, callback_on_step_end, generator,
            latents, (None, channels, size, size),
        )

    def x0_to_prediction(self, x0: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Converts the transformer's x0 into the scheduler's prediction type (flow schedulers without a
        `prediction_type` expect `flow_prediction`, `(sample - x0) / sigma`)."""
        return x0_to_prediction(self.scheduler, x0, sample, sigma)

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
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        snap: bool = False,
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
        Answers prompts (or writes unconditional text when `prompt` is None).

        Args:
            prompt (`str`, `list[str]` or None): the prompt(s); None samples `num_images_per_prompt` unconditional texts.
            num_inference_steps (`int`, defaults to 50): model evaluations N of the DDIM sampler.
            sigmas (`list[float]`, *optional*): custom decreasing noise levels in (0, 1) instead of the default grid.
                As in diffusers, `sigmas` win: their length is the number of steps (a different
                `num_inference_steps` given beside them is ignored, with a warning).
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance w; only for models trained with
                condition dropout.
            num_images_per_prompt (`int`, defaults to 1): answers per prompt.
            generator, latents: randomness, or the initial noise (batch, 3, S, S).
            snap (`bool`, defaults to False): snap off-vocabulary colours to the nearest valid id before decoding.
            output_type (`str`, defaults to "pil"): the type of `images`: "pil", "np" or "pt" (in [0, 1]).
            return_dict (`bool`, defaults to True): return a [`PixelDLMPipelineOutput`] instead of a tuple
                `(texts, token_ids, images)`.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. `{"scale": lora_scale}`).
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after each scheduler step.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, output_type,
                          callback_on_step_end_tensor_inputs, latents, generator, snap, callback_on_step_end)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        config = self.transformer.config

        condition = None if prompt is None else self.encode_prompt(prompt, num_images_per_prompt, device)
        batch_size = num_images_per_prompt if condition is None else condition.shape[0]
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            validation.check_generator(generator, batch_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=torch.float32)

        own_grid = self.scheduler.config.get("time_grid", "linear") != "linear"  # karras, log-SNR, calibrated
        timesteps, num_inference_steps = retrieve_flow_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas,  # the native grid unless the scheduler has its own
            default_sigmas=None if sigmas is not None or own_grid
            else 0.999 * np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps),
        )
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        model_condition, condition_mask = condition, None
        if condition is not None and self.do_classifier_free_guidance:
            model_condition = torch.cat([condition, condition])
            condition_mask = torch.cat([torch.ones(batch_size, dtype=torch.bool), torch.zeros(batch_size, dtype=torch.bool)]).to(device)

        with self.progress_bar(total=progress_total(self.scheduler, timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = current_sigma(self.scheduler, t)
                model_input = latents.to(self.transformer.dtype)
                if condition_mask is not None:
                    model_input = torch.cat([model_input, model_input])
                x0 = self.transformer(
                    model_input, t.float().expand(model_input.shape[0]), condition=model_condition,
                    condition_mask=condition_mask, attention_kwargs=attention_kwargs, return_dict=False,
                )[0].float()
                if condition_mask is not None:
                    x0_cond, x0_uncond = x0.chunk(2)
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

        samples = latents.clamp(0.0, 1.0)
        token_ids = self.codec.decode(samples, snap=snap)
        texts = [self.tokenizer.decode(ids) for ids in token_ids]
        images = self.image_processor.postprocess(samples, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (texts, token_ids, images)
        return PixelDLMPipelineOutput(texts=texts, token_ids=token_ids, images=images)
