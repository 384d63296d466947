"""Pixel-space SDXL: the SDXL U-Net body on patch features of the raw image, no VAE, for diffusers.

The architecture reproduces upstream pixel-space SDXL (github.com/kohya-ss/pixel-space-sdxl) exactly, so that its
checkpoints and the weights of any SDXL model convert (see `pixel_diffusers.conversion.pixel_sdxl`):

* a patch encoder turns the image into features at the SDXL level that matches the patch size: patch 16 gives a
  64x64 grid for 1024 px (SDXL's second level, 640 channels), patch 32 a 32x32 grid (the third level, 1280
  channels). The encoder stands in for the dropped first stage, so it emits the channels of the level above (320 or
  640) and the body's first kept block widens them, exactly as in SDXL;
* the body is the sub-graph of SDXL's U-Net from that level down, built from diffusers' own blocks
  (`CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`); the last kept up block has no upsampler.
  The body keeps diffusers' key names (`down_blocks.1.*` is SDXL's `down_blocks.1.*`), so the kept part of a
  diffusers SDXL U-Net state dict loads unchanged;
* a patch decoder maps the body output back to patches, un-patchified into the x0 estimate in pixel space.

`encoder_decoder_type="conv"` (patch 32 only) replaces the 1x1 patch coders by upstream's U-shaped CNN with long skips
at every resolution from 1024 down to 32, whose time-conditioned blocks share the body's embedding.

Time and prediction follow the package conventions at the edges of `forward`: the model takes diffusers timesteps
(`sigma * 1000`, sigma 1 = pure noise) and feeds SDXL's embedding the native `sigma * 999`; it returns its native
prediction, the clean image x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale

from ...loading import StrictModelMixin
from ...loaders import FromUpstreamSingleFileMixin

__all__ = ["PIXEL_SDXL_PRESETS", "PixelSDXLUNet2DConditionModel", "PixelSDXLUNetOutput"]

PATCH_SIZES = (16, 32)
ENCODER_DECODER_TYPES = ("default", "conv")

# Upstream's two configurations (`base_resolution` 64 and 32) and its conv encoder/decoder, plus a tiny one for tests.
PIXEL_SDXL_PRESETS: dict[str, dict] = {
    "patch16": {},
    "patch32": {"patch_size": 32, "patch_hidden_channels": 768, "num_patch_res_blocks": 4},
    "patch32_conv": {"patch_size": 32, "encoder_decoder_type": "conv"},
    "for_testing": {
        "block_out_channels": (32, 64, 128),
        "transformer_layers_per_block": (1, 1, 2),
        "num_attention_heads": (1, 2, 4),
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "norm_num_groups": 8,
        "patch_hidden_channels": 64,
        "num_patch_res_blocks": 1,
        "conv_encoder_channels": (8, 16, 16, 16, 32),
        "conv_decoder_channels": (32, 16, 16, 16, 16),
    },
}


@dataclass
class PixelSDXLUNetOutput(BaseOutput):
    """Output of `PixelSDXLUNet2DConditionModel`.

    Args:
        sample: (B, 3, H, W) the predicted clean image x0 in [-1, 1].
    """

    sample: torch.Tensor


class PixelSDXLResidualConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> SiLU -> conv3x3 -> GroupNorm, then SiLU(h + x): the activation follows the residual
    add (upstream's ResidualConvBlock)."""

    def __init__(self, channels: int, hidden_channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1)
        self.norm1 = nn.GroupNorm(groups, hidden_channels)
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + x)


