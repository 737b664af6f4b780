"""The demo world's attribute judge, trained here: a small supervised classifier (``eval/attribute_judge.py``) that
reads a 64x64 image's shape, colour, style and background.

It is trained on the world's exact labels, never on a generated image and never as a training signal for gates
or LoRAs, so it can tell whether a composition drew its concepts without being what any method optimised.
Generated images are not the clean drawings the labels come from, so training sees them the way generation
does: a round trip through the world's own VAE (with noise in latent space), blur, pixel noise, shifts of up
to 4 pixels and a mild colour jitter.

Global pooling alone reads colours and textures wherever they are, so a saturated checker-and-stripe texture in
the prompt's colours passed every head (experiments/docs/composition-experiments.md). The shape head therefore has a value ``none``:
training also sees pictures that are not a scene of one object (a background alone, full-frame checkerboards of
any colours and cell size, stripes over everything, both together), so "the star is there" means an object is.

Files (``judge/`` in the demo assets, written by ``AttributeJudge.save``): ``config.json`` (the attributes and their
values, the layer widths, and which attribute value each concept is) and ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..eval.attribute_judge import AttributeJudge, load_judge, pil_to_uint8
from . import world
from .images import RESOLUTION, jitter, scene_pixels


def judged_attributes(known: world.World = world.V1) -> dict[str, tuple[str, ...]]:
    """What the judge of a world reads: every value the base knows of each factor, and each held-out concept's."""
    return {
        "shape": (*known.shapes, "star", "none"),  # none: no single object (a background alone, a texture)
        "colour": tuple(world.COLOURS),
        "style": ("plain", *(s for s in known.styles if s), "stripes"),
        "background": (*known.backgrounds, "checker"),
    }


# the attribute value that shows each held-out concept
CONCEPT_ATTRIBUTES = {"star": ("shape", "star"), "stripes": ("style", "stripes"), "checker": ("background", "checker")}


def scene_labels(scene: world.Scene) -> dict[str, str]:
    return {"shape": scene.shape, "colour": scene.colour, "style": scene.style or "plain", "background": scene.background}


# -- augmentations that look like generated images ------------------------------------------------------
@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, generator: torch.Generator, latent_noise: float = 0.3) -> torch.Tensor:
    """Encode and decode with the world's VAE; latents get N(0, s^2) noise, s up to ``latent_noise`` latent
    standard deviations (a sampler never lands exactly on a clean image's latent)."""
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype) * 2 - 1).latent_dist.mean
    scale = torch.rand(len(images), 1, 1, 1, generator=generator) * latent_noise / vae.config.scaling_factor
    latents = latents + scale.to(latents) * torch.randn(latents.shape, generator=generator).to(latents)
    return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).float().cpu()


def augment(images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None):
    """Shifts of up to 4 pixels, Gaussian blur (sigma 0-1.2), colour jitter (gain 0.9-1.1 per channel, offset
    +-0.04) and pixel noise (std 0-0.06), each drawn per image. With ``masks`` (N, 1, H, W) in [0, 1], returns
    them too, shifted with their images."""
    stacked = images if masks is None else torch.cat([images, masks.to(images)], dim=1)
    stacked = jitter((stacked * 255).round().to(torch.uint8), generator).float() / 255
    images, masks = (stacked, None) if masks is None else (stacked[:, :3], stacked[:, 3:])
    n = len(images)
    sigma = torch.rand(n, generator=generator) * 1.2
    blurred = torch.stack([_blur(image, float(s)) for image, s in zip(images, sigma)])
    gain = 0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=generator)
    offset = 0.08 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.06 * torch.randn(blurred.shape, generator=generator)
    augmented = (blurred * gain + offset + noise).clamp(0, 1)
    return augmented if masks is None else (augmented, masks)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:
        return image
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image[None], (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)[0]


