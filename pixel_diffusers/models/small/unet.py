"""smalldiffusion's U-Net (the DDPM/DDIM CIFAR-10 layout) with a sigma embedding."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from torch import nn

from .small_utils import CondEmbedderLabel, SigmaEmbedderSinCos, SmallDiffusionModel, check_prediction_type


def _norm(channels):
    return nn.GroupNorm(32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1, channels, eps=1e-6)


class _ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.block1 = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_ch, out_ch))
        self.block2 = nn.Sequential(_norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        return self.shortcut(x) + self.block2(h)


class _AttnBlock(nn.Module):
    """Single-head self-attention over the H * W positions: token-wise qkv (no bias) and output Linears, as
    smalldiffusion's `Attention`, then its 1 x 1 conv `proj_out` and the residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        out = self.proj(nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class SmallUNet(SmallDiffusionModel):
    """U-Net: ``num_res_blocks`` residual blocks per level (attention at ``attn_resolutions``), stride-2 conv down,
    nearest x2 + conv up, a Res-Attn-Res middle, skip concatenations, GroupNorm-SiLU-conv out.

    The CIFAR-10 setting (``ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,)``) is the DDPM topology
    (36,071,939 parameters, as smalldiffusion's ``Unet``). Channel counts that are not multiples of 32 use 8 or 1
    GroupNorm groups (upstream supports multiples of 32 only).

    Args:
        in_dim (`int`): image size. in_ch / out_ch (`int`): channels. ch (`int`, 128), ch_mult (`tuple`, (1, 2, 2, 2)),
        embed_ch_mult (`int`, 4), num_res_blocks (`int`, 2), attn_resolutions (`tuple`, (16,)), dropout (`float`, 0.1),
        num_classes (`int`, *optional*), dropout_prob (`float`, 0.1), prediction_type (`str`), scaled (`bool`).
    """

    @register_to_config
    def __init__(self, in_dim: int = 32, in_ch: int = 3, out_ch: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 embed_ch_mult: int = 4, num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.1, num_classes: int | None = None, dropout_prob: float = 0.1,
                 prediction_type: str = "epsilon", scaled: bool = False):
        super().__init__()
        check_prediction_type(prediction_type)
        temb = ch * embed_ch_mult
        self.input_dims = (in_ch, in_dim, in_dim)
        self.sig_embed = SigmaEmbedderSinCos(temb)
        self.cond_embed = CondEmbedderLabel(temb, num_classes, dropout_prob) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, current, resolution = nn.ModuleList(), [ch], ch, in_dim
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                attn = _AttnBlock(ch * mult) if resolution in attn_resolutions else nn.Identity()
                self.down.append(nn.ModuleList([_ResnetBlock(current, ch * mult, temb, dropout), attn]))
                current = ch * mult
                skips.append(current)
            if level != len(ch_mult) - 1:
                self.down.append(nn.Conv2d(current, current, 3, stride=2))
                skips.append(current)
                resolution //= 2
        self.mid = nn.ModuleList([_ResnetBlock(current, current, temb, dropout), _AttnBlock(current),
                                  _ResnetBlock(current, current, temb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                attn = _AttnBlock(ch * mult) if resolution in attn_resolutions else nn.Identity()
                self.up.append(nn.ModuleList([_ResnetBlock(current + skips.pop(), ch * mult, temb, dropout), attn]))
                current = ch * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)))
                resolution *= 2
        self.conv_out = nn.Sequential(_norm(current), nn.SiLU(), nn.Conv2d(current, out_ch, 3, padding=1))

    def _network(self, x, sigma, cond):
        temb = self.sig_embed(x.shape[0], sigma)
        if self.cond_embed is not None:
            temb = temb + self.cond_embed(cond)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(nn.functional.pad(h, (0, 1, 0, 1)))
            else:
                h = layer[1](layer[0](h, temb))
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)
            else:
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), temb))
        return self.conv_out(h)