class PixelSDXLPatchCoder(nn.Module):
    """Upstream's patch encoder / decoder on the patch grid: Conv1x1 -> GroupNorm -> SiLU -> n residual blocks ->
    Conv1x1, kept as one `nn.Sequential` named `net` (the upstream key layout `net.{i}`)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, num_blocks: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.GroupNorm(groups, hidden_channels),
            nn.SiLU(),
            *[PixelSDXLResidualConvBlock(hidden_channels, hidden_channels, groups) for _ in range(num_blocks)],
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            if torch.is_grad_enabled() and self.gradient_checkpointing and isinstance(layer, PixelSDXLResidualConvBlock):
                x = self._gradient_checkpointing_func(layer, x)
            else:
                x = layer(x)
        return x


def _norm_act(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU())


class PixelSDXLConvEncoder(nn.Module):
    """Upstream's ConvEncoder32: a 7x7 stem, then five stride-2 stages (conv + GroupNorm + SiLU, then blocks) down to
    the 32x32 grid of a 1024 px image, and a final conv3x3. The first three stages end in a residual conv block, the
    last two in 2 and 3 time-conditioned `ResnetBlock2D`s. Returns the features and the six skips (stem and each stage).

    As upstream, the stem and the first stage normalise with `groups / 4` and `groups / 2` groups.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        widths = (*channels, out_channels)  # stem, then the five stages
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=7, padding=3)
        self.norm_in = _norm_act(widths[0], groups // 4)
        self.downsamplers = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for stage, (width_in, width) in enumerate(zip(widths[:-1], widths[1:])):
            self.downsamplers.append(
                nn.Sequential(
                    nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1),
                    *_norm_act(width, groups // 2 if stage == 0 else groups),
                )
            )
            if stage < 3:
                self.blocks.append(nn.ModuleList([PixelSDXLResidualConvBlock(width, width, groups)]))
            else:
                self.blocks.append(
                    nn.ModuleList(
                        [
                            ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=groups, eps=eps)
                            for _ in range(stage - 1)
                        ]
                    )
                )
        self.conv_out = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.norm_in(self.conv_in(x))
        skips = [x]
        for downsample, blocks in zip(self.downsamplers, self.blocks):
            x = downsample(x)
            for block in blocks:
                args = (x, temb) if isinstance(block, ResnetBlock2D) else (x,)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    x = self._gradient_checkpointing_func(block, *args)
                else:
                    x = block(*args)
            skips.append(x)
        return self.conv_out(x), skips


