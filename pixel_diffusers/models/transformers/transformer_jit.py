"""JiT ("Just image Transformers", Li & He 2025) and PixelDLM (text written as pixels), for diffusers.

One model class, two architectures selected by `architecture` (both plain ViT denoisers that predict the clean
image; they differ in every layer, so each keeps its own blocks below):

* ``"jit"``: official JiT (github.com/LTH14/JiT): a bottleneck patch embedding (a p x p conv to `bottleneck_dim`
  channels, then a 1 x 1 conv to the width), a fixed 2D sin-cos position table, blocks with AdaLN-Zero
  (shift/scale/gate from `t_emb + y_emb`), RMSNorm, attention with QK RMSNorm and 2D axial RoPE (interleaved
  pairs, rows on the first half of each head, columns on the second), SwiGLU; `in_context_len` copies of the class
  embedding prepended before block `in_context_start` (identity rotation for them), a modulated final layer.
* ``"pixeldlm"``: PixelDLM (github.com/Decalogue/PixelDLM): a 64 x 64 image whose pixels are token ids. A
  `[condition | target]` sequence of 2 x 256 tokens with a key-padding mask, linear patch embeddings without a
  bottleneck, learned row + column position tables (one pair per half), a sin-first sinusoid of the integer time
  used directly as the condition, one AdaLN (clamped scale, no gates) shared by both sub-layers of a block, attention
  without QK norm or RoPE, an un-normalised linear head, and optionally a small U-Net "pixel decoder".

Time and data at the edges of `forward` (package conventions): the model takes diffusers timesteps `sigma * 1000`
(1000 = pure noise). JiT converts them to its native `t = 1 - sigma` (t = 1 is clean) and works on images in
[-1, 1] with noise of std `sample_size / 256`. PixelDLM's native time is `t = sigma * 1000` itself (upstream trains
`x_t = (1 - t/1000) x0 + (t/1000) noise` with integer t) and its data are images in [0, 1] (a token-carrying image is
not a photograph: the [0, 1] range is part of the trained checkpoints). Both return their native prediction, the
clean image x0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale

from ...loading import StrictModelMixin
from ...loaders import FromUpstreamSingleFileMixin

__all__ = ["JIT_PRESETS", "JiTTransformer2DModel", "JiTTransformerOutput"]

ARCHITECTURES = ("jit", "pixeldlm")

_B = {"hidden_size": 768, "num_layers": 12, "num_attention_heads": 12, "bottleneck_dim": 128, "in_context_start": 4}
_L = {"hidden_size": 1024, "num_layers": 24, "num_attention_heads": 16, "bottleneck_dim": 128, "in_context_start": 8}
_H = {"hidden_size": 1280, "num_layers": 32, "num_attention_heads": 16, "bottleneck_dim": 256, "in_context_start": 10}
_G = {"hidden_size": 1664, "num_layers": 40, "num_attention_heads": 16, "bottleneck_dim": 256, "in_context_start": 10}

# Paper Tab. 9 / official `model_jit.py` (the code defines B, L and H; G from the paper). H and G train with projection
# dropout 0.2 (upstream's `--proj_dropout 0.2`, attention dropout 0) in the middle half of the blocks. "/16" models are for 256 x 256, "/32" for 512 x 512, "/64" for 1024 x 1024.
JIT_PRESETS: dict[str, dict] = {
    "JiT-B/16": {**_B, "sample_size": 256, "patch_size": 16},
    "JiT-B/32": {**_B, "sample_size": 512, "patch_size": 32},
    "JiT-B/64": {**_B, "sample_size": 1024, "patch_size": 64},
    "JiT-L/16": {**_L, "sample_size": 256, "patch_size": 16},
    "JiT-L/32": {**_L, "sample_size": 512, "patch_size": 32},
    "JiT-H/16": {**_H, "sample_size": 256, "patch_size": 16, "dropout": 0.2},
    "JiT-H/32": {**_H, "sample_size": 512, "patch_size": 32, "dropout": 0.2},
    "JiT-G/16": {**_G, "sample_size": 256, "patch_size": 16, "dropout": 0.2},
    "JiT-G/32": {**_G, "sample_size": 512, "patch_size": 32, "dropout": 0.2},
    # PixelDLM's "JiT-B/4": only the B widths are shared with official JiT.
    "PixelDLM-B/4": {
        "architecture": "pixeldlm",
        "sample_size": 64,
        "patch_size": 4,
        "hidden_size": 768,
        "num_layers": 12,
        "num_attention_heads": 12,
    },
    "PixelDLM-B/4-decoder": {
        "architecture": "pixeldlm",
        "sample_size": 64,
        "patch_size": 4,
        "hidden_size": 768,
        "num_layers": 12,
        "num_attention_heads": 12,
        "use_pixel_decoder": True,
    },
}


@dataclass
class JiTTransformerOutput(BaseOutput):
    """Output of :class:`JiTTransformer2DModel`.

    Args:
        sample: (B, C, H, W) the predicted clean image, in [-1, 1] (JiT) or [0, 1] (PixelDLM).
    """

    sample: torch.Tensor


_FUSED_ATTENTION_KEY = re.compile(r"^(.*\.attn)\.(qkv|proj)\.(weight|bias)$")


def split_fused_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream JiT's and PixelDLM's attention tensors (`attn.qkv`, `attn.proj`, also the names this model saved under
    before it took diffusers' names) under diffusers' names: the fused qkv rows are cut into `to_q`, `to_k`, `to_v`
    (in that order) and `proj` becomes `to_out.0`. Every other key passes unchanged."""
    out = {}
    for key, value in state.items():
        match = _FUSED_ATTENTION_KEY.match(key)
        if match is None:
            out[key] = value
        elif match.group(2) == "proj":
            out[f"{match.group(1)}.to_out.0.{match.group(3)}"] = value
        else:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{match.group(1)}.{name}.{match.group(3)}"] = part.contiguous()
    return out


