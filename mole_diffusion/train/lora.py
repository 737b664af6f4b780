"""DreamBooth-LoRA training of one concept expert, on PEFT; optionally MoSLoRA (docs/method.md) or
orthogonal adaptation.

``unconditional_weight`` (0: off) adds a term that holds the LoRA's prediction for the empty prompt to the base
model's, on the same noisy latents: || eps_lora(x_t, "") - eps_base(x_t, "") ||^2. Classifier-free guidance draws
u + g (c - u); what a LoRA changes in both the conditional and the unconditional prediction passes at strength 1,
what it changes in the conditional one alone is multiplied by g. Without the term a LoRA may learn its concept in
both, and at a high guidance the base's own reading of the prompt then outweighs it; with it the concept is what
the prompt adds, as the base model's own concepts are.

MoSLoRA puts a learnable r x r mixer M between A and B: delta = s * B M A x. The mixer sits in front of B
(PEFT's layer computes ``lora_B(lora_A(x))``, so ``lora_B = Sequential(M, B)`` is MoSLoRA without touching
PEFT), and is folded into B (B' = B M) before saving, so every file is a plain LoRA in diffusers layout.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from ..concepts import Concept, list_images
from ..errors import MoLEError, load_base_pipeline
from ..experts import lora_components
from ..pipelines import mole_pipeline_class
from .common import (
    BatchRandom,
    Examples,
    LossFunction,
    TrainingSettings,
    denoising_objective,
    encode_examples,
    encode_prompts,
    make_accelerator,
    prepare_pipeline,
    run_training,
    trainable_parameters,
)

MIXER_INITS = ("orthogonal", "kaiming")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' own default name


@dataclass(kw_only=True)
class LoRATrainingConfig(TrainingSettings):
    base: str
    images: Path
    prompt: str
    class_prompt: str | None = None
    class_images: Path | None = None
    rank: int = 4
    alpha: float | None = None  # default: the rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    mixer: str | None = None  # None: plain LoRA; "orthogonal" or "kaiming": MoSLoRA with that mixer init
    orthogonal_slot: int | None = None  # orthogonal adaptation: A fixed to this slot of a shared basis, only B trains
    unconditional_weight: float = 0.0  # the empty prompt's prediction held to the base's, with this weight (docstring)


def add_mixers(model: nn.Module, init: str, adapter: str = "default") -> int:
    """Turn every PEFT LoRA layer of ``model`` into MoSLoRA: ``lora_B`` becomes ``Sequential(M, B)``."""
    if init not in MIXER_INITS:
        raise MoLEError(f"mixer init must be one of {MIXER_INITS}, got {init!r} (zero does not train; identity is plain LoRA)")
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_B:
            up = module.lora_B[adapter]
            rank = up.in_features if isinstance(up, nn.Linear) else up.in_channels
            mixer = nn.Linear(rank, rank, bias=False) if isinstance(up, nn.Linear) else nn.Conv2d(rank, rank, 1, bias=False)
            if init == "orthogonal":
                nn.init.orthogonal_(mixer.weight)
            else:
                nn.init.kaiming_uniform_(mixer.weight, a=math.sqrt(5))
            module.lora_B[adapter] = nn.Sequential(mixer.to(up.weight), up)
            count += 1
    return count


@torch.no_grad()
def fix_orthogonal_down(model: nn.Module, slot: int, component: str, adapter: str = "default") -> int:
    """Orthogonal adaptation (Po et al., CVPR 2024): every LoRA layer's down-projection A is fixed to rows
    ``slot * r .. (slot + 1) * r`` of a random orthogonal basis of its (flattened) input, seeded by the layer's name,
    so that LoRAs trained with different slots read orthogonal subspaces and their B A have orthogonal row spaces;
    only B trains. Rows are scaled to the length of PEFT's gaussian init (std 1/r), so B learns at the usual rate."""
    if slot < 0:
        raise MoLEError(f"orthogonal slot must be 0 or more, got {slot}")
    count = 0
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and adapter in module.lora_A):
            continue
        down = module.lora_A[adapter].weight
        rank, inputs = down.shape[0], down[0].numel()
        if (slot + 1) * rank > inputs:
            raise MoLEError(f"{component}.{name} has {inputs} inputs: at rank {rank} it holds orthogonal slots "
                            f"0..{inputs // rank - 1}, not slot {slot}")
        generator = torch.Generator().manual_seed(zlib.crc32(f"{component}.{name}".encode()))
        # the square draw keeps every slot on one basis; the QR of its first columns alone gives that basis's first
        # columns (Householder), O(inputs * used^2) instead of O(inputs^3): minutes at SD's 11520-input convs
        used = torch.randn(inputs, inputs, generator=generator, dtype=torch.float64)[:, :(slot + 1) * rank]
        basis, _ = torch.linalg.qr(used)
        rows = basis.T[slot * rank:] * (math.sqrt(inputs) / rank)
        down.copy_(rows.reshape(down.shape))
        down.requires_grad_(False)
        count += 1
    return count


