from __future__ import annotations

import os

from ..errors import BaseModelError
from .mixin import MoLEPipelineMixin
from .pipeline_mole_flux import MoLEFluxPipeline
from .pipeline_mole_stable_diffusion import MoLEStableDiffusionPipeline
from .pipeline_mole_stable_diffusion_xl import MoLEStableDiffusionXLPipeline

__all__ = ["MoLEFluxPipeline", "MoLEPipelineMixin", "MoLEStableDiffusionPipeline", "MoLEStableDiffusionXLPipeline",
           "mole_pipeline_class"]

MOLE_PIPELINES = {cls.family: cls for cls in (MoLEStableDiffusionPipeline, MoLEStableDiffusionXLPipeline, MoLEFluxPipeline)}


def mole_pipeline_class(base: str | os.PathLike) -> type[MoLEPipelineMixin]:
    """The MoLE pipeline for a base model (a diffusers folder or hub id), chosen by the ``_class_name`` of its
    ``model_index.json``: SD 1.x / 2.x, SDXL or Flux. Its ``diffusers_class`` is the diffusers pipeline it extends."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(str(base))["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())  # one line: diffusers' message runs over several
        raise BaseModelError(f"{base}: cannot load a pipeline: no readable model_index.json ({detail})") from err
    for cls in MOLE_PIPELINES.values():
        if name in (cls.__name__, cls.diffusers_class().__name__):
            return cls
    raise BaseModelError(f"{base}: a {name}; mole-diffusion runs Stable Diffusion 1.x/2.x "
                         "(StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) and Flux (FluxPipeline) bases")
