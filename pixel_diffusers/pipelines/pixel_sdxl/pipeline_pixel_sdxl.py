"""Text-to-image generation with pixel-space SDXL, directly in pixel space (no VAE)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import USE_PEFT_BACKEND, logging, replace_example_docstring, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ...loading import StrictPipelineMixin
from .. import validation
from ...hub import PixelDiffusersHubMixin
from ...models.unets.unet_pixel_sdxl import PixelSDXLUNet2DConditionModel
from ..flow_utils import current_sigma, progress_total, retrieve_flow_timesteps, starts_a_step, x0_to_prediction
from ..offload import SequentialOffloadMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Upstream sampler's floor on sigma when an x0 estimate is turned into a noise / flow estimate (its T_EPS).
SIGMA_FLOOR = 0.05

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pixel_diffusers import PixelSDXLPipeline

        >>> pipe = PixelSDXLPipeline.from_pretrained("org/pixel-sdxl", torch_dtype=torch.bfloat16)
        >>> image = pipe("1girl, solo, looking at viewer, masterpiece", num_inference_steps=30).images[0]
        ```
"""


class PixelSDXLPipeline(StrictPipelineMixin, SequentialOffloadMixin, PixelDiffusersHubMixin, DiffusionPipeline, StableDiffusionXLLoraLoaderMixin):
    r"""
    Pixel-space SDXL text-to-image pipeline.

    Components:
        unet ([`PixelSDXLUNet2DConditionModel`]): predicts the clean image x0 in pixel space.
        scheduler: a flow-matching scheduler, [`PixelFlowMatchScheduler`] by default (Euler with the flow shift 3,
            upstream's sampler); diffusers' `FlowMatchEulerDiscreteScheduler` swaps in and gives the same images.
        text_encoder ([`CLIPTextModel`]): CLIP ViT-L; its penultimate hidden states are the first 768 channels of the
            context.
        text_encoder_2 ([`CLIPTextModelWithProjection`]): OpenCLIP ViT-bigG; its penultimate hidden states are the
            remaining 1280 channels, its projected end-of-text state the pooled embedding.
        tokenizer, tokenizer_2 ([`CLIPTokenizer`]): 77-token prompts; the second pads with id 0 (open_clip's "!").

    The model's x0 is converted to whatever `scheduler.config.prediction_type` expects in
    [`~PixelSDXLPipeline.x0_to_prediction`], the one place that knows both conventions. Size and crop conditioning
    (`original_size`, `crops_coords_top_left`, `target_size`) is SDXL's, and guidance mixes the two x0 estimates, as
    upstream does.

    Default sampler: upstream's, Euler with the flow shift 3 on `1, (N-1)/N, ..., 1/N` and 30 steps, kept because no
    trained pixel-space SDXL is measured by `benchmarks/bench_samplers.py` and oracle measurements do not carry over
    to a model (README, "Few-step sampling"). A scheduler with a `karras`, `log_snr` or `calibrated` grid is sampled
    on that grid instead.

    Differences from the upstream sampler: the conditional and unconditional passes run as one batch (the same
    numbers); the sampler state stays in float32 under half-precision weights.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids"]
    _model_card_template = "pixel_sdxl.md"

    def __init__(
        self,
        unet: PixelSDXLUNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.patch_size = unet.config.patch_size if unet is not None else 16
        sample_size = unet.config.get("sample_size") if unet is not None else None
        self.default_sample_size = sample_size or 1024

    # ------------------------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------------------------
    def _encode_text(self, tokenizer, text_encoder, prompt: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Penultimate hidden states (B, 77, width) and, for the projection model, the pooled embedding."""
        length = tokenizer.model_max_length
        input_ids = tokenizer(
            prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        untruncated = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[1] > length:
            removed = tokenizer.batch_decode(untruncated[:, length - 1 : -1])
            logger.warning(f"Prompts were truncated to {length} tokens; removed: {removed}")
        output = text_encoder(input_ids.to(device), output_hidden_states=True)
        pooled = output.text_embeds if isinstance(text_encoder, CLIPTextModelWithProjection) else None
        return output.hidden_states[-2], pooled

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
    ):
        r"""
        Encodes prompts with both CLIP encoders into the context (B, 77, 768 + 1280) and the pooled embedding, repeated
        `num_images_per_prompt` times. `prompt_2` goes to the second encoder (default: `prompt`). The unconditional
        branch encodes `negative_prompt` ("" by default) normally, as training's caption dropout did.

        `lora_scale` scales the text encoders' LoRA layers while encoding (as diffusers' SDXL pipeline does; `__call__`
        passes `cross_attention_kwargs["scale"]`, so one scale reaches the U-Net and the text encoders). Needs only the
        text components: works with `unet=None`.

        Returns `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`; the
        negative pair is `None` without guidance.
        """
        device = device or self._execution_device
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        if lora_scale is not None and USE_PEFT_BACKEND:
            for encoder in encoders:
                scale_lora_layers(encoder, lora_scale)
        try:
            embeds = self._encode_prompts(
                prompt, prompt_2, negative_prompt, negative_prompt_2, do_classifier_free_guidance, device,
                prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            )
        finally:
            if lora_scale is not None and USE_PEFT_BACKEND:
                for encoder in encoders:
                    unscale_lora_layers(encoder, lora_scale)
        dtype = self.unet.dtype if self.unet is not None else self.text_encoder_2.dtype

        def repeat(tensor):
            return None if tensor is None else tensor.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        return tuple(repeat(tensor) for tensor in embeds)

    def _encode_prompts(
        self, prompt, prompt_2, negative_prompt, negative_prompt_2, do_classifier_free_guidance, device,
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
    ):

        def encode(first, second):
            first = [first] if isinstance(first, str) else first
            second = second or first
            second = [second] if isinstance(second, str) else second
            hidden_1, _ = self._encode_text(self.tokenizer, self.text_encoder, first, device)
            hidden_2, pooled = self._encode_text(self.tokenizer_2, self.text_encoder_2, second, device)
            return torch.cat([hidden_1, hidden_2], dim=-1), pooled

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = encode(prompt, prompt_2)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            negative_prompt_2 = (
                batch_size * [negative_prompt_2] if isinstance(negative_prompt_2, str) else negative_prompt_2
            )
            negative_prompt_embeds, negative_pooled_prompt_embeds = encode(negative_prompt, negative_prompt_2)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # ------------------------------------------------------------------------------------------------------------
    # Checks and helpers
    # ------------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        prompt_2,
        negative_prompt,
        negative_prompt_2,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        num_images_per_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        original_size,
        crops_coords_top_left,
        target_size,
        output_type,
        callback_on_step_end_tensor_inputs,
        latents=None,
        generator=None,
        callback_on_step_end=None,
    ):
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`; both are None.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`, not both.")
        for name, value in (("prompt", prompt), ("prompt_2", prompt_2), ("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            if value is None or isinstance(value, str):
                continue
            if not (isinstance(value, list) and value and all(isinstance(p, str) for p in value)):
                raise ValueError(f"`{name}` must be a str or a non-empty list of str, got {type(value).__name__}.")
        context_width = self.unet.config.cross_attention_dim
        config = self.unet.config
        pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        tokens = self.tokenizer.model_max_length if self.tokenizer is not None else None
        for name, embeds, pooled_name, pooled in (
            ("prompt_embeds", prompt_embeds, "pooled_prompt_embeds", pooled_prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds, "negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
        ):
            if embeds is None:
                if pooled is not None:
                    raise ValueError(f"`{pooled_name}` needs `{name}`.")
                continue
            if pooled is None:
                raise ValueError(f"`{name}` needs `{pooled_name}` (the second encoder's pooled output).")
            validation.check_tensor(name, embeds, (None, None, context_width))
            if embeds.shape[0] == 0 or embeds.shape[1] == 0:
                raise ValueError(f"`{name}` must hold at least one prompt of at least one token, got {tuple(embeds.shape)}.")
            validation.check_tensor(pooled_name, pooled, (embeds.shape[0], pooled_width))
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError("`negative_prompt_embeds` and `prompt_embeds` must have the same shape.")
        elif tokens is not None and validation.is_number(guidance_scale) and guidance_scale > 1:
            # The branch given as text is encoded here, `tokens` long, and batched with the one given as embeddings.
            for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
                if embeds is not None and embeds.shape[1] != tokens:
                    raise ValueError(
                        f"`{name}` must hold {tokens} tokens (the tokenizer's model_max_length) when the other branch "
                        f"is encoded by the pipeline, got {embeds.shape[1]}; or pass both embeddings."
                    )
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"`negative_prompt_embeds` holds {negative_prompt_embeds.shape[0]} prompts but there are {batch}.")
        for name, value in (("prompt_2", prompt_2), ("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            if isinstance(value, list) and len(value) != batch:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {batch} prompts.")
        if prompt_2 is not None and prompt is None:
            raise ValueError("`prompt_2` needs `prompt` (with `prompt_embeds`, encode both prompts yourself).")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Provide either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("Provide either `negative_prompt_2` or `negative_prompt_embeds`, not both.")
        for name, value in (("height", height), ("width", width)):
            validation.check_size(name, value, self.patch_size)
        for name, value in (("original_size", original_size), ("target_size", target_size)):
            if value is not None:
                validation.check_pair(name, value, minimum=1)
        validation.check_pair("crops_coords_top_left", crops_coords_top_left, minimum=0)
        validation.check_sigmas(sigmas, num_inference_steps, validation.call_default(self, "num_inference_steps"))
        validation.check_guidance_scale(guidance_scale)
        validation.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        validation.check_sampling_call(
            self, output_type, OUTPUT_TYPES, callback_on_step_end_tensor_inputs, callback_on_step_end, generator,
            latents, (None, self.unet.config.in_channels, height, width),
        )

    def prepare_latents(self, batch_size, height, width, device, generator, latents=None) -> torch.Tensor:
        """Pure Gaussian noise of shape (batch, 3, height, width) in float32 (the sampler state stays float32)."""
        shape = (batch_size, self.unet.config.in_channels, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        validation.check_generator(generator, batch_size)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    @staticmethod
    def get_time_ids(original_size, crops_coords_top_left, target_size, batch_size: int, device) -> torch.Tensor:
        """SDXL's size/crop conditioning (original h, w, crop top, left, target h, w) per sample, float32."""
        values = list(original_size) + list(crops_coords_top_left) + list(target_size)
        return torch.tensor([values], dtype=torch.float32, device=device).repeat(batch_size, 1)

    def x0_to_prediction(self, x0: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Converts the model's x0 estimate into the prediction type the scheduler expects.

        The noise and flow estimates divide by `max(sigma, 0.05)`, the floor upstream's sampler puts under `sigma`;
        above it they are exact, so an Euler step on the flow equals upstream's re-noising step. diffusers' flow
        schedulers without a `prediction_type` (FlowMatchEulerDiscreteScheduler) expect `flow_prediction`.
        """
        return x0_to_prediction(self.scheduler, x0, sample, sigma.clamp(min=SIGMA_FLOOR))

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
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Generates images from text.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds` and `pooled_prompt_embeds`.
            prompt_2 (`str` or `list[str]`, *optional*): the prompt(s) for the second text encoder (default: `prompt`).
            negative_prompt, negative_prompt_2 (*optional*): the unconditional prompts for guidance ("" by default).
            height, width (`int`, *optional*): multiples of the patch size (16 or 32); default: the U-Net's
                `sample_size` (the training resolution), or 1024 for a config without one.
            num_inference_steps (`int`, defaults to 30): Euler steps on the grid `1, (N-1)/N, ..., 1/N` (shifted by the
                scheduler's `shift`), then the step to sigma 0.
            sigmas (`list[float]`, *optional*): custom noise levels in (0, 1], decreasing; overrides that grid. As in
                diffusers, `sigmas` win: their length is the number of steps (a different `num_inference_steps` given
                beside them is ignored, with a warning).
            guidance_scale (`float`, defaults to 7.0): classifier-free guidance on the x0 estimates; `<= 1` disables
                it.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image.
            latents (`torch.Tensor`, *optional*): initial noise of shape (batch, 3, height, width).
            prompt_embeds, pooled_prompt_embeds: precomputed context (batch, 77, 2048) and pooled embedding.
            negative_prompt_embeds, negative_pooled_prompt_embeds: the same for the unconditional branch.
            original_size (`tuple[int, int]`, defaults to (height, width)), crops_coords_top_left (defaults to
                (0, 0)), target_size (defaults to (height, width)): SDXL's size and crop conditioning, used for both
                branches.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (the raw
                [-1, 1] tensor).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the U-Net (e.g. `{"scale": lora_scale}`).
            callback_on_step_end, callback_on_step_end_tensor_inputs: called at the end of each step with the named
                tensors; may return replacements.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        self.check_inputs(
            prompt,
            prompt_2,
            negative_prompt,
            negative_prompt_2,
            height,
            width,
            num_inference_steps,
            sigmas,
            guidance_scale,
            num_images_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            original_size,
            crops_coords_top_left,
            target_size,
            output_type,
            callback_on_step_end_tensor_inputs,
            latents,
            generator,
            callback_on_step_end,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt,
            prompt_2,
            negative_prompt,
            negative_prompt_2,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
        )
        batch_size = prompt_embeds.shape[0]
        latents = self.prepare_latents(batch_size, height, width, device, generator, latents)
        add_time_ids = self.get_time_ids(
            original_size or (height, width), crops_coords_top_left, target_size or (height, width), batch_size, device
        )
        add_text_embeds = pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            # Unconditional first, as in diffusers' SDXL; both branches get the same size conditioning.
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([add_time_ids, add_time_ids])

        own_grid = self.scheduler.config.get("time_grid", "linear") != "linear"  # karras, log-SNR, calibrated
        timesteps, num_inference_steps = retrieve_flow_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas,  # the native grid unless the scheduler has its own
            default_sigmas=None if sigmas is not None or own_grid
            else np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps),
        )
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        with self.progress_bar(total=progress_total(self.scheduler, timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = current_sigma(self.scheduler, t)
                model_input = latents.to(self.unet.dtype)
                if self.do_classifier_free_guidance:
                    model_input = torch.cat([model_input, model_input])
                x0 = self.unet(
                    model_input,
                    t.float().expand(model_input.shape[0]),
                    encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_ids},
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0].float()
                if self.do_classifier_free_guidance:
                    x0_uncond, x0_cond = x0.chunk(2)
                    x0 = x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)
                prediction = self.x0_to_prediction(x0, latents, sigma)
                step_begins = starts_a_step(self.scheduler)
                latents = self.scheduler.step(prediction, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = validation.callback_outputs(callback_on_step_end(self, i, t, callback_kwargs))
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)
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
