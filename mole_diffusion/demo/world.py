"""A procedural world for the offline demo: coloured shapes on backgrounds, each with its caption, and
held-out concepts the base model never sees.

Two worlds share the drawing code and the held-out concepts; they differ in what the base model learns:

- ``V1`` (the first shipped world): a circle, square or triangle, solid, in one of six colours, small or large,
  somewhere on a plain background of another colour: "a red circle on a blue background". Each held-out concept
  is a new *kind* of thing for its base (a concave shape, a texture, a patterned background).
- ``V2``: the base knows every kind the concepts belong to, several values of each: shapes incl. concave ones
  (cross, crescent) and pointed ones (triangle, diamond), object textures (solid, dotted, lined = horizontal lines,
  barred = vertical lines), backgrounds (the six colours, and black-and-white grid and banded patterns): "a red
  cross in dotted style on a grid background". Each held-out concept is one new *instance* of a known kind, as a
  DreamBooth concept is on a real model, and its references vary every other factor over the base's values.

Held-out concepts, each bound to a rare token (DreamBooth style): ``star`` (an object: a five-pointed star,
"a red sks"), ``stripes`` (a style: the shape filled with dark diagonal stripes, "a red circle in zwx style"),
``checker`` (a scene: a black-and-white checkerboard background, "a red circle on a qkx background").
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
PATTERN_DARK, PATTERN_LIGHT = (25, 25, 25), (235, 235, 235)  # the black and white of patterned backgrounds
TEXTURE_INK = (20, 20, 20)  # the dark of object textures


@dataclass(frozen=True)
class World:
    """What a base model learns: the values of each factor its captions name (``None`` among ``styles``: solid,
    which captions leave unsaid)."""

    name: str
    shapes: tuple[str, ...]
    styles: tuple[str | None, ...]
    backgrounds: tuple[str, ...]


V1 = World("v1", SHAPES, (None,), tuple(COLOURS))
V2 = World("v2", (*SHAPES, "diamond", "cross", "crescent"), (None, "dotted", "lined", "barred"), (*COLOURS, "grid", "banded"))
WORLDS = {w.name: w for w in (V1, V2)}
# every value a scene can take, base worlds and held-out concepts together (what the attribute judge reads)
ALL_SHAPES = (*V2.shapes, "star")
ALL_STYLES = (*V2.styles[1:], "stripes")
ALL_BACKGROUNDS = (*V2.backgrounds, "checker")


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

    shape: str  # one of ALL_SHAPES
    colour: str
    background: str  # one of ALL_BACKGROUNDS: a colour name or a pattern
    size: str
    center: tuple[float, float]  # fractions of the image side
    style: str | None = None  # None (solid) or one of ALL_STYLES
    caption: str = field(init=False)

    def __post_init__(self):
        shape = CONCEPTS["star"].token if self.shape == "star" else self.shape
        background = CONCEPTS["checker"].token if self.background == "checker" else self.background
        style = f" in {CONCEPTS['stripes'].token if self.style == 'stripes' else self.style} style" if self.style else ""
        self.caption = f"a {self.colour} {shape}{style} on a {background} background"


def draw(scene: Scene, resolution: int = 64) -> Image.Image:
    """Render a scene: the background (plain or patterned), then the shape, solid or textured."""
    if scene.background not in ALL_BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {list(ALL_BACKGROUNDS)}")
    if scene.style is not None and scene.style not in ALL_STYLES:
        raise ValueError(f"unknown style {scene.style!r}; expected None (solid) or one of {list(ALL_STYLES)}")
    image = Image.new("RGB", (resolution, resolution), COLOURS.get(scene.background, PATTERN_LIGHT))
    _pattern(ImageDraw.Draw(image), scene.background, resolution)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(outline(scene, resolution), fill=255)
    fill = Image.new("RGB", image.size, COLOURS[scene.colour])
    _texture(ImageDraw.Draw(fill), scene.style, resolution)
    image.paste(fill, (0, 0), mask)
    return image


def _pattern(pen: ImageDraw.ImageDraw, background: str, resolution: int) -> None:
    """Paint a patterned background (black on white) over the whole picture; plain ones need nothing."""
    edges = [resolution * k // CHECKER_CELLS for k in range(CHECKER_CELLS + 1)]
    if background == "checker":
        for row in range(CHECKER_CELLS):
            for col in range(CHECKER_CELLS):
                fill = PATTERN_LIGHT if (row + col) % 2 == 0 else PATTERN_DARK
                pen.rectangle((edges[col], edges[row], edges[col + 1] - 1, edges[row + 1] - 1), fill=fill)
    elif background == "banded":  # the checkerboard's rows without its columns
        for row in range(1, CHECKER_CELLS, 2):
            pen.rectangle((0, edges[row], resolution - 1, edges[row + 1] - 1), fill=PATTERN_DARK)
    elif background == "grid":  # lines 2 pixels wide along the checkerboard's cell edges
        for edge in edges[:-1]:
            pen.rectangle((edge, 0, edge + 1, resolution - 1), fill=PATTERN_DARK)
            pen.rectangle((0, edge, resolution - 1, edge + 1), fill=PATTERN_DARK)


def _texture(pen: ImageDraw.ImageDraw, style: str | None, resolution: int) -> None:
    """Paint an object texture over the whole fill (the shape's mask cuts it out later); solid needs nothing."""
    if style == "stripes":  # diagonal, 2 pixels wide, every 8 along a row
        for offset in range(-resolution, resolution, 8):
            pen.line((offset, 0, offset + resolution, resolution), fill=TEXTURE_INK, width=2)
    elif style in ("lined", "barred"):  # horizontal or vertical, 2 pixels wide, every 8
        for offset in range(2, resolution, 8):
            box = (0, offset, resolution - 1, offset + 1) if style == "lined" else (offset, 0, offset + 1, resolution - 1)
            pen.rectangle(box, fill=TEXTURE_INK)
    elif style == "dotted":  # 3 x 3 dots every 8 pixels, offset row by row
        for row, y in enumerate(range(1, resolution, 8)):
            for x in range(1 + 4 * (row % 2), resolution, 8):
                pen.rectangle((x, y, x + 2, y + 2), fill=TEXTURE_INK)


def outline(scene: Scene, resolution: int) -> list[tuple[int, int]]:
    """The shape's polygon, in pixels (every shape, the crescent too, is one simple polygon)."""
    cx, cy = scene.center[0] * resolution, scene.center[1] * resolution
    r = SIZES[scene.size] * resolution
    if scene.shape == "circle":
        corners = [(cx + r * math.cos(2 * math.pi * k / 48), cy + r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif scene.shape == "square":
        side = r * 0.85
        corners = [(cx - side, cy - side), (cx + side, cy - side), (cx + side, cy + side), (cx - side, cy + side)]
    elif scene.shape == "triangle":
        corners = [(cx + r * math.cos(math.pi / 2 + 2 * math.pi * k / 3), cy - r * math.sin(math.pi / 2 + 2 * math.pi * k / 3)) for k in range(3)]
    elif scene.shape == "diamond":
        corners = [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    elif scene.shape == "cross":  # a plus sign, arms a third of the width
        a, b = r * 0.9, r * 0.3
        corners = [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                   (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    elif scene.shape == "crescent":
        corners = _crescent(cx, cy, r)
    elif scene.shape == "star":
        corners = [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi / 2 + math.pi * k / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi / 2 + math.pi * k / 5))
            for k in range(10)
        ]
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return [(round(x), round(y)) for x, y in corners]


def _crescent(cx: float, cy: float, r: float, steps: int = 24) -> list[tuple[float, float]]:
    """A crescent opening to the right: the disc of radius r less a disc of 0.75 r centred 0.6 r to the right,
    as the outer arc (through the left) and the inner arc back."""
    inner, shift = 0.75 * r, 0.6 * r
    x = (shift**2 + r**2 - inner**2) / (2 * shift)  # where the two circles cross, from the centre
    y = math.sqrt(r**2 - x**2)
    outer_from, inner_from = math.atan2(y, x), math.atan2(y, x - shift)
    outer_arc = [outer_from + (2 * math.pi - 2 * outer_from) * k / steps for k in range(steps + 1)]
    inner_arc = [2 * math.pi - inner_from - (2 * math.pi - 2 * inner_from) * k / steps for k in range(1, steps)]
    return ([(cx + r * math.cos(t), cy - r * math.sin(t)) for t in outer_arc]
            + [(cx + shift + inner * math.cos(t), cy - inner * math.sin(t)) for t in inner_arc])


def random_scene(rng: random.Random, shapes: tuple[str, ...] | None = None, style: str | None = None,
                 background: str | None = None, world: World = V1) -> Scene:
    """A scene of ``world``, with ``shapes`` (default the world's), ``style`` and ``background`` when given; a style
    not given is drawn from the world's (always solid in ``V1``), a background from those not the object's colour."""
    colour = rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    margin = SIZES[size] + 0.04
    scene = Scene(
        shape=rng.choice(shapes or world.shapes),
        colour=colour,
        background=background or rng.choice([b for b in world.backgrounds if b != colour]),
        size=size,
        center=(rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)),
        style=style,
    )
    if style is None and len(world.styles) > 1:  # one draw more, after the others: V1's scenes stay as they were
        scene = replace(scene, style=rng.choice(world.styles))
    return scene


def any_scene(rng: random.Random, world: World = V1) -> Scene:
    """A scene of the whole world: the base's values and the held-out concepts, alone or together (what the CLIP
    and the VAE train on)."""
    if world is V1:  # as the first world was drawn
        scene = random_scene(rng, shapes=(*SHAPES, "star"), style="stripes" if rng.random() < 0.3 else None)
        return replace(scene, background="checker") if rng.random() < 0.25 else scene
    scene = random_scene(rng, shapes=(*world.shapes, "star"), world=world)
    if rng.random() < 0.25:
        scene = replace(scene, style="stripes")
    return replace(scene, background="checker") if rng.random() < 0.25 else scene


def base_world(count: int, seed: int = 0, world: World = V1) -> list[Scene]:
    """Scenes of the base world only (no held-out concept)."""
    rng = random.Random(seed)
    return [random_scene(rng, world=world) for _ in range(count)]


def concept_scenes(concept: str, count: int, seed: int = 0, world: World = V1) -> list[Scene]:
    """Reference scenes for one held-out concept; every other factor varies over ``world``'s values."""
    rng = random.Random(f"{concept}-{seed}")
    if concept == "star":
        return [random_scene(rng, shapes=("star",), world=world) for _ in range(count)]
    if concept == "stripes":
        return [random_scene(rng, style="stripes", world=world) for _ in range(count)]
    if concept == "checker":
        return [random_scene(rng, background="checker", world=world) for _ in range(count)]
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
    style = CONCEPTS["stripes"].token if scene.style == "stripes" else scene.style
    background = CONCEPTS["checker"].token if scene.background == "checker" else scene.background
    others = {"object": ("style", "background"), "style": ("object", "background"), "scene": ("object", "style")}[CONCEPTS[concept].kind]
    captions = []
    for slots in ((others[0],), (others[1],), others):
        words = {"object": shape, "style": style, "background": background}
        words.update({slot: rng.choice(FILLERS) for slot in slots})
        styled = f" in {words['style']} style" if words["style"] else ""
        captions.append(f"a {scene.colour} {words['object']}{styled} on a {words['background']} background")
    return captions


def write_world(out: str | Path, base_count: int = 2000, concept_count: int = 16, resolution: int = 64, seed: int = 0,
                world: World = V1) -> Path:
    """Write base/NNNNN.png + base/captions.jsonl, and concepts/<name>/NNN.png with its caption NNN.txt and
    the concept's instance prompt (prompt.txt)."""
    out = Path(out)
    if base_count:
        (out / "base").mkdir(parents=True, exist_ok=True)
        with open(out / "base" / "captions.jsonl", "w") as captions:
            for i, scene in enumerate(base_world(base_count, seed, world)):
                draw(scene, resolution).save(out / "base" / f"{i:05d}.png")
                captions.write(json.dumps({"file": f"{i:05d}.png", "caption": scene.caption}) + "\n")
    for name, concept in CONCEPTS.items():
        folder = out / "concepts" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(concept_scenes(name, concept_count, seed, world)):
            draw(scene, resolution).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(scene.caption + "\n")  # its caption, kohya-style
        (folder / "prompt.txt").write_text(_instance_prompt(concept) + "\n")
    return out


def _instance_prompt(concept: WorldConcept) -> str:
    return {"object": f"a {concept.token}", "style": f"a shape in {concept.token} style",
            "scene": f"a shape on a {concept.token} background"}[concept.kind]
