from .analytic import (
    ANALYTIC_DENOISERS,
    NearestDatasetDenoiser,
    OptimalDenoiser,
    PCALocalityDenoiser,
    SmoothedCFDMDenoiser,
    WienerDenoiser,
)
from .small import ConditionalMLP, IdealDenoiser, SmallDiT, SmallUNet, Swissroll, TimeInputMLP, TreeDataset
from .transformers import JiTTransformer2DModel, JiTTransformerOutput, PixelHDMTransformer2DModel, PixelHDMTransformerOutput
from .unets import PixelSDXLUNet2DConditionModel, PixelSDXLUNetOutput

__all__ = [
    "ANALYTIC_DENOISERS",
    "ConditionalMLP",
    "IdealDenoiser",
    "JiTTransformer2DModel",
    "JiTTransformerOutput",
    "NearestDatasetDenoiser",
    "OptimalDenoiser",
    "PCALocalityDenoiser",
    "PixelHDMTransformer2DModel",
    "PixelHDMTransformerOutput",
    "PixelSDXLUNet2DConditionModel",
    "PixelSDXLUNetOutput",
    "SmallDiT",
    "SmallUNet",
    "SmoothedCFDMDenoiser",
    "Swissroll",
    "TimeInputMLP",
    "TreeDataset",
    "WienerDenoiser",
]
