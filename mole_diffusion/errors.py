"""The one base class of the errors a user can fix: a bad file, concept, model or option, or a refusal.

The command prints these as one line (``mole-diffusion <command>: error: ...``); anything else (a bug, out of
memory) keeps its traceback. A ``ValueError``, so code that caught ValueError before still does.
"""

from __future__ import annotations

import os
from typing import TypeVar

from .quiet import quiet_loading

Pipeline = TypeVar("Pipeline")


class MoLEError(ValueError):
    """An input that cannot be used as it is; the message says which and why."""


class BaseModelError(MoLEError):
    """A base model (folder or hub id) that cannot be loaded as a pipeline of a supported family."""


def load_base_pipeline(cls: type[Pipeline], base: str | os.PathLike, **kwargs) -> Pipeline:
    """``cls.from_pretrained(base, **kwargs)``; a missing or unreadable model is a ``BaseModelError``. Without
    diffusers' and transformers' loading bars (``quiet_loading``): the command's own bar is the one shown.
    ``safety_checker`` is passed only to pipelines that have one (SD 1.x / 2.x)."""
    import inspect

    if "safety_checker" not in inspect.signature(cls.__init__).parameters:
        kwargs.pop("safety_checker", None)
    try:
        with quiet_loading():
            return cls.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:  # diffusers: OSError for missing files, ValueError for a bad path or id
        raise BaseModelError(f"{base}: cannot load a {cls.__name__} ({err})") from err