class PixelSDXLConvDecoder(nn.Module):
    """Upstream's ConvDecoder32: concatenate the body output with the deepest skip, conv3x3 + GroupNorm + SiLU and two
    `ResnetBlock2D`s; then five times bilinear x2 upsampling, concatenation of the next skip, conv3x3 + GroupNorm +
    SiLU and blocks (two `ResnetBlock2D`s at the first, one residual conv block after); finally conv3x3, GroupNorm,
    SiLU and a conv3x3 to RGB."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: tuple[int, ...],
        channels: tuple[int, ...],
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
    ):
        super().__init__()
        # skip_channels: the encoder's skips, shallow to deep; widths: the decoder's stage widths, deep to shallow.
        widths = (skip_channels[-1], *channels)
        skips = tuple(reversed(skip_channels))
        self.fuse_convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        previous = in_channels
        for stage, (skip, width) in enumerate(zip(skips, widths)):
            self.fuse_convs.append(
                nn.Sequential(nn.Conv2d(previous + skip, width, kernel_size=3, padding=1), *_norm_act(width, groups))
            )
            if stage < 2:
                self.blocks.append(
                    nn.ModuleList(
                        [
                            ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=groups, eps=eps)
                            for _ in range(2)
                        ]
                    )
                )
            else:
                self.blocks.append(nn.ModuleList([PixelSDXLResidualConvBlock(width, width, groups)]))
            previous = width
        self.conv_norm_out = nn.Sequential(nn.Conv2d(previous, previous, kernel_size=3, padding=1), *_norm_act(previous, groups))
        self.conv_out = nn.Conv2d(previous, out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for stage, (fuse, blocks, skip) in enumerate(zip(self.fuse_convs, self.blocks, reversed(skips))):
            if stage > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, skip], dim=1))
            for block in blocks:
                args = (x, temb) if isinstance(block, ResnetBlock2D) else (x,)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    x = self._gradient_checkpointing_func(block, *args)
                else:
                    x = block(*args)
        return self.conv_out(self.conv_norm_out(x))


class PixelSDXLUNet2DConditionModel(StrictModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin, FromUpstreamSingleFileMixin):
    r"""Pixel-space SDXL U-Net: patch encoder, the SDXL U-Net body below the patch grid's level, patch decoder.

    Args:
        patch_size: 16 (the body starts at SDXL's second level) or 32 (the third level).
        in_channels: image channels (3); the output has as many.
        encoder_decoder_type: "default" (1x1 patch encoder/decoder with residual conv blocks) or "conv" (upstream's
            U-shaped CNN; patch 32 only).
        block_out_channels, layers_per_block, transformer_layers_per_block, num_attention_heads, cross_attention_dim,
            addition_time_embed_dim, projection_class_embeddings_input_dim, norm_num_groups, norm_eps,
            use_linear_projection: the SDXL U-Net's own config (diffusers' names and SDXL's values); only the levels
            from the patch grid's down are built. `num_attention_heads` is the head count per level (SDXL's diffusers
            config calls it `attention_head_dim`).
        patch_hidden_channels, num_patch_res_blocks: width and depth of the default patch encoder/decoder (upstream:
            512 and 3 for patch 16, 768 and 4 for patch 32).
        conv_encoder_channels: the conv encoder's stem and first four stage widths (its last stage has the body's input
            width); conv_decoder_channels: the conv decoder's widths after its first stage, deep to shallow.
        sample_size: the image side the model was trained at, which `PixelSDXLPipeline` generates by default (the
            model takes any multiple of the patch grid); None when not recorded.

    Parameter counts of the presets (`from_preset`): "patch16" 2,576,760,896 (patch encoder 14,723,904, decoder
    14,888,192, body 2,547,148,800), "patch32" 2,460,812,672 (encoder 45,339,520, decoder 45,833,472, body
    2,369,639,680), "patch32_conv" 2,444,639,363 (conv encoder 36,207,328, conv decoder 38,792,355). The body is
    exactly the matching part of SDXL's 2,567,463,684-parameter U-Net, under the same names.

    Initialisation: PyTorch's and diffusers' defaults everywhere (upstream does the same; the patch coders start fresh
    when converting from a latent SDXL).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm", "time_embedding", "add_embedding"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        encoder_decoder_type: str = "default",
        block_out_channels: tuple[int, ...] = (320, 640, 1280),
        layers_per_block: int = 2,
        transformer_layers_per_block: tuple[int, ...] = (1, 2, 10),
        num_attention_heads: tuple[int, ...] = (5, 10, 20),
        cross_attention_dim: int = 2048,
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 2816,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        use_linear_projection: bool = True,
        patch_hidden_channels: int = 512,
        num_patch_res_blocks: int = 3,
        conv_encoder_channels: tuple[int, ...] = (32, 64, 128, 160, 320),
        conv_decoder_channels: tuple[int, ...] = (320, 256, 160, 128, 64),
        sample_size: int | None = None,
    ):
        super().__init__()
        _validate_config(self.config)
        channels = tuple(block_out_channels)
        levels = len(channels)
        first = self.first_level
        time_embed_dim = channels[0] * 4

        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)
        self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        block_kwargs = {
            "temb_channels": time_embed_dim,
            "resnet_eps": norm_eps,
            "resnet_groups": norm_num_groups,
            "cross_attention_dim": cross_attention_dim,
            "use_linear_projection": use_linear_projection,
        }
        # Keyed by SDXL level, so that the keys are those of diffusers' SDXL U-Net (`down_blocks.1.*`, ...).
        self.down_blocks = nn.ModuleDict(
            {
                str(level): CrossAttnDownBlock2D(
                    in_channels=channels[level - 1],
                    out_channels=channels[level],
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers_per_block[level],
                    num_attention_heads=num_attention_heads[level],
                    add_downsample=level < levels - 1,
                    **block_kwargs,
                )
                for level in range(first, levels)
            }
        )
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=channels[-1],
            transformer_layers_per_block=transformer_layers_per_block[-1],
            num_attention_heads=num_attention_heads[-1],
            **block_kwargs,
        )
        # Up block i is SDXL's up block i (its level is levels - 1 - i); the last kept one has no upsampler.
        self.up_blocks = nn.ModuleList(
            [
                CrossAttnUpBlock2D(
                    in_channels=channels[level - 1],
                    out_channels=channels[level],
                    prev_output_channel=channels[min(level + 1, levels - 1)],
                    num_layers=layers_per_block + 1,
                    transformer_layers_per_block=transformer_layers_per_block[level],
                    num_attention_heads=num_attention_heads[level],
                    add_upsample=level > first,
                    resolution_idx=levels - 1 - level,
                    **block_kwargs,
                )
                for level in reversed(range(first, levels))
            ]
        )

        encoder_width, decoder_width = channels[first - 1], channels[first]
        if encoder_decoder_type == "default":
            patch_channels = in_channels * patch_size * patch_size
            self.patch_encoder = PixelSDXLPatchCoder(
                patch_channels, patch_hidden_channels, encoder_width, num_patch_res_blocks, norm_num_groups
            )
            self.patch_decoder = PixelSDXLPatchCoder(
                decoder_width, patch_hidden_channels, patch_channels, num_patch_res_blocks, norm_num_groups
            )
        else:
            self.conv_encoder = PixelSDXLConvEncoder(
                in_channels, tuple(conv_encoder_channels), encoder_width, time_embed_dim, norm_num_groups, norm_eps
            )
            self.conv_decoder = PixelSDXLConvDecoder(
                decoder_width,
                (*conv_encoder_channels, encoder_width),
                tuple(conv_decoder_channels),
                in_channels,
                time_embed_dim,
                norm_num_groups,
                norm_eps,
            )
        self.gradient_checkpointing = False

    @classmethod
    def _convert_single_file(cls, path: str, **converter_kwargs) -> "PixelSDXLUNet2DConditionModel":
        """`from_single_file`: an SGM-layout SDXL or upstream pixel-SDXL file through `convert_pixel_sdxl_checkpoint`
        (`unet_config`, `seed`); its U-Net."""
        from ...conversion.pixel_sdxl import convert_pixel_sdxl_checkpoint

        return convert_pixel_sdxl_checkpoint(path, **converter_kwargs)[0]["unet"]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PixelSDXLUNet2DConditionModel":
        """A randomly initialised model of a named configuration: "patch16", "patch32", "patch32_conv" (upstream's)
        or "for_testing" (tiny). `overrides` replace config fields."""
        if name not in PIXEL_SDXL_PRESETS:
            raise ValueError(f"Unknown pixel-SDXL preset name={name!r}; allowed values: {sorted(PIXEL_SDXL_PRESETS)}.")
        return cls(**{**PIXEL_SDXL_PRESETS[name], **overrides})

    @property
    def first_level(self) -> int:
        """The SDXL level whose resolution the patch grid has (1 for patch 16, 2 for patch 32; the VAE's factor is 8)."""
        return int(math.log2(self.config.patch_size)) - 3

    def body_parameter_names(self) -> list[str]:
        """Names of the parameters taken from SDXL's U-Net (time and size embeddings included)."""
        prefixes = ("time_embedding.", "add_embedding.", "down_blocks.", "mid_block.", "up_blocks.")
        return [name for name, _ in self.named_parameters() if name.startswith(prefixes)]

    def get_embedding(self, timestep: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL's conditioning embedding `time_embedding(t) + add_embedding([pooled text, size/crop features])`.

        `timestep` is in diffusers units (`sigma * 1000`); SDXL's native `sigma * 999` is embedded.
        """
        dtype = self.time_embedding.linear_1.weight.dtype
        t_emb = self.time_proj(timestep.to(torch.float32) * 0.999).to(dtype)
        time_embeds = self.add_time_proj(time_ids.flatten().to(torch.float32)).reshape(time_ids.shape[0], -1)
        added = torch.cat([text_embeds.to(dtype), time_embeds.to(dtype)], dim=-1)
        return self.time_embedding(t_emb) + self.add_embedding(added)

    def forward_body(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The SDXL body on encoder features (B, C_level-1, h, w): the skip stack starts with its input, as in SDXL,
        where that input is the output of the dropped level's downsampler."""
        context = {"encoder_hidden_states": encoder_hidden_states, "cross_attention_kwargs": cross_attention_kwargs}
        residuals = (hidden_states,)
        for block in self.down_blocks.values():
            hidden_states, block_residuals = block(hidden_states, temb=temb, **context)
            residuals += block_residuals
        hidden_states = self.mid_block(hidden_states, temb, **context)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_residuals, residuals = residuals[-count:], residuals[:-count]
            # The explicit size lets odd grids round-trip the downsampler; for even ones it is SDXL's exact x2.
            upsample_size = residuals[-1].shape[2:] if residuals else None
            hidden_states = block(hidden_states, block_residuals, temb=temb, upsample_size=upsample_size, **context)
        return hidden_states

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> PixelSDXLUNetOutput | tuple:
        r"""Predict the clean image x0 from a noisy one.

        Args:
            sample: (B, 3, H, W) noisy image `(1 - sigma) * x0 + sigma * noise`, x0 in [-1, 1]; H and W multiples of
                `patch_size`.
            timestep: (B,) or scalar, `sigma * 1000` (1000 = pure noise).
            encoder_hidden_states: (B, T, cross_attention_dim) the two CLIP encoders' penultimate hidden states,
                concatenated on the channel axis.
            added_cond_kwargs: `{"text_embeds": (B, pooled width), "time_ids": (B, 6)}` as in diffusers' SDXL: the
                second encoder's pooled projection and (original h, w, crop top, left, target h, w).
            cross_attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: return a `PixelSDXLUNetOutput` instead of a tuple.
        """
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"sample must have shape (B, {config.in_channels}, H, W); got {tuple(sample.shape)}.")
        batch, _, height, width = sample.shape
        p = config.patch_size
        if height % p or width % p:
            raise ValueError(f"sample height and width must be multiples of patch_size={p}; got {height}x{width}.")
        if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= added_cond_kwargs.keys():
            raise ValueError("added_cond_kwargs must be a dict with 'text_embeds' and 'time_ids' (as for SDXL).")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        if time_ids.shape != (batch, 6) or text_embeds.ndim != 2 or text_embeds.shape[0] != batch:
            raise ValueError(
                f"added_cond_kwargs must hold text_embeds (B, D) and time_ids ({batch}, 6); got "
                f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}."
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},); got {tuple(timestep.shape)}.")

        dtype = self.time_embedding.linear_1.weight.dtype
        temb = self.get_embedding(timestep, text_embeds, time_ids)
        context = encoder_hidden_states.to(dtype)
        x = sample.to(dtype)
        if config.encoder_decoder_type == "default":
            hidden_states = self.patch_encoder(F.pixel_unshuffle(x, p))
            hidden_states = self.forward_body(hidden_states, temb, context, cross_attention_kwargs)
            x0 = F.pixel_shuffle(self.patch_decoder(hidden_states), p)
        else:
            hidden_states, skips = self.conv_encoder(x, temb)
            hidden_states = self.forward_body(hidden_states, temb, context, cross_attention_kwargs)
            x0 = self.conv_decoder(hidden_states, temb, skips)
        if not return_dict:
            return (x0,)
        return PixelSDXLUNetOutput(sample=x0)


