"""Training objectives: flow-matching time sampling, the JPEG-weighted DCT frequency loss and REPA with DINOv3."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# diffusers' `--weighting_scheme` values: logit_normal and mode shape the draw of noise levels, sigma_sqrt and cosmap
# weight the loss per sample (their draw is uniform), none is uniform and unweighted.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "none", "sigma_sqrt")

# The JPEG standard's quality-50 quantisation tables (ITU-T T.81, Annex K), luma then chroma.
_JPEG_Q50_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_Q50_CHROMA = ((17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
                    (47, 66, 99, 99, 99, 99, 99, 99)) + ((99,) * 8,) * 4
# BT.601 RGB -> YCbCr without offsets (the offsets cancel in a difference).
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_flow_sigmas(
    batch_size: int,
    generator: torch.Generator | None = None,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    t_eps: float = 0.05,
    device: torch.device | str = "cpu",
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Per-sample noise levels sigma (1 = pure noise) for flow-matching training, as diffusers' scripts draw them.

    diffusers' `compute_density_for_timestep_sampling(scheme, ...)` gives u in (0, 1), which diffusers turns into the
    timestep index u * 1000 of a descending schedule, i.e. u = 1 - sigma: `logit_mean` is the mean of logit(1 - sigma)
    (a negative mean favours noisy samples). u is squashed into [t_eps, 1 - t_eps]; sigma = 1 - u.
    """
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme={scheme!r} is not supported; allowed values: {WEIGHTING_SCHEMES}.")
    if not 0.0 <= t_eps < 0.5:
        raise ValueError(f"t_eps must be in [0, 0.5), got {t_eps}.")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, device=device,
        generator=generator,
    )
    t = t_eps + (1.0 - 2.0 * t_eps) * u
    return 1.0 - t


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of `scheme` (diffusers' `compute_loss_weighting_for_sd3`; ones unless sigma_sqrt or
    cosmap). sigma is floored at 1/1000, the smallest noise level of diffusers' 1000-step table, so that sigma_sqrt's
    sigma^-2 stays finite."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas.clamp(min=1e-3)).to(sigmas.dtype)


def _jpeg_weights(table, quality: int) -> torch.Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = torch.clamp(torch.floor((torch.tensor(table, dtype=torch.float64) * scale + 50) / 100), 1, 255)
    inverse = 1.0 / q
    return (inverse / inverse.mean()).float()


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.float()


class FrequencyLoss(nn.Module):
    """Weighted squared error of 8x8 block DCT-II coefficients of prediction and target in YCbCr.

    Each coefficient is weighted by its JPEG quality-`quality` quantisation step, inverted and normalised to mean 1
    (luma and chroma separately): low frequencies, which JPEG keeps, weigh most. Images need sides divisible by 8.
    """

    def __init__(self, quality: int = 90, weight: float = 1.0):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}.")
        self.weight = weight
        weights = torch.stack([_jpeg_weights(_JPEG_Q50_LUMA, quality)] + [_jpeg_weights(_JPEG_Q50_CHROMA, quality)] * 2)
        self.register_buffer("coefficient_weights", weights, persistent=False)  # (3, 8, 8)
        self.register_buffer("dct", _dct_matrix(), persistent=False)
        self.register_buffer("rgb_to_ycbcr", torch.tensor(_RGB_TO_YCBCR), persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = prediction.shape
        if channels != 3 or height % 8 or width % 8:
            raise ValueError(f"FrequencyLoss needs (B, 3, H, W) with H and W divisible by 8, got {tuple(prediction.shape)}.")
        difference = torch.einsum("oc,bchw->bohw", self.rgb_to_ycbcr, (prediction - target).float())
        blocks = difference.reshape(batch, 3, height // 8, 8, width // 8, 8).permute(0, 1, 2, 4, 3, 5)
        coefficients = self.dct @ blocks @ self.dct.T
        return self.weight * (self.coefficient_weights[None, :, None, None] * coefficients.square()).mean()


class DINOv3Features(nn.Module):
    """Frozen DINOv3 patch features of images in [-1, 1], at the images' own resolution.

    Takes a transformers `DINOv3ViTModel`; returns the final (normed) patch tokens (B, L, C), without the CLS and
    register tokens, and the (rows, cols) patch grid.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.patch_size = model.config.patch_size
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> DINOv3Features:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(name_or_path, **kwargs))

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"Image sides must be multiples of DINOv3's patch size {self.patch_size}, got {height}x{width}.")
        dtype = next(self.model.parameters()).dtype
        pixels = (((images.float() + 1) / 2 - self.mean) / self.std).to(dtype)
        tokens = self.model(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens :]
        return tokens.float(), (height // self.patch_size, width // self.patch_size)


class REPALoss(nn.Module):
    """Representation alignment: 0.5 * mean(1 - cos(project(h), normalise(features))).

    The projector is a 3x3 convolution over the token grid (trained with the model, and saved with it); the targets
    are normalised per channel over the tokens of each image. A projected grid that differs from the feature grid is
    resized bilinearly.
    """

    def __init__(self, hidden_size: int, feature_dim: int = 768, weight: float = 0.5):
        super().__init__()
        self.weight = weight
        self.projector = nn.Conv2d(hidden_size, feature_dim, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(self.projector.weight, mode="fan_out")
        nn.init.zeros_(self.projector.bias)

    def forward(
        self, hidden: torch.Tensor, grid: tuple[int, int], features: torch.Tensor, feature_grid: tuple[int, int]
    ) -> torch.Tensor:
        batch, _, dim = hidden.shape
        projected = self.projector(hidden.transpose(1, 2).reshape(batch, dim, *grid).to(self.projector.weight.dtype))
        if tuple(grid) != tuple(feature_grid):
            projected = F.interpolate(projected.float(), size=feature_grid, mode="bilinear", align_corners=False)
        projected = projected.flatten(2).transpose(1, 2).float()
        target = (features - features.mean(dim=1, keepdim=True)) / (features.std(dim=1, keepdim=True) + 1e-6)
        return self.weight * (1 - F.cosine_similarity(projected, target, dim=-1)).mean()


def build_lpips(weights_path: str | None, device) -> nn.Module:
    """Frozen LPIPS(VGG) whose VGG16 weights come from a local torchvision state dict; never downloads."""
    try:
        import lpips
    except ImportError as error:
        raise ValueError("--lpips_weight > 0 needs the `lpips` package (pip install lpips torchvision).") from error
    if not weights_path or not Path(weights_path).is_file():
        raise ValueError(
            f"--lpips_weight > 0 needs --lpips_vgg_weights, a local torchvision VGG16 state dict (vgg16-397923af.pth); "
            f"got {weights_path!r}. Nothing is downloaded."
        )
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # linear heads ship with the package
    vgg = torch.load(weights_path, map_location="cpu", weights_only=True)
    # lpips splits VGG16's `features` into five slices that keep torchvision's layer indices.
    bounds = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))
    mapped = {}
    for key, value in vgg.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            part = next(s for s, low, high in bounds if low <= index < high)
            mapped[f"slice{part}.{key[len('features.'):]}"] = value
    model.net.load_state_dict(mapped, strict=True)
    return model.requires_grad_(False).eval().to(device)
