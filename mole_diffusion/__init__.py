"""mole-diffusion: Mixture of LoRA Experts (MoLE) for Stable Diffusion, SDXL and Flux, on diffusers."""

from .config import GateConfig
from .errors import MoLEError
from .experts import Expert, ExpertError, load_expert
from .gate_file import GateFileError, load_gates, save_gates
from .gates import Gate
from .inject import MoLE, block_weights_to_diffusers, inject_experts
from .layers import MoLELayer
from .pipelines import MoLEFluxPipeline, MoLEStableDiffusionPipeline, MoLEStableDiffusionXLPipeline

__version__ = "0.1.0"
__all__ = [
    "Expert",
    "ExpertError",
    "Gate",
    "GateConfig",
    "GateFileError",
    "MoLE",
    "MoLEError",
    "MoLELayer",
    "MoLEFluxPipeline",
    "MoLEStableDiffusionPipeline",
    "MoLEStableDiffusionXLPipeline",
    "block_weights_to_diffusers",
    "inject_experts",
    "load_expert",
    "load_gates",
    "save_gates",
]
