from .pipeline_mole_stable_diffusion import MoLEStableDiffusionPipeline

__all__ = ["MoLEStableDiffusionPipeline"]
