"""Build the demo world from nothing: ``mole-diffusion build-demo --out DIR``.

Stages, each skipped when its output is already there (so a stopped build goes on where it stopped):

1. ``world/``: the held-out concepts' reference images and prompts (``world.write_world``).
2. ``clip/``: a tiny open_clip model trained contrastively on the *whole* world, concepts included: the judge.
3. ``pipeline/``: a tiny Stable Diffusion pipeline (diffusers classes, the real CLIP tokenizer) whose
   AutoencoderKL is trained to reconstruct the world's images and whose UNet and CLIP text encoder are
   trained on the *base* world only: the generator never sees a held-out concept.
4. ``judge/``: the attribute judge (``demo/judge.py``), a classifier of the world's exact labels trained on VAE
   round trips and clean drawings; it scores presence and is never a training signal.
5. ``loras/<concept>.safetensors``: one DreamBooth LoRA per concept, with ``train_lora``; then
   ``lora_check.json``: how often each LoRA alone shows its concept on selection seeds (``check_loras``).
6. ``gates.safetensors``: MoLE gates for the three LoRAs, with ``train_gates`` on ``concepts.toml``.

Every random draw is seeded, so the same settings give the same files (on the same hardware and library
versions). A GPU is used when there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import GateConfig
from ..errors import MoLEError
from ..files import write_atomically
from ..gate_file import read_gate_file
from ..offline_tokenizers import make_clip_tokenizer
from ..train.common import Examples, TrainingSettings, denoising_loss, encode_prompts, make_accelerator, run_training
from ..train.gates import GateTrainingConfig, train_gates
from ..train.lora import LoRATrainingConfig, train_lora
from . import world
from .images import RESOLUTION, jitter, scene_pixels
from .judge import JudgeSettings, train_judge

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    # cross-attention at 8x8 and 4x4 only: a third of the cost of attending at 16x16, and enough to place a shape
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE_CONFIG = dict(  # 64x64x3 images <-> 16x16x4 latents, as SD's 512 <-> 64 (factor 4 here, 8 there)
    block_out_channels=(16, 32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
TEXT_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
    vocab_size=49408, projection_dim=32,
)
CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "size": 64,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


# the concept LoRAs' UNet modules: attention, projections and the resnet convs (stripes and checkerboards are drawn at
# the 16x16 level, which has no attention)
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")
# also the UNet's first and last convs, the down/upsamplers, the resnet shortcuts and time projections
# (experiments/docs/composition-experiments.md: at rank 16 the checker LoRA alone shows its board in 52% of the
# composition images, the shipped one in 16%)
WIDE_LORA_TARGET_MODULES = (*LORA_TARGET_MODULES, "conv_in", "conv_out", "conv", "conv_shortcut", "time_emb_proj")


@dataclass
class BuildSettings:
    # the world the base model learns (world.WORLDS): "v1" knows solid circles, squares and triangles on plain
    # backgrounds; "v2" every kind the held-out concepts belong to (docs/demo-world.md)
    world: str = "v1"
    seed: int = 0
    concept_images: int = 16
    clip_steps: int = 2400
    clip_batch_size: int = 256
    vae_steps: int = 1500
    vae_batch_size: int = 32
    base_images: int = 12000
    base_steps: int = 3000
    base_batch_size: int = 64
    base_learning_rate: float = 5e-4
    # the base UNet's widths at 16x16, 8x8 and 4x4 (1.7 M parameters); 64 128 128 (6.5 M) trains in about twice the
    # time on 2 CPU cores, and its LoRAs come closer to adding (experiments/docs/composition-experiments.md)
    unet_channels: list[int] = field(default_factory=lambda: list(UNET_CONFIG["block_out_channels"]))
    # cross-attention at 16x16, 8x8 and 4x4: at 16x16, where an object is resolved, words can bind to places
    unet_cross_attention: list[bool] = field(default_factory=lambda: [False, True, True])
    text_width: int = TEXT_CONFIG["hidden_size"]  # the text encoder's width (its MLP twice that)
    lora_steps: int = 2000
    # steps for the concepts named here instead of lora_steps (a concept the base finds harder to learn)
    lora_concept_steps: dict[str, int] = field(default_factory=dict)
    # adapt the text encoder's attention too (a LoRA's text-encoder half also changes the other words' encodings)
    lora_text_encoder: bool = True
    # lora_text_encoder for the concepts named here instead
    lora_concept_text_encoder: dict[str, bool] = field(default_factory=dict)
    lora_rank: int = 4
    lora_learning_rate: float = 2e-3
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    # each reference image also with 3 captions of made-up words (world.filler_captions); off: on the composition
    # prompts it helped the checker LoRA alone and hurt the star and stripes LoRAs (experiments/docs/composition-experiments.md)
    lora_filler_captions: bool = False
    # train-lora's --unconditional-weight: each LoRA's prediction for the empty prompt held to the base's (0: off)
    lora_unconditional_weight: float = 0.0
    # after training, each LoRA alone draws this many fresh prompts of its own x 4 selection seeds (check_loras; 0: no check)
    lora_check_prompts: int = 8
    gate_steps: int = 300
    # the gates' kind (GateConfig, GateTrainingConfig): by default softplus at prior 1 with the concepts' trigger
    # words, which compose as the plain sum on the second world; "softmax", None, False: the paper's gates
    gate_activation: str | None = None
    gate_prior_weights: list[float] | None = None
    gate_by_trigger: bool | None = None
    judge_steps: int = 800
    judge_pool: int = 4000  # VAE round trips the judge trains on (with fresh clean drawings)
    judge_rim_share: float = 0.3  # its scenes drawn with a rim around the object (judge.with_rim)
    validation_steps: int = 20  # sampling steps of the LoRA and gate runs' validation grids
    device: str | None = None

    @classmethod
    def for_world(cls, name: str, **settings) -> "BuildSettings":
        """The settings `build-demo --world name` builds with: the world's recipe (WORLD_SETTINGS), then
        ``settings``. ``BuildSettings(world=name)`` changes only what the base learns, not the model sizes."""
        if name not in WORLD_SETTINGS:
            raise ValueError(f"unknown demo world {name!r}: expected one of {', '.join(WORLD_SETTINGS)}")
        return cls(world=name, **{**WORLD_SETTINGS[name], **settings})


# each world's recipe (BuildSettings.for_world): the settings that differ from the defaults (the first world's).
# The second world's base attends to the text at 16x16 as well, with a 64-wide text encoder and the 4x UNet: one
# training step costs 4x the first world's (benchmarks/bench_demo_base.py), 3000 steps about 2 hours on 2 CPU
# cores. Its LoRAs learn from 64 references each for 1000 steps (with 16 references and 2000 steps the star LoRA
# drew one training picture whatever the seed), the stripes LoRA for 2000 and in the UNet only (at 1000 steps with
# its text-encoder half it drew stripes in 77% of its own prompts, and the plain sum of all three concepts drew them
# together in 6% of the composition prompts; with this stripes LoRA 56%). The checker keeps its text-encoder half:
# without it the checker LoRA drew its board in 78% of its own prompts, with it 88% (docs/demo-world.md)
WORLD_SETTINGS: dict[str, dict] = {
    "v1": {},
    "v2": {"unet_channels": [64, 128, 128], "unet_cross_attention": [True, True, True], "text_width": 64,
           "concept_images": 64, "lora_steps": 1000, "lora_concept_steps": {"stripes": 2000},
           "lora_concept_text_encoder": {"stripes": False},
           # the default gates, spelled out as they were recorded before they became the default (a build
           # started then resumes)
           "gate_activation": "softplus", "gate_prior_weights": [1.0, 1.0, 1.0], "gate_by_trigger": True},
}


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Build a stage's folder under a name of its own (``.<name>.partial``) and rename it into place only when
    the stage finished: a stage whose folder exists was written whole. A stopped attempt's partial folder is ours,
    so the next attempt starts it afresh."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    partial.rename(folder)


def _world(settings: BuildSettings) -> world.World:
    return world.WORLDS[settings.world]


def _device(settings: BuildSettings) -> torch.device:
    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# -- the judge: a tiny open_clip model --------------------------------------------------------------------
def train_clip(out: Path, settings: BuildSettings) -> Path:
    """Contrastive training on random scenes of the whole world; writes an open_clip ``local-dir`` folder."""
    import open_clip
    from safetensors.torch import save_file

    device = _device(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(CLIP_CONFIG, indent=1))
    torch.manual_seed(settings.seed)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False).to(device).train()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    mean = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_CONFIG["preprocess_cfg"]["std"], device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / settings.clip_steps)))
    loss_fn = open_clip.ClipLoss()
    rng = random.Random(f"clip-{settings.seed}")
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(range(settings.clip_steps), desc="clip")
    for _ in bar:
        scenes = [world.any_scene(rng, _world(settings)) for _ in range(settings.clip_batch_size)]
        images = (jitter(scene_pixels(scenes), generator).to(device).float() / 255 - mean) / std
        texts = tokenizer([s.caption for s in scenes]).to(device)
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


# -- the generator ----------------------------------------------------------------------------------------
def train_vae(settings: BuildSettings):
    """An AutoencoderKL that reconstructs the world's images, trained on random 32x32 crops (it is convolutional)."""
    from diffusers import AutoencoderKL

    device = _device(settings)
    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.vae_steps)))
    rng = random.Random(f"vae-{settings.seed}")
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(range(settings.vae_steps), desc="vae")
    crop = RESOLUTION // 2
    for _ in bar:
        images = scene_pixels([world.any_scene(rng, _world(settings)) for _ in range(settings.vae_batch_size)])
        x, y = torch.randint(0, RESOLUTION - crop + 1, (2,), generator=generator).tolist()
        pixels = images[:, :, y : y + crop, x : x + crop].to(device).float() / 127.5 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    vae.eval()
    # SD's convention: latents times scaling_factor have unit variance
    with torch.no_grad():
        pixels = scene_pixels(world.base_world(256, settings.seed + 1, _world(settings))).to(device).float() / 127.5 - 1
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.cpu()