def _rope_angles(grid: int, head_dim: int, theta: float, prefix: int, device) -> torch.Tensor:
    """(prefix + grid**2, head_dim // 2) rotation angles of JiT's 2D axial RoPE, one per interleaved channel pair.

    Pair j < head_dim // 4 rotates with the patch row, the others with the column, at frequencies
    theta ** (-2j / (head_dim / 2)); the `prefix` in-context tokens get angle 0 (no rotation)."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(0, 2 * quarter, 2, device=device, dtype=torch.float32) / (2 * quarter))
    positions = torch.arange(grid, device=device, dtype=torch.float32)
    rows = (positions[:, None, None] * freqs).expand(grid, grid, quarter)
    cols = (positions[None, :, None] * freqs).expand(grid, grid, quarter)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * quarter)
    return torch.cat([angles.new_zeros(prefix, 2 * quarter), angles])


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, S, H, D) by angles given as cos/sin (S, D // 2), in float32."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(x.dtype)


def _pixeldlm_time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """PixelDLM's time condition: [sin, cos] of t * exp(-i ln(1e4) / (dim/2 - 1)), in float32. The frequencies are
    formed in upstream's operation order: at t ~ 1000 diffusers' `Timesteps` differs from it by float32 rounding."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _pixeldlm_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PixelDLM's RMSNorm: x / max(rms(x), eps) * weight (a clamp, not the usual rsqrt(ms + eps))."""
    rms = x.norm(dim=-1, keepdim=True) * (x.shape[-1] ** -0.5)
    return x / rms.clamp(min=eps) * weight


