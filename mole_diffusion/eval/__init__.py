"""Evaluation: CLIP models (``load_clip``) for scoring and for the CLIP training objective."""

from ..clip import ClipError, ClipModel, load_clip

__all__ = ["ClipError", "ClipModel", "load_clip"]