def unet_config(settings: BuildSettings) -> dict:
    """The base UNet's config: ``UNET_CONFIG`` with the settings' widths, where it attends to the text, and the
    text encoder's width as its cross-attention width."""
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in settings.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(settings.unet_cross_attention))
    return {**UNET_CONFIG, "block_out_channels": tuple(settings.unet_channels), "down_block_types": down,
            "up_block_types": up, "cross_attention_dim": settings.text_width}


def text_config(settings: BuildSettings) -> dict:
    return {**TEXT_CONFIG, "hidden_size": settings.text_width, "intermediate_size": 2 * settings.text_width,
            "projection_dim": settings.text_width}


def make_pipeline(vae, settings: BuildSettings, tokenizer_dir: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(settings.seed)
    return StableDiffusionPipeline(
        vae=vae,
        unet=UNet2DConditionModel(**unet_config(settings)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config(settings))),
        tokenizer=make_clip_tokenizer(tokenizer_dir),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def train_base(out: Path, settings: BuildSettings, work: Path | None = None) -> Path:
    """Train the UNet and text encoder on the base world (captions dropped 10% of the time, for guidance);
    ``work`` (default ``<out>-training``) keeps the VAE and the training checkpoints, so a stopped run resumes."""
    from diffusers import AutoencoderKL

    stage = work or out.with_name(out.name + "-training")
    stage.mkdir(parents=True, exist_ok=True)
    vae_path = stage / "vae"
    if not vae_path.is_dir():
        with staged_folder(vae_path) as folder:
            train_vae(settings).save_pretrained(folder)
    vae = AutoencoderKL.from_pretrained(vae_path)
    vae.register_to_config(_name_or_path="")  # not this build folder's path, in the shipped config.json
    pipe = make_pipeline(vae, settings, stage / "tokenizer")

    scenes = world.base_world(settings.base_images, seed=settings.seed, world=_world(settings))
    train_denoiser(pipe, scene_examples(vae, scenes), TrainingSettings(
        output_dir=stage, steps=settings.base_steps, batch_size=settings.base_batch_size, learning_rate=settings.base_learning_rate,
        seed=settings.seed, checkpoint_every=250, keep_checkpoints=1, resume=True, resolution=RESOLUTION,
    ))
    pipe.save_pretrained(out)
    make_portable(out, stage / "tokenizer")
    return out


@torch.no_grad()
def scene_examples(vae, scenes: list[world.Scene]) -> Examples:
    """Each scene drawn and encoded by ``vae`` (the latent distribution's mean), with its caption, for ``train_denoiser``."""
    latents = []
    for start in range(0, len(scenes), 256):
        pixels = scene_pixels(scenes[start : start + 256]).float() / 127.5 - 1
        latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return Examples(torch.cat(latents), [s.caption for s in scenes], torch.zeros(len(scenes), dtype=torch.long), torch.ones(len(scenes)))


def train_denoiser(pipe, examples: Examples, training: TrainingSettings) -> None:
    """Train ``pipe``'s UNet and text encoder on ``examples`` (latents and captions), the captions dropped 10% of the
    time so that guidance has an unconditional prediction to start from; the VAE stays frozen. Leaves ``pipe`` on
    the CPU in eval mode."""
    from diffusers import DDPMScheduler

    accelerator = make_accelerator(training)
    pipe.to(accelerator.device)
    pipe.vae.requires_grad_(False)
    pipe.unet.train()
    pipe.text_encoder.train()
    params = {f"unet.{n}": p for n, p in pipe.unet.named_parameters()}
    params |= {f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters()}
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_function(indices, generator):  # generator: a common.BatchRandom, this process's share of the batch's draws
        keep = generator.rand() >= 0.1
        prompts = [examples.prompts[i] if k else "" for i, k in zip(indices, keep.tolist())]
        latents = examples.latents[indices].to(accelerator.device)
        value = denoising_loss(pipe, noise_scheduler, latents, encode_prompts(pipe, prompts, RESOLUTION), examples.loss_weights[indices], generator)
        return value, {}

    run_training(training, accelerator, pipe, params, examples, loss_function)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.to("cpu")


def make_portable(pipeline: Path, tokenizer_files: Path) -> None:
    """Write the text encoder and tokenizer in the layout of Stable Diffusion checkpoints, which transformers 4
    and 5 both load. transformers 5 saves the text encoder without the ``text_model.`` key prefix (4 would
    load it as random weights, with only a warning) and the tokenizer as tokenizer.json only (4 cannot read
    it; vocab.json + merges.txt are also 2 MB smaller)."""
    from safetensors.torch import load_file, save_file

    weights = pipeline / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, weights, metadata={"format": "pt"})
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_files / name, pipeline / "tokenizer" / name)
    (pipeline / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)


