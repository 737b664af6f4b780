"""What gate training and LoRA training share: reference images as latents, the denoising loss, atomic
checkpoints, logs, validation grids, and the plain accelerate loop that runs them.

Every random draw of a step (which images, which noise, which timesteps) is derived from the seed and the
step number, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run would.

Several processes (``accelerate launch``) split each micro-batch: ``batch_size`` is the global micro-batch,
every process draws the whole step's random numbers (every micro-batch's) from the same seeded generator and
takes its rows, gradients are averaged and batch statistics (the balance loss's mean gate weights) are taken over
the global batch, so N processes end with the gates of one process (to float rounding), only sooner.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers import DDPMScheduler, DiffusionPipeline, FluxPipeline, StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..concepts import Concept, ConceptError, list_images
from ..errors import MoLEError
from ..experts import lora_components


class CheckpointError(MoLEError, RuntimeError):
    """A training checkpoint that does not belong to this run."""


class NonFiniteLossError(MoLEError, FloatingPointError):
    """The loss became inf or NaN: a refusal to train on, with what to change."""


@dataclass(kw_only=True)
class TrainingSettings:
    """The loop's settings, common to ``train-gates`` and ``train-lora``."""

    output_dir: Path
    steps: int = 400
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    resolution: int = 512
    prior_loss_weight: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 100
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 25
    progress: bool = True


class BatchRandom:
    """The random draws of one global micro-batch, of which this process uses rows ``start .. start + count - 1``.

    Each draw is made for the whole micro-batch and then sliced, so a process's rows are exactly the rows one
    process with the whole batch would use: the split across processes does not change the samples.
    """

    def __init__(self, generator: torch.Generator, size: int, start: int = 0, count: int | None = None):
        self.generator, self.size, self.start = generator, size, start
        self.count = size - start if count is None else count

    def rand(self, *shape: int) -> torch.Tensor:
        """(count, *shape) numbers uniform in [0, 1)."""
        return torch.rand((self.size, *shape), generator=self.generator)[self.start:self.start + self.count]

    def randn(self, *shape: int) -> torch.Tensor:
        """(count, *shape) standard normal numbers."""
        return torch.randn((self.size, *shape), generator=self.generator)[self.start:self.start + self.count]

    def randint(self, high: int) -> torch.Tensor:
        """(count,) integers in [0, high)."""
        return torch.randint(0, high, (self.size,), generator=self.generator)[self.start:self.start + self.count]

    @staticmethod
    def of(generator: torch.Generator | BatchRandom, size: int) -> BatchRandom:
        """``generator`` as is, or a plain generator as the draws of a batch of ``size`` alone."""
        return generator if isinstance(generator, BatchRandom) else BatchRandom(generator, size)


