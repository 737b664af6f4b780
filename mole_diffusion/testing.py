"""Tiny, random Stable Diffusion checkpoints and LoRA files, built offline from configs.

For this project's tests and for users' own CI: no hub, no download. The tokenizer is the real CLIP BPE
tokenizer, built from the vocabulary file that ships inside ``open_clip``.

    from mole_diffusion.testing import make_tiny_pipeline, make_tiny_lora
    path = make_tiny_pipeline("tiny-sd")
    make_tiny_lora(path, "dog.safetensors", seed=1)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["make_clip_tokenizer", "make_concept_images", "make_tiny_clip", "make_tiny_dino", "make_tiny_owlvit", "make_tiny_transformers_clip", "make_tiny_pipeline", "make_tiny_lora", "TINY_UNET_CONFIG"]

TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=32,
)


def make_clip_tokenizer(path: str | os.PathLike):
    """Write a real CLIP tokenizer (vocab.json, merges.txt) to ``path`` from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_pipeline(path: str | os.PathLike, seed: int = 0, **unet_config) -> Path:
    """Write a tiny random Stable Diffusion pipeline folder (loadable with ``from_pretrained``) to ``path``.

    ``unet_config`` overrides entries of ``TINY_UNET_CONFIG`` (for a differently shaped base).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, **unet_config})
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    tokenizer = make_clip_tokenizer(path / "tokenizer")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


UNET_ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffixes) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def make_tiny_lora(
    pipeline_path: str | os.PathLike,
    out: str | os.PathLike,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    layout: str = "diffusers",
    text_encoder: bool = True,
    unet_modules: tuple[str, ...] = UNET_ATTENTION_MODULES,
    text_modules: tuple[str, ...] = TEXT_ATTENTION_MODULES,
    std: float = 0.3,
) -> Path:
    """Write a random LoRA for the tiny pipeline at ``pipeline_path``.

    ``layout="diffusers"`` writes what ``StableDiffusionPipeline.save_lora_weights`` writes (PEFT keys,
    ``lora_adapter_metadata`` holding ``lora_alpha`` and ``r``); ``layout="kohya"`` writes the A1111/kohya
    layout (``lora_unet_*.lora_down/lora_up/alpha``). Modules ending in ``unet_modules`` (any Linear or Conv2d,
    so ``"conv1"`` gives a LoCon-style conv LoRA) are adapted. The same seed gives the same tensors in both
    layouts, so the two files are twins.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    pipeline_path, out = Path(pipeline_path), Path(out)
    alpha = float(rank if alpha is None else alpha)
    generator = torch.Generator().manual_seed(seed)
    models = {"unet": (UNet2DConditionModel.from_pretrained(pipeline_path / "unet"), unet_modules)}
    if text_encoder:
        models["text_encoder"] = (CLIPTextModel.from_pretrained(pipeline_path / "text_encoder"), text_modules)

    layers: dict[str, dict[str, torch.Tensor]] = {component: {} for component in models}
    targets: dict[str, list[str]] = {component: [] for component in models}
    for component, (model, suffixes) in models.items():
        for name, module in _lora_targets(model, suffixes):
            if isinstance(module, torch.nn.Linear):
                down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
            else:
                down_shape = (rank, module.in_channels, *module.kernel_size)
                up_shape = (module.out_channels, rank, 1, 1)
            layers[component][f"{name}.lora_A.weight"] = torch.randn(down_shape, generator=generator) * std
            layers[component][f"{name}.lora_B.weight"] = torch.randn(up_shape, generator=generator) * std
            targets[component].append(name)

    out.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        from diffusers import StableDiffusionPipeline

        metadata = {f"{c}_lora_adapter_metadata": {"r": rank, "lora_alpha": alpha, "target_modules": t} for c, t in targets.items()}
        StableDiffusionPipeline.save_lora_weights(
            out.parent,
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers.get("text_encoder"),
            weight_name=out.name,
            **metadata,
        )
    elif layout == "kohya":
        tensors = {}
        for component, component_layers in layers.items():
            # kohya names text-encoder modules from `text_model.`, as transformers 4 did
            prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
            for name in targets[component]:
                key = prefix + name.removeprefix("text_model.").replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = component_layers[f"{name}.lora_A.weight"]
                tensors[f"{key}.lora_up.weight"] = component_layers[f"{name}.lora_B.weight"]
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
        save_file(tensors, str(out), metadata={"format": "pt"})
    else:
        raise ValueError(f"layout must be 'diffusers' or 'kohya', got {layout!r}")
    return out


def make_concept_images(
    folder: str | os.PathLike, shape: str, colour: tuple[int, int, int], count: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """``count`` PNGs of a coloured circle or square at a jittered place and size on a light background."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        x, y, r = (torch.rand(3, generator=generator) * torch.tensor([size / 3, size / 3, size / 6])).int().tolist()
        x, y, r = x + size // 3, y + size // 3, r + size // 6
        image = Image.new("RGB", (size, size), (230, 230, 225))
        draw = ImageDraw.Draw(image)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            raise ValueError(f"shape must be 'circle' or 'square', got {shape!r}")
        image.save(folder / f"{i}.png")
    return folder


TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP's
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def make_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """A random tiny open_clip model folder; returns its open_clip name, ``"local-dir:<path>"``."""
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{path}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


# text and vision towers of the tiny CLIP-like transformers models below
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)


def make_tiny_transformers_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny transformers ``CLIPModel`` folder with its processor (for ``--clip-model PATH``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = make_clip_tokenizer(path)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(TINY_TOWER, max_position_embeddings=77),
                        vision_config=dict(TINY_TOWER, image_size=32, patch_size=8), projection_dim=32)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def make_tiny_dino(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny DINOv2 folder with its image processor (for ``evaluate --image-model PATH``)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = Path(path)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def make_tiny_owlvit(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny OWL-ViT detector folder with its processor (for ``evaluate --presence-model PATH``; random
    weights, so only the machinery can be tested with it)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    path = Path(path)
    tokenizer = make_clip_tokenizer(path)
    torch.manual_seed(seed)
    config = OwlViTConfig(text_config=dict(TINY_TOWER, max_position_embeddings=16),
                          vision_config=dict(TINY_TOWER, image_size=32, patch_size=8), projection_dim=32)
    model = OwlViTForObjectDetection(config)
    with torch.no_grad():  # logits = the box-query cosine (random heads saturate every score at 0 or 1)
        for head in (model.class_head.logit_shift, model.class_head.logit_scale):
            head.weight.zero_()
            head.bias.zero_()
    model.save_pretrained(path)
    image_processor = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