def _validate_config(config) -> None:
    size = config.get("sample_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"sample_size must be None or a positive integer image side; got {size!r}.")
    if config.patch_size not in PATCH_SIZES:
        raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {config.patch_size!r}.")
    if config.encoder_decoder_type not in ENCODER_DECODER_TYPES:
        raise ValueError(
            f"encoder_decoder_type must be one of {ENCODER_DECODER_TYPES}, got {config.encoder_decoder_type!r}."
        )
    if config.encoder_decoder_type == "conv" and config.patch_size != 32:
        raise ValueError("encoder_decoder_type='conv' needs patch_size=32 (upstream's conv encoder ends at 1/32).")
    levels = len(config.block_out_channels)
    first = int(math.log2(config.patch_size)) - 3
    if levels <= first:
        raise ValueError(
            f"block_out_channels needs more than {first} levels for patch_size={config.patch_size}, got "
            f"{tuple(config.block_out_channels)}."
        )
    for name in ("transformer_layers_per_block", "num_attention_heads"):
        if len(getattr(config, name)) != levels:
            raise ValueError(f"{name} must have one entry per level ({levels}), got {tuple(getattr(config, name))}.")
    for name in ("conv_encoder_channels", "conv_decoder_channels"):
        if len(getattr(config, name)) != 5:
            raise ValueError(f"{name} must have 5 entries, got {tuple(getattr(config, name))}.")
    expected = 6 * config.addition_time_embed_dim
    if config.projection_class_embeddings_input_dim <= expected:
        raise ValueError(
            f"projection_class_embeddings_input_dim ({config.projection_class_embeddings_input_dim}) must exceed the "
            f"6 * addition_time_embed_dim = {expected} size features (the pooled text embedding makes up the rest)."
        )