# -- data -----------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Reference images encoded once (the VAE is frozen), with their prompts and loss weights."""

    latents: torch.Tensor  # (M, C, h, w), already shifted and scaled as the denoiser reads them
    prompts: list[str]
    groups: torch.Tensor  # (M,): one group per concept's instance images, one per its class images
    loss_weights: torch.Tensor  # (M,): 1, or the prior-preservation weight for class images


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1]: (3, resolution, resolution)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def image_caption(image: Path, prompt: str) -> str:
    """The image's own caption, kohya-style (``NAME.txt`` next to ``NAME.png``), else the concept's prompt."""
    caption = image.with_suffix(".txt")
    try:
        text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
    except UnicodeDecodeError as e:
        raise ConceptError(f"{caption}: the caption of {image.name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text or prompt


@torch.no_grad()
def encode_examples(concepts: list[Concept], vae, resolution: int, prior_loss_weight: float) -> Examples:
    latents, prompts, groups, weights = [], [], [], []
    sets = [(c.images, c.prompt, 1.0) for c in concepts]
    sets += [(c.class_images, c.class_prompt, prior_loss_weight) for c in concepts if c.class_images is not None]
    for group, (folder, prompt, weight) in enumerate(sets):
        for path in list_images(folder):
            pixels = load_image(path, resolution)[None].to(vae.device, vae.dtype)
            mean = vae.encode(pixels).latent_dist.mean.float().cpu()
            # Flux's VAE has a shift as well as a scale (the pipeline decodes latents / scale + shift)
            latents.append((mean - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor)
            prompts.append(image_caption(path, prompt))
            groups.append(group)
            weights.append(weight)
    return Examples(torch.cat(latents), prompts, torch.tensor(groups), torch.tensor(weights))


@lru_cache(maxsize=4)
def _epoch_order(groups: tuple[int, ...], seed: int, epoch: int) -> list[int]:
    """A shuffled pass over all examples that takes the groups in turn, so every batch mixes concepts."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    group_ids = torch.tensor(groups)
    shuffled = [
        members[torch.randperm(len(members), generator=generator)].tolist()
        for members in (torch.nonzero(group_ids == g).flatten() for g in sorted(set(groups)))
    ]
    longest = max(len(s) for s in shuffled)
    return [s[i] for i in range(longest) for s in shuffled if i < len(s)]


def sample_indices(examples: Examples, seed: int, start: int, count: int) -> list[int]:
    """Examples number ``start`` .. ``start + count - 1`` of the endless, seeded stream of epochs."""
    groups, size = tuple(examples.groups.tolist()), len(examples.prompts)
    return [_epoch_order(groups, seed, n // size)[n % size] for n in range(start, start + count)]


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The UNet, or Flux's transformer."""
    return next(iter(lora_components(pipe).values()))


def text_encoders(pipe: DiffusionPipeline) -> list[torch.nn.Module]:
    """The text encoders a LoRA may adapt (diffusers' list for the pipeline: not Flux's T5)."""
    return [model for name, model in lora_components(pipe).items() if name.startswith("text_encoder")]


def encode_prompts(pipe: DiffusionPipeline, prompts: list[str], resolution: int) -> dict:
    """The denoiser's text conditions for ``prompts``, as keyword arguments of its forward, with gradients
    through the text encoders (for their gates): SD the hidden states; SDXL both encoders' and the added
    conditions (pooled embedding, size ``resolution`` uncropped); Flux the T5 states, the CLIP pooled
    embedding and the text ids."""
    device = denoiser(pipe).device
    mole = getattr(pipe, "mole", None)
    if mole is not None:  # gates with trigger words weigh each expert by whether the example's prompt names it
        mole.set_prompts(prompts)
    if isinstance(pipe, FluxPipeline):
        # FLUX.1's T5 reads 512 tokens (its tokenizer's length; the pipeline's default); a smaller tokenizer fewer
        length = min(512, pipe.tokenizer_2.model_max_length)
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        size = (resolution, resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}}
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return {"encoder_hidden_states": pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]}


# Flux.1-dev is guidance-distilled: its transformer takes the guidance scale as an input, in training as well
# (diffusers' Flux DreamBooth script: 3.5 by default)
FLUX_TRAINING_GUIDANCE = 3.5


def denoising_loss(
    pipe: DiffusionPipeline, noise_scheduler: DDPMScheduler | None, latents: torch.Tensor, conditions: dict,
    loss_weights: torch.Tensor, generator: torch.Generator | BatchRandom,
) -> torch.Tensor:
    """The usual diffusion loss. SD / SDXL: noise the latents at random timesteps, predict epsilon / v / the
    sample. Flux (flow matching): x_s = (1 - s) x + s noise at s uniform in [0, 1), predict noise - x.
    ``generator``: a plain generator (the draws of this batch alone), or this process's slice of a global batch's."""
    random = BatchRandom.of(generator, len(latents))
    noise = random.randn(*latents.shape[1:]).to(latents)
    if isinstance(pipe, FluxPipeline):
        prediction, target = _flow_matching_prediction(pipe, latents, noise, conditions, random.rand().to(latents))
    else:
        timesteps = random.randint(noise_scheduler.config.num_train_timesteps).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, **conditions).sample
        target = {
            "epsilon": noise,
            "v_prediction": noise_scheduler.get_velocity(latents, noise, timesteps),
            "sample": latents,
        }[noise_scheduler.config.prediction_type]
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_example * loss_weights.to(per_example)).mean()


