from .pipeline_analytic import AnalyticDiffusionPipeline, AnalyticPipelineOutput, mse, r2, studio_scheduler

__all__ = ["AnalyticDiffusionPipeline", "AnalyticPipelineOutput", "mse", "r2", "studio_scheduler"]