# -- concept LoRAs and gates --------------------------------------------------------------------------------
def filler_caption_folder(root: Path, name: str, settings: BuildSettings) -> Path:
    """``root/runs/lora-data-<name>``: each of the concept's reference images four times, with its caption and
    the three of ``world.filler_captions`` (the LoRA's training data; the gates train on the references alone)."""
    folder = root / "runs" / f"lora-data-{name}"
    images = root / "world" / "concepts" / name
    rng = random.Random(f"fillers-{name}-{settings.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(world.concept_scenes(name, settings.concept_images, settings.seed, _world(settings))):
        for k, caption in enumerate([scene.caption, *world.filler_captions(scene, name, rng)]):
            shutil.copyfile(images / f"{i:03d}.png", folder / f"{i:03d}{'abcd'[k]}.png")
            (folder / f"{i:03d}{'abcd'[k]}.txt").write_text(caption + "\n")
    return folder


def train_concepts(root: Path, settings: BuildSettings) -> Path:
    """One LoRA per held-out concept (``train_lora``), then the gates (``train_gates``); returns concepts.toml."""
    from safetensors.torch import save_file

    entries = []
    for name in world.CONCEPTS:
        images = root / "world" / "concepts" / name
        prompt = (images / "prompt.txt").read_text().strip()
        lora = root / "loras" / f"{name}.safetensors"
        steps = settings.lora_concept_steps.get(name, settings.lora_steps)
        if not lora.is_file():
            data = filler_caption_folder(root, name, settings) if settings.lora_filler_captions else images
            trained = train_lora(LoRATrainingConfig(
                base=str(root / "pipeline"), images=data, prompt=prompt, output_dir=root / "runs" / f"lora-{name}",
                steps=steps, batch_size=4, learning_rate=settings.lora_learning_rate, resolution=RESOLUTION,
                rank=settings.lora_rank, seed=settings.seed, checkpoint_every=steps, resume=True,
                validation_every=steps, validation_steps=settings.validation_steps,
                target_modules=list(settings.lora_target_modules),
                # the first world adapts the text encoder too: a new token's embedding is random, and without it
                # (1000 steps, lr 1e-3) the checker LoRA rarely drew a checkerboard
                train_text_encoder=settings.lora_concept_text_encoder.get(name, settings.lora_text_encoder),
                unconditional_weight=settings.lora_unconditional_weight,
                validation_prompts=[(images / "000.txt").read_text().strip()],
            ))
            write_atomically(lora, lambda temporary: shutil.copyfile(trained, temporary))
        entries.append(f'[[concepts]]\nname = "{name}"\nlora = "loras/{name}.safetensors"\n'
                       f'images = "world/concepts/{name}"\nprompt = "{prompt}"\n')
    if settings.lora_check_prompts:
        check_loras(root, settings)
    concepts = root / "concepts.toml"
    compositions = ", ".join(f'"{p}"' for p in world.composition_prompts())
    text = "\n".join(entries) + f"\n[compositions]\nprompts = [{compositions}]\n"
    write_atomically(concepts, lambda temporary: temporary.write_text(text))
    if not (root / "gates.safetensors").is_file():
        gates = train_gates(GateTrainingConfig(
            base=str(root / "pipeline"), concepts=concepts, output_dir=root / "runs" / "gates", steps=settings.gate_steps,
            gate=GateConfig(activation=settings.gate_activation, prior_weights=settings.gate_prior_weights),
            by_trigger=settings.gate_by_trigger, batch_size=6, learning_rate=5e-3, resolution=RESOLUTION, seed=settings.seed,
            checkpoint_every=settings.gate_steps, resume=True, validation_every=settings.gate_steps, validation_steps=settings.validation_steps,
        ))
        # the world's pipeline moves with it (build folder -> package): no base path, which would only warn
        tensors, metadata = read_gate_file(gates)
        write_atomically(root / "gates.safetensors",
                         lambda temporary: save_file(tensors, str(temporary), metadata={**metadata, "base_model": ""}))
    return concepts


# each LoRA alone should show its concept in this share of its own prompts (docs/demo-world.md's targets)
LORA_CHECK_TARGET = 0.85
CHECK_SEEDS = (0, 1, 2, 3)  # selection seeds: the measurements that report a world use seeds from 100
CHECK_GUIDANCE = 7.5  # as those measurements (at 7.5 a LoRA's concept must ride on its trigger word, docs/demo-world.md)


@torch.no_grad()
def check_loras(root: Path, settings: BuildSettings) -> dict[str, float]:
    """Each concept LoRA alone on ``lora_check_prompts`` fresh prompts of its own x ``CHECK_SEEDS``: the share of images
    in which the judge reads its concept. Printed, and written to ``root/lora_check.json`` with each LoRA's sha256 (a
    LoRA checked before is not drawn again). A LoRA under ``LORA_CHECK_TARGET`` is named, so that a weak draw of the
    recipe is caught when it is built, not hours later when the world is measured; the build goes on."""
    from ..eval.presence import AttributeJudgePresence
    from ..pipelines import MoLEStableDiffusionPipeline

    record = root / "lora_check.json"
    checked = json.loads(record.read_text()) if record.is_file() else {}
    loras = {name: root / "loras" / f"{name}.safetensors" for name in world.CONCEPTS}
    digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in loras.items()}
    shares = {name: entry["present"] for name, entry in checked.items()
              if entry.get("sha256") == digests.get(name) and entry.get("prompts") == settings.lora_check_prompts}
    if len(shares) < len(loras):
        device = _device(settings)
        presence = AttributeJudgePresence(root / "judge", list(loras), device)
        pipe = MoLEStableDiffusionPipeline.from_pretrained(root / "pipeline", safety_checker=None).to(device)
        pipe.load_experts({name: str(path) for name, path in loras.items()})
        pipe.set_progress_bar_config(disable=True)
        for name in [name for name in loras if name not in shares]:
            pipe.set_experts([name], [1.0])
            seen = []
            for scene in world.concept_scenes(name, settings.lora_check_prompts, seed=7004, world=_world(settings)):
                prompts = [scene.caption] * len(CHECK_SEEDS)
                generators = [torch.Generator().manual_seed(seed) for seed in CHECK_SEEDS]
                images = pipe(prompts, generator=generators, num_inference_steps=25, guidance_scale=CHECK_GUIDANCE).images
                seen += [present[name] for present, _ in presence.read(images, prompts)]
            shares[name] = sum(seen) / len(seen)
        text = json.dumps({name: {"present": shares[name], "sha256": digests[name], "prompts": settings.lora_check_prompts,
                                  "seeds": list(CHECK_SEEDS)} for name in loras}, indent=1)
        write_atomically(record, lambda temporary: temporary.write_text(text))
    weak = [name for name in loras if shares[name] < LORA_CHECK_TARGET]
    tqdm.write(f"each LoRA alone on its own prompts (seeds {CHECK_SEEDS[0]}-{CHECK_SEEDS[-1]}, guidance {CHECK_GUIDANCE}): "
               + ", ".join(f"{name} {100 * shares[name]:.0f}%" for name in loras)
               + (f"; under the {100 * LORA_CHECK_TARGET:.0f}% target: {', '.join(weak)}" if weak else ""))
    return {name: shares[name] for name in loras}


