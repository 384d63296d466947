from .pixelhdm import PixelHDMConversionReport, convert_pixelhdm_checkpoint

__all__ = ["PixelHDMConversionReport", "convert_pixelhdm_checkpoint"]
