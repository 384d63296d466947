from .pixelhdm import PixelHDMLoraLoaderMixin, PixelHDMPipeline

__all__ = ["PixelHDMLoraLoaderMixin", "PixelHDMPipeline"]
