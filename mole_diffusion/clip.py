"""CLIP models (open_clip, or a transformers ``CLIPModel`` folder) and image backbones (DINO and other
transformers vision models): unit-length embeddings, for scores and for the CLIP training objective (whose
image path is differentiable)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import MoLEError
from .quiet import quiet_loading


class ClipError(MoLEError):
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
        return F.normalize(self._encode_image(images.to(self.device)).float(), dim=-1)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def embed_pil(self, images: list, batch_size: int = 32) -> torch.Tensor:
        """(len(images), D) through the model's own preprocessing, as open_clip scores images."""
        return _batched(images, batch_size, lambda chunk: self._encode_image(
            torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)))


class TransformersClip(ClipModel):
    """A transformers ``CLIPModel`` folder, with its image processor and tokenizer."""

    def __init__(self, folder: str, device):
        from transformers import AutoProcessor, CLIPModel

        with quiet_loading():  # no "Loading weights" bar before the evaluator's own
            self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.processor, self.name = AutoProcessor.from_pretrained(folder), folder
        image_processor = self.processor.image_processor
        self.size = image_processor.crop_size["height"]
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)

    @torch.no_grad()
    def embed_pil(self, images: list, batch_size: int = 32) -> torch.Tensor:
        return _batched(images, batch_size, lambda chunk: self._encode_image(
            self.processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").pixel_values.to(self.device)))


class ImageBackbone:
    """A transformers vision model (DINO, DINOv2, ViT...) for image alignment: its CLS token, unit length."""

    def __init__(self, folder: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel

        try:
            with quiet_loading():
                self.model = AutoModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
            self.processor = AutoImageProcessor.from_pretrained(folder)
        except Exception as err:
            raise ClipError(f"cannot load image model {folder}: {type(err).__name__}: {err}") from None
        self.name = folder

    @torch.no_grad()
    def embed_pil(self, images: list, batch_size: int = 32) -> torch.Tensor:
        def cls_token(chunk):
            pixels = self.processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").pixel_values
            return self.model(pixel_values=pixels.to(self.model.device)).last_hidden_state[:, 0]

        return _batched(images, batch_size, cls_token)


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as ``pooler_output``; 4.x returns the tensor itself."""
    return output if torch.is_tensor(output) else output.pooler_output


def _batched(images: list, batch_size: int, embed) -> torch.Tensor:
    chunks = [embed(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1).cpu()


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """``model``: an open_clip name ("ViT-B-32") with ``pretrained`` (a tag such as "openai", or a local
    checkpoint file), "local-dir:PATH" (a folder with open_clip_config.json and open_clip_model.safetensors),
    or a transformers ``CLIPModel`` folder (config.json with model_type "clip")."""
    import open_clip

    config = Path(model) / "config.json"
    if config.is_file():
        if json.loads(config.read_text()).get("model_type") != "clip":
            raise ClipError(f"{model}: a transformers folder, but not a CLIPModel (config.json model_type is not 'clip')")
        try:
            return TransformersClip(model, device)
        except Exception as err:
            raise ClipError(f"cannot load CLIP model {model}: {type(err).__name__}: {err}") from None

    if not pretrained and not model.startswith(("local-dir:", "hf-hub:")):
        raise ClipError(f"CLIP model {model}: give pretrained= (a tag such as 'openai', or a checkpoint file); "
                        "without weights its scores mean nothing")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as err:  # open_clip raises RuntimeError/ValueError/OSError/KeyError for unknown names and bad files
        what = f"{model}" + (f" with pretrained={pretrained}" if pretrained else "")
        raise ClipError(f"cannot load CLIP model {what}: {type(err).__name__}: {err}") from None
    return ClipModel(clip, preprocess, tokenizer, f"{model}|{pretrained}" if pretrained else model)  # name keys the cache