def _flow_matching_prediction(pipe: FluxPipeline, latents: torch.Tensor, noise: torch.Tensor, conditions: dict,
                              sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's velocity prediction at noise levels ``sigmas`` (B,), on latents packed 2x2 into tokens as the
    pipeline packs them, and its target."""
    batch, channels, height, width = latents.shape
    s = sigmas.view(-1, 1, 1, 1)
    packed = pipe._pack_latents((1 - s) * latents + s * noise, batch, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    transformer = pipe.transformer
    guidance = torch.full((batch,), FLUX_TRAINING_GUIDANCE, device=latents.device) if transformer.config.guidance_embeds else None
    prediction = transformer(hidden_states=packed, timestep=sigmas, guidance=guidance, img_ids=image_ids,
                             return_dict=False, **conditions)[0]
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(prediction, height * scale, width * scale, scale), noise - latents


# -- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, keep: int, scaler=None,
                    kind: str | None = None) -> Path:
    """Write ``folder/step-NNNNNN`` atomically (a temporary folder, then one rename) and keep the newest ``keep``.
    ``scaler``: fp16's gradient scaler, whose scale a resumed run must continue from; ``kind``: what the parameters
    mean beyond their names and shapes (a gate's kind), checked when resuming."""
    state = optimizer.state_dict()
    tensors = {f"param.{name}": p.detach().float().cpu().contiguous() for name, p in params.items()}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).cpu().contiguous()
    final, temporary = folder / f"step-{step:06d}", folder / f".step-{step:06d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, str(temporary / "state.safetensors"))
    info = {"step": step, "param_groups": state["param_groups"], "params": list(params),
            "scaler": scaler.state_dict() if scaler is not None else None, "kind": kind}
    (temporary / "state.json").write_text(json.dumps(info))
    for file in temporary.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    old_copy = folder / f".step-{step:06d}.old"
    shutil.rmtree(old_copy, ignore_errors=True)  # left by a run killed between the two renames
    if final.exists():  # the same step written again after a resume: swap, then drop the old copy
        final.rename(old_copy)
    os.replace(temporary, final)
    shutil.rmtree(old_copy, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are hidden ``.tmp`` folders and never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file() and (p / "state.safetensors").is_file())


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, learning_rate: float, scaler=None,
                    kind: str | None = None) -> int:
    """Restore parameters, optimizer and scaler state (the learning rate is this run's); returns the step. A
    checkpoint that records another ``kind`` is refused (parameters of one shape can mean other things)."""
    info = json.loads((path / "state.json").read_text())
    if info.get("kind") is not None and info["kind"] != kind:
        raise CheckpointError(f"{path}: checkpoint of another run, with other gates ({info['kind']}; this run: {kind}); use "
                              "a new output folder, or this run's settings to resume it")
    tensors = load_file(str(path / "state.safetensors"))
    if info["params"] != list(params):
        missing = sorted(set(params) - set(info["params"]))[:3]
        extra = sorted(set(info["params"]) - set(params))[:3]
        raise CheckpointError(
            f"{path}: checkpoint of another run (its trainable parameters differ: missing {missing}, unexpected "
            f"{extra}); use a new --output-dir or drop --resume"
        )
    for name, p in params.items():
        saved = tensors[f"param.{name}"]
        if saved.shape != p.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(saved.shape)} there and {tuple(p.shape)} in this run "
                                  "(another rank or model?); use a new output folder or drop --resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            slots.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": [{**g, "lr": learning_rate} for g in info["param_groups"]]})
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    return info["step"]


# -- logs and validation --------------------------------------------------------------------------------
class TrainingLog:
    """One row per step in ``log.csv`` and ``log.jsonl`` (always), and TensorBoard when it is installed."""

    def __init__(self, folder: Path, accelerator: Accelerator, resumed_from: int):
        self.jsonl, self.csv, self.accelerator = folder / "log.jsonl", folder / "log.csv", accelerator
        kept = []
        if resumed_from and self.jsonl.exists():  # drop steps taken after the checkpoint: they are redone
            kept = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resumed_from]
        # the kept rows go to new files that replace the old ones by rename: a run stopped here loses no row
        final, self.jsonl, self.csv = (self.jsonl, self.csv), self.jsonl.with_name("log.jsonl.tmp"), self.csv.with_name("log.csv.tmp")
        self.jsonl.unlink(missing_ok=True)
        self.csv.unlink(missing_ok=True)
        for row in kept:
            self.write(row, track=False)
        for temporary, path in zip((self.jsonl, self.csv), final):
            if temporary.exists():
                os.replace(temporary, path)
            else:
                path.unlink(missing_ok=True)
        self.jsonl, self.csv = final

    def write(self, row: dict, track: bool = True) -> None:
        """Append one row (every row has the same columns)."""
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        new_file = not self.csv.exists()
        with open(self.csv, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if track and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


@torch.no_grad()
def save_validation_grid(pipe, settings: TrainingSettings, path: Path) -> None:
    """Rows: validation prompts; columns: seeds. Same seeds every time, so grids compare across steps."""
    images = [
        pipe(prompt, num_inference_steps=settings.validation_steps, height=settings.resolution, width=settings.resolution,
             generator=torch.Generator().manual_seed(seed)).images[0]
        for prompt in settings.validation_prompts
        for seed in settings.validation_seeds
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(settings.validation_prompts), cols=len(settings.validation_seeds)).save(path)


# -- the loop -------------------------------------------------------------------------------------------
MULTI_PROCESS_ON_CPU = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m mole_diffusion.cli ..."


def make_accelerator(settings: TrainingSettings) -> Accelerator:
    """The run's Accelerator; refuses launches whose processes would not train together, and batch sizes that
    do not split evenly over the processes."""
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, log_with=log_with, project_dir=str(settings.output_dir))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # torchrun started several processes, but accelerate found no GPU and so did not connect them: each
        # would train alone, all writing the same folder
        raise MoLEError(f"{launched} processes were launched but accelerate runs each alone (no GPU found); on CPUs "
                        f"set ACCELERATE_USE_CPU=1: {MULTI_PROCESS_ON_CPU}")
    if accelerator.num_processes == 1 and _one_of_several_cpu_processes():
        # gates do not depend on the number of processes, so this run is right, only slower than asked
        accelerator.print(f"note: `accelerate launch --cpu` started one process (without mpirun it starts no more); "
                          f"training in one process, to the same result. For several on CPUs: {MULTI_PROCESS_ON_CPU}")
    local_batch_size(settings, accelerator.num_processes)
    return accelerator


