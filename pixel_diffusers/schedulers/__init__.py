"""Schedulers of pixel_diffusers."""

from .scheduling_gradient_estimation import GradientEstimationScheduler
from .scheduling_pixel_flow import PixelFlowMatchScheduler, PixelFlowMatchSchedulerOutput

__all__ = ["GradientEstimationScheduler", "PixelFlowMatchScheduler", "PixelFlowMatchSchedulerOutput"]