class JiTAttnProcessor:
    """Self-attention: q/k/v projections (fused into `to_qkv` after `fuse_qkv_projections()`), optional QK RMSNorm and
    RoPE, diffusers' attention dispatcher, output projection.

    A key-padding mask that masks every key of a sample gives that sample uniform attention (the mean of the
    values), as upstream PixelDLM does."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "JiTAttention", hidden_states, rotary_emb=None, key_mask=None) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if rotary_emb is not None:
            query, key = _apply_rope(query, *rotary_emb), _apply_rope(key, *rotary_emb)
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
        hidden = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=attn.dropout if attn.training else 0.0,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        if key_mask is not None:
            empty = ~key_mask.any(dim=1)
            if bool(empty.any()):
                uniform = value.mean(dim=1, keepdim=True).expand_as(hidden)
                hidden = torch.where(empty[:, None, None, None], uniform, hidden)
        return attn.to_out[1](attn.to_out[0](hidden.flatten(2, 3)))


class JiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with diffusers' projection names (`to_q`, `to_k`, `to_v`, `to_out.0`, the targets of
    diffusers' and peft's LoRA recipes); JiT: qkv bias and QK RMSNorm; PixelDLM: neither. Upstream's fused `qkv`
    weight is split into the three projections by the converters (and by the loading shim for older saves)."""

    _default_processor_cls = JiTAttnProcessor
    _available_processors = [JiTAttnProcessor]

    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = attention_dropout  # on the attention probabilities; `dropout` on the output projection
        self.use_bias = qkv_bias  # read by diffusers' `fuse_projections`
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm_q = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.norm_k = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states, rotary_emb=None, key_mask=None) -> torch.Tensor:
        return self.processor(self, hidden_states, rotary_emb=rotary_emb, key_mask=key_mask)


class JiTFeedForward(nn.Module):
    """SwiGLU with biases: w3(silu(a) * b) with (a, b) = w12(x)."""

    def __init__(self, dim: int, inner_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * inner_dim)
        self.w3 = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(hidden_states).chunk(2, dim=-1)
        return self.w3(self.dropout(F.silu(a) * b))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class JiTBlock(nn.Module):
    """JiT block with AdaLN-Zero: x += gate * sublayer(RMSNorm(x) * (1 + scale) + shift), for attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.attn = JiTAttention(dim, heads, qkv_bias=True, qk_norm=True, dropout=dropout,
                                 attention_dropout=attention_dropout)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.mlp = JiTFeedForward(dim, int(int(dim * mlp_ratio) * 2 / 3), dropout)
        self.adaln = nn.Linear(dim, 6 * dim)

    def forward(self, hidden_states, cond_act, rotary_emb, key_mask=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond_act).chunk(6, dim=-1)
        attn = self.attn(_modulate(self.norm1(hidden_states), shift1, scale1), rotary_emb)
        hidden_states = hidden_states + gate1[:, None] * attn
        mlp = self.mlp(_modulate(self.norm2(hidden_states), shift2, scale2))
        return hidden_states + gate2[:, None] * mlp


class PixelDLMAdaLN(nn.Module):
    """RMSNorm(x) * clamp(1 + scale(silu(c)), 0.1, 10) + shift(silu(c)); shared by both sub-layers of a block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.scale = nn.Linear(dim, dim)
        self.shift = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond_act: torch.Tensor) -> torch.Tensor:
        scale = (self.scale(cond_act) + 1.0).clamp(0.1, 10.0)
        return _pixeldlm_rms_norm(x, self.norm_weight) * scale[:, None] + self.shift(cond_act)[:, None]