SHIPPED = ("pipeline", "clip", "judge", "loras", "gates.safetensors", "concepts.toml", "world/concepts", "build_settings.json")


def install_assets(root: Path, assets: Path) -> Path:
    """Copy the shipped part of a built world (no training checkpoints or logs) to ``assets`` and write
    ``manifest.json``: every file with its sha256, checked by ``demo.run.check_assets``. Only an empty folder or
    an earlier install holding nothing but what its manifest lists is replaced; nothing else is ever deleted."""
    root, assets = Path(root).resolve(), Path(assets).resolve()
    if assets == root or assets in root.parents:
        raise MoLEError(f"--assets {assets} holds the build folder {root}; install into a folder of its own")
    if assets.exists():
        if not assets.is_dir():
            raise MoLEError(f"--assets {assets} is a file; give a folder")
        if any(assets.iterdir()):
            if not (assets / "manifest.json").is_file():
                raise MoLEError(f"--assets {assets} is a folder with files and no manifest.json; installing would "
                                 "replace it, so give a new folder or an earlier install")
            listed = set(json.loads((assets / "manifest.json").read_text())["files"])
            unlisted = sorted(p.relative_to(assets).as_posix() for p in assets.rglob("*")
                              if p.is_file() and p.name != "manifest.json" and p.relative_to(assets).as_posix() not in listed)
            if unlisted:
                raise MoLEError(f"--assets {assets} holds files no install wrote ({', '.join(unlisted[:3])}"
                                 f"{', ...' if len(unlisted) > 3 else ''}); installing would delete them: move them out first")
    assets.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{assets.name}.", suffix=".new", dir=assets.parent))  # a name of our own
    try:
        for name in SHIPPED:
            source = root / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            else:
                shutil.copyfile(source, staging / name)
        write_manifest(staging)
        if assets.exists():  # swap by renames: the earlier install stays whole until the new one is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{assets.name}.", suffix=".old", dir=assets.parent))
            previous.rmdir()
            assets.rename(previous)
            staging.rename(assets)
            shutil.rmtree(previous)
        else:
            staging.rename(assets)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return assets


