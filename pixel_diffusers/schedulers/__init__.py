"""Schedulers of pixel_diffusers."""

from .scheduling_pixel_flow import PixelFlowMatchScheduler, PixelFlowMatchSchedulerOutput

__all__ = ["PixelFlowMatchScheduler", "PixelFlowMatchSchedulerOutput"]