class PixelDLMBlock(nn.Module):
    """PixelDLM block: x += attn(adaln(x), key mask); x += mlp(adaln(x)), with one shared AdaLN and no gates."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.adaln = PixelDLMAdaLN(dim)
        self.attn = JiTAttention(dim, heads, qkv_bias=False, qk_norm=False, dropout=dropout, attention_dropout=dropout)
        self.mlp = JiTFeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, hidden_states, cond_act, rotary_emb=None, key_mask=None) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.adaln(hidden_states, cond_act), key_mask=key_mask)
        return hidden_states + self.mlp(self.adaln(hidden_states, cond_act))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class PixelDLMPixelDecoder(nn.Module):
    """PixelDLM's optional U-Net refiner (DiP-style): the transformer's target features, projected and laid out on the
    patch grid, are concatenated at the deepest level (which must have the patch grid's size).

    Layers as upstream (checkpoint compatible), and so is its data-dependent range handling: the input is mapped from
    [-1, 1] to [0, 1] when its minimum is negative, and so is the tanh output, which is then clamped. Deliberate
    difference: we take that minimum per sample, upstream over the whole batch, where one sample's output would depend
    on the others it is batched with (other prompts, guidance's unconditional half). Upstream's inference decodes one
    prompt at a time, where both agree; only upstream's batched training differs, for batches that mix both cases."""

    def __init__(self, channels: int, cond_dim: int, depth: int, base_channels: int = 64):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList(
            [_conv_block(c_in, c_out) for c_in, c_out in zip([channels] + widths[:-1], widths)]
        )
        self.cond_proj = nn.Linear(cond_dim, widths[-1])
        self.decoder = nn.ModuleList([_conv_block(2 * w, w) for w in reversed(widths[1:])])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in reversed(widths[1:])])
        self.out = nn.Sequential(
            nn.Conv2d(2 * base_channels, base_channels, 3, padding=1),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(),
            nn.Conv2d(base_channels, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = torch.where(image.amin(dim=(1, 2, 3), keepdim=True) < 0, (image + 1) / 2, image)
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(x)
            skips.append(x)
            if index < len(self.encoder) - 1:
                x = F.max_pool2d(x, 2)
        grid = int(math.isqrt(features.shape[1]))
        cond = F.relu(self.cond_proj(features)).unflatten(1, (grid, grid)).permute(0, 3, 1, 2)
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, cond], dim=1)
        for block, up, skip in zip(self.decoder, self.up, reversed(skips[:-1])):
            x = torch.cat([up(block(x)), skip], dim=1)
        out = self.out(x)
        out = torch.where(out.amin(dim=(1, 2, 3), keepdim=True) < 0, (out + 1) / 2, out)
        return out.clamp(0, 1)