# the colours textures and rims are drawn in: the world's, and the checkerboard's black and white
PALETTE = [*world.COLOURS.values(), (25, 25, 25), (235, 235, 235)]


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A Pillow "L" mask as a (1, H, W) uint8 tensor."""
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, mask.height, mask.width)


def objectless(rng: random.Random, resolution: int = 64, known: world.World = world.V1) -> tuple[Image.Image, dict[str, str | None]]:
    """A picture that is not a scene of one object, and what is known of it (None: nothing to read).

    A quarter are a background alone (plain or the world's checkerboard); a quarter a scene cut into 8- or
    16-pixel tiles and shuffled (its colours and local patterns kept, its layout lost); the rest are textures over
    the whole frame: a checkerboard of two random colours (black and white included) at a random cell size and
    phase, diagonal stripes of a random colour, period and direction, or both, as the failed compositions drew
    (beyond ``V1``, also horizontal or vertical lines, and dots)."""
    kind = rng.random()
    if kind < 1 / 4:
        background = rng.choice([*known.backgrounds, "checker"])
        empty = world.Scene("circle", "red", background, "small", (2.0, 2.0))  # the circle lies off the canvas
        return world.draw(empty, resolution), {"shape": "none", "colour": None, "style": "plain", "background": background}
    if kind < 1 / 2:
        scene = _scenes(rng, 1, known)[0]
        image, tile = world.draw(scene, resolution), rng.choice((8, 16))
        corners = [(x, y) for y in range(0, resolution, tile) for x in range(0, resolution, tile)]
        tiles = [image.crop((x, y, x + tile, y + tile)) for x, y in corners]
        rng.shuffle(tiles)
        for piece, corner in zip(tiles, corners):
            image.paste(piece, corner)
        return image, {"shape": "none", "colour": None, "style": None, "background": None}
    texture = rng.choice(("checker", "stripes", "both") if known is world.V1 else ("checker", "stripes", "both", "lines", "dots"))
    image = Image.new("RGB", (resolution, resolution), rng.choice(PALETTE))
    pen = ImageDraw.Draw(image)
    if texture in ("checker", "both"):
        first, second = rng.sample(PALETTE, 2)
        cell, dx, dy = rng.randint(5, 12), rng.randint(0, 11), rng.randint(0, 11)
        for row in range(-1, resolution // cell + 2):
            for col in range(-1, resolution // cell + 2):
                x, y = col * cell - dx, row * cell - dy
                pen.rectangle((x, y, x + cell - 1, y + cell - 1), fill=first if (row + col) % 2 == 0 else second)
    if texture in ("stripes", "both"):
        colour, period, width, sign = rng.choice(PALETTE), rng.randint(5, 10), rng.randint(2, 4), rng.choice((-1, 1))
        for offset in range(-2 * resolution, 2 * resolution, period):
            start, end = (offset, 0), (offset + sign * resolution, resolution)
            pen.line((*start, *end), fill=colour, width=width)
    if texture == "lines":
        colour, period, width, vertical = rng.choice(PALETTE), rng.randint(5, 10), rng.randint(1, 4), rng.random() < 0.5
        for offset in range(rng.randint(0, period - 1), resolution, period):
            pen.rectangle((offset, 0, offset + width - 1, resolution - 1) if vertical else (0, offset, resolution - 1, offset + width - 1), fill=colour)
    if texture == "dots":
        colour, period, side = rng.choice(PALETTE), rng.randint(5, 10), rng.randint(2, 3)
        for y in range(rng.randint(0, period - 1), resolution, period):
            for x in range(rng.randint(0, period - 1), resolution, period):
                pen.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
    return image, {"shape": "none", "colour": None, "style": None, "background": None}


def with_rim(image: Image.Image, mask: Image.Image, rng: random.Random) -> Image.Image:
    """The picture with a rim 1-4 pixels wide, of a random colour, around the object of ``mask``: generated objects
    often sit in a ring of another colour (their own background, or a dark edge), which changes no attribute."""
    width = rng.randint(1, 4)
    inside = mask_tensor(mask)[None].float()
    ring = F.max_pool2d(inside, 2 * width + 1, 1, width) - inside
    rimmed = image.copy()
    rimmed.paste(Image.new("RGB", image.size, rng.choice(PALETTE)), (0, 0), Image.fromarray(ring[0, 0].byte().numpy()))
    return rimmed


def _examples(rng: random.Random, count: int, objectless_share: float = 0.25, rim_share: float = 0.0,
              known: world.World = world.V1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, 3, H, W) uint8 pictures and their targets: per attribute a value index (-100: not known, left out of
    the loss), and ``object`` (N, 1, H, W), 1 where the object is. Scenes of the whole world, and about
    ``objectless_share`` pictures of no single object (no object anywhere); about ``rim_share`` of the scenes get a
    rim around the object (``with_rim``; the object map keeps the object alone)."""
    images, labels, masks = [], [], []
    for scene in _scenes(rng, count, known):
        mask = Image.new("L", (RESOLUTION, RESOLUTION), 0)
        if rng.random() < objectless_share:
            image, label = objectless(rng, known=known)
        else:
            image, label = world.draw(scene, RESOLUTION), scene_labels(scene)
            ImageDraw.Draw(mask).polygon(world.outline(scene, RESOLUTION), fill=255)
            if rim_share and rng.random() < rim_share:  # no draw when off: a judge without rims sees what it saw before they existed
                image = with_rim(image, mask, rng)
        images.append(image)
        labels.append(label)
        masks.append(mask_tensor(mask))
    pixels = pil_to_uint8(images, RESOLUTION)
    targets = {a: torch.tensor([values.index(l[a]) if l[a] is not None else -100 for l in labels])
               for a, values in judged_attributes(known).items()}
    targets["object"] = torch.stack(masks).float() / 255
    return pixels, targets


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per attribute, and the object map against the share of each cell the object covers."""
    loss = sum(F.cross_entropy(logits[a], targets[a].to(logits[a].device)) for a in targets)
    cover = F.adaptive_avg_pool2d(masks.to(logits["object"].device), logits["object"].shape[-2:])[:, 0]
    return loss + F.binary_cross_entropy_with_logits(logits["object"], cover)


def _scenes(rng: random.Random, count: int, known: world.World = world.V1) -> list[world.Scene]:
    """The whole world, concepts alone and together, so that the judge sees every combination of the three, as
    composition prompts ask for: in ``V1`` stripes and the checkerboard each in about half the scenes; beyond it
    each concept in about a third, the rest over the base's values."""
    scenes = []
    for _ in range(count):
        if known is world.V1:
            scene = world.random_scene(rng, shapes=(*world.SHAPES, "star"), style="stripes" if rng.random() < 0.5 else None)
            if rng.random() < 0.5:
                scene = replace(scene, background="checker")
        else:
            scene = world.random_scene(rng, shapes=("star",) if rng.random() < 1 / 3 else None, world=known)
            if rng.random() < 1 / 3:
                scene = replace(scene, style="stripes")
            if rng.random() < 1 / 3:
                scene = replace(scene, background="checker")
        scenes.append(scene)
    return scenes


@dataclass
class JudgeSettings:
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    pool_size: int = 4000  # VAE round trips drawn once; each step takes half its batch from them, half fresh
    seed: int = 0
    # scenes with a rim around the object (with_rim): generated objects sit in rings, and a judge that never saw one
    # read most generated stars as no object (experiments/docs/composition-experiments.md: measured on hand-labelled generated images)
    rim_share: float = 0.3
    world: str = "v1"  # the world whose values it reads (world.WORLDS)


def train_judge(out: str | Path, vae, settings: JudgeSettings | None = None, device: str | torch.device = "cpu") -> Path:
    """Train the attribute judge and its object map on labelled scenes and objectless pictures (half VAE round
    trips, half clean drawings, all augmented); writes ``out/config.json`` and ``out/model.safetensors``."""
    settings = settings or JudgeSettings()
    torch.manual_seed(settings.seed)
    rng = random.Random(f"judge-{settings.seed}")
    generator = torch.Generator().manual_seed(settings.seed)
    vae = vae.to(device).eval()
    known = world.WORLDS[settings.world]
    pool_pixels, pool_targets = _examples(rng, settings.pool_size, rim_share=settings.rim_share, known=known)
    pool = torch.cat([vae_round_trip(vae, pool_pixels[i : i + 200].float() / 255, generator)
                      for i in tqdm(range(0, len(pool_pixels), 200), desc="judge: VAE round trips")])

    judge = AttributeJudge(judged_attributes(known)).to(device).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    bar = tqdm(range(settings.steps), desc="judge")
    half = settings.batch_size // 2
    for _ in bar:
        picked = torch.randint(0, len(pool), (half,), generator=generator)
        fresh, fresh_targets = _examples(rng, settings.batch_size - half, rim_share=settings.rim_share, known=known)
        targets = {a: torch.cat([pool_targets[a][picked], fresh_targets[a]]) for a in fresh_targets}
        images, masks = augment(torch.cat([pool[picked], fresh.float() / 255]), generator, targets.pop("object"))
        loss = _loss(judge(images.to(device)), targets, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.eval().cpu().save(out, CONCEPT_ATTRIBUTES, RESOLUTION)


@torch.no_grad()
def round_trip_accuracy(judge: AttributeJudge, vae, count: int = 400, seed: int = 4321,
                        known: world.World = world.V1) -> dict[str, float]:
    """Accuracy per attribute on VAE round trips (with latent noise) of ``count`` fresh scenes, drawn from a
    seed the judge's training never used; and, where the judge knows ``none``, ``no object``: the share of
    ``count`` fresh objectless pictures (backgrounds alone, textures) it reads as no object."""
    rng = random.Random(f"judge-test-{seed}")
    generator = torch.Generator().manual_seed(seed)

    def round_trips(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae_round_trip(vae, pixels[i : i + 200].float() / 255, generator) for i in range(0, len(pixels), 200)])

    scenes = _scenes(rng, count, known)
    predicted = judge.predict(round_trips(scene_pixels(scenes)))
    accuracy = {a: sum(p[a] == scene_labels(s)[a] for p, s in zip(predicted, scenes)) / count for a in judge.attributes}
    if "none" in judge.attributes["shape"]:
        pictures = pil_to_uint8([objectless(rng, known=known)[0] for _ in range(count)])
        accuracy["no object"] = sum(p["shape"] == "none" for p in judge.predict(round_trips(pictures))) / count
    return accuracy


def main(argv: list[str] | None = None) -> None:
    """``python -m mole_diffusion.demo.judge --assets DIR --out DIR/judge``: train the judge for a built world."""
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(prog="python -m mole_diffusion.demo.judge", description=main.__doc__)
    parser.add_argument("--assets", required=True, help="a built demo world (its pipeline/vae is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=JudgeSettings.steps)
    parser.add_argument("--rim-share", type=float, default=JudgeSettings.rim_share,
                        help="share of scenes drawn with a rim around the object (default 0.3, as shipped)")
    parser.add_argument("--world", choices=sorted(world.WORLDS), default=JudgeSettings.world)
    parser.add_argument("--pool", type=int, default=JudgeSettings.pool_size, help="VAE round trips it trains on")
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(Path(args.assets) / "pipeline" / "vae")
    out = train_judge(args.out, vae, JudgeSettings(steps=args.steps, rim_share=args.rim_share, world=args.world, pool_size=args.pool))
    judge, _ = load_judge(out)
    print(round_trip_accuracy(judge, vae, known=world.WORLDS[args.world]))


if __name__ == "__main__":
    main()
