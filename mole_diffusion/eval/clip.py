"""CLIP models through open_clip: unit-length image and text embeddings, for scores and for the CLIP
training objective (whose image path is differentiable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClipError(ValueError):
    """A CLIP model that cannot be loaded as given."""


class ClipModel:
    """An open_clip model with its preprocessing and tokenizer. Embeddings are L2-normalised."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, name: str):
        import open_clip

        self.model, self.preprocess, self.tokenizer, self.name = model.eval().requires_grad_(False), preprocess, tokenizer, name
        config = open_clip.get_model_preprocess_cfg(model)
        self.size = config["size"] if isinstance(config["size"], int) else config["size"][0]
        self.mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"]).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D). Differentiable: bicubic resize of the short side, centre crop, normalise."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        size = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        images = images[..., top : top + self.size, left : left + self.size]
        images = (images - self.mean.to(images.device)) / self.std.to(images.device)
        return F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """``model``: an open_clip name ("ViT-B-32") with ``pretrained`` (a tag such as "openai", or a local
    checkpoint file), or "local-dir:PATH" (a folder with open_clip_config.json and open_clip_model.safetensors)."""
    import open_clip

    if not pretrained and not model.startswith(("local-dir:", "hf-hub:")):
        raise ClipError(f"CLIP model {model}: give pretrained= (a tag such as 'openai', or a checkpoint file); "
                        "without weights its scores mean nothing")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as err:  # open_clip raises RuntimeError/ValueError/OSError/KeyError for unknown names and bad files
        what = f"{model}" + (f" with pretrained={pretrained}" if pretrained else "")
        raise ClipError(f"cannot load CLIP model {what}: {type(err).__name__}: {err}") from None
    return ClipModel(clip, preprocess, tokenizer, model)
