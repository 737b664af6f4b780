"""Can gates learn, from each concept's own images, what the plain sum gets wrong when the LoRAs meet? A diagnostic.

    python -m experiments.region_gates --assets build/world-v2/assets --out build/region-gates

Gates with trigger words trained the shipped way (each concept's images with its own caption) never see two LoRAs
at once, so nothing teaches them that on the second world the checker LoRA, beside the stripes LoRA, pulls a red
object back to the textures of its own references (docs/demo-world.md, "What the images show"). Here every
reference image also serves a second time, as a composition would: its caption names, in their slots, the
concepts that draw the *other* region of the image (the star's and the stripes' images the checkerboard, the
checker's images the star and the stripes), so those LoRAs act too, and the denoising loss counts only the region
this concept draws, which the image shows as it should be: the object of a star or stripes image, the background of
a checker image. On a stripes image "a red circle in zwx style on a grid background" becomes "a red circle in zwx
style on a qkx background", and the loss on the circle asks the mixture to keep its stripes with the checker LoRA on.
Nothing says what the other region should look like: only the latent cells wholly inside the concept's region count
(a cell on the outline also encodes the other region, whose target the company caption makes wrong), though the
UNet's receptive field still carries some of the other region into them.

The images are each concept's references of the build; their regions come from the world's scenes, recomputed
from the build's seed (each is checked against the reference image, pixel for pixel). A user's equivalent is a
mask per reference image, as kohya's masked loss takes. The gates: softplus at prior 1 with the concepts' trigger
words, as shipped, but per position unless ``--block`` (so a LoRA can stay off one region and on the other). The
loss is the denoising loss alone: the shipped trigger-word gates' balance loss is inert (one LoRA on per example,
so every share is 0 or 1), and on the company examples it would push down whichever concept is named most often.
``--objective distillation`` takes as each row's target, instead of the noise, the prediction of its concept's
LoRA alone (weight 1 on every gate) on the same noisy latents under the image's own caption, as ``train-gates
--objective distillation`` does: the untrained gates (each LoRA the prompt names at 1) already meet it on the plain
rows, so the company rows teach, with a target free of the denoising loss's noise, "with the other region's LoRAs
on, draw this concept's region as its LoRA alone does". One more UNet call per step. ``--hold checker`` keeps the
checker LoRA at its untrained weight at every gate and position (only the other concepts' rows train), so the
company rows can move only the star's and the stripes' LoRAs.
No judge and no composition image is seen; the gate file is then measured as any other, e.g. on selection seeds:

    python -m experiments.quality --assets build/world-v2/assets --out build/region-quality --seeds 8 --first-seed 0 \\
        --guidance-scale 7.5 --methods sum mole --gates region=build/region-gates/gates.safetensors --skip-lift
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.concepts import concept_triggers, load_concepts
from mole_diffusion.config import GateConfig
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.quiet import quiet_loading
from mole_diffusion.train.common import (
    BatchRandom,
    Examples,
    TrainingSettings,
    encode_examples,
    encode_prompts,
    make_accelerator,
    prepare_pipeline,
    run_training,
    trainable_parameters,
)
from mole_diffusion.train.gates import expert_alone_predictions

# the region of the image each kind of concept draws
REGIONS = {"object": "object", "style": "object", "scene": "background"}
# how a scene names each concept: the field it sets, and to what
SLOTS = {"star": ("shape", "star"), "stripes": ("style", "stripes"), "checker": ("background", "checker")}
RESOLUTION = 64


def region(concept: str) -> str:
    return REGIONS[world.CONCEPTS[concept].kind]


def companions(concept: str) -> list[str]:
    """The concepts that draw the other region of ``concept``'s images."""
    return [name for name in world.CONCEPTS if region(name) != region(concept)]


def company_scene(scene: world.Scene, concept: str) -> world.Scene:
    """``scene`` as a composition would name it: each companion of ``concept`` in its slot (the caption follows)."""
    return replace(scene, **dict(SLOTS[name] for name in companions(concept)))


def object_mask(scene: world.Scene, resolution: int = RESOLUTION) -> torch.Tensor:
    """(resolution, resolution): 1 on the object, as ``world.draw`` fills it, 0 elsewhere."""
    mask = Image.new("L", (resolution, resolution), 0)
    ImageDraw.Draw(mask).polygon(world.outline(scene, resolution), fill=255)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def region_weights(scene: world.Scene, concept: str, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) on the latent grid: 1 where a latent cell lies wholly in ``concept``'s region of ``scene``, else 0."""
    share = F.adaptive_avg_pool2d(object_mask(scene)[None, None], grid)[0, 0]
    return (share == 1).float() if region(concept) == "object" else (share == 0).float()


