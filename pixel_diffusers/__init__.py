"""pixel_diffusers: pixel-space diffusion models (no VAE) as first-class citizens of Hugging Face diffusers.

Every public class is imported eagerly: diffusers (0.42) resolves the component classes named in a saved
`model_index.json` through `sys.modules`, so their modules must be loaded before `from_pretrained` runs.
"""

from .hub import register_with_diffusers
from .models import PixelHDMTransformer2DModel
from .pipelines import PixelHDMLoraLoaderMixin, PixelHDMPipeline
from .schedulers import PixelFlowMatchScheduler

__version__ = "0.1.0"

register_with_diffusers(PixelHDMPipeline)

__all__ = [
    "PixelFlowMatchScheduler",
    "PixelHDMLoraLoaderMixin",
    "PixelHDMPipeline",
    "PixelHDMTransformer2DModel",
    "register_with_diffusers",
]