class JiTTransformer2DModel(StrictModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin, FromUpstreamSingleFileMixin):
    r"""JiT / PixelDLM pixel-space diffusion transformer predicting the clean image (see the module docstring).

    Args:
        architecture: ``"jit"`` (official JiT) or ``"pixeldlm"`` (PixelDLM).
        sample_size: image side; the model works on exactly this size (a fixed `(sample_size / patch_size)**2` grid).
        patch_size: side of a square patch.
        in_channels: image channels (3); the output has as many.
        hidden_size, num_layers, num_attention_heads: width, depth and heads of the transformer.
        mlp_ratio: MLP width as a multiple of `hidden_size` (JiT applies SwiGLU's 2/3 reduction, PixelDLM does not).
        bottleneck_dim: JiT's patch-embedding bottleneck width (ignored by PixelDLM).
        num_classes: JiT's number of classes; label `num_classes` is the null class of classifier-free guidance.
        in_context_len, in_context_start: JiT's number of prepended class tokens and the block they enter at.
        dropout: JiT: dropout on the attention output projection and the SwiGLU hidden layer (upstream's
            `proj_dropout`); PixelDLM: on the attention probabilities, projection and MLP hidden layer.
        attention_dropout: JiT's dropout on the attention probabilities (upstream's `attn_dropout`). JiT applies
            both only in the middle half of the blocks, `num_layers // 4 <= i < num_layers // 4 * 3` (upstream's
            bounds: depth 6 drops out in blocks 1 and 2).
        rope_theta: JiT's RoPE frequency base.
        use_pixel_decoder, pixel_decoder_depth: PixelDLM's optional U-Net refiner.
        id2label: optional class names `{id: name}` (JiT), used by `JiTPipeline` to accept names as labels.
        noise_scale: JiT's noise std (training and sampling); None = JiT's rule `sample_size / 256`, which leaves
            very little noise at small sizes (0.125 at 32 x 32).

    Initialisation: JiT as upstream (xavier Linears, zero-initialised modulation and output layers, N(0, 0.02)
    embeddings). PixelDLM: trunc-normal(0.02) Linears and position tables, but its AdaLN modulation starts at zero
    (identity), which is what upstream intends; upstream's final `apply(_init_weights)` overwrites that zero init.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JiTBlock", "PixelDLMBlock"]
    _repeated_blocks = ["JiTBlock", "PixelDLMBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "time_embed", "class_embed", "norm", "pos_embed"]

    @register_to_config
    def __init__(
        self,
        architecture: str = "jit",
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        num_classes: int = 1000,
        in_context_len: int = 32,
        in_context_start: int = 4,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        use_pixel_decoder: bool = False,
        pixel_decoder_depth: int = 3,
        id2label: dict | None = None,
        noise_scale: float | None = None,
    ):
        super().__init__()
        _validate_config(**self.config)
        self.grid = sample_size // patch_size
        patch_dim = patch_size * patch_size * in_channels
        dim = hidden_size
        # The block class this variant has: FSDP's per-block sharding looks every listed class up in the model.
        self._no_split_modules = ["JiTBlock"] if architecture == "jit" else ["PixelDLMBlock"]

        if architecture == "jit":
            # The conv pair is a low-rank linear map of each (c, row, col)-ordered patch.
            self.patch_embed = nn.Sequential(
                nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False),
                nn.Conv2d(bottleneck_dim, dim, 1),
            )
            pos = get_2d_sincos_pos_embed(dim, self.grid, base_size=self.grid, output_type="pt")
            self.register_buffer("pos_embed", pos.float()[None], persistent=False)
            self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embed = TimestepEmbedding(256, dim)
            self.class_embed = nn.Embedding(num_classes + 1, dim)
            if in_context_len > 0:
                self.in_context_pos_embed = nn.Parameter(torch.zeros(1, in_context_len, dim))
            lo, hi = num_layers // 4, num_layers // 4 * 3
            self.blocks = nn.ModuleList(
                [
                    JiTBlock(dim, num_attention_heads, mlp_ratio, *((dropout, attention_dropout) if lo <= i < hi else (0.0, 0.0)))
                    for i in range(num_layers)
                ]
            )
            self.norm_out = RMSNorm(dim, eps=1e-6)
            self.adaln_out = nn.Linear(dim, 2 * dim)
            self.proj_out = nn.Linear(dim, patch_dim)
        else:
            self.patch_embed = nn.Linear(patch_dim, dim, bias=False)
            self.condition_embed = nn.Linear(patch_dim, dim, bias=False)
            self.pos_embed_row = nn.Parameter(torch.zeros(1, self.grid, dim))
            self.pos_embed_col = nn.Parameter(torch.zeros(1, self.grid, dim))
            self.condition_pos_embed_row = nn.Parameter(torch.zeros(1, self.grid, dim))
            self.condition_pos_embed_col = nn.Parameter(torch.zeros(1, self.grid, dim))
            self.blocks = nn.ModuleList(
                [PixelDLMBlock(dim, num_attention_heads, mlp_ratio, dropout) for _ in range(num_layers)]
            )
            self.proj_out = nn.Linear(dim, patch_dim)
            self.pixel_decoder = (
                PixelDLMPixelDecoder(in_channels, dim, pixel_decoder_depth) if use_pixel_decoder else None
            )

        self.gradient_checkpointing = False
        self._init_weights()

    @property
    def noise_scale(self) -> float:
        """JiT's noise std: `config.noise_scale`, or `sample_size / 256` (the paper's rule) when that is None."""
        return self.config.noise_scale or self.config.sample_size / 256

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`; a config of a community JiT layout (diffusers PR #13098, BiliSakura/JiT-diffusers),
        which carries the same class name, is translated into this model's config (see `conversion.jit`)."""
        from ...conversion.jit import translate_community_jit_config

        outputs = super().load_config(*args, **kwargs)
        translate_community_jit_config(outputs[0] if isinstance(outputs, tuple) else outputs)
        return outputs

    def _fix_state_dict_keys_on_load(self, state_dict: dict) -> dict:
        """Loading shim (diffusers' hook for renamed layers, applied to unsharded checkpoints): folders saved before the
        attention projections took diffusers' names (`attn.qkv`, `attn.proj`), and the weights of the community JiT
        layouts, are renamed in place to this model's keys."""
        from ...conversion.jit import community_jit_state_dict_to_ours

        fixed = split_fused_attention(community_jit_state_dict_to_ours(dict(state_dict), self))
        state_dict.clear()
        state_dict.update(fixed)
        return state_dict

    @classmethod
    def _convert_single_file(cls, path: str, architecture: str = "jit", **converter_kwargs) -> "JiTTransformer2DModel":
        """`from_single_file`: an official JiT checkpoint (`architecture="jit"`, through `convert_jit_checkpoint`:
        `weights`, `preset`, config overrides) or an upstream PixelDLM one (`architecture="pixeldlm"`, through
        `convert_pixeldlm_checkpoint`: `num_attention_heads`)."""
        from ...conversion.jit import convert_jit_checkpoint, convert_pixeldlm_checkpoint

        converters = {"jit": convert_jit_checkpoint, "pixeldlm": convert_pixeldlm_checkpoint}
        if architecture not in converters:
            raise ValueError(f"architecture must be one of {sorted(converters)}; got {architecture!r}.")
        return converters[architecture](path, **converter_kwargs)[0]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "JiTTransformer2DModel":
        """A randomly initialised model of a named configuration. Parameters (JiT: the fixed sin-cos table is a
        buffer, not a parameter): JiT-B/16 131,123,712; B/32 133,190,400; L/16 458,877,664; H/16 952,514,368;
        PixelDLM-B/4 127,681,584. `overrides` replace config fields."""
        if name not in JIT_PRESETS:
            raise ValueError(f"Unknown JiT preset name={name!r}; allowed values: {sorted(JIT_PRESETS)}.")
        return cls(**{**JIT_PRESETS[name], **overrides})

    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.config.architecture == "jit":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            for conv in self.patch_embed:
                nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(self.patch_embed[1].bias)
            nn.init.normal_(self.class_embed.weight, std=0.02)
            nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
            nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
            if self.config.in_context_len > 0:
                nn.init.normal_(self.in_context_pos_embed, std=0.02)
            for layer in [block.adaln for block in self.blocks] + [self.adaln_out, self.proj_out]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            for name in ("pos_embed_row", "pos_embed_col", "condition_pos_embed_row", "condition_pos_embed_col"):
                nn.init.normal_(getattr(self, name), std=0.02)
            for block in self.blocks:
                for layer in (block.adaln.scale, block.adaln.shift):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ layout

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, grid**2, C * p * p): row-major patches, each flattened as (c, row, col)."""
        b, c, p, g = image.shape[0], image.shape[1], self.config.patch_size, self.grid
        return image.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, patches: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """(B, grid**2, C * p * p) -> (B, C, H, W); each patch laid out (row, col, c) (JiT) or (c, row, col)."""
        b, c, p, g = patches.shape[0], self.config.in_channels, self.config.patch_size, self.grid
        if channels_last:
            x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        else:
            x = patches.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    def pixel_mask_to_patch_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) pixel mask -> (B, grid**2) bool: a patch is valid when more than half of its pixels are."""
        b, p, g = mask.shape[0], self.config.patch_size, self.grid
        return mask.float().reshape(b, g, p, g, p).mean(dim=(2, 4)).reshape(b, g * g) > 0.5

    # ----------------------------------------------------------------- forward

    def _run_blocks(self, hidden_states, blocks, cond_act, rotary, key_mask):
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, cond_act, rotary, key_mask)
            else:
                hidden_states = block(hidden_states, cond_act, rotary, key_mask)
        return hidden_states

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> JiTTransformerOutput | tuple:
        r"""Predict the clean image x0.

        Args:
            hidden_states: (B, C, S, S) noisy image `(1 - sigma) x0 + sigma noise`, S = `sample_size`.
            timestep: (B,) or scalar, `sigma * 1000` (1000 = pure noise).
            class_labels: (B,) JiT class ids in [0, num_classes]; `num_classes` is the null (unconditional) class.
            condition: (B, C, S, S) PixelDLM condition image in [0, 1] (the prompt's tokens), or None (unconditional).
            condition_mask: (B,) PixelDLM: which samples use `condition` (False = unconditional, as for
                classifier-free guidance and condition dropout); default all, when `condition` is given.
            pixel_mask: (B, S, S) PixelDLM target pixel mask (1 = text pixel); masks the target patches with at most
                half valid pixels as keys and zeroes their output (training); None = all valid (inference).
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: return a `JiTTransformerOutput` instead of a tuple.
        """
        config = self.config
        size, channels = config.sample_size, config.in_channels
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"hidden_states must have shape (B, {channels}, {size}, {size}); got {tuple(hidden_states.shape)}."
            )
        batch, device = hidden_states.shape[0], hidden_states.device
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},); got {tuple(timestep.shape)}.")
        if config.architecture == "jit":
            if condition is not None or condition_mask is not None or pixel_mask is not None:
                raise ValueError("condition, condition_mask and pixel_mask are PixelDLM inputs; JiT takes class_labels.")
            out = self._forward_jit(hidden_states, timestep, class_labels)
        else:
            if class_labels is not None:
                raise ValueError("class_labels is a JiT input; PixelDLM takes condition (and condition_mask).")
            out = self._forward_pixeldlm(hidden_states, timestep, condition, condition_mask, pixel_mask)
        return JiTTransformerOutput(sample=out) if return_dict else (out,)

    def _forward_jit(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        config = self.config
        batch = hidden_states.shape[0]
        if class_labels is None:
            raise ValueError("class_labels is required by JiT (use num_classes for the null class).")
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device).reshape(-1)
        if class_labels.shape != (batch,) or class_labels.is_floating_point():
            raise ValueError(f"class_labels must be {batch} integer ids; got {tuple(class_labels.shape)}.")
        if bool((class_labels < 0).any() or (class_labels > config.num_classes).any()):
            raise ValueError(f"class_labels must lie in [0, num_classes={config.num_classes}]; got {class_labels}.")
        dtype = self.proj_out.weight.dtype
        t = 1.0 - timestep.to(torch.float32) / 1000.0  # JiT native time, 1 = clean
        y_emb = self.class_embed(class_labels)
        cond_act = F.silu(self.time_embed(self.time_proj(t).to(dtype)) + y_emb)

        x = self.patch_embed(hidden_states.to(dtype)).flatten(2).transpose(1, 2) + self.pos_embed.to(dtype)
        head_dim = config.hidden_size // config.num_attention_heads
        angles = _rope_angles(self.grid, head_dim, config.rope_theta, 0, x.device)
        start = config.in_context_start if config.in_context_len > 0 else len(self.blocks)
        x = self._run_blocks(x, self.blocks[:start], cond_act, (angles.cos(), angles.sin()), None)
        if start < len(self.blocks):
            prefix = y_emb[:, None] + self.in_context_pos_embed
            x = torch.cat([prefix, x], dim=1)
            angles = _rope_angles(self.grid, head_dim, config.rope_theta, config.in_context_len, x.device)
            x = self._run_blocks(x, self.blocks[start:], cond_act, (angles.cos(), angles.sin()), None)
            x = x[:, config.in_context_len :]
        shift, scale = self.adaln_out(cond_act).chunk(2, dim=-1)
        x = self.proj_out(_modulate(self.norm_out(x), shift, scale))
        return self.unpatchify(x, channels_last=True)

    def _forward_pixeldlm(self, hidden_states, timestep, condition, condition_mask, pixel_mask) -> torch.Tensor:
        config = self.config
        batch, device = hidden_states.shape[0], hidden_states.device
        dtype = self.proj_out.weight.dtype
        length = self.grid * self.grid
        x = self.patch_embed(self.patchify(hidden_states.to(dtype)))
        x = x + (self.pos_embed_row[:, :, None] + self.pos_embed_col[:, None]).flatten(1, 2)

        if condition is not None:
            if tuple(condition.shape) != tuple(hidden_states.shape):
                raise ValueError(
                    f"condition must have the shape of hidden_states {tuple(hidden_states.shape)}; "
                    f"got {tuple(condition.shape)}."
                )
            cond = self.condition_embed(self.patchify(condition.to(device=device, dtype=dtype)))
            cond = cond + (self.condition_pos_embed_row[:, :, None] + self.condition_pos_embed_col[:, None]).flatten(1, 2)
            if condition_mask is None:
                condition_mask = torch.ones(batch, dtype=torch.bool, device=device)
            condition_mask = torch.as_tensor(condition_mask, device=device).reshape(-1).bool()
            if condition_mask.shape != (batch,):
                raise ValueError(f"condition_mask must have shape ({batch},); got {tuple(condition_mask.shape)}.")
            cond = cond * condition_mask[:, None, None].to(dtype)  # dropped conditions are zeros, as upstream
        else:
            if condition_mask is not None:
                raise ValueError("condition_mask was given without condition.")
            cond = x.new_zeros(batch, length, config.hidden_size)
            condition_mask = torch.zeros(batch, dtype=torch.bool, device=device)

        if pixel_mask is not None:
            if tuple(pixel_mask.shape) != (batch, config.sample_size, config.sample_size):
                raise ValueError(
                    f"pixel_mask must have shape ({batch}, {config.sample_size}, {config.sample_size}); "
                    f"got {tuple(pixel_mask.shape)}."
                )
            target_mask = self.pixel_mask_to_patch_mask(pixel_mask.to(device))
        else:
            target_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        key_mask = torch.cat([condition_mask[:, None].expand(batch, length), target_mask], dim=1)

        cond_act = F.silu(_pixeldlm_time_features(timestep, config.hidden_size).to(dtype))
        x = self._run_blocks(torch.cat([cond, x], dim=1), self.blocks, cond_act, None, key_mask)
        features = x[:, length:]
        patches = self.proj_out(features)
        if pixel_mask is not None:
            patches = patches * target_mask[:, :, None].to(dtype)
        image = self.unpatchify(patches, channels_last=False)
        if self.pixel_decoder is not None:
            image = self.pixel_decoder(image, features)
        return image


