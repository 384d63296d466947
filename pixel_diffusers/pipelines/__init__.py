from .analytic import AnalyticDiffusionPipeline, AnalyticPipelineOutput
from .jit import JiTPipeline
from .pixel_sdxl import PixelSDXLPipeline
from .pixeldlm import PixelDLMPipeline, PixelDLMPipelineOutput, TextPixelCodec
from .pixelhdm import PixelHDMLoraLoaderMixin, PixelHDMPipeline
from .small import SmallDiffusionPipeline, SmallDiffusionPipelineOutput

__all__ = [
    "AnalyticDiffusionPipeline",
    "AnalyticPipelineOutput",
    "JiTPipeline",
    "PixelDLMPipeline",
    "PixelDLMPipelineOutput",
    "PixelHDMLoraLoaderMixin",
    "PixelHDMPipeline",
    "PixelSDXLPipeline",
    "SmallDiffusionPipeline",
    "SmallDiffusionPipelineOutput",
    "TextPixelCodec",
]
