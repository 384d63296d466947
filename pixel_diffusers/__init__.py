"""pixel_diffusers: pixel-space diffusion models (no VAE) as first-class citizens of Hugging Face diffusers.

Every public class is imported eagerly: diffusers (0.42) resolves the component classes named in a saved
`model_index.json` through `sys.modules`, so their modules must be loaded before `from_pretrained` runs.
"""

import logging as _logging


class _TorchvisionFallbackNotice(_logging.Filter):
    """Drops transformers' one-time notice that an image processor falls back to its PIL version without torchvision:
    diffusers' pipeline modules, which we import, trigger it for CLIP and SigLIP, where a user can do nothing about
    it. Installed only while this package imports."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_notice_filter = _TorchvisionFallbackNotice()
_logging.getLogger("transformers.utils.import_utils").addFilter(_notice_filter)

from .hub import register_text_to_image_pipelines, register_with_diffusers
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

_logging.getLogger("transformers.utils.import_utils").removeFilter(_notice_filter)

__version__ = "0.1.0"

# JiTTransformer2DModel too: folders in the layout of diffusers PR #13098 name it as a diffusers class.
register_with_diffusers(
    AnalyticDiffusionPipeline, JiTPipeline, PixelDLMPipeline, PixelHDMPipeline, PixelSDXLPipeline, SmallDiffusionPipeline,
    JiTTransformer2DModel,
)
register_text_to_image_pipelines(pixelhdm=PixelHDMPipeline, pixel_sdxl=PixelSDXLPipeline)

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
    "register_text_to_image_pipelines",
    "register_with_diffusers",
]
