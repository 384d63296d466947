from .analytic import (
    ANALYTIC_DENOISERS,
    NearestDatasetDenoiser,
    OptimalDenoiser,
    PCALocalityDenoiser,
    SmoothedCFDMDenoiser,
    WienerDenoiser,
)
from .small import ConditionalMLP, IdealDenoiser, SmallDiT, SmallUNet, Swissroll, TimeInputMLP, TreeDataset
from .transformers import PixelHDMTransformer2DModel, PixelHDMTransformerOutput
from .unets import PixelSDXLUNet2DConditionModel, PixelSDXLUNetOutput

__all__ = [
    "ANALYTIC_DENOISERS",
    "ConditionalMLP",
    "IdealDenoiser",
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
