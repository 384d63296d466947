from .unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel, PixelSDXLUNetOutput

__all__ = ["PIXEL_SDXL_PRESETS", "PixelSDXLUNet2DConditionModel", "PixelSDXLUNetOutput"]