def _one_of_several_cpu_processes() -> bool:
    """Whether ``accelerate launch --cpu --num_processes N`` (N > 1) started this single process: it sets the
    rendezvous address for N processes, but only mpirun would start them and give them ranks."""
    ranks = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return cpu and "MASTER_PORT" in os.environ and not any(name in os.environ for name in ranks)


def local_batch_size(settings: TrainingSettings, processes: int) -> int:
    """Each process's share of the global micro-batch ``settings.batch_size``."""
    if settings.batch_size < 1:
        raise MoLEError(f"batch_size must be at least 1, got {settings.batch_size}")
    if settings.batch_size % processes:
        raise MoLEError(f"--batch-size {settings.batch_size} is the global batch and must split evenly over the "
                        f"{processes} processes: use a multiple of {processes}")
    return settings.batch_size // processes


def global_batch_means(tensors: list[torch.Tensor], accelerator: Accelerator) -> list[torch.Tensor]:
    """``tensors`` (this process's rows of a batch statistic's inputs, batch first) shifted so that their mean
    over the batch is the mean over the global batch, all processes' rows, while the gradient stays this
    process's own. A loss that is not a mean over examples (the balance loss, -sum log q) then has the
    global batch's value, and averaging the processes' gradients gives one process's gradient; the local
    means alone would give another loss. All processes must hold equally many rows (``local_batch_size``)."""
    if accelerator.num_processes == 1 or not tensors:
        return tensors
    local = torch.cat([t.detach().float().mean(dim=0).flatten() for t in tensors])
    offsets = (accelerator.reduce(local, "mean") - local).split([t[0].numel() for t in tensors])
    return [t + offset.view(t.shape[1:]).to(t.dtype) for t, offset in zip(tensors, offsets)]


