"""pixel_diffusers: pixel-space diffusion models (no VAE) as first-class citizens of Hugging Face diffusers.

Every public class is imported eagerly: diffusers (0.42) resolves the component classes named in a saved
`model_index.json` through `sys.modules`, so their modules must be loaded before `from_pretrained` runs.
"""

from .hub import register_with_diffusers
from .models import (
    ConditionalMLP,
    IdealDenoiser,
    JiTTransformer2DModel,
    NearestDatasetDenoiser,
    OptimalDenoiser,
    PCALocalityDenoiser,
    PixelHDMTransformer2DModel,
    PixelSDXLUNet2DConditionModel,
    SmallDiT,
    SmallUNet,
    SmoothedCFDMDenoiser,
    Swissroll,
    TimeInputMLP,
    TreeDataset,
    WienerDenoiser,
)
from .pipelines import (
    AnalyticDiffusionPipeline,
    JiTPipeline,
    PixelDLMPipeline,
    PixelDLMPipelineOutput,
    PixelHDMLoraLoaderMixin,
    PixelHDMPipeline,
    PixelSDXLPipeline,
    SmallDiffusionPipeline,
    TextPixelCodec,
)
from .schedulers import GradientEstimationScheduler, PixelFlowMatchScheduler

__version__ = "0.1.0"

register_with_diffusers(
    AnalyticDiffusionPipeline, JiTPipeline, PixelDLMPipeline, PixelHDMPipeline, PixelSDXLPipeline, SmallDiffusionPipeline
)

__all__ = [
    "AnalyticDiffusionPipeline",
    "ConditionalMLP",
    "GradientEstimationScheduler",
    "IdealDenoiser",
    "JiTPipeline",
    "JiTTransformer2DModel",
    "NearestDatasetDenoiser",
    "OptimalDenoiser",
    "PCALocalityDenoiser",
    "PixelDLMPipeline",
    "PixelDLMPipelineOutput",
    "PixelFlowMatchScheduler",
    "PixelHDMLoraLoaderMixin",
    "PixelHDMPipeline",
    "PixelHDMTransformer2DModel",
    "PixelSDXLPipeline",
    "PixelSDXLUNet2DConditionModel",
    "SmallDiT",
    "SmallDiffusionPipeline",
    "SmallUNet",
    "SmoothedCFDMDenoiser",
    "TextPixelCodec",
    "Swissroll",
    "TimeInputMLP",
    "TreeDataset",
    "WienerDenoiser",
    "register_with_diffusers",
]
