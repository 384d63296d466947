"""smalldiffusion's DiT: a patch transformer with adaLN modulation and fixed 2-D sin-cos positions."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from torch import nn

from .small_utils import CondEmbedderLabel, SigmaEmbedderSinCos, SmallDiffusionModel, TimestepEmbedder, check_prediction_type


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[grid^2, width]``: each axis gives ``[sin, cos]`` of width/4 frequencies."""
    omega = 1.0 / 10000 ** np.linspace(0, 1, width // 4, endpoint=False)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    for axis in (cols, rows):
        angles = axis.reshape(-1, 1) * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


class _Modulation(nn.Module):
    def __init__(self, width: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Sequential(nn.SiLU(), nn.Linear(width, count * width))

    def forward(self, y):
        return self.linear(y).unsqueeze(1).chunk(self.count, dim=-1)


class _Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation1, self.modulation2, self.gates = _Modulation(width, 2), _Modulation(width, 2), _Modulation(width, 2)

    def forward(self, x, y):
        (shift1, scale1), (shift2, scale2), (gate1, gate2) = self.modulation1(y), self.modulation2(y), self.gates(y)
        b, n, d = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attention = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(attention)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class SmallDiT(SmallDiffusionModel):
    """DiT for small images (smalldiffusion's layout): width ``head_dim * num_heads``, ``depth`` adaLN blocks.

    Conditioning ``y = sigma embedding (+ label embedding)``; flow models (``prediction_type="flow"``) embed the
    time with the 256-frequency :class:`TimestepEmbedder`. Initialisation as upstream: xavier-uniform linears with
    zero bias, sigma-embedding weights N(0, 0.02), zeroed final layer (adaLN is *not* zero-initialised upstream
    either, which we keep for training parity).

    Args:
        in_dim (`int`, defaults to 32): image size. channels (`int`, defaults to 3). patch_size (`int`, defaults to 2).
        depth (`int`, 12), head_dim (`int`, 64), num_heads (`int`, 6), mlp_ratio (`float`, 4.0).
        num_classes (`int`, *optional*): class-conditional with label dropout ``dropout_prob`` when set.
        prediction_type (`str`), scaled (`bool`): see :mod:`.small_utils`.
    """

    @register_to_config
    def __init__(self, in_dim: int = 32, channels: int = 3, patch_size: int = 2, depth: int = 12, head_dim: int = 64,
                 num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int | None = None, dropout_prob: float = 0.1,
                 prediction_type: str = "epsilon", scaled: bool = False):
        super().__init__()
        check_prediction_type(prediction_type)
        if in_dim % patch_size:
            raise ValueError(f"`in_dim` ({in_dim}) must be divisible by `patch_size` ({patch_size}).")
        width = head_dim * num_heads
        self.input_dims = (channels, in_dim, in_dim)
        self.patch_embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.register_buffer("positions", sincos_positions(width, in_dim // patch_size), persistent=False)
        self.sig_embed = TimestepEmbedder(width) if prediction_type == "flow" else SigmaEmbedderSinCos(width)
        self.cond_embed = CondEmbedderLabel(width, num_classes, dropout_prob) if num_classes else None
        self.blocks = nn.ModuleList(_Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = _Modulation(width, 2)
        self.final_linear = nn.Linear(width, patch_size**2 * channels)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.sig_embed.mlp:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.final_linear.weight)

    def _network(self, x, sigma, cond):
        b, c, size, _ = x.shape
        p, grid = self.config.patch_size, size // self.config.patch_size
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positions
        y = self.sig_embed(b, sigma)
        if self.cond_embed is not None:
            y = y + self.cond_embed(cond)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_modulation(y)
        h = self.final_linear(self.final_norm(h) * (1 + scale) + shift)
        return h.view(b, grid, grid, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, size, size)
