from .pipeline_jit import JiTPipeline

__all__ = ["JiTPipeline"]
