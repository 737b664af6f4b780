"""The schedulers the command line offers by short name; shared by `generate` and `evaluate`, below both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MoLEError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def use_scheduler(pipe: "DiffusionPipeline", name: str) -> None:
    """Replace the pipeline's scheduler by the one named, built from the checkpoint's own scheduler config."""
    import diffusers  # here, so that `mole-diffusion --help` stays quick

    if isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        raise MoLEError(f"--scheduler {name}: this base samples by flow matching (Flux) with its own "
                        "FlowMatchEulerDiscreteScheduler; the schedulers offered are Stable Diffusion's and SDXL's")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
