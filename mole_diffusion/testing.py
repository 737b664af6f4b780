"""Tiny, random Stable Diffusion checkpoints and LoRA files, built offline from configs.

For this project's tests and for users' own CI: no hub, no download. The tokenizer is the real CLIP BPE
tokenizer, built from the vocabulary file that ships inside ``open_clip`` (``offline_tokenizers``).

    from mole_diffusion.testing import make_tiny_pipeline, make_tiny_lora
    path = make_tiny_pipeline("tiny-sd")
    make_tiny_lora(path, "dog.safetensors", seed=1)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .lycoris import lycoris_to_lora
from .offline_tokenizers import make_clip_tokenizer

__all__ = ["make_clip_tokenizer", "make_t5_tokenizer", "pipeline_family", "make_concept_images", "make_tiny_clip", "make_tiny_dino", "make_tiny_owlvit", "make_tiny_transformers_clip", "make_tiny_pipeline", "make_tiny_lora", "tiny_lora_deltas", "sgm_module_name", "TINY_UNET_CONFIG"]

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


FAMILIES = ("sd", "sdxl", "flux")
# SDXL: the UNet reads both text encoders' hidden states side by side (32 + 32) and, as added conditions,
# the second encoder's pooled projection (32) and six size/crop numbers embedded in 8 each (32 + 48 = 80)
TINY_SDXL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    cross_attention_dim=64,
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)
TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True,
)
TINY_FLUX_VAE_CONFIG = dict(  # 4 latent channels, packed 2x2 into the transformer's 16
    TINY_VAE_CONFIG, latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
    scaling_factor=1.5035,
)
TINY_T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


def make_t5_tokenizer(path: str | os.PathLike):
    """A small T5 tokenizer (a Unigram over letters, digits and punctuation, with T5's pad, eos and unk), built in
    memory with ``tokenizers``: Flux's second tokenizer, with no hub to download T5's own from."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t5 = T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                         extra_ids=0, model_max_length=64)  # FLUX.1's T5 reads 512: tests train on fewer
    t5.save_pretrained(path)
    return t5


def make_tiny_pipeline(path: str | os.PathLike, seed: int = 0, family: str = "sd", **unet_config) -> Path:
    """Write a tiny random pipeline folder (loadable with ``from_pretrained``) to ``path``.

    ``family``: "sd" (Stable Diffusion 1.x), "sdxl" (two CLIP text encoders, the UNet's added conditions) or
    "flux" (FluxTransformer2DModel, CLIP and T5 text encoders, flow matching). ``unet_config`` overrides entries
    of the denoiser's config (``TINY_UNET_CONFIG``, ``TINY_SDXL_UNET_CONFIG`` or ``TINY_FLUX_TRANSFORMER_CONFIG``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    tokenizer = make_clip_tokenizer(path / "tokenizer")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    if family == "sd":
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**{**TINY_UNET_CONFIG, **unet_config}),
            vae=AutoencoderKL(**TINY_VAE_CONFIG),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**{**TINY_SDXL_UNET_CONFIG, **unet_config}),
            vae=AutoencoderKL(**TINY_VAE_CONFIG),
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG)),
            tokenizer=tokenizer,
            tokenizer_2=make_clip_tokenizer(path / "tokenizer_2"),
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        t5_tokenizer = make_t5_tokenizer(path / "tokenizer_2")
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER_CONFIG, **unet_config}),
            vae=AutoencoderKL(**TINY_FLUX_VAE_CONFIG),
            text_encoder=text_encoder,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **TINY_T5_CONFIG)),
            tokenizer=tokenizer,
            tokenizer_2=t5_tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    pipe.save_pretrained(path)
    return path


def pipeline_family(pipeline_path: str | os.PathLike) -> str:
    """"sd", "sdxl" or "flux", from the folder's ``model_index.json``."""
    index = Path(pipeline_path) / "model_index.json"
    name = json.loads(index.read_text())["_class_name"] if index.exists() else ""
    return "flux" if "Flux" in name else "sdxl" if "XL" in name else "sd"


UNET_ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
# Flux LoRAs as kohya writes them (BFL's module names, q/k/v fused): kohya name -> the transformer's modules
# (diffusers' names) it is split into, with the split of its lora_up rows
FLUX_KOHYA_MODULES = {
    "double_blocks_{i}_img_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), "transformer_blocks.{i}"),
    "double_blocks_{i}_img_attn_proj": (("attn.to_out.0",), "transformer_blocks.{i}"),
    "double_blocks_{i}_txt_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "transformer_blocks.{i}"),
    "double_blocks_{i}_txt_attn_proj": (("attn.to_add_out",), "transformer_blocks.{i}"),
    "double_blocks_{i}_img_mlp_0": (("ff.net.0.proj",), "transformer_blocks.{i}"),
    # (no single_blocks linear1: diffusers' converter splits it at FLUX.1's own widths, 3072 x 3 + 12288)
    "single_blocks_{i}_linear2": (("proj_out",), "single_transformer_blocks.{i}"),
}
# XLabs writes only the double blocks' attention, q/k/v fused
FLUX_XLABS_MODULES = {"processor.qkv_lora1": "double_blocks_{i}_img_attn_qkv", "processor.proj_lora1": "double_blocks_{i}_img_attn_proj",
                      "processor.qkv_lora2": "double_blocks_{i}_txt_attn_qkv", "processor.proj_lora2": "double_blocks_{i}_txt_attn_proj"}
LAYOUTS = ("diffusers", "kohya", "ai-toolkit", "xlabs", "kohya-sgm", "peft")
FAMILY_LAYOUTS = {"sd": ("diffusers", "peft", "kohya"), "sdxl": ("diffusers", "peft", "kohya", "kohya-sgm"),
                  "flux": ("diffusers", "peft", "kohya", "ai-toolkit", "xlabs")}
# kohya's names for a diffusers resnet's layers in the original (sgm) SDXL UNet
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                     "conv_shortcut": "skip_connection"}


