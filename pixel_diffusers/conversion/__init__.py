from .jit import JiTConversionReport, convert_jit_checkpoint, convert_pixeldlm_checkpoint
from .pixel_sdxl import PixelSDXLConversionReport, convert_pixel_sdxl_checkpoint
from .pixelhdm import PixelHDMConversionReport, convert_pixelhdm_checkpoint
from .post_hoc_ema import post_hoc_ema, post_hoc_ema_weights
from .smalldiffusion import SmallDiffusionConversionReport, convert_smalldiffusion_checkpoint

__all__ = [
    "JiTConversionReport",
    "PixelHDMConversionReport",
    "PixelSDXLConversionReport",
    "SmallDiffusionConversionReport",
    "convert_jit_checkpoint",
    "convert_pixel_sdxl_checkpoint",
    "convert_pixelhdm_checkpoint",
    "convert_pixeldlm_checkpoint",
    "convert_smalldiffusion_checkpoint",
    "post_hoc_ema",
    "post_hoc_ema_weights",
]
