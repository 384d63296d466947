from .pipeline_pixel_sdxl import PixelSDXLPipeline

__all__ = ["PixelSDXLPipeline"]
