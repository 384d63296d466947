from .pipeline_small import SmallDiffusionPipeline, SmallDiffusionPipelineOutput

__all__ = ["SmallDiffusionPipeline", "SmallDiffusionPipelineOutput"]
