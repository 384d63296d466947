"""PixelHDM: a pixel-space dual-path diffusion transformer (patch path + pixel path), for diffusers.

The architecture reproduces upstream PixelHDM (github.com/yetrtyog-creator/PixelHDM, CC0) exactly, so that converted
upstream checkpoints give the same outputs (see `pixel_diffusers.conversion.pixelhdm`):

* patch path: a bottleneck patch embedding of each 16x16 patch (flattened in (row, column, channel) order), prepended
  text tokens in one joint sequence (Lumina2-style single stream), `num_patch_layers` sandwich-norm blocks with
  token-wise AdaLN from the time embedding, gated grouped-query attention with per-head QK RMSNorm and a 3-axis
  multimodal RoPE;
* pixel path: a per-pixel embedding of the same noisy input, `num_pixel_layers` blocks with pixel-wise AdaLN driven by
  `semantic tokens + time embedding + pooled text`, token compaction (compress each patch's pixels into one token,
  attend over the patch tokens, expand back) and a per-pixel SwiGLU;
* output: per-pixel RMSNorm and a linear head, un-patchified to an image.

Time and prediction follow the package conventions at the edges of `forward`: the model takes diffusers timesteps
(`sigma * 1000`, sigma 1 = pure noise) and converts them to PixelHDM's native time `t = 1 - sigma` (t = 1 is clean);
it returns PixelHDM's native velocity `x0 - noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models import attention_dispatch
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale

from ...loading import StrictModelMixin
from ...loaders import FromUpstreamSingleFileMixin

__all__ = ["PIXELHDM_PRESETS", "PixelHDMTransformer2DModel", "PixelHDMTransformerOutput"]


# Upstream factory configurations (`src/config/pixelhdm_factories.py`), in our config names. `small` and `large` use
# `text_embed_dim=1024` so that they work with Qwen3-0.6B; upstream gives them text width 512/1152 without any
# projection, which cannot work with that encoder. Here a `text_proj` Linear(1024 -> hidden_size) is added instead
# (+524,800 parameters for small, +1,180,800 for large).
PIXELHDM_PRESETS: dict[str, dict] = {
    "default": {},
    "small": {
        "hidden_size": 512,
        "num_patch_layers": 8,
        "num_pixel_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "attention_head_dim": 64,
        "text_embed_dim": 1024,
    },
    "large": {
        "hidden_size": 1152,
        "num_patch_layers": 26,
        "num_pixel_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "attention_head_dim": 72,
        "rope_axes_dim": (16, 28, 28),
        "text_embed_dim": 1024,
    },
    "for_testing": {
        "hidden_size": 256,
        "pixel_dim": 8,
        "num_patch_layers": 2,
        "num_pixel_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_head_dim": 64,
        "mlp_ratio": 2.0,
        "bottleneck_dim": 64,
        "text_embed_dim": 256,
        "repa_align_layer": 1,
    },
}

# Tokens per chunk in the pixel path's token-local work: keeps the large per-pixel intermediates (p^2 x 6d AdaLN
# parameters per token) small enough to be reused by the allocator instead of being mapped afresh at every call.
_PIXEL_CHUNK_TOKENS = 256


@dataclass
class PixelHDMTransformerOutput(BaseOutput):
    """Output of `PixelHDMTransformer2DModel`.

    Args:
        sample: (B, C, H, W) predicted velocity `x0 - noise`.
        repa_features: (B, L, hidden_size) image tokens after patch block `repa_align_layer - 1` (no norm); only with
            `return_aux=True`.
        gamma_l2: scalar, sum over pixel blocks of mean(gamma1^2) + mean(gamma2^2) of the raw pixel-wise AdaLN scales;
            only with `return_aux=True`.
    """

    sample: torch.Tensor
    repa_features: torch.Tensor | None = None
    gamma_l2: torch.Tensor | None = None


def _rope_angles(positions: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation angles (..., head_dim // 2) in float32 for 3-axis position ids (..., 3).

    Each axis owns a contiguous block of the head dimension, rotated on interleaved pairs with angle
    pos * theta^(-2i / d_axis). Computed on the fly in float32, so a bf16 model keeps exact angles.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
        angles.append(positions[..., axis : axis + 1].to(torch.float32) * freqs)
    return torch.cat(angles, dim=-1)


def _patch_grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (float32) of each of the h * w patch tokens, in row-major order."""
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return rows, cols


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers' `apply_rotary_emb` takes one table for the whole batch; PixelHDM needs per-sample tables (image
    # tokens sit at the per-sample text length on axis 0), so the interleaved-pair rotation is written here.
    # x: (B, S, H, D); cos, sin: (B or 1, S, 1, D // 2), float32. Computed in at least float32.
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def _backend_supports_gqa(backend) -> bool:
    """Whether the attention backend takes `enable_gqa` (the dispatcher forwards it only on torch >= 2.5)."""
    if not getattr(attention_dispatch, "_CAN_USE_FLEX_ATTN", True):
        return False
    name = backend if backend is not None else _AttentionBackendRegistry.get_active_backend()[0]
    return "enable_gqa" in _AttentionBackendRegistry._supported_arg_names.get(name, ())


