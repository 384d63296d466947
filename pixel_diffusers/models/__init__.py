from .transformers import PixelHDMTransformer2DModel, PixelHDMTransformerOutput

__all__ = ["PixelHDMTransformer2DModel", "PixelHDMTransformerOutput"]
