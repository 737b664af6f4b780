"""CLIP scores of generated images (docs/method.md).

- text alignment: cos(E_I(image), E_T(prompt)); also ``clip_score_2.5`` = 2.5 * max(cos, 0) (CLIPScore,
  Custom Diffusion's convention) and ``clip_score_100`` = 100 * max(cos, 0) (torchmetrics' convention);
- image alignment to concept k: the mean cosine to k's reference images; ``image_min`` is the minimum over
  the composed concepts (a composition is only as good as its weakest concept).
Reference embeddings are cached on disk, keyed by the model and the images' content hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ..clip import ClipModel, ImageBackbone
from ..concepts import list_images


def embed_pil(model, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """(len(images), D) unit embeddings through the model's own preprocessing."""
    return model.embed_pil(images, batch_size)


def reference_embeddings(clip: ClipModel | ImageBackbone, folder: Path, cache_dir: Path | None = None) -> torch.Tensor:
    """Embeddings of a concept's reference images, from the disk cache when the same images were seen."""
    files = list_images(folder)
    digest = hashlib.sha256(clip.name.encode())
    for file in files:
        digest.update(file.read_bytes())
    cached = cache_dir / f"{digest.hexdigest()[:32]}.safetensors" if cache_dir else None
    if cached is not None and cached.is_file():
        return load_file(str(cached))["embeddings"]
    embeddings = embed_pil(clip, [Image.open(f) for f in files])
    if cached is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")  # processes of one run may write the same entry
        save_file({"embeddings": embeddings.contiguous()}, str(temporary))
        temporary.replace(cached)
    return embeddings


def _image_alignment(embed: torch.Tensor, references: dict[str, torch.Tensor], composed: list[str], prefix: str) -> dict[str, float]:
    row = {f"{prefix}_image_{name}": float((refs @ embed).mean()) for name, refs in references.items()}
    if composed:
        row[f"{prefix}_image_min"] = min(row[f"{prefix}_image_{name}"] for name in composed)
    return row


def image_alignment(model, images: list[Image.Image], references: dict[str, torch.Tensor], composed: list[list[str]],
                    prefix: str) -> list[dict[str, float]]:
    """Image alignment only (for a second backbone such as DINO): ``<prefix>_image_<concept>`` and ``_min``."""
    return [_image_alignment(embed, references, composed[i], prefix) for i, embed in enumerate(embed_pil(model, images))]


def score_images(
    clip: ClipModel, images: list[Image.Image], prompts: list[str], references: dict[str, torch.Tensor],
    composed: list[list[str]], prefix: str = "clip",
) -> list[dict[str, float]]:
    """One row of scores per image: text alignment to its prompt, image alignment to each concept in
    ``references``, and the minimum over the concepts the image composes (``composed[i]``)."""
    image_embeds = embed_pil(clip, images)
    text_embeds = F.normalize(clip.embed_texts(prompts).cpu(), dim=-1)
    rows = []
    for i, image_embed in enumerate(image_embeds):
        cos = float(image_embed @ text_embeds[i])
        row = {f"{prefix}_text": cos, f"{prefix}_score_2.5": 2.5 * max(cos, 0.0), f"{prefix}_score_100": 100 * max(cos, 0.0)}
        rows.append({**row, **_image_alignment(image_embed, references, composed[i], prefix)})
    return rows