class PixelHDMAttnProcessor:
    """Gated grouped-query attention: QK RMSNorm, RoPE, attention through diffusers' dispatcher, per-head sigmoid gate
    computed from the attention input, output projection."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "PixelHDMAttention",
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn.fused_projections:  # after `fuse_qkv_projections()`: one matmul for q, k and v
            kv = attn.kv_heads * attn.head_dim
            query, key, value = attn.to_qkv(hidden_states).split([attn.heads * attn.head_dim, kv, kv], dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.kv_heads, -1))
        value = value.unflatten(-1, (attn.kv_heads, -1))

        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if rotary_emb is not None:
            query = _apply_rope(query, *rotary_emb)
            key = _apply_rope(key, *rotary_emb)

        enable_gqa = False
        if attn.kv_heads != attn.heads:
            if _backend_supports_gqa(self._attention_backend):
                enable_gqa = True
            else:
                # Query head h reads key/value head h // (heads / kv_heads).
                key = key.repeat_interleave(attn.heads // attn.kv_heads, dim=2)
                value = value.repeat_interleave(attn.heads // attn.kv_heads, dim=2)

        hidden = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            enable_gqa=enable_gqa,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        gate = torch.sigmoid(attn.to_gate(hidden_states))
        hidden = hidden * gate.unsqueeze(-1).to(hidden.dtype)
        return attn.to_out[0](hidden.flatten(2, 3))


class PixelHDMAttention(nn.Module, AttentionModuleMixin):
    """Gated multi-head self-attention with grouped key/value heads (no biases)."""

    _default_processor_cls = PixelHDMAttnProcessor
    _available_processors = [PixelHDMAttnProcessor]

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.use_bias = False  # read by diffusers' `fuse_projections`
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_gate = nn.Linear(dim, heads, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim, bias=False)])
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states, rotary_emb=None, attention_mask=None) -> torch.Tensor:
        return self.processor(self, hidden_states, rotary_emb=rotary_emb, attention_mask=attention_mask)


class PixelHDMFeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner_dim, bias=False)
        self.up_proj = nn.Linear(dim, inner_dim, bias=False)
        self.down_proj = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class PixelHDMPatchEmbed(nn.Module):
    """Bottleneck patch embedding: Linear(p*p*C -> b) -> SiLU -> Linear(b -> D), no biases."""

    def __init__(self, in_features: int, bottleneck_dim: int, dim: int):
        super().__init__()
        self.proj_down = nn.Linear(in_features, bottleneck_dim, bias=False)
        self.proj_up = nn.Linear(bottleneck_dim, dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj_up(F.silu(self.proj_down(patches)))


class PixelHDMPatchBlock(nn.Module):
    """Patch-level block: sandwich norms, token AdaLN `gamma * norm(x) + beta`, gated attention and SwiGLU, residuals
    scaled by `alpha / sqrt(2 * num_patch_layers)`."""

    def __init__(self, dim, heads, kv_heads, head_dim, mlp_ratio, eps, residual_scale):
        super().__init__()
        self.residual_scale = residual_scale
        self.adaln = nn.Linear(dim, 6 * dim)  # rows: gamma1, beta1, alpha1, gamma2, beta2, alpha2
        self.pre_attn_norm = RMSNorm(dim, eps=eps)
        self.attn = PixelHDMAttention(dim, heads, kv_heads, head_dim, eps)
        self.post_attn_norm = RMSNorm(dim, eps=eps)
        self.pre_mlp_norm = RMSNorm(dim, eps=eps)
        self.ff = PixelHDMFeedForward(dim, int(dim * mlp_ratio))
        self.post_mlp_norm = RMSNorm(dim, eps=eps)

    def forward(self, hidden_states, temb, rotary_emb, attention_mask):
        # temb: SiLU(time embedding), (B, D)
        gamma1, beta1, alpha1, gamma2, beta2, alpha2 = self.adaln(temb).unsqueeze(1).chunk(6, dim=-1)
        h = torch.addcmul(beta1, self.pre_attn_norm(hidden_states), gamma1)
        h = self.post_attn_norm(self.attn(h, rotary_emb=rotary_emb, attention_mask=attention_mask))
        hidden_states = torch.addcmul(hidden_states, h, alpha1 * self.residual_scale)
        h = torch.addcmul(beta2, self.pre_mlp_norm(hidden_states), gamma2)
        h = self.post_mlp_norm(self.ff(h))
        return torch.addcmul(hidden_states, h, alpha2 * self.residual_scale)


class PixelHDMPixelAdaLN(nn.Module):
    """Pixel-wise AdaLN: each pixel of each patch gets its own 6 modulation vectors,
    `linear(SiLU(cond_expand(s_cond)))`, and both modulations share one RMSNorm(pixel_dim)."""

    def __init__(self, dim, pixel_dim, pixels_per_patch, eps):
        super().__init__()
        self.cond_expand = nn.Linear(dim, pixels_per_patch * pixel_dim, bias=False)
        self.linear = nn.Linear(pixel_dim, 6 * pixel_dim)  # rows: gamma1, beta1, alpha1, gamma2, beta2, alpha2
        self.norm = RMSNorm(pixel_dim, eps=eps)

    def modulate(self, x, gamma, beta):
        normed = self.norm(x)
        return torch.addcmul(beta, normed, gamma).add_(normed)  # (1 + gamma) * norm(x) + beta


class PixelHDMTokenCompaction(nn.Module):
    """Compress each patch's p*p*d pixel features to one token, attend over the L patch tokens, expand back (no
    internal residual)."""

    def __init__(self, dim, pixel_dim, pixels_per_patch, heads, kv_heads, head_dim, eps):
        super().__init__()
        self.compress = nn.Linear(pixels_per_patch * pixel_dim, dim, bias=False)
        self.norm_in = RMSNorm(dim, eps=eps)
        self.attn = PixelHDMAttention(dim, heads, kv_heads, head_dim, eps)
        self.norm_out = RMSNorm(dim, eps=eps)
        self.expand = nn.Linear(dim, pixels_per_patch * pixel_dim, bias=False)


class PixelHDMPixelBlock(nn.Module):
    """Pixel-level block: pixel-wise AdaLN `(1 + gamma) * norm(x) + beta`, token compaction and a per-pixel SwiGLU,
    residuals scaled by `alpha / sqrt(num_pixel_layers)`."""

    def __init__(self, dim, pixel_dim, pixels_per_patch, heads, kv_heads, head_dim, mlp_ratio, eps, residual_scale):
        super().__init__()
        self.residual_scale = residual_scale
        self.adaln = PixelHDMPixelAdaLN(dim, pixel_dim, pixels_per_patch, eps)
        self.compaction = PixelHDMTokenCompaction(dim, pixel_dim, pixels_per_patch, heads, kv_heads, head_dim, eps)
        self.ff = PixelHDMFeedForward(pixel_dim, int(pixel_dim * mlp_ratio))

    def _adaln_params(self, cond_chunk: torch.Tensor, first: bool) -> tuple[torch.Tensor, ...]:
        """(gamma1, beta1) if `first` else (alpha1, gamma2, beta2, alpha2) for a chunk of SiLU(cond_expand(s))."""
        d = cond_chunk.shape[-1]
        rows = slice(0, 2 * d) if first else slice(2 * d, 6 * d)
        linear = self.adaln.linear
        plain = type(linear) is nn.Linear and getattr(linear, "_diffusers_hook", None) is None
        plain = plain and getattr(linear, "_hf_hook", None) is None  # accelerate offload hooks own the weights
        if plain and not linear._forward_hooks and not linear._forward_pre_hooks:
            params = F.linear(cond_chunk, linear.weight[rows], linear.bias[rows])  # only the rows needed now
        else:  # wrapped (LoRA, casting or offload hooks): go through the module
            params = linear(cond_chunk)[..., rows]
        return params.chunk(2 if first else 4, dim=-1)

    def forward(self, hidden_states, cond, rotary_emb, compute_gamma_l2: bool = False):
        """hidden_states: (B, L, P, d) pixel features; cond: (B, L, D) semantic condition.

        The token-local work runs in chunks of tokens (only the compaction attention needs all tokens at once), so the
        per-pixel AdaLN parameters are never materialised for the whole image. Returns (hidden_states, gamma_l2).
        """
        batch, length, pixels, d = hidden_states.shape
        step = _PIXEL_CHUNK_TOKENS
        x = hidden_states.reshape(batch * length, pixels, d)
        cond = cond.reshape(batch * length, -1)
        compact = self.compaction
        gamma_sq = []

        conds, tokens = [], []
        for start in range(0, batch * length, step):
            cond_chunk = F.silu(self.adaln.cond_expand(cond[start : start + step])).unflatten(-1, (pixels, d))
            gamma1, beta1 = self._adaln_params(cond_chunk, first=True)
            if compute_gamma_l2:
                gamma_sq.append(gamma1.float().square().sum())
            h = self.adaln.modulate(x[start : start + step], gamma1, beta1)
            tokens.append(compact.compress(h.flatten(1)))
            conds.append(cond_chunk)
        tokens = torch.cat(tokens).unflatten(0, (batch, length))
        tokens = compact.norm_out(compact.attn(compact.norm_in(tokens), rotary_emb=rotary_emb)).flatten(0, 1)

        out = []
        for index, start in enumerate(range(0, batch * length, step)):
            alpha1, gamma2, beta2, alpha2 = self._adaln_params(conds[index], first=False)
            if compute_gamma_l2:
                gamma_sq.append(gamma2.float().square().sum())
            h = compact.expand(tokens[start : start + step]).unflatten(-1, (pixels, d))
            xc = torch.addcmul(x[start : start + step], h, alpha1 * self.residual_scale)
            h = self.ff(self.adaln.modulate(xc, gamma2, beta2))
            out.append(torch.addcmul(xc, h, alpha2 * self.residual_scale))
        hidden_states = torch.cat(out).view(batch, length, pixels, d)

        gamma_l2 = None
        if compute_gamma_l2:
            # mean(gamma1^2) + mean(gamma2^2): both have batch * length * pixels * d entries.
            gamma_l2 = torch.stack(gamma_sq).sum() / (batch * length * pixels * d)
        return hidden_states, gamma_l2


class PixelHDMTransformer2DModel(StrictModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin, FromUpstreamSingleFileMixin):
    r"""PixelHDM dual-path pixel-space diffusion transformer.

    Args:
        patch_size: side of a square patch (16).
        in_channels: image channels (3); the output has as many.
        hidden_size: width D of the patch path (and of the compaction tokens).
        pixel_dim: width d of each pixel's features in the pixel path.
        num_patch_layers: patch-level blocks N (residual scale 1/sqrt(2N)).
        num_pixel_layers: pixel-level blocks M (residual scale 1/sqrt(M)).
        num_attention_heads: query heads; `hidden_size` must equal `num_attention_heads * attention_head_dim`.
        num_key_value_heads: key/value heads (grouped-query attention).
        attention_head_dim: width of one head.
        mlp_ratio: SwiGLU inner width as a multiple of the block width (both paths).
        bottleneck_dim: width of the patch embedding bottleneck (upstream default p*p/4 = 64; 256 before 2026-01-26).
        text_embed_dim: width of the text encoder's hidden states and pooled embedding. When it differs from
            `hidden_size`, a `text_proj` Linear(text_embed_dim -> hidden_size, with bias) is applied to both; upstream
            has no such projection (its `small`/`large` configurations cannot work with Qwen3-0.6B's 1024-wide output).
        rope_axes_dim: head-dimension split of the 3-axis RoPE (sequence, patch row, patch column); must sum to
            `attention_head_dim`, each part even.
        rope_theta: RoPE frequency base.
        repa_align_layer: 1-based patch block whose image tokens are returned as REPA features.
        norm_eps: epsilon of every RMSNorm.
        sample_size: the image side the model was trained at, which `PixelHDMPipeline` generates by default (the
            model itself takes any multiple of `patch_size`); None when not recorded.

    Initialisation follows the intended upstream scheme, which deliberately differs from what upstream's code ends up
    with: upstream re-initialises every Linear with xavier after the submodules' own init, which silently overwrites
    the zero-initialised attention gates and the 0.1-gain compaction `expand`. Here gates start at zero (sigmoid 0.5)
    and `expand` uses xavier gain 0.1. Token AdaLN: trunc_normal(0.02) weights, biases gamma = alpha = 1, beta = 0;
    pixel AdaLN: xavier weights, biases gamma = beta = 0, alpha = 1; every other Linear: xavier, zero bias.

    RoPE angles and the sinusoidal time features are computed in float32 on the fly (no buffers), so a bf16 model keeps
    them exact (upstream casts its angle tables to bf16 with the model).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PixelHDMPatchBlock", "PixelHDMPixelBlock"]
    _repeated_blocks = ["PixelHDMPatchBlock", "PixelHDMPixelBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "pixel_embed", "time_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 1024,
        pixel_dim: int = 16,
        num_patch_layers: int = 16,
        num_pixel_layers: int = 4,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        attention_head_dim: int = 64,
        mlp_ratio: float = 3.0,
        bottleneck_dim: int = 64,
        text_embed_dim: int = 1024,
        rope_axes_dim: tuple[int, int, int] = (16, 24, 24),
        rope_theta: float = 10000.0,
        repa_align_layer: int = 8,
        norm_eps: float = 1e-6,
        sample_size: int | None = None,
    ):
        super().__init__()
        # register_to_config has already stored every argument; validate them all in one place.
        _validate_config(**{**self.config, "rope_axes_dim": rope_axes_dim})
        self.rope_axes_dim = tuple(rope_axes_dim)
        pixels_per_patch = patch_size * patch_size

        self.patch_embed = PixelHDMPatchEmbed(pixels_per_patch * in_channels, bottleneck_dim, hidden_size)
        self.pixel_embed = nn.Linear(in_channels, pixel_dim)
        # sin-first features of 1000 * t (t = 1 - sigma), computed in float32 as (t * freq) * 1000 like upstream.
        self.time_proj = Timesteps(256, flip_sin_to_cos=False, downscale_freq_shift=0, scale=1000)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.text_proj = nn.Linear(text_embed_dim, hidden_size) if text_embed_dim != hidden_size else None

        self.patch_blocks = nn.ModuleList(
            [
                PixelHDMPatchBlock(
                    hidden_size,
                    num_attention_heads,
                    num_key_value_heads,
                    attention_head_dim,
                    mlp_ratio,
                    norm_eps,
                    1.0 / math.sqrt(2 * num_patch_layers),
                )
                for _ in range(num_patch_layers)
            ]
        )
        self.pixel_blocks = nn.ModuleList(
            [
                PixelHDMPixelBlock(
                    hidden_size,
                    pixel_dim,
                    pixels_per_patch,
                    num_attention_heads,
                    num_key_value_heads,
                    attention_head_dim,
                    mlp_ratio,
                    norm_eps,
                    1.0 / math.sqrt(num_pixel_layers),
                )
                for _ in range(num_pixel_layers)
            ]
        )
        self.norm_out = RMSNorm(pixel_dim, eps=norm_eps)
        self.proj_out = nn.Linear(pixel_dim, in_channels)

        self.gradient_checkpointing = False
        self._init_weights()

    @classmethod
    def _convert_single_file(cls, path: str, **converter_kwargs) -> "PixelHDMTransformer2DModel":
        """`from_single_file`: an upstream PixelHDM checkpoint through `convert_pixelhdm_checkpoint` (`use_ema`,
        `preset`)."""
        from ...conversion.pixelhdm import convert_pixelhdm_checkpoint

        return convert_pixelhdm_checkpoint(path, **converter_kwargs)[0]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PixelHDMTransformer2DModel":
        """A randomly initialised model of an upstream configuration: "default" (356,364,355 parameters), "small"
        (44,732,019 = upstream's 44,207,219 + a 1024->512 text projection), "large" (677,536,419 = upstream's
        676,355,619 + a 1024->1152 text projection) or "for_testing" (3,942,651). `overrides` replace config fields."""
        if name not in PIXELHDM_PRESETS:
            raise ValueError(f"Unknown PixelHDM preset name={name!r}; allowed values: {sorted(PIXELHDM_PRESETS)}.")
        return cls(**{**PIXELHDM_PRESETS[name], **overrides})

    @torch.no_grad()
    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        dim, d = self.config.hidden_size, self.config.pixel_dim
        for block in self.patch_blocks:
            nn.init.trunc_normal_(block.adaln.weight, std=0.02)
            block.adaln.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]).repeat_interleave(dim))
            nn.init.zeros_(block.attn.to_gate.weight)
        for block in self.pixel_blocks:
            block.adaln.linear.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).repeat_interleave(d))
            nn.init.zeros_(block.compaction.attn.to_gate.weight)
            nn.init.xavier_uniform_(block.compaction.expand.weight, gain=0.1)

    def _joint_rope(self, batch: int, text_len: int, lengths: torch.Tensor | None, h: int, w: int, device):
        """cos/sin (B or 1, T + L, 1, head_dim // 2): text token n at (n, 0, 0), image token (r, c) at
        (len_b, r, c) with len_b the true text length of sample b."""
        rows, cols = _patch_grid(h, w, device)
        text = torch.arange(text_len, device=device, dtype=torch.float32)
        text_ids = torch.stack([text, torch.zeros_like(text), torch.zeros_like(text)], dim=-1)
        if lengths is None:
            start = torch.full_like(rows, float(text_len))
            ids = torch.cat([text_ids, torch.stack([start, rows, cols], dim=-1)])[None]
        else:
            start = lengths.to(torch.float32)[:, None].expand(batch, h * w)
            image_ids = torch.stack([start, rows.expand(batch, -1), cols.expand(batch, -1)], dim=-1)
            ids = torch.cat([text_ids.expand(batch, -1, -1), image_ids], dim=1)
        angles = _rope_angles(ids, self.rope_axes_dim, self.config.rope_theta).unsqueeze(2)
        return angles.cos(), angles.sin()

    def _pixel_rope(self, h: int, w: int, device):
        """cos/sin (1, L, 1, head_dim // 2) for the compaction attention: patch token (r, c) at (0, r, c)."""
        rows, cols = _patch_grid(h, w, device)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)[None]
        angles = _rope_angles(ids, self.rope_axes_dim, self.config.rope_theta).unsqueeze(2)
        return angles.cos(), angles.sin()

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
        return_aux: bool = False,
    ) -> PixelHDMTransformerOutput | tuple:
        r"""Predict the velocity `x0 - noise` of a noisy image.

        Args:
            hidden_states: (B, C, H, W) noisy image `(1 - sigma) * x0 + sigma * noise`, x0 in [-1, 1]; H and W
                multiples of `patch_size`.
            timestep: (B,) or scalar, `sigma * 1000` (1000 = pure noise).
            encoder_hidden_states: (B, T, text_embed_dim) text encoder hidden states, or None for no text.
            encoder_attention_mask: (B, T) 1/True for real tokens, 0/False for padding, or None (all real). Padded
                tokens are masked only as keys; image tokens sit at the true text length in RoPE, so padding does not
                change the image output.
            pooled_projections: (B, text_embed_dim) pooled text embedding added to the pixel-path condition, or None.
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: return a `PixelHDMTransformerOutput` instead of a tuple.
            return_aux: also return the REPA features and the pixel AdaLN gamma L2 term.

        Returns:
            `PixelHDMTransformerOutput`, or `(sample,)` / `(sample, repa_features, gamma_l2)` when `return_dict=False`.
        """
        config = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != config.in_channels:
            raise ValueError(
                f"hidden_states must have shape (B, {config.in_channels}, H, W); got {tuple(hidden_states.shape)}."
            )
        batch, channels, height, width = hidden_states.shape
        p = config.patch_size
        if height % p or width % p:
            raise ValueError(
                f"hidden_states height and width must be multiples of patch_size={p}; got {height}x{width}."
            )
        h, w = height // p, width // p
        length = h * w
        device = hidden_states.device
        dtype = self.patch_embed.proj_down.weight.dtype

        # (B, C, H, W) -> (B, L, p*p, C): patch-major tokens, pixels in (row, col) order, channels last.
        patches = hidden_states.to(dtype).reshape(batch, channels, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(batch, length, p * p, channels)

        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},); got {tuple(timestep.shape)}.")
        t = 1.0 - timestep.to(torch.float32) / 1000.0  # PixelHDM native time, 1 = clean
        temb = self.time_embed(self.time_proj(t).to(dtype))

        x = self.patch_embed(patches.flatten(2))
        text_len, lengths, key_mask = 0, None, None
        if encoder_hidden_states is not None:
            if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or (
                encoder_hidden_states.shape[2] != config.text_embed_dim
            ):
                raise ValueError(
                    f"encoder_hidden_states must have shape ({batch}, T, {config.text_embed_dim}); "
                    f"got {tuple(encoder_hidden_states.shape)}."
                )
            text_len = encoder_hidden_states.shape[1]
            text = encoder_hidden_states.to(dtype)
            if self.text_proj is not None:
                text = self.text_proj(text)
            if encoder_attention_mask is not None:
                if encoder_attention_mask.shape != (batch, text_len):
                    raise ValueError(
                        f"encoder_attention_mask must have shape ({batch}, {text_len}); "
                        f"got {tuple(encoder_attention_mask.shape)}."
                    )
                text_mask = encoder_attention_mask.to(device=device, dtype=torch.bool)
                if not bool(text_mask.all()):
                    lengths = text_mask.sum(dim=1)
                    key_mask = torch.cat([text_mask, text_mask.new_ones(batch, length)], dim=1)[:, None, None, :]
            x = torch.cat([text, x], dim=1)
        elif encoder_attention_mask is not None:
            raise ValueError("encoder_attention_mask was given without encoder_hidden_states.")

        rotary = self._joint_rope(batch, text_len, lengths, h, w, device)
        temb_act = F.silu(temb)
        repa_features = None
        for index, block in enumerate(self.patch_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, temb_act, rotary, key_mask)
            else:
                x = block(x, temb_act, rotary, key_mask)
            if return_aux and index == config.repa_align_layer - 1:
                repa_features = x[:, text_len:]

        cond = x[:, text_len:] + temb[:, None]
        if pooled_projections is not None:
            if pooled_projections.shape != (batch, config.text_embed_dim):
                raise ValueError(
                    f"pooled_projections must have shape ({batch}, {config.text_embed_dim}); "
                    f"got {tuple(pooled_projections.shape)}."
                )
            pooled = pooled_projections.to(dtype)
            if self.text_proj is not None:
                pooled = self.text_proj(pooled)
            cond = cond + pooled[:, None]

        pixels = self.pixel_embed(patches)  # (B, L, p*p, d), from the same noisy input
        pixel_rotary = self._pixel_rope(h, w, device)
        gamma_l2 = torch.zeros((), device=device, dtype=torch.float32) if return_aux else None
        for block in self.pixel_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                pixels, block_l2 = self._gradient_checkpointing_func(block, pixels, cond, pixel_rotary, return_aux)
            else:
                pixels, block_l2 = block(pixels, cond, pixel_rotary, return_aux)
            if return_aux:
                gamma_l2 = gamma_l2 + block_l2

        out = self.proj_out(self.norm_out(pixels))  # (B, L, p*p, C)
        out = out.reshape(batch, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(batch, channels, height, width)

        if not return_dict:
            return (out, repa_features, gamma_l2) if return_aux else (out,)
        return PixelHDMTransformerOutput(sample=out, repa_features=repa_features, gamma_l2=gamma_l2)


def _validate_config(**cfg) -> None:
    """Raise ValueError naming the first bad config argument and its allowed values."""
    positive_ints = [
        "patch_size",
        "in_channels",
        "hidden_size",
        "pixel_dim",
        "num_patch_layers",
        "num_pixel_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "attention_head_dim",
        "bottleneck_dim",
        "text_embed_dim",
    ]
    for name in positive_ints:
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["attention_head_dim"]
    if heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads must divide num_attention_heads={heads}; got {kv_heads} "
            f"(allowed: {[k for k in range(1, heads + 1) if heads % k == 0]})."
        )
    if cfg["hidden_size"] != heads * head_dim:
        raise ValueError(
            f"hidden_size must equal num_attention_heads * attention_head_dim = {heads * head_dim}; "
            f"got {cfg['hidden_size']}."
        )
    axes = cfg["rope_axes_dim"]
    valid = isinstance(axes, (tuple, list)) and len(axes) == 3
    valid = valid and all(isinstance(a, int) and not isinstance(a, bool) and a >= 2 and a % 2 == 0 for a in axes)
    if not valid or sum(axes) != head_dim:
        raise ValueError(
            f"rope_axes_dim must be three positive even integers summing to attention_head_dim={head_dim}; "
            f"got {axes}."
        )
    for name in ("mlp_ratio", "rope_theta", "norm_eps"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}.")
    if int(cfg["pixel_dim"] * cfg["mlp_ratio"]) < 1:
        raise ValueError(
            f"mlp_ratio must give a pixel SwiGLU width pixel_dim * mlp_ratio >= 1; got {cfg['mlp_ratio']!r}."
        )
    size = cfg.get("sample_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % cfg["patch_size"]):
        raise ValueError(f"sample_size must be None or a positive multiple of patch_size={cfg['patch_size']}; got {size!r}.")
    layer = cfg["repa_align_layer"]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= cfg["num_patch_layers"]:
        raise ValueError(
            f"repa_align_layer must be an integer in [1, num_patch_layers={cfg['num_patch_layers']}]; got {layer!r}."
        )