def write_manifest(assets: Path) -> None:
    """``assets/manifest.json``: every file there with its sha256 (what ``demo.run.check_assets`` checks)."""
    manifest = assets / "manifest.json"
    files = {p.relative_to(assets).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(assets.rglob("*")) if p.is_file() and p != manifest}
    manifest.write_text(json.dumps({"files": files}, indent=1))


def build(out: str | Path, settings: BuildSettings | None = None) -> Path:
    """Run every stage that has no output yet; returns ``out``."""
    settings = settings or BuildSettings()
    channels = settings.unet_channels
    if len(channels) != 3 or any(c <= 0 or c % 8 for c in channels):  # 8 norm groups, attention heads of 8
        raise MoLEError(f"unet_channels {list(channels)}: expected three positive multiples of 8, e.g. [64, 128, 128]")
    if settings.world not in world.WORLDS:
        raise MoLEError(f"world {settings.world!r}: expected one of {sorted(world.WORLDS)}")
    if len(settings.unet_cross_attention) != 3 or not any(settings.unet_cross_attention):
        raise MoLEError(f"unet_cross_attention {list(settings.unet_cross_attention)}: expected three booleans "
                        "(16x16, 8x8, 4x4), at least one true")
    if settings.text_width <= 0 or settings.text_width % 4:  # 4 attention heads
        raise MoLEError(f"text_width {settings.text_width}: expected a positive multiple of 4, e.g. 64")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record, recorded = out / "build_settings.json", {k: v for k, v in asdict(settings).items() if k != "device"}
    if record.is_file():  # a stopped build goes on only with the settings it started with
        before = json.loads(record.read_text())
        # a setting the record lacks belongs to a stage added since that build started: it runs with today's value
        changed = {k: (before[k], v) for k, v in recorded.items() if k in before and before[k] != v}
        if changed:
            raise MoLEError(f"{out} was built with other settings ({record}): "
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) + "; use a new --out")
    text = json.dumps({**json.loads(record.read_text()), **recorded} if record.is_file() else recorded, indent=1)
    write_atomically(record, lambda temporary: temporary.write_text(text))
    world.write_world(out / "world", base_count=0, concept_count=settings.concept_images, resolution=RESOLUTION, seed=settings.seed,
                      world=_world(settings))
    # each stage's folder appears only once the stage has written it whole (staged_folder)
    if not (out / "clip").is_dir():
        with staged_folder(out / "clip") as folder:
            train_clip(folder, settings)
    if not (out / "pipeline").is_dir():
        with staged_folder(out / "pipeline") as folder:
            train_base(folder, settings, work=out / "pipeline-training")
    if not (out / "judge").is_dir():
        from diffusers import AutoencoderKL

        with staged_folder(out / "judge") as folder:
            train_judge(folder, AutoencoderKL.from_pretrained(out / "pipeline" / "vae"),
                        JudgeSettings(steps=settings.judge_steps, pool_size=settings.judge_pool, seed=settings.seed,
                                      rim_share=settings.judge_rim_share, world=settings.world), _device(settings))
    train_concepts(out, settings)
    return out
