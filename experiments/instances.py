"""Are a built world's LoRAs instances the base can add? ``python -m experiments.instances --assets DIR --out OUT``
prints (and writes ``OUT/instances.md``) three checks, each on seeds the build never used (from 100):

1. **the base reads its own prompts**: captions of fresh base-world scenes, drawn by the base model; how often the
   attribute judge reads each factor the caption names (shape, colour, style, background);
2. **each LoRA alone, on its own prompts** (captions of fresh scenes of its concept, the other factors varied):
   how often its concept is there, and whether the layout follows the seed: the spread of the object's centre
   across seeds (``locate``: the judge's object map), against the spread of the centres in the references the world
   holds, located the same way. A LoRA that memorised draws one training picture whatever the seed (spread near 0);
3. **pairs add**: for each pair of concepts, prompts naming both, drawn with the plain sum of the two LoRAs; how
   often both are there.

The world (first or second) is the one its ``build_settings.json`` names. The judge only reads: nothing here
trains on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.judge import CONCEPT_ATTRIBUTES, scene_labels
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.attribute_judge import load_judge

NAMES = tuple(world.CONCEPTS)


def built_world(assets: Path) -> tuple[world.World, dict]:
    """The world ``assets`` was built on, and its build settings (a build from before the second world: the first)."""
    settings = json.loads((assets / "build_settings.json").read_text())
    return world.WORLDS[settings.get("world", "v1")], settings


def with_class_word(caption: str, word: str) -> str:
    """The caption with ``word`` after the checker's trigger: "... on a qkx background" -> "... on a qkx tiled
    background" (a set whose checker was trained with a class word: ``experiments.known_pattern assets`` records it as
    the build setting ``class_word``, which every measurement reads from ``built_world``'s settings)."""
    token = world.CONCEPTS["checker"].token
    return caption.replace(f"{token} background", f"{token} {word} background") if word else caption


def spread(centres: list[tuple[float, float] | None]) -> float | None:
    """How far centres scatter: sqrt(var x + var y) over those found (None with fewer than two)."""
    found = [c for c in centres if c is not None]
    if len(found) < 2:
        return None
    xs, ys = torch.tensor([c[0] for c in found]), torch.tensor([c[1] for c in found])
    return math.sqrt(float(xs.var(unbiased=False) + ys.var(unbiased=False)))


def reference_spread(judge, folder: Path) -> float | None:
    """The spread of the object's centre over a concept's reference images in ``folder``, located by ``judge`` as
    the generated images' are: the references the world holds, however they were drawn."""
    return spread(judge.locate([Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"))]))


def draw(pipe, prompt: str, seeds: list[int], steps: int, guidance_scale: float):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe([prompt] * len(seeds), generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale).images


def with_concept(scene: world.Scene, name: str) -> world.Scene:
    field, value = CONCEPT_ATTRIBUTES[name]  # a scene's fields and the judge's attributes share their names
    return replace(scene, **{field: value})


def shows(seen: dict[str, str], name: str) -> bool:
    """Whether the judge's reading of an image shows concept ``name``."""
    attribute, value = CONCEPT_ATTRIBUTES[name]
    return seen[attribute] == value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.instances", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(ASSETS), help="a built world (default: the shipped one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per check (per concept, per pair)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt, from --first-seed")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args(argv)
    assets, out = Path(args.assets), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    known, settings = built_world(assets)
    word = settings.get("class_word", "")  # the checker's class word in a set of experiments.known_pattern
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    judge, _ = load_judge(assets / "judge")
    pipe = MoLEStableDiffusionPipeline.from_pretrained(assets / "pipeline", safety_checker=None)
    pipe.load_experts({name: assets / "loras" / f"{name}.safetensors" for name in NAMES})
    pipe.set_progress_bar_config(disable=True)
    run = dict(seeds=seeds, steps=args.steps, guidance_scale=args.guidance_scale)
    lines = [f"## Instances: world {known.name}, {args.prompts} prompts x {len(seeds)} seeds (from {seeds[0]}), "
             f"{args.steps} steps, guidance {args.guidance_scale}", ""]

    # 1. the base on its own prompts (every expert off: set_experts with weights 0 is the base model exactly)
    pipe.set_experts(list(NAMES), [0.0] * len(NAMES))
    read = {factor: 0 for factor in ("shape", "colour", "style", "background")}
    for scene in world.base_world(args.prompts, seed=7001, world=known):
        for seen in judge.predict(draw(pipe, with_class_word(scene.caption, word), **run)):
            for factor in read:
                read[factor] += seen[factor] == scene_labels(scene)[factor]
    total = args.prompts * len(seeds)
    lines += ["The base on base-world prompts: % of images in which the judge reads the factor the caption names", "",
              "| " + " | ".join(read) + " |", "|" + "---|" * len(read),
              "| " + " | ".join(f"{100 * v / total:.1f}%" for v in read.values()) + " |", ""]
    print("\n".join(lines), flush=True)

    # 2. each LoRA alone on its own prompts: presence, and the centre's spread across seeds against its references'
    lines += ["Each LoRA alone on its own prompts: % showing its concept; the object's centre spread across seeds "
              "(mean over prompts) against the spread of its references' centres", "",
              "| concept | present | spread | references | ratio |", "|---|---|---|---|---|"]
    for name in NAMES:
        pipe.set_experts([name], [1.0])
        present, spreads = 0, []
        for scene in world.concept_scenes(name, args.prompts, seed=7002, world=known):
            images = draw(pipe, with_class_word(scene.caption, word), **run)
            present += sum(shows(seen, name) for seen in judge.predict(images))
            spreads.append(spread(judge.locate(images)))
        references = reference_spread(judge, assets / "world" / "concepts" / name)
        found = [s for s in spreads if s is not None]
        mean = sum(found) / len(found) if found else None
        ratio = f"{mean / references:.2f}" if mean is not None and references else "-"
        lines.append(f"| {name} | {100 * present / total:.1f}% | {'-' if mean is None else f'{mean:.3f}'} | "
                     f"{'-' if references is None else f'{references:.3f}'} | {ratio} |")
        print(lines[-1], flush=True)
    lines.append("")

    # 3. pairs under the plain sum
    lines += ["Pairs under the plain sum (weights 1, 1): % of images showing both concepts", "", "| pair | both |", "|---|---|"]
    for first, second in itertools.combinations(NAMES, 2):
        pipe.set_experts([first, second], [1.0, 1.0])
        both = 0
        for scene in world.concept_scenes(first, args.prompts, seed=7003, world=known):
            scene = with_concept(scene, second)
            for seen in judge.predict(draw(pipe, with_class_word(scene.caption, word), **run)):
                both += shows(seen, first) and shows(seen, second)
        lines.append(f"| {first} + {second} | {100 * both / total:.1f}% |")
        print(lines[-1], flush=True)
    lines.append("")
    (out / "instances.md").write_text("\n".join(lines))
    print(f"wrote {out / 'instances.md'}")


if __name__ == "__main__":
    main()
