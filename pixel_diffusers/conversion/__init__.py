from .pixel_sdxl import PixelSDXLConversionReport, convert_pixel_sdxl_checkpoint
from .pixelhdm import PixelHDMConversionReport, convert_pixelhdm_checkpoint
from .post_hoc_ema import post_hoc_ema, post_hoc_ema_weights

__all__ = [
    "PixelHDMConversionReport",
    "PixelSDXLConversionReport",
    "convert_pixel_sdxl_checkpoint",
    "convert_pixelhdm_checkpoint",
    "post_hoc_ema",
    "post_hoc_ema_weights",
]
