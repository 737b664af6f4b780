from .mixin import MoLEPipelineMixin
from .pipeline_mole_flux import MoLEFluxPipeline
from .pipeline_mole_stable_diffusion import MoLEStableDiffusionPipeline
from .pipeline_mole_stable_diffusion_xl import MoLEStableDiffusionXLPipeline

__all__ = ["MoLEFluxPipeline", "MoLEPipelineMixin", "MoLEStableDiffusionPipeline", "MoLEStableDiffusionXLPipeline"]
