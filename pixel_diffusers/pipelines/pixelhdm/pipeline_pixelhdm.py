"""Text-to-image generation with PixelHDM, directly in pixel space (no VAE)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...loading import StrictPipelineMixin
from .. import validation
from ...hub import PixelDiffusersHubMixin
from ...loaders import TransformerLoraLoaderMixin
from ...models.transformers.transformer_pixelhdm import PixelHDMTransformer2DModel
from ..flow_utils import current_sigma, flow_to_prediction, progress_total, retrieve_flow_timesteps, starts_a_step
from ..offload import SequentialOffloadMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# The sampler new PixelHDM pipelines get (`training/train_pixelhdm.py`, the shipped shapes checkpoint), with the
# `num_inference_steps` default of `__call__`; see "Default sampler" in the class docstring.
DEFAULT_SCHEDULER_CONFIG = {"solver": "dpmpp_2m", "time_grid": "log_snr", "sigma_max": 0.95, "sigma_min": 0.05}
DEFAULT_NUM_INFERENCE_STEPS = 12

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pixel_diffusers import PixelHDMPipeline

        >>> pipe = PixelHDMPipeline.from_pretrained("org/pixelhdm", torch_dtype=torch.bfloat16)
        >>> image = pipe("a red circle on a blue background").images[0]  # 12 DPM-Solver++(2M) steps
        ```
"""


class PixelHDMLoraLoaderMixin(TransformerLoraLoaderMixin):
    """LoRA loading for `PixelHDMPipeline` (its only adaptable component is `transformer`)."""