def _validate_config(**cfg) -> None:
    """Raise ValueError naming the first bad config argument and its allowed values."""
    if cfg["architecture"] not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {cfg['architecture']!r}.")
    names = ["sample_size", "patch_size", "in_channels", "hidden_size", "num_layers", "num_attention_heads"]
    names += ["bottleneck_dim", "num_classes", "pixel_decoder_depth"]
    for name in names:
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if cfg["sample_size"] % cfg["patch_size"]:
        raise ValueError(f"sample_size must be a multiple of patch_size={cfg['patch_size']}; got {cfg['sample_size']}.")
    heads = cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads:
        raise ValueError(f"hidden_size must be a multiple of num_attention_heads={heads}; got {cfg['hidden_size']}.")
    if cfg["architecture"] == "jit":
        if (cfg["hidden_size"] // heads) % 4:
            raise ValueError(f"hidden_size / num_attention_heads must be a multiple of 4 (2D RoPE); got {cfg['hidden_size'] // heads}.")
        if cfg["hidden_size"] % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2D sin-cos table); got {cfg['hidden_size']}.")
        length, start = cfg["in_context_len"], cfg["in_context_start"]
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"in_context_len must be an integer >= 0; got {length!r}.")
        if length and (isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < cfg["num_layers"]):
            raise ValueError(f"in_context_start must be an integer in [0, num_layers={cfg['num_layers']}); got {start!r}.")
        if cfg["use_pixel_decoder"]:
            raise ValueError("use_pixel_decoder is a PixelDLM option; set architecture='pixeldlm' or leave it False.")
    elif cfg["hidden_size"] % 2 or cfg["hidden_size"] < 4:
        raise ValueError(f"hidden_size must be even and >= 4 (PixelDLM's sin/cos time features); got {cfg['hidden_size']}.")
    elif cfg["use_pixel_decoder"] and (cfg["sample_size"] >> (cfg["pixel_decoder_depth"] - 1)) != cfg["sample_size"] // cfg["patch_size"]:
        raise ValueError(
            "pixel_decoder_depth must make the decoder's deepest level the patch grid: sample_size / 2**(depth - 1) == "
            f"sample_size / patch_size; got depth {cfg['pixel_decoder_depth']}."
        )
    for name in ("mlp_ratio", "rope_theta"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}.")
    for name in ("dropout", "attention_dropout"):
        if isinstance(cfg[name], bool) or not (isinstance(cfg[name], (int, float)) and 0.0 <= cfg[name] < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1); got {cfg[name]!r}.")
    noise_scale = cfg["noise_scale"]
    if noise_scale is not None and (isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or noise_scale <= 0):
        raise ValueError(f"noise_scale must be None or a number > 0; got {noise_scale!r}.")
    if cfg["id2label"] is not None and not isinstance(cfg["id2label"], dict):
        raise ValueError(f"id2label must be a dict {{id: name}} or None; got {type(cfg['id2label']).__name__}.")
