"""The demo world's attribute judge: a small supervised classifier that reads a 64x64 image's shape, colour,
style and background (issue 12).

It is trained on the world's exact labels, never on a generated image and never as a training signal for gates
or LoRAs, so it can tell whether a composition drew its concepts without being what any method optimised.
Generated images are not the clean drawings the labels come from, so training sees them the way generation
does: a round trip through the world's own VAE (with noise in latent space), blur, pixel noise, shifts of up
to 4 pixels and a mild colour jitter.

Files (``judge/`` in the demo assets): ``config.json`` (the attributes and their values, the layer widths, and
which attribute value each concept is) and ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import MoLEError
from . import world

FORMAT = "mole-diffusion-attribute-judge"
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": (*world.SHAPES, "star"),
    "colour": tuple(world.COLOURS),
    "style": ("plain", "stripes"),
    "background": (*world.COLOURS, "checker"),
}
# the attribute value that shows each held-out concept
CONCEPT_ATTRIBUTES = {"star": ("shape", "star"), "stripes": ("style", "stripes"), "checker": ("background", "checker")}


def scene_labels(scene: world.Scene) -> dict[str, str]:
    return {"shape": scene.shape, "colour": scene.colour, "style": scene.style or "plain", "background": scene.background}


class AttributeJudge(nn.Module):
    """Four stages of two convolutions (each stage halving the side), global mean and max pooling, then one
    linear head per attribute.

    Global pooling makes it blind to where the shape is; the 4-pixel shifts in training make it blind to where stripes
    and checker cells fall on the pixel grid.
    """

    def __init__(self, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES, widths: tuple[int, ...] = (32, 64, 96, 128)):
        super().__init__()
        self.attributes = {a: tuple(v) for a, v in attributes.items()}
        self.widths = tuple(widths)
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({a: nn.Linear(2 * channels, len(v)) for a, v in self.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) in [0, 1] -> {attribute: logits (B, values)}."""
        maps = self.features(images * 2 - 1)
        # mean and max over positions: the mean reads colours and textures, the max a corner or a point wherever it is
        features = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return {a: head(features) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[Image.Image]) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image."""
        if isinstance(images, list):
            images = pil_to_tensor(images)
        param = next(self.parameters())
        logits = self(images.to(param.device, param.dtype))
        picks = {a: logits[a].argmax(dim=-1).tolist() for a in self.attributes}
        return [{a: self.attributes[a][picks[a][i]] for a in self.attributes} for i in range(len(images))]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "attributes": self.attributes, "widths": self.widths,
                  "concepts": {c: list(v) for c, v in CONCEPT_ATTRIBUTES.items()}, "resolution": world_resolution()}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        from .build import write_atomically

        write_atomically(folder / "model.safetensors", lambda temporary: save_file(state, str(temporary)))
        write_atomically(folder / "config.json", lambda temporary: temporary.write_text(json.dumps(config, indent=1)))
        return folder


def world_resolution() -> int:
    from .build import RESOLUTION

    return RESOLUTION


def is_judge_folder(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def load_judge(folder: str | Path, device: str | torch.device = "cpu") -> tuple[AttributeJudge, dict]:
    """The judge in ``folder`` and its config (which holds ``concepts``: {concept: [attribute, value]})."""
    folder = Path(folder)
    if not is_judge_folder(folder):
        raise MoLEError(f"{folder}: no attribute judge here (expected config.json with format {FORMAT!r} "
                                "and model.safetensors; build one with `mole-diffusion build-demo`)")
    config = json.loads((folder / "config.json").read_text())
    judge = AttributeJudge(config["attributes"], tuple(config["widths"]))
    judge.load_state_dict(load_file(str(folder / "model.safetensors")))
    return judge.eval().to(device), config


def pil_to_tensor(images: list[Image.Image], resolution: int = 64) -> torch.Tensor:
    """(B, 3, resolution, resolution) in [0, 1]."""
    arrays = [torch.frombuffer(bytearray(i.convert("RGB").resize((resolution, resolution), Image.BICUBIC).tobytes()),
                               dtype=torch.uint8).view(resolution, resolution, 3) for i in images]
    return torch.stack(arrays).permute(0, 3, 1, 2).float() / 255


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


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts of up to 4 pixels, Gaussian blur (sigma 0-1.2), colour jitter (gain 0.9-1.1 per channel, offset
    +-0.04) and pixel noise (std 0-0.06), each drawn per image."""
    from .build import _jitter

    images = _jitter((images * 255).round().to(torch.uint8), generator).float() / 255
    n = len(images)
    sigma = torch.rand(n, generator=generator) * 1.2
    blurred = torch.stack([_blur(image, float(s)) for image, s in zip(images, sigma)])
    gain = 0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=generator)
    offset = 0.08 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.06 * torch.randn(blurred.shape, generator=generator)
    return (blurred * gain + offset + noise).clamp(0, 1)


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


