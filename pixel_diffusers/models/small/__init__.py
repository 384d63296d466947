from .dit import SmallDiT
from .ideal import IdealDenoiser
from .mlp import ConditionalMLP, TimeInputMLP
from .small_utils import CondEmbedderLabel, SigmaEmbedderSinCos, SmallDiffusionModel, TimestepEmbedder
from .toy_data import Swissroll, TreeDataset
from .unet import SmallUNet

__all__ = [
    "CondEmbedderLabel",
    "ConditionalMLP",
    "IdealDenoiser",
    "SigmaEmbedderSinCos",
    "SmallDiT",
    "SmallDiffusionModel",
    "SmallUNet",
    "Swissroll",
    "TimeInputMLP",
    "TimestepEmbedder",
    "TreeDataset",
]
