from .analytic import AnalyticDiffusionPipeline, AnalyticPipelineOutput
from .pixelhdm import PixelHDMLoraLoaderMixin, PixelHDMPipeline
from .small import SmallDiffusionPipeline, SmallDiffusionPipelineOutput

__all__ = [
    "AnalyticDiffusionPipeline",
    "AnalyticPipelineOutput",
    "PixelHDMLoraLoaderMixin",
    "PixelHDMPipeline",
    "SmallDiffusionPipeline",
    "SmallDiffusionPipelineOutput",
]