def _targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    labels = [scene_labels(s) for s in scenes]
    return {a: torch.tensor([values.index(l[a]) for l in labels]) for a, values in ATTRIBUTES.items()}


def _scenes(rng: random.Random, count: int) -> list[world.Scene]:
    """The whole world, concepts alone and together: each concept in about half the scenes, so that the judge
    sees every combination of the three, as composition prompts ask for."""
    scenes = []
    for _ in range(count):
        scene = world.random_scene(rng, shapes=(*world.SHAPES, "star"), style="stripes" if rng.random() < 0.5 else None)
        if rng.random() < 0.5:
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


def train_judge(out: str | Path, vae, settings: JudgeSettings | None = None, device: str | torch.device = "cpu") -> Path:
    """Train the attribute judge on labelled scenes (half VAE round trips, half clean drawings, all augmented);
    writes ``out/config.json`` and ``out/model.safetensors``."""
    from .build import _pixels

    settings = settings or JudgeSettings()
    torch.manual_seed(settings.seed)
    rng = random.Random(f"judge-{settings.seed}")
    generator = torch.Generator().manual_seed(settings.seed)
    vae = vae.to(device).eval()
    pool_scenes = _scenes(rng, settings.pool_size)
    pool = torch.cat([vae_round_trip(vae, _pixels(pool_scenes[i : i + 200]).float() / 255, generator)
                      for i in tqdm(range(0, len(pool_scenes), 200), desc="judge: VAE round trips")])
    pool_targets = _targets(pool_scenes)

    judge = AttributeJudge().to(device).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    bar = tqdm(range(settings.steps), desc="judge")
    half = settings.batch_size // 2
    for _ in bar:
        picked = torch.randint(0, len(pool), (half,), generator=generator)
        fresh = _scenes(rng, settings.batch_size - half)
        images = augment(torch.cat([pool[picked], _pixels(fresh).float() / 255]), generator).to(device)
        fresh_targets = _targets(fresh)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[a], torch.cat([pool_targets[a][picked], fresh_targets[a]]).to(device))
                   for a in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.eval().cpu().save(out)


@torch.no_grad()
def round_trip_accuracy(judge: AttributeJudge, vae, count: int = 400, seed: int = 4321) -> dict[str, float]:
    """Accuracy per attribute on VAE round trips (with latent noise) of ``count`` fresh scenes, drawn from a
    seed the judge's training never used."""
    from .build import _pixels

    rng = random.Random(f"judge-test-{seed}")
    generator = torch.Generator().manual_seed(seed)
    scenes = _scenes(rng, count)
    images = torch.cat([vae_round_trip(vae, _pixels(scenes[i : i + 200]).float() / 255, generator) for i in range(0, count, 200)])
    predicted = judge.predict(images)
    return {a: sum(p[a] == scene_labels(s)[a] for p, s in zip(predicted, scenes)) / count for a in ATTRIBUTES}


def main(argv: list[str] | None = None) -> None:
    """``python -m mole_diffusion.demo.judge --assets DIR --out DIR/judge``: train the judge for a built world."""
    import argparse

    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(prog="python -m mole_diffusion.demo.judge", description=main.__doc__)
    parser.add_argument("--assets", required=True, help="a built demo world (its pipeline/vae is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=JudgeSettings.steps)
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(Path(args.assets) / "pipeline" / "vae")
    out = train_judge(args.out, vae, JudgeSettings(steps=args.steps))
    judge, _ = load_judge(out)
    print(round_trip_accuracy(judge, vae))


if __name__ == "__main__":
    main()