def reference_scenes(assets: Path) -> dict[str, list[world.Scene]]:
    """Each concept's reference scenes, as the build drew them (``assets/build_settings.json``: world, seed,
    count), checked against the images and captions in ``assets/world/concepts``."""
    settings = json.loads((assets / "build_settings.json").read_text())
    known = world.WORLDS[settings.get("world", "v1")]
    scenes = {}
    for name in world.CONCEPTS:
        scenes[name] = world.concept_scenes(name, settings["concept_images"], settings["seed"], known)
        for i, scene in enumerate(scenes[name]):
            image = assets / "world" / "concepts" / name / f"{i:03d}.png"
            with Image.open(image) as drawn:
                same = np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(world.draw(scene, RESOLUTION)))
            if not same or image.with_suffix(".txt").read_text().strip() != scene.caption:
                raise ValueError(f"{image}: not the scene the build's settings draw ({scene.caption!r}); "
                                 f"this world was built with other settings than {assets / 'build_settings.json'}")
    return scenes


def region_examples(pipe, assets: Path) -> tuple[Examples, torch.Tensor]:
    """Every reference image twice: with its own caption and the whole image counted (group k, concept k's), and
    with its company caption and only its concept's region counted (group N + k). Returns the examples and the
    loss weights per latent cell, (2M, h, w)."""
    concepts = load_concepts(assets / "concepts.toml")
    names = [c.name for c in concepts]
    plain = encode_examples(concepts, pipe.vae, RESOLUTION, prior_loss_weight=0.0)
    grid = tuple(plain.latents.shape[-2:])
    scenes = reference_scenes(assets)
    ordered = [(name, scene) for name in names for scene in scenes[name]]  # encode_examples' order: concept, then file
    if [s.caption for _, s in ordered] != plain.prompts:
        raise ValueError(f"{assets / 'concepts.toml'}: its concepts' images are not the world's references in order")
    company = [company_scene(scene, name).caption for name, scene in ordered]
    regions = torch.stack([region_weights(scene, name, grid) for name, scene in ordered])
    examples = Examples(
        latents=torch.cat([plain.latents, plain.latents]), prompts=plain.prompts + company,
        groups=torch.cat([plain.groups, plain.groups + len(names)]), loss_weights=torch.ones(2 * len(ordered)))
    return examples, torch.cat([torch.ones_like(regions), regions])


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, cell_weights: torch.Tensor) -> torch.Tensor:
    """Each example's squared error, averaged over the channels and then over its weighted latent cells (B, h, w)."""
    error = (prediction.float() - target.float()).pow(2).mean(dim=1)
    return ((error * cell_weights).sum(dim=(1, 2)) / cell_weights.sum(dim=(1, 2)).clamp_min(1e-6)).mean()