@torch.no_grad()
def fold_mixers(model: nn.Module, adapter: str = "default") -> int:
    """B' = B M for every MoSLoRA layer: the layer computes the same, and is a plain PEFT LoRA again."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.lora_B[adapter] if adapter in module.lora_B else None, nn.Sequential):
            mixer, up = module.lora_B[adapter]
            up.weight.copy_((up.weight.flatten(1) @ mixer.weight.flatten(1)).view_as(up.weight))
            module.lora_B[adapter] = up
            count += 1
    return count


def train_lora(config: LoRATrainingConfig) -> Path:
    """Train one concept's LoRA (or MoSLoRA); returns ``output_dir/pytorch_lora_weights.safetensors``."""
    where = "train-lora"
    list_images(config.images, f"{where}: --images")
    if config.class_images is not None:
        list_images(config.class_images, f"{where}: --class-images")
    if (config.class_images is None) != (config.class_prompt is None):
        raise MoLEError("prior preservation needs both --class-prompt and --class-images")
    if not (math.isfinite(config.unconditional_weight) and config.unconditional_weight >= 0):
        raise MoLEError(f"--unconditional-weight must be a number >= 0, got {config.unconditional_weight}")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config)
    mole_class = mole_pipeline_class(config.base)  # the family: a plain diffusers pipeline of it trains the LoRA
    pipe = load_base_pipeline(mole_class.diffusers_class(), config.base, safety_checker=None)
    if config.unconditional_weight and mole_class.denoiser != "unet":
        raise MoLEError(f"{where}: --unconditional-weight is for classifier-free guidance; {config.base} is a "
                        f"{mole_class.__name__.removeprefix('MoLE').removesuffix('Pipeline')} model, which does not use it")
    prepare_pipeline(pipe, accelerator, config)
    alpha = float(config.rank if config.alpha is None else config.alpha)
    lora_configs = {mole_class.denoiser: LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                    target_modules=list(config.target_modules))}
    if config.train_text_encoder:  # every text encoder diffusers loads LoRAs into (SDXL: both; Flux: CLIP, not T5)
        for component in lora_components(pipe):
            if component.startswith("text_encoder"):
                lora_configs[component] = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                     target_modules=list(config.text_encoder_target_modules))
    torch.manual_seed(config.seed)  # PEFT's and the mixers' random init: seeded runs are reproducible
    for component, lora_config in lora_configs.items():
        model = getattr(pipe, component)
        try:
            model.add_adapter(lora_config)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            raise MoLEError(f"{where}: {component}: {err}") from None
        if config.mixer:
            add_mixers(model, config.mixer)
        if config.orthogonal_slot is not None:
            fix_orthogonal_down(model, config.orthogonal_slot, component)
        cast_training_params(model, dtype=torch.float32)  # trainable weights in fp32 under mixed precision

    concept = Concept(name="concept", prompt=config.prompt, images=Path(config.images),
                      class_prompt=config.class_prompt, class_images=config.class_images)
    examples = encode_examples([concept], pipe.vae, config.resolution, config.prior_loss_weight)
    if not config.validation_prompts:
        config.validation_prompts = [config.prompt]
    loss = denoising_objective(pipe, examples)
    if config.unconditional_weight:
        adapted = [getattr(pipe, component) for component in lora_configs]
        loss = with_unconditional_term(pipe, examples, loss, adapted, config.unconditional_weight)
    run_training(config, accelerator, pipe, trainable_parameters(pipe), examples, loss)

    path = output_dir / LORA_WEIGHT_NAME
    if accelerator.is_main_process:
        save_lora(pipe, lora_configs, path)
    return path