def prepare_pipeline(pipe: DiffusionPipeline, accelerator: Accelerator, settings: TrainingSettings) -> None:
    """Frozen models on the device in the mixed-precision dtype, progress bars off, checkpointing if asked."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe.to(accelerator.device)
    if weight_dtype != torch.float32:
        pipe.to(dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing passes gradients to gates behind frozen blocks.
        denoiser(pipe).enable_gradient_checkpointing()
        denoiser(pipe).train()
        for text_encoder in text_encoders(pipe):
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            text_encoder.train()


def trainable_parameters(pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
    """{"unet.<name>" / "text_encoder.<name>" / ...: parameter} for every parameter that requires grad."""
    return {
        f"{component}.{name}": p
        for component, model in lora_components(pipe).items()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


LossFunction = Callable[[list[int], BatchRandom], tuple[torch.Tensor, dict[str, float]]]


def denoising_objective(pipe: DiffusionPipeline, examples: Examples) -> LossFunction:
    """The usual DreamBooth loss on the examples ``indices``, as a loss function for ``run_training``."""
    noise_scheduler = None if isinstance(pipe, FluxPipeline) else DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = examples.latents.shape[-1] * pipe.vae_scale_factor

    def loss(indices: list[int], generator: BatchRandom) -> tuple[torch.Tensor, dict[str, float]]:
        conditions = encode_prompts(pipe, [examples.prompts[i] for i in indices], resolution)
        latents = examples.latents[indices].to(denoiser(pipe).device, denoiser(pipe).dtype)
        value = denoising_loss(pipe, noise_scheduler, latents, conditions, examples.loss_weights[indices], generator)
        return value, {"loss_denoising": value.item()}

    return loss


def run_training(
    settings: TrainingSettings,
    accelerator: Accelerator,
    pipe: DiffusionPipeline,
    params: dict[str, torch.nn.Parameter],
    examples: Examples,
    loss_function: LossFunction,
    kind: str | None = None,
) -> None:
    """Train ``params`` (everything else in ``pipe`` frozen) on ``loss_function(indices, random)``, which
    returns the loss of a micro-batch (examples ``indices``; random draws from ``random``) and values to log.
    Under several processes ``indices`` and ``random`` are this process's share of the global micro-batch,
    and the loss must be a mean over the examples (or use ``global_batch_means`` for batch statistics).
    ``kind``: recorded in each checkpoint; resuming one of another kind is refused (``load_checkpoint``)."""
    for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "validation_every"):
        if getattr(settings, name) < 1:
            raise MoLEError(f"{name} must be at least 1, got {getattr(settings, name)}")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / "checkpoints"
    optimizer = accelerator.prepare(torch.optim.AdamW(params.values(), lr=settings.learning_rate))
    start, existing = 0, list_checkpoints(checkpoints)
    if existing and not settings.resume:  # never prune (or later resume from) another run's checkpoints
        raise CheckpointError(f"{checkpoints} holds checkpoints of an earlier run (newest {existing[-1].name}): "
                              "pass --resume to continue it, or choose another output folder")
    if existing:
        start = load_checkpoint(existing[-1], params, optimizer, settings.learning_rate, accelerator.scaler, kind)
        accelerator.print(f"resuming from {existing[-1]} (step {start})")
        if kind is not None and json.loads((existing[-1] / "state.json").read_text()).get("kind") is None:
            accelerator.print(f"note: {existing[-1]} does not record what it trained; resuming as {kind}")
    log = TrainingLog(output_dir, accelerator, start) if accelerator.is_main_process else None
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("tensorboard")

    accumulation, world, rank = settings.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    local = local_batch_size(settings, world)
    if world > 1:
        # one starting point on every process, as DDP does (gates a pipeline was handed may differ)
        with torch.no_grad():
            for p in params.values():
                p.copy_(broadcast(p.detach().clone(), from_process=0))
        accelerator.print(f"training on {world} processes, {local} of the {settings.batch_size} examples of each micro-batch on each")
    bar = tqdm(total=settings.steps, initial=start, disable=not (settings.progress and accelerator.is_local_main_process), desc="training")
    for step in range(start + 1, settings.steps + 1):
        began, logged = time.perf_counter(), {}
        for micro in range(accumulation):
            draw = (step - 1) * accumulation + micro  # the global micro-batch's number; this process takes its rows
            indices = sample_indices(examples, settings.seed, draw * settings.batch_size + rank * local, local)
            # the step's random draws are made for all its micro-batches together, each taking its rows: so
            # accumulating k micro-batches of b sees the samples of one batch of k * b (a mean loss: its gradient)
            random = BatchRandom(torch.Generator().manual_seed(settings.seed * 1_000_003 + step - 1),
                                 accumulation * settings.batch_size, micro * settings.batch_size + rank * local, local)
            with accelerator.autocast():
                loss, values = loss_function(indices, random)
            values = {"loss": loss.item(), **values}
            if world > 1:  # log the global batch's values (and every process sees a non-finite loss, so all stop)
                means = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device), "mean")
                values = dict(zip(values, means.tolist()))
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"loss is {values['loss']} at step {step}; lower --learning-rate, or train in fp32 (--mixed-precision no)"
                )
            accelerator.backward(loss / accumulation)
            for key, value in values.items():
                logged[key] = logged.get(key, 0.0) + value / accumulation
        if world > 1:
            average_gradients(list(params.values()), accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - began
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.4f}", s_per_step=f"{seconds:.2f}")
        if log is not None:
            log.write({"step": step, **logged, "seconds": seconds})
        if accelerator.is_main_process and (step % settings.checkpoint_every == 0 or step == settings.steps):
            save_checkpoint(checkpoints, step, params, optimizer, settings.keep_checkpoints, accelerator.scaler, kind)
        if accelerator.is_main_process and settings.validation_prompts and (step % settings.validation_every == 0 or step == settings.steps):
            save_validation_grid(pipe, settings, output_dir / "validation" / f"step-{step:06d}.png")
        accelerator.wait_for_everyone()
    bar.close()
    accelerator.end_training()


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Data parallel: every gradient becomes its mean over the processes, in one all-reduce. Each process's
    loss is the mean over its equal share of the batch, so this is the global batch's gradient. A parameter
    without a gradient on some process counts zero there; one without a gradient anywhere keeps none (AdamW
    then leaves it alone, as in one process)."""
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params] + [present])
    flat = accelerator.reduce(flat, "mean")
    grads, anywhere = flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):] > 0
    for p, grad, has in zip(params, grads, anywhere.tolist()):
        p.grad = grad.view(p.shape).to(p.dtype) if has else None