def masked_denoising_loss(pipe, scheduler: DDPMScheduler, latents: torch.Tensor, cell_weights: torch.Tensor,
                          prompts: list[str], random: BatchRandom, teacher=None) -> torch.Tensor:
    """The denoising loss under ``prompts`` on the weighted latent cells (``masked_mse``); ``teacher(noisy,
    timesteps)``, when given, is the target instead of the noise."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"this diagnostic trains epsilon-prediction models, not {scheduler.config.prediction_type!r}")
    noise = random.randn(*latents.shape[1:]).to(latents)
    timesteps = random.randint(scheduler.config.num_train_timesteps).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if teacher is None else teacher(noisy, timesteps)
    conditions = encode_prompts(pipe, prompts, RESOLUTION)  # after the teacher's: it sets the trigger words' gates too
    return masked_mse(pipe.unet(noisy, timesteps, **conditions).sample, target, cell_weights)


def lora_alone(pipe, prompts: list[str], experts: list[int]):
    """``teacher(noisy, timesteps)``: each row's prediction by LoRA ``experts[row]`` alone at weight 1 on every gate,
    under ``prompts[row]``, without gradients; the gates are in place again afterwards."""
    return lambda noisy, timesteps: expert_alone_predictions(pipe, noisy, timesteps, prompts, experts, RESOLUTION)


def train_region_gates(pipe, assets: Path, out: Path, steps: int = 300, batch_size: int = 6, learning_rate: float = 5e-3,
                       seed: int = 0, progress: bool = True, objective: str = "denoising",
                       examples: tuple[Examples, torch.Tensor] | None = None, hold: tuple[str, ...] = ()) -> Path:
    """Train ``pipe``'s gates (its experts the world's concepts) on the region examples (``region_examples``, made
    here unless given); writes ``out/gates.safetensors``. The experts named in ``hold`` keep their untrained weight
    (the prior, wherever their trigger word is) at every gate and position: only the others' rows train, and the
    temperature, which scales every row, stays 1."""
    settings = TrainingSettings(output_dir=out, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                resolution=RESOLUTION, seed=seed, checkpoint_every=max(steps, 1), progress=progress)
    accelerator = make_accelerator(settings)
    prepare_pipeline(pipe, accelerator, settings)
    mole = pipe.mole
    unknown = sorted(set(hold) - set(mole.expert_names))
    if unknown:
        raise ValueError(f"hold names {unknown}, which are not experts of this pipeline ({mole.expert_names})")
    held = torch.tensor([name in hold for name in mole.expert_names])
    for gate in mole.gates.values():
        gate.float().requires_grad_(True)
        gate.log_temperature.requires_grad_(not hold)
    untrained = []  # (gate, its held rows, their untrained weights, their untrained biases)
    for gate in mole.gates.values() if hold else ():
        rows = held.to(gate.weight.device)
        untrained.append((gate, rows, gate.weight[rows].detach().clone(), gate.bias[rows].detach().clone()))

    @torch.no_grad()
    def put_back_held_rows():  # before every forward, so no step ever sees them moved (AdamW moves them)
        for gate, rows, weight, bias in untrained:
            gate.weight[rows] = weight
            gate.bias[rows] = bias

    if objective not in ("denoising", "distillation"):
        raise ValueError(f"objective must be 'denoising' or 'distillation', got {objective!r}")
    examples, cell_weights = examples or region_examples(pipe, assets)
    half = len(examples.prompts) // 2  # plain rows, then the same images in company
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_function(indices: list[int], random: BatchRandom):
        put_back_held_rows()
        teacher = None
        if objective == "distillation":  # each image's concept's LoRA alone, under the image's own caption
            concepts = [int(examples.groups[i]) % len(mole.experts) for i in indices]
            teacher = lora_alone(pipe, [examples.prompts[i % half] for i in indices], concepts)
        latents = examples.latents[indices].to(pipe.unet.device, pipe.unet.dtype)
        value = masked_denoising_loss(pipe, scheduler, latents, cell_weights[indices].to(latents.device),
                                      [examples.prompts[i] for i in indices], random, teacher)
        return value, {f"loss_{objective}": value.item()}

    run_training(settings, accelerator, pipe, trainable_parameters(pipe), examples, loss_function, kind="region gates")
    put_back_held_rows()  # after the last step
    path = Path(out) / "gates.safetensors"
    if accelerator.is_main_process:
        pipe.save_gates(path)
    return path


def region_pipeline(assets: Path, per_position: bool = True, timestep_knots: int = 0) -> MoLEStableDiffusionPipeline:
    """The world's base with its LoRAs, under untrained softplus gates at prior 1 with the concepts' trigger words
    (the plain sum of the LoRAs a prompt names), timestep-aware with ``timestep_knots`` offsets."""
    concepts = load_concepts(assets / "concepts.toml")
    with quiet_loading():
        pipe = MoLEStableDiffusionPipeline.from_pretrained(assets / "pipeline", safety_checker=None)
    gate = GateConfig(activation="softplus", prior_weights=[1.0] * len(concepts), per_position=per_position,
                      timestep_knots=timestep_knots, triggers=concept_triggers(concepts))
    pipe.load_experts({c.name: c.lora for c in concepts}, gate_config=gate)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.region_gates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS, help="a built world (default: the shipped one)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--block", action="store_true", help="one weight per LoRA per block, not per position")
    parser.add_argument("--objective", choices=("denoising", "distillation"), default="denoising",
                        help="the target: the noise, or each concept's LoRA alone under the image's own caption")
    parser.add_argument("--hold", action="append", default=[], metavar="CONCEPT",
                        help="keep this concept's LoRA at its untrained weight everywhere (repeat for more)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = region_pipeline(args.assets, per_position=not args.block)
    path = train_region_gates(pipe, args.assets, args.out, args.steps, args.batch_size, args.learning_rate, seed=args.seed,
                              objective=args.objective, hold=tuple(args.hold))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
