from .transformer_jit import JIT_PRESETS, JiTTransformer2DModel, JiTTransformerOutput
from .transformer_pixelhdm import PixelHDMTransformer2DModel, PixelHDMTransformerOutput

__all__ = [
    "JIT_PRESETS",
    "JiTTransformer2DModel",
    "JiTTransformerOutput",
    "PixelHDMTransformer2DModel",
    "PixelHDMTransformerOutput",
]