def with_unconditional_term(pipe: DiffusionPipeline, examples: Examples, loss: LossFunction, adapted: list[nn.Module],
                            weight: float) -> LossFunction:
    """``loss`` plus ``weight`` x the MSE between the adapted UNet's prediction for the empty prompt and the base's
    (``adapted``' adapters off) on the examples' latents, noised at fresh timesteps (module docstring)."""
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = examples.latents.shape[-1] * pipe.vae_scale_factor
    zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    # the empty prompt reads differently through an adapted text encoder; zeros (SDXL) and the base's do not change
    text_adapted = not zeros and any(model is getattr(pipe, name, None) for model in adapted
                                     for name in ("text_encoder", "text_encoder_2"))
    base_conditions: dict[int, dict] = {}  # batch size -> the base's empty-prompt conditions, encoded once

    def base_prediction(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        for model in adapted:
            model.disable_adapters()
        try:
            if len(noisy) not in base_conditions:
                base_conditions[len(noisy)] = empty_prompt_conditions(pipe, len(noisy), resolution, zeros)
            return pipe.unet(noisy, timesteps, **base_conditions[len(noisy)]).sample
        finally:
            for model in adapted:
                model.enable_adapters()

    def total(indices: list[int], generator: BatchRandom) -> tuple[torch.Tensor, dict[str, float]]:
        value, logs = loss(indices, generator)
        latents = examples.latents[indices].to(pipe.unet.device, pipe.unet.dtype)
        random = BatchRandom.of(generator, len(latents))
        noise = random.randn(*latents.shape[1:]).to(latents)
        timesteps = random.randint(noise_scheduler.config.num_train_timesteps).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            target = base_prediction(noisy, timesteps)
        conditions = (empty_prompt_conditions(pipe, len(latents), resolution, zeros) if text_adapted
                      else base_conditions[len(latents)])
        term = F.mse_loss(pipe.unet(noisy, timesteps, **conditions).sample.float(), target.float())
        return value + weight * term, {**logs, "loss_unconditional": term.item()}

    return total


def empty_prompt_conditions(pipe: DiffusionPipeline, batch: int, resolution: int, zeros: bool) -> dict:
    """The conditions classifier-free guidance predicts without a prompt: the empty prompt's, or with ``zeros``
    (SDXL's ``force_zeros_for_empty_prompt``) zeros in their place, as its pipeline does."""
    conditions = encode_prompts(pipe, [""] * batch, resolution)
    if zeros:
        conditions["encoder_hidden_states"] = torch.zeros_like(conditions["encoder_hidden_states"])
        added = conditions["added_cond_kwargs"]
        conditions["added_cond_kwargs"] = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
    return conditions


def save_lora(pipe: DiffusionPipeline, lora_configs: dict[str, LoraConfig], path: Path) -> None:
    """Fold any mixers and write a diffusers LoRA file (PEFT keys, with its rank/alpha metadata).

    PEFT's own ``lora_A``/``lora_B`` keys throughout: diffusers' older ``lora.down``/``lora.up`` renaming
    only covers Linear layers, and diffusers does not load a file that mixes both (conv targets such as a
    UNet's ``proj_in`` keep ``lora_A``)."""
    layers, metadata = {}, {}
    for component, lora_config in lora_configs.items():
        model = getattr(pipe, component)
        fold_mixers(model)
        state = get_peft_model_state_dict(model)
        if component.startswith("text_encoder") and not hasattr(model, "text_model"):
            # transformers 5 flattened CLIPTextModel; keep the `text_model.` keys that diffusers, kohya and
            # transformers 4 read (diffusers strips them again for a flattened model)
            state = {f"text_model.{k}": v for k, v in state.items()}
        layers[f"{component}_lora_layers"] = state
        config = lora_config.to_dict()
        # the base's path on the training machine: no use to whoever loads the file, and two runs would differ
        config["base_model_name_or_path"] = None
        if isinstance(config["target_modules"], (set, list)):  # PEFT keeps a set: sorted, the same run writes the same file
            config["target_modules"] = sorted(config["target_modules"])
        metadata[f"{component}_lora_adapter_metadata"] = config
    # whole or not at all: a stopped save leaves the earlier file (a resumed run's, say) as it was
    temporary = path.with_name(f".{path.stem}.tmp.safetensors")
    type(pipe).save_lora_weights(path.parent, weight_name=temporary.name, **layers, **metadata)
    os.replace(temporary, path)
