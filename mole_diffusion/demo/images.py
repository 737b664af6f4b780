"""The demo world's scenes as tensors, at the resolution its models are built for, and the shifts they train with.
Shared by the build (``build.py``: CLIP, VAE, base model) and the attribute judge's training (``judge.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..eval.attribute_judge import pil_to_uint8
from . import world

RESOLUTION = 64  # images are 64x64: the VAE, UNet and CLIP configs of build.py and the judge are sized for it


def scene_pixels(scenes: list[world.Scene]) -> torch.Tensor:
    """(N, 3, H, W) uint8 images of ``scenes``."""
    return pil_to_uint8([world.draw(s, RESOLUTION) for s in scenes], RESOLUTION)


def jitter(images: torch.Tensor, generator: torch.Generator, most: int = 4) -> torch.Tensor:
    """Each image moved by up to ``most`` pixels each way (edges repeated). Without it the judge keys on
    where stripes and checker cells sit on its 8-pixel patch grid: moved 4 pixels, clean images lost a third
    of their zero-shot accuracy, and generated images, never pixel-aligned, were misread."""
    padded = F.pad(images.float(), (most,) * 4, mode="replicate").to(images.dtype)
    side = images.shape[-1]
    offsets = torch.randint(0, 2 * most + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([p[:, y : y + side, x : x + side] for p, (x, y) in zip(padded, offsets)])