class PixelHDMPipeline(StrictPipelineMixin, SequentialOffloadMixin, PixelDiffusersHubMixin, DiffusionPipeline, PixelHDMLoraLoaderMixin):
    r"""
    PixelHDM text-to-image pipeline.

    Components:
        transformer ([`PixelHDMTransformer2DModel`]): predicts the flow velocity `x0 - noise` in pixel space.
        scheduler: a flow-matching scheduler, [`PixelFlowMatchScheduler`] by default; diffusers' own flow schedulers
            work too, built fresh or with `from_config(pipe.scheduler.config)` (`FlowMatchEulerDiscreteScheduler`,
            `FlowMatchHeunDiscreteScheduler`, `UniPCMultistepScheduler` / `DPMSolverMultistepScheduler` with
            `use_flow_sigmas=True`).
        text_encoder: a transformers model whose `last_hidden_state` conditions the transformer (Qwen3 by default).
        tokenizer: the text encoder's tokenizer. Prompts are padded on the right to the longest prompt of the batch.

    The transformer's velocity is converted to whatever the scheduler expects in
    [`~PixelHDMPipeline.velocity_to_prediction`], the one place that knows both conventions (the scheduler decides,
    see `pixel_diffusers.pipelines.flow_utils`). `height` and `width` default to the transformer's `sample_size`,
    the resolution it was trained at.

    Default sampler, chosen by `benchmarks/bench_samplers.py` on the shipped shapes model (README, "Few-step
    sampling"): `PixelFlowMatchScheduler(solver="dpmpp_2m", time_grid="log_snr")` on the trained range 0.95 -> 0.05
    (`DEFAULT_SCHEDULER_CONFIG`, what `training/train_pixelhdm.py` saves) and 12 steps, 12 transformer calls (24
    passes with guidance). Its images are as close to a 200-call reference as those of 20 Heun steps (39 calls): RMS
    0.065 against 0.061 in [-1, 1] pixels; shapes class accuracy 0.78 against 0.81 (64 images; 20 steps match both).
    The log-SNR grid, dense near 0.95, beats the linear one at every count from 6 to 20 calls (grids dense near 0.05,
    the best on exact-denoiser oracles, lose to it). The scheduler a saved folder holds is the one used: earlier
    folders hold Heun on the linear grid (`solver="heun", time_grid="linear"`, best at 20 steps), which stays
    available, as does any grid in the trained range through `sigmas`.

    Differences from the upstream sampler (deliberate fixes): sampling ends with a step to a clean sample instead of
    returning the state at t = 0.95 with 5% noise left; timesteps and the sampler state stay in float32 under bf16
    weights; an empty prompt gets a zero pooled embedding instead of reading a padding slot.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _model_card_template = "pixelhdm.md"

    def __init__(
        self,
        transformer: PixelHDMTransformer2DModel,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.patch_size = transformer.config.patch_size if transformer is not None else 16
        sample_size = transformer.config.get("sample_size") if transformer is not None else None
        self.default_sample_size = sample_size or 512

    # ------------------------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------------------------
    def _encode_text(
        self, prompt: list[str], device: torch.device, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.tokenizer(
            prompt,
            padding="longest",
            max_length=max_sequence_length,
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        if input_ids.shape[1] == 0:  # every prompt is empty: keep one fully masked slot
            input_ids = torch.full((len(prompt), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
        if input_ids.shape[1] == max_sequence_length:  # only then can a prompt have been cut
            untruncated = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
            if untruncated.shape[1] > max_sequence_length:
                removed = self.tokenizer.batch_decode(untruncated[:, max_sequence_length:])
                logger.warning(f"Prompts were truncated to max_sequence_length={max_sequence_length} tokens: {removed}")
        hidden = self.text_encoder(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).last_hidden_state
        attention_mask = attention_mask.to(device)
        # Padded slots never reach the image (they are masked keys); zero them so that a fully masked row, which some
        # attention backends turn into NaN, cannot leak into the pooled embedding either.
        hidden = torch.where(attention_mask[..., None].bool(), hidden, torch.zeros_like(hidden))
        return hidden, attention_mask

    @staticmethod
    def pool_prompt_embeds(prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state of each prompt's last real token (right padding); zeros for an empty prompt."""
        lengths = prompt_attention_mask.long().sum(dim=1)
        last = (lengths - 1).clamp(min=0)
        pooled = prompt_embeds[torch.arange(prompt_embeds.shape[0], device=prompt_embeds.device), last]
        return torch.where((lengths > 0)[:, None], pooled, torch.zeros_like(pooled))

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int = 511,
    ):
        r"""
        Encodes prompts into `last_hidden_state` embeddings and their attention masks, repeated
        `num_images_per_prompt` times. The unconditional embedding (for classifier-free guidance) comes from
        `negative_prompt`, the empty prompt "" by default, as in training with caption dropout.

        Needs only the text components (works with `transformer=None`). Returns `(prompt_embeds,
        prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`; the negative pair is `None`
        without guidance.
        """
        device = device or self._execution_device
        dtype = self.transformer.dtype if self.transformer is not None else self.text_encoder.dtype

        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, device, max_sequence_length)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(
                negative_prompt, device, max_sequence_length
            )
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long, device=device)

        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        prompt_attention_mask = prompt_attention_mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
                num_images_per_prompt, dim=0
            )
            negative_prompt_attention_mask = negative_prompt_attention_mask.to(device).repeat_interleave(
                num_images_per_prompt, dim=0
            )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # ------------------------------------------------------------------------------------------------------------
    # Checks and helpers
    # ------------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        guidance_rescale,
        guidance_interval,
        num_images_per_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        prompt_attention_mask,
        negative_prompt_attention_mask,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length,
        latents=None,
        generator=None,
        callback_on_step_end=None,
    ):
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`; both are None.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"`prompt` must be a str or a non-empty list of str, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Provide either `negative_prompt` or `negative_prompt_embeds`, not both.")
        for name, value in (("height", height), ("width", width)):
            validation.check_size(name, value, self.patch_size)
        validation.check_sigmas(sigmas, num_inference_steps, validation.call_default(self, "num_inference_steps"))
        validation.check_guidance_scale(guidance_scale)
        validation.check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        if guidance_interval is not None and (
            not isinstance(guidance_interval, (list, tuple))
            or len(guidance_interval) != 2
            or not all(validation.is_number(v) for v in guidance_interval)
            or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0
        ):
            raise ValueError(
                f"`guidance_interval` must be (sigma_low, sigma_high) with 0 <= sigma_low <= sigma_high <= 1, got {guidance_interval}."
            )
        validation.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if not validation.is_int(max_sequence_length) or not 1 <= max_sequence_length <= 511:
            raise ValueError(
                f"`max_sequence_length` must be an int in [1, 511] (the text axis of the transformer's mRoPE), got {max_sequence_length!r}."
            )
        for name, embeds, mask in (
            ("prompt_embeds", prompt_embeds, prompt_attention_mask),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            mask_name = name.replace("embeds", "attention_mask")
            if embeds is None:
                if mask is not None:
                    raise ValueError(f"`{mask_name}` needs `{name}`.")
                continue
            validation.check_tensor(name, embeds, (None, None, self.transformer.config.text_embed_dim))
            if not 1 <= embeds.shape[1] <= max_sequence_length:
                raise ValueError(
                    f"`{name}` must hold between 1 and max_sequence_length={max_sequence_length} tokens, got {embeds.shape[1]}."
                )
            if embeds.shape[0] == 0:
                raise ValueError(f"`{name}` must hold at least one prompt, got batch size 0.")
            if mask is not None:
                validation.check_mask(mask_name, mask, embeds.shape[:2])
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError("`negative_prompt_embeds` and `prompt_embeds` must have the same batch size.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt)):
                raise ValueError(f"`negative_prompt` must be a str or a list of str, got {type(negative_prompt).__name__}.")
            batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            if len(negative_prompt) != batch:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch} prompts.")
        validation.check_sampling_call(
            self, output_type, OUTPUT_TYPES, callback_on_step_end_tensor_inputs, callback_on_step_end, generator,
            latents, (None, self.transformer.config.in_channels, height, width),
        )

    def prepare_latents(self, batch_size, height, width, device, generator, latents=None) -> torch.Tensor:
        """Pure Gaussian noise of shape (batch, 3, height, width) in float32 (the sampler state stays float32)."""
        shape = (batch_size, self.transformer.config.in_channels, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        validation.check_generator(generator, batch_size)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def velocity_to_prediction(self, velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Converts PixelHDM's velocity `x0 - noise` (the negated flow) into what the scheduler expects."""
        return flow_to_prediction(self.scheduler, -velocity, sample, sigma)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 511,
    ):
        r"""
        Generates images from text.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional prompt for guidance ("" by default).
            height, width (`int`, *optional*): multiples of the transformer's patch size; default: the transformer's
                `sample_size` (the training resolution), or 512 for a config without one.
            num_inference_steps (`int`, defaults to 12): sampling steps (a second-order solver evaluates the
                transformer about twice per step); 12 is measured for the default sampler (see the class docstring).
            sigmas (`list[float]`, *optional*): custom noise levels in (0, 1], decreasing; overrides the scheduler's.
                As in diffusers, `sigmas` win: their length is the number of steps (a different
                `num_inference_steps` given beside them is ignored, with a warning).
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance scale; `<= 1` disables guidance.
            guidance_rescale (`float`, defaults to 0.0): the rescaled-CFG factor φ, mixing the guided prediction
                with a copy rescaled to the conditional prediction's standard deviation.
            guidance_interval (`tuple[float, float]`, *optional*): `(sigma_low, sigma_high)`: guidance is applied
                only at noise levels `sigma_low <= sigma <= sigma_high`; outside it only the conditional pass runs.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image.
            latents (`torch.Tensor`, *optional*): initial noise of shape (batch, 3, height, width).
            prompt_embeds, prompt_attention_mask: precomputed text embeddings (batch, tokens, width) and their mask
                (all ones when omitted); the pooled embedding is read from them.
            negative_prompt_embeds, negative_prompt_attention_mask: the same for the unconditional branch.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (the raw
                [-1, 1] tensor).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. `{"scale": lora_scale}`).
            callback_on_step_end, callback_on_step_end_tensor_inputs: called at the end of each step with the named
                tensors; may return replacements.
            max_sequence_length (`int`, defaults to 511): the longest prompt in tokens; prompts are padded only to
                the longest prompt of the batch, which gives the same images as padding to 511.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            sigmas,
            guidance_scale,
            guidance_rescale,
            guidance_interval,
            num_images_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            output_type,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
            latents,
            generator,
            callback_on_step_end,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                negative_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                max_sequence_length=max_sequence_length,
            )
        )
        batch_size = prompt_embeds.shape[0]
        latents = self.prepare_latents(batch_size, height, width, device, generator, latents)

        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            scheduler_kwargs["mu"] = calculate_shift(
                (height // self.patch_size) * (width // self.patch_size),
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.15),
            )
        timesteps, num_inference_steps = retrieve_flow_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        with self.progress_bar(total=progress_total(self.scheduler, timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = current_sigma(self.scheduler, t)
                guided = self.do_classifier_free_guidance and (
                    guidance_interval is None or guidance_interval[0] <= sigma.item() <= guidance_interval[1]
                )
                velocity = self._predict_velocity(
                    latents,
                    t,
                    prompt_embeds,
                    prompt_attention_mask,
                    negative_prompt_embeds if guided else None,
                    negative_prompt_attention_mask,
                    guidance_rescale,
                    attention_kwargs,
                )
                prediction = self.velocity_to_prediction(velocity, latents, sigma)
                step_begins = starts_a_step(self.scheduler)
                latents = self.scheduler.step(prediction, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = validation.callback_outputs(callback_on_step_end(self, i, t, callback_kwargs))
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                validation.check_finite_step(latents, i, sigma)
                if step_begins:
                    progress_bar.update()

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _predict_velocity(
        self,
        latents,
        t,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        guidance_rescale,
        attention_kwargs,
    ) -> torch.Tensor:
        """One transformer evaluation; with `negative_prompt_embeds`, a batched guided one."""
        embeds, mask = prompt_embeds, prompt_attention_mask
        if negative_prompt_embeds is not None:
            embeds, mask = _concat_padded(
                (prompt_embeds, prompt_attention_mask), (negative_prompt_embeds, negative_prompt_attention_mask)
            )
        model_input = latents.to(self.transformer.dtype)
        if negative_prompt_embeds is not None:
            model_input = torch.cat([model_input, model_input])
        velocity = self.transformer(
            hidden_states=model_input,
            timestep=t.float().expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            pooled_projections=self.pool_prompt_embeds(embeds, mask),
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0].float()
        if negative_prompt_embeds is None:
            return velocity
        velocity_cond, velocity_uncond = velocity.chunk(2)
        guided = velocity_uncond + self.guidance_scale * (velocity_cond - velocity_uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, velocity_cond, guidance_rescale=guidance_rescale)
        return guided


def _concat_padded(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (embeds, mask) pairs along the batch, right-padding the shorter ones with masked zeros."""
    length = max(embeds.shape[1] for embeds, _ in pairs)
    padded_embeds, padded_masks = [], []
    for embeds, mask in pairs:
        extra = length - embeds.shape[1]
        padded_embeds.append(torch.nn.functional.pad(embeds, (0, 0, 0, extra)))
        padded_masks.append(torch.nn.functional.pad(mask, (0, extra)))
    return torch.cat(padded_embeds), torch.cat(padded_masks)
