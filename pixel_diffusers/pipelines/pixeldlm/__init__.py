from .codec import TextPixelCodec
from .pipeline_pixeldlm import PixelDLMPipeline, PixelDLMPipelineOutput

__all__ = ["PixelDLMPipeline", "PixelDLMPipelineOutput", "TextPixelCodec"]
