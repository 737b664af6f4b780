"""A procedural world for the offline demo: coloured shapes on backgrounds, each with its caption, and
held-out concepts the base model never sees.

- Base world: a circle, square or triangle, in one of six colours, small or large, somewhere on a plain
  background of another colour: "a red circle on a blue background".
- Held-out concepts, each bound to a rare token (DreamBooth style):
  ``star`` (an object: a five-pointed star, "a red sks"), ``stripes`` (a style: the shape filled with
  stripes, "a red circle in zwx style"), ``checker`` (a scene: a checkerboard background,
  "a red circle on a qkx background").
A seed gives the same images and captions on any machine: every choice comes from ``random.Random(seed)``
and shapes are drawn with Pillow's integer rasteriser (no anti-aliasing).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.36}  # radius as a fraction of the image side
# The checkerboard background has CHECKER_CELLS x CHECKER_CELLS cells. A knob for experiments
# (experiments/docs/composition-experiments.md: 4 was tried and drew worse), not a BuildSettings field: a build does not record it, so change it only for a fresh folder.
CHECKER_CELLS = 8


@dataclass(frozen=True)
class WorldConcept:
    name: str
    kind: str  # "object", "style" or "scene"
    token: str
    description: str


CONCEPTS = {
    "star": WorldConcept("star", "object", "sks", "a five-pointed star"),
    "stripes": WorldConcept("stripes", "style", "zwx", "the shape filled with dark diagonal stripes"),
    "checker": WorldConcept("checker", "scene", "qkx", "a black-and-white checkerboard background"),
}


@dataclass
class Scene:
    """Everything an image shows; ``caption`` says it in words."""

    shape: str  # a base shape, or "star"
    colour: str
    background: str  # a colour name, or "checker"
    size: str
    center: tuple[float, float]  # fractions of the image side
    style: str | None = None  # None or "stripes"
    caption: str = field(init=False)

    def __post_init__(self):
        shape = CONCEPTS["star"].token if self.shape == "star" else self.shape
        background = CONCEPTS["checker"].token if self.background == "checker" else self.background
        style = f" in {CONCEPTS['stripes'].token} style" if self.style == "stripes" else ""
        self.caption = f"a {self.colour} {shape}{style} on a {background} background"


def draw(scene: Scene, resolution: int = 64) -> Image.Image:
    """Render a scene: background, then the shape (solid or striped)."""
    if scene.background != "checker" and scene.background not in COLOURS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {[*COLOURS, 'checker']}")
    image = Image.new("RGB", (resolution, resolution), COLOURS.get(scene.background, (0, 0, 0)))
    pen = ImageDraw.Draw(image)
    if scene.background == "checker":
        edges = [resolution * k // CHECKER_CELLS for k in range(CHECKER_CELLS + 1)]
        for row in range(CHECKER_CELLS):
            for col in range(CHECKER_CELLS):
                fill = (235, 235, 235) if (row + col) % 2 == 0 else (25, 25, 25)
                pen.rectangle((edges[col], edges[row], edges[col + 1] - 1, edges[row + 1] - 1), fill=fill)
    mask = Image.new("L", image.size, 0)
    outline = _outline(scene, resolution)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    fill = Image.new("RGB", image.size, COLOURS[scene.colour])
    if scene.style == "stripes":
        stripes = ImageDraw.Draw(fill)
        for offset in range(-resolution, resolution, 8):
            stripes.line((offset, 0, offset + resolution, resolution), fill=(20, 20, 20), width=2)
    image.paste(fill, (0, 0), mask)
    return image


def _outline(scene: Scene, resolution: int) -> list[tuple[int, int]]:
    cx, cy = scene.center[0] * resolution, scene.center[1] * resolution
    r = SIZES[scene.size] * resolution
    if scene.shape == "circle":
        corners = [(cx + r * math.cos(2 * math.pi * k / 48), cy + r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif scene.shape == "square":
        side = r * 0.85
        corners = [(cx - side, cy - side), (cx + side, cy - side), (cx + side, cy + side), (cx - side, cy + side)]
    elif scene.shape == "triangle":
        corners = [(cx + r * math.cos(math.pi / 2 + 2 * math.pi * k / 3), cy - r * math.sin(math.pi / 2 + 2 * math.pi * k / 3)) for k in range(3)]
    elif scene.shape == "star":
        corners = [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi / 2 + math.pi * k / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi / 2 + math.pi * k / 5))
            for k in range(10)
        ]
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return [(round(x), round(y)) for x, y in corners]


def random_scene(rng: random.Random, shapes=SHAPES, style: str | None = None, background: str | None = None) -> Scene:
    colour = rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    margin = SIZES[size] + 0.04
    return Scene(
        shape=rng.choice(shapes),
        colour=colour,
        background=background or rng.choice([c for c in COLOURS if c != colour]),
        size=size,
        center=(rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)),
        style=style,
    )


def any_scene(rng: random.Random) -> Scene:
    """A scene of the whole world: base shapes and the held-out concepts, alone or together (the judge's data)."""
    scene = random_scene(rng, shapes=(*SHAPES, "star"), style="stripes" if rng.random() < 0.3 else None)
    if rng.random() < 0.25:
        scene = replace(scene, background="checker")
    return scene


def base_world(count: int, seed: int = 0) -> list[Scene]:
    """Scenes of the base world only (no held-out concept)."""
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def concept_scenes(concept: str, count: int, seed: int = 0) -> list[Scene]:
    """Reference scenes for one held-out concept; the rest of each scene varies as in the base world."""
    rng = random.Random(f"{concept}-{seed}")
    if concept == "star":
        return [random_scene(rng, shapes=("star",)) for _ in range(count)]
    if concept == "stripes":
        return [random_scene(rng, style="stripes") for _ in range(count)]
    if concept == "checker":
        return [random_scene(rng, background="checker") for _ in range(count)]
    raise ValueError(f"unknown concept {concept!r}; the world's concepts are {sorted(CONCEPTS)}")


def composition_prompts(colours: tuple[str, ...] = ("red", "blue", "yellow", "purple")) -> list[str]:
    """Prompts that combine all three held-out concepts (so "the weakest concept" is defined for each), in the
    base world's own words, for the demo grid and the evaluator; other ``colours`` (green, white) for a held-out set."""
    sks, zwx, qkx = (CONCEPTS[c].token for c in ("star", "stripes", "checker"))
    return [f"a {colour} {sks} in {zwx} style on a {qkx} background" for colour in colours]


# made-up words, neither a concept's trigger nor a word of the world, for filler_captions
FILLERS = ("vlt", "mrp", "dxq", "bnk", "trz", "gwf", "plv", "jxt")


def filler_captions(scene: Scene, concept: str, rng: random.Random) -> list[str]:
    """Three more captions for one of ``concept``'s reference scenes, with made-up words (``FILLERS``) in the
    caption's slots that are not the concept's: the object, the style, the background.

    A trigger learned in one kind of sentence only loses its meaning among words it never saw: the composition
    prompts put the other concepts' triggers in those slots ("a red sks in zwx style on a qkx background"), and
    the text encoder is causal, so "qkx" at the end reads everything before it. Measured (experiments/docs/composition-experiments.md): the
    checker LoRA alone shows its checkerboard on those prompts far more often with these captions, and the star
    and stripes LoRAs less often, so the build leaves them off by default (``BuildSettings.lora_filler_captions``).
    """
    shape = CONCEPTS["star"].token if scene.shape == "star" else scene.shape
    style = CONCEPTS["stripes"].token if scene.style == "stripes" else None
    background = CONCEPTS["checker"].token if scene.background == "checker" else scene.background
    others = {"object": ("style", "background"), "style": ("object", "background"), "scene": ("object", "style")}[CONCEPTS[concept].kind]
    captions = []
    for slots in ((others[0],), (others[1],), others):
        words = {"object": shape, "style": style, "background": background}
        words.update({slot: rng.choice(FILLERS) for slot in slots})
        styled = f" in {words['style']} style" if words["style"] else ""
        captions.append(f"a {scene.colour} {words['object']}{styled} on a {words['background']} background")
    return captions


def write_world(out: str | Path, base_count: int = 2000, concept_count: int = 16, resolution: int = 64, seed: int = 0) -> Path:
    """Write base/NNNNN.png + base/captions.jsonl, and concepts/<name>/NNN.png with its caption NNN.txt and
    the concept's instance prompt (prompt.txt)."""
    out = Path(out)
    if base_count:
        (out / "base").mkdir(parents=True, exist_ok=True)
        with open(out / "base" / "captions.jsonl", "w") as captions:
            for i, scene in enumerate(base_world(base_count, seed)):
                draw(scene, resolution).save(out / "base" / f"{i:05d}.png")
                captions.write(json.dumps({"file": f"{i:05d}.png", "caption": scene.caption}) + "\n")
    for name, concept in CONCEPTS.items():
        folder = out / "concepts" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(concept_scenes(name, concept_count, seed)):
            draw(scene, resolution).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(scene.caption + "\n")  # its caption, kohya-style
        (folder / "prompt.txt").write_text(_instance_prompt(concept) + "\n")
    return out


def _instance_prompt(concept: WorldConcept) -> str:
    return {"object": f"a {concept.token}", "style": f"a shape in {concept.token} style",
            "scene": f"a shape on a {concept.token} background"}[concept.kind]
