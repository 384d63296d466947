from .analytic import AnalyticDiffusionPipeline, AnalyticPipelineOutput
from .pixel_sdxl import PixelSDXLPipeline
from .pixelhdm import PixelHDMLoraLoaderMixin, PixelHDMPipeline
from .small import SmallDiffusionPipeline, SmallDiffusionPipelineOutput

__all__ = [
    "AnalyticDiffusionPipeline",
    "AnalyticPipelineOutput",
    "PixelHDMLoraLoaderMixin",
    "PixelHDMPipeline",
    "PixelSDXLPipeline",
    "SmallDiffusionPipeline",
    "SmallDiffusionPipelineOutput",
]