def sgm_module_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet module name in the original (sgm) SDXL UNet's terms, as kohya's sd-scripts write it:
    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (with 2 layers per block)."""
    parts = name.split(".")
    inner = {"resnets": 0, "attentions": 1}
    if parts[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        head, rest = f"middle_block.{index}", parts[3:]
    else:
        block, kind, layer = int(parts[1]), parts[2], int(parts[3])
        if kind not in inner:
            raise ValueError(f"{name}: only resnets and attentions have sgm names here")
        if parts[0] == "down_blocks":
            head = f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.{inner[kind]}"
        else:
            head = f"output_blocks.{block * (layers_per_block + 1) + layer}.{inner[kind]}"
        rest = parts[4:]
    if "resnets" in name:
        rest = SGM_RESNET_LAYERS[".".join(rest)].split(".")
    return ".".join([head, *rest])


def _lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffixes) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _flux_groups(transformer: torch.nn.Module, layout: str) -> list[tuple[str, list[str]]]:
    """(kohya name, the transformer modules it covers) for every fused module of the tiny Flux transformer."""
    groups = []
    for kohya, (modules, block) in FLUX_KOHYA_MODULES.items():
        kind = "transformer_blocks" if kohya.startswith("double") else "single_transformer_blocks"
        if layout == "xlabs" and (kind != "transformer_blocks" or "mlp" in kohya):
            continue
        for i in range(len(getattr(transformer, kind))):
            groups.append((kohya.format(i=i), [f"{block.format(i=i)}.{m}" for m in modules]))
    return groups


def make_tiny_lora(
    pipeline_path: str | os.PathLike,
    out: str | os.PathLike,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    layout: str = "diffusers",
    text_encoder: bool = True,
    unet_modules: tuple[str, ...] | None = None,
    text_modules: tuple[str, ...] = TEXT_ATTENTION_MODULES,
    std: float = 0.3,
    per_module: bool = False,
    rslora: bool = False,
    dora: bool = False,
) -> Path:
    """Write a random LoRA for the tiny pipeline at ``pipeline_path`` (any family, read from its model_index).

    Layouts (``FAMILY_LAYOUTS`` says which a family has):

    - ``"diffusers"``: what the pipeline class's ``save_lora_weights`` writes (PEFT keys, ``lora_adapter_metadata``
      holding ``lora_alpha``, ``r`` and, with ``per_module``, ``rank_pattern`` / ``alpha_pattern``);
    - ``"peft"``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for the denoiser
      alone, as ``PeftModel.save_pretrained`` writes it; ``rslora`` sets ``use_rslora`` (scale alpha / sqrt(r));
    - ``"kohya"``: the A1111/kohya layout (``lora_unet_*`` / ``lora_te_*`` (SDXL and Flux: ``lora_te1_*``,
      ``lora_te2_*``) ``.lora_down/lora_up/alpha``, an alpha per module; Flux with BFL's module names and q/k/v fused);
    - ``"kohya-sgm"`` (SDXL): kohya with the original (sgm) UNet block names, as kohya's sd-scripts write SDXL LoRAs;
    - Flux also has ``"ai-toolkit"`` (diffusers keys, no metadata, alpha folded into the weights) and ``"xlabs"``
      (the double blocks' attention only, no alpha: scale 1).

    SD and SDXL: modules ending in ``unet_modules`` (default: attention's q/k/v/out; any Linear or Conv2d, so
    ``"conv1"`` gives a LoCon-style conv LoRA) and, with ``text_encoder``, ``text_modules`` of every text encoder
    are adapted. Flux: the fused kohya modules that cover a module ending in ``unet_modules`` (default: all).
    ``per_module`` gives module i its own alpha (``alpha * (1 + i % 3)``) and every third module half the rank,
    as real kohya files can have. ``dora`` (diffusers and PEFT layouts) adds DoRA magnitudes (PEFT's
    ``lora_magnitude_vector``): the norm of each output channel of W + alpha/r B A, times 1 + N(0, 0.2).
    The same arguments give the same LoRA in every layout, so the files are twins; ``tiny_lora_deltas`` returns
    the weight deltas they hold, in closed form.
    """
    pipeline_path, out = Path(pipeline_path), Path(out)
    family = pipeline_family(pipeline_path)
    if layout not in FAMILY_LAYOUTS[family]:
        raise ValueError(f"layout must be one of {FAMILY_LAYOUTS[family]} for a {family} pipeline, got {layout!r}")
    if layout in ("xlabs", "peft"):
        text_encoder = False  # XLabs files and PEFT folders hold the denoiser only
    if dora and layout not in ("diffusers", "peft"):
        raise ValueError(f"DoRA files are written in the diffusers and peft layouts, not {layout!r}")
    entries, models = _tiny_lora_entries(pipeline_path, family, rank, alpha, seed, layout, text_encoder, unet_modules,
                                         text_modules, std, per_module, dora)
    out.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        _save_diffusers_lora(out, family, entries, rank, float(rank if alpha is None else alpha))
    elif layout == "peft":
        _save_peft_folder(out, entries, rank, float(rank if alpha is None else alpha), rslora)
    elif layout in ("kohya", "kohya-sgm"):
        tensors = {}
        for entry in entries:
            key = entry["kohya"]
            if layout == "kohya-sgm" and entry["component"] == "unet":
                key = "lora_unet_" + sgm_module_name(entry["names"][0], models["unet"].config.layers_per_block).replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": entry["down"], f"{key}.lora_up.weight": entry["up"],
                            f"{key}.alpha": torch.tensor(entry["alpha"])})
        save_file(tensors, str(out), metadata={"format": "pt"})
    elif layout == "ai-toolkit":  # diffusers keys with alpha / r folded into lora_A
        tensors = {}
        for entry in entries:
            for name, part in zip(entry["names"], entry["parts"]):
                tensors[f"{entry['component']}.{name}.lora_A.weight"] = entry["down"] * entry["scale"]
                tensors[f"{entry['component']}.{name}.lora_B.weight"] = part
        save_file(tensors, str(out), metadata={"format": "pt"})
    else:  # xlabs: double_blocks.<i>.processor.<qkv|proj>_lora<1|2>.<down|up>.weight, scale 1
        by_kohya = {entry["kohya"]: entry for entry in entries}
        tensors = {}
        for key, kohya in FLUX_XLABS_MODULES.items():
            for i in range(len(models["transformer"].transformer_blocks)):
                entry = by_kohya.get(f"lora_unet_{kohya.format(i=i)}")
                if entry is not None:
                    tensors[f"double_blocks.{i}.{key}.down.weight"] = entry["down"]
                    tensors[f"double_blocks.{i}.{key}.up.weight"] = entry["up"]
        save_file(tensors, str(out), metadata={"format": "pt"})
    return out


def tiny_lora_deltas(pipeline_path: str | os.PathLike, **kwargs) -> dict[str, torch.Tensor]:
    """{"<component>.<module>": scale * B A} of the LoRA ``make_tiny_lora(pipeline_path, ..., **kwargs)`` writes,
    computed from its factors (conv deltas in the weight's 4-D shape): the hand merge that equivalence tests
    apply to a plain pipeline where no library is a reference."""
    family = pipeline_family(pipeline_path)
    layout = kwargs.get("layout", "diffusers")
    if layout in ("xlabs", "peft"):
        kwargs["text_encoder"] = False
    entries, models = _tiny_lora_entries(Path(pipeline_path), family, kwargs.get("rank", 4), kwargs.get("alpha"),
                                         kwargs.get("seed", 0), layout, kwargs.get("text_encoder", True),
                                         kwargs.get("unet_modules"), kwargs.get("text_modules", TEXT_ATTENTION_MODULES),
                                         kwargs.get("std", 0.3), kwargs.get("per_module", False), kwargs.get("dora", False))
    rslora = kwargs.get("rslora", False)
    deltas = {}
    for entry in entries:
        r = entry["down"].shape[0]
        scale = 1.0 if layout == "xlabs" else entry["alpha"] / (math.sqrt(r) if rslora else r)
        down = entry["down"].flatten(1)
        for index, (name, part) in enumerate(zip(entry["names"], entry["parts"])):
            delta = scale * (part.flatten(1) @ down)
            if "magnitudes" in entry:  # DoRA: m * (W + delta) / ||W + delta|| - W, per output channel
                weight = models[entry["component"]].get_submodule(name).weight.detach().flatten(1)
                adapted = weight + delta
                delta = adapted * (entry["magnitudes"][index].flatten() / adapted.norm(dim=1))[:, None] - weight
            deltas[f"{entry['component']}.{name}"] = delta.reshape(part.shape[0], *entry["down"].shape[1:])
    return deltas


def _tiny_lora_entries(pipeline_path: Path, family: str, rank: int, alpha: float | None, seed: int, layout: str,
                       text_encoder: bool, unet_modules, text_modules, std: float, per_module: bool, dora: bool = False):
    """One entry per kohya module (Flux: fused q/k/v): its component, kohya key, the modules it covers, the factors
    (up split by module), its alpha and, with ``dora``, each module's DoRA magnitude."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    text_encoders = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}[family]
    # groups: (component, kohya key, [module names], up-row splits) sharing one lora_down
    groups: list[tuple[str, str, list[str], list[int]]] = []
    models: dict[str, torch.nn.Module] = {}
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        models["transformer"] = FluxTransformer2DModel.from_pretrained(pipeline_path / "transformer")
        for kohya, names in _flux_groups(models["transformer"], layout):
            if unet_modules is None or any(n.endswith(tuple(unet_modules)) for n in names):
                splits = [models["transformer"].get_submodule(n).out_features for n in names]
                groups.append(("transformer", "lora_unet_" + kohya, names, splits))
    else:
        models["unet"] = UNet2DConditionModel.from_pretrained(pipeline_path / "unet")
        for name, module in _lora_targets(models["unet"], tuple(unet_modules or UNET_ATTENTION_MODULES)):
            groups.append(("unet", "lora_unet_" + name.replace(".", "_"), [name], []))
    if text_encoder:
        for component in text_encoders:
            text_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            models[component] = text_class.from_pretrained(pipeline_path / component)
            prefix = {"text_encoder": "lora_te_" if family == "sd" else "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
            for name, module in _lora_targets(models[component], text_modules):
                # kohya names text-encoder modules from `text_model.`, as transformers 4 did
                groups.append((component, prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_"), [name], []))

    entries = []
    for index, (component, kohya, names, splits) in enumerate(groups):
        module = models[component].get_submodule(names[0])
        r = max(1, rank // 2) if per_module and index % 3 == 2 else rank
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (r, module.in_features), (sum(splits) or module.out_features, r)
        else:
            down_shape = (r, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, r, 1, 1)
        down = torch.randn(down_shape, generator=generator) * std
        up = torch.randn(up_shape, generator=generator) * std
        module_alpha = float(rank if alpha is None else alpha) * (1 + index % 3 if per_module else 1)
        entries.append(dict(component=component, kohya=kohya, names=names, down=down, up=up, alpha=module_alpha,
                            scale=module_alpha / r, parts=[p.contiguous() for p in (up.split(splits) if splits else [up])]))
    if dora:  # drawn after every factor, so a DoRA file's factors are its plain twin's
        for entry in entries:
            entry["magnitudes"] = []
            for name, part in zip(entry["names"], entry["parts"]):
                weight = models[entry["component"]].get_submodule(name).weight.detach().flatten(1)
                norm = (weight + entry["scale"] * (part.flatten(1) @ entry["down"].flatten(1))).norm(dim=1)
                magnitude = norm * (1 + 0.2 * torch.randn(norm.shape, generator=generator))
                # PEFT keeps a conv's magnitude as (1, out, 1, 1)
                entry["magnitudes"].append(magnitude.reshape(1, -1, 1, 1) if entry["down"].dim() == 4 else magnitude)
    return entries, models


def _save_diffusers_lora(out: Path, family: str, entries: list[dict], rank: int, alpha: float) -> None:
    """As the pipeline class's ``save_lora_weights`` writes it, per-module ranks and alphas as PEFT patterns."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    layers: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict] = {}
    for entry in entries:
        component = entry["component"]
        config = metadata.setdefault(component, {"r": rank, "lora_alpha": alpha, "target_modules": [],
                                                 "rank_pattern": {}, "alpha_pattern": {}, "use_dora": "magnitudes" in entry})
        for index, (name, part) in enumerate(zip(entry["names"], entry["parts"])):
            layers.setdefault(component, {})[f"{name}.lora_A.weight"] = entry["down"].clone()  # Flux: q, k, v share it
            layers[component][f"{name}.lora_B.weight"] = part
            if "magnitudes" in entry:
                layers[component][f"{name}.lora_magnitude_vector"] = entry["magnitudes"][index]
            config["target_modules"].append(name)
            if entry["down"].shape[0] != rank:
                config["rank_pattern"][f"^{re.escape(name)}$"] = entry["down"].shape[0]
            if entry["alpha"] != alpha:
                config["alpha_pattern"][f"^{re.escape(name)}$"] = entry["alpha"]
    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}[family]
    kwargs = {f"{c}_lora_layers": layers[c] for c in layers}
    kwargs.update({f"{c}_lora_adapter_metadata": config for c, config in metadata.items()})
    cls.save_lora_weights(out.parent, weight_name=out.name, **kwargs)


def _save_peft_folder(out: Path, entries: list[dict], rank: int, alpha: float, rslora: bool) -> None:
    """A PEFT adapter folder for the denoiser, as ``PeftModel.save_pretrained`` writes it."""
    from peft import LoraConfig

    tensors, rank_pattern, alpha_pattern, targets = {}, {}, {}, []
    for entry in entries:
        for index, (name, part) in enumerate(zip(entry["names"], entry["parts"])):
            tensors[f"base_model.model.{name}.lora_A.weight"] = entry["down"].clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = part
            if "magnitudes" in entry:
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = entry["magnitudes"][index]
            targets.append(name)
            if entry["down"].shape[0] != rank:
                rank_pattern[f"^{re.escape(name)}$"] = entry["down"].shape[0]
            if entry["alpha"] != alpha:
                alpha_pattern[f"^{re.escape(name)}$"] = entry["alpha"]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, use_rslora=rslora, use_dora=any("magnitudes" in e for e in entries))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, str(out / "adapter_model.safetensors"))


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


def _lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a LoKr dimension into (smaller, larger) factors: ``factor`` and the rest when it divides,
    else the most balanced split whose smaller part is at most ``factor`` (-1: any)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def _lycoris_shapes(module: torch.nn.Module, algo: str, rank: int, use_tucker: bool, factor: int,
                    decompose_both: bool, full_matrix: bool) -> dict[str, tuple[int, ...]]:
    """The keys and shapes LyCORIS' LoHa / LoKr / LoCon module saves for ``module`` (a Linear or Conv2d)."""
    conv = isinstance(module, torch.nn.Conv2d)
    out_dim, in_dim = module.weight.shape[:2]
    k = tuple(module.kernel_size) if conv else ()
    tucker = use_tucker and any(i != 1 for i in k)
    flat = in_dim * torch.Size(k).numel()
    if algo == "loha":
        if tucker:
            return {f"hada_{p}": s for i in "12" for p, s in ((f"w{i}_a", (rank, out_dim)), (f"w{i}_b", (rank, in_dim)), (f"t{i}", (rank, rank, *k)))}
        return {f"hada_{p}": s for i in "12" for p, s in ((f"w{i}_a", (out_dim, rank)), (f"w{i}_b", (rank, flat)))}
    if algo == "locon_tucker":
        ones = (1,) * len(k)
        shapes = {"lora_down.weight": (rank, in_dim, *ones) if tucker else (rank, in_dim, *k), "lora_up.weight": (out_dim, rank, *ones)}
        return {**shapes, "lora_mid.weight": (rank, rank, *k)} if tucker else shapes
    (a, b), (c, d) = _lycoris_factorization(out_dim, factor), _lycoris_factorization(in_dim, factor)  # out = a*b, in = c*d
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        shapes = {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)}
    else:
        shapes = {"lokr_w1": (a, c)}
    if (rank >= max(b, d) / 2) or full_matrix:
        return {**shapes, "lokr_w2": (b, d, *k)}
    if tucker:
        return {**shapes, "lokr_t2": (rank, rank, *k), "lokr_w2_a": (rank, b), "lokr_w2_b": (rank, d)}
    return {**shapes, "lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * torch.Size(k).numel())}


def make_tiny_lycoris(
    pipeline_path: str | os.PathLike,
    out: str | os.PathLike,
    algo: str = "loha",
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    unet_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"),
    *,
    use_tucker: bool = False,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
    std: float = 0.3,
) -> Path:
    """Write a random LyCORIS file for the UNet of the tiny SD / SDXL pipeline at ``pipeline_path``, with the
    key names and shapes the lycoris-lora package saves (``lora_unet_<module>.<key>``, float32, ``.alpha``), so
    its tests need no lycoris package.

    ``algo``: "loha" (with ``use_tucker``: Tucker cores on kernels other than 1x1), "lokr" (``factor``,
    ``decompose_both``, ``full_matrix`` and ``use_tucker`` as in LyCORIS) or "locon_tucker" (LoCon with a
    ``lora_mid`` core on kernels other than 1x1, plain LoRA keys elsewhere). Each module's factors are scaled so
    its delta is as large as that of ``make_tiny_lora(std=std)`` at the same rank and alpha.
    """
    from diffusers import UNet2DConditionModel

    if algo not in ("loha", "lokr", "locon_tucker"):
        raise ValueError(f"algo must be 'loha', 'lokr' or 'locon_tucker', got {algo!r}")
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_path) / "unet")
    generator = torch.Generator().manual_seed(seed)
    target = std**2 * rank**0.5 * alpha / rank  # the std of make_tiny_lora's delta
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not (name.endswith(unet_modules) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))):
            continue
        prefix = "lora_unet_" + name.replace(".", "_")
        shapes = _lycoris_shapes(module, algo, rank, use_tucker, factor, decompose_both, full_matrix)
        group = {f"{prefix}.{key}": torch.randn(shape, generator=generator) for key, shape in shapes.items()}
        # LyCORIS stores alpha = dim for a LoKr with both factors full (its scale is then 1)
        group[f"{prefix}.alpha"] = torch.tensor(float(rank if {"lokr_w1", "lokr_w2"} <= set(shapes) else alpha))
        lora = lycoris_to_lora(group, "make_tiny_lycoris")
        down, up = lora[f"{prefix}.lora_down.weight"], lora[f"{prefix}.lora_up.weight"]
        delta = float(lora[f"{prefix}.alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)
        factor_scale = (target / float(delta.std())) ** (1 / len(shapes))  # the delta is linear in each factor
        tensors.update({k: v * factor_scale if not k.endswith(".alpha") else v for k, v in group.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out
