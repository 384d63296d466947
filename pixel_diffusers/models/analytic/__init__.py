from .nearest_dataset import NearestDatasetDenoiser
from .optimal import OptimalDenoiser
from .pca_locality import PCALocalityDenoiser
from .scfdm import SmoothedCFDMDenoiser
from .wiener import WienerDenoiser

ANALYTIC_DENOISERS = {
    "nearest_dataset": NearestDatasetDenoiser,
    "optimal": OptimalDenoiser,
    "scfdm": SmoothedCFDMDenoiser,
    "wiener": WienerDenoiser,
    "pca_locality": PCALocalityDenoiser,
}

__all__ = [
    "ANALYTIC_DENOISERS",
    "NearestDatasetDenoiser",
    "OptimalDenoiser",
    "PCALocalityDenoiser",
    "SmoothedCFDMDenoiser",
    "WienerDenoiser",
]
