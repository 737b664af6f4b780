"""How does a background word read in context? ``python -m experiments.trigger_context --out OUT``

The checker LoRA of the second world draws its board after a bare object ("a blue square on a qkx background") and
rarely after a style phrase ("a red circle in dotted style on a qkx background"). This draws, for each style phrase
between the object and "on a <word> background" (none, dotted, lined, barred, the stripes trigger) and four objects,
a few seeds with the base model alone (``--lora``: with that LoRA alone at weight 1) and prints how the attribute
judge reads the background: how many images show the checkerboard, and what the others show. ``--word`` repeats for
other words in the trigger's place (the base alone: how it reads words it never saw). Seeds default to 0-3,
selection seeds; nothing here trains on the judge.

    python -m experiments.trigger_context --out build/context --lora checker=build/world-v2/loras/checker.safetensors
    python -m experiments.trigger_context --out build/context-base --word qkx --word vlt --word checkerboard
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.attribute_judge import load_judge

OBJECTS = (("red", "circle"), ("blue", "square"), ("yellow", "diamond"), ("red", world.CONCEPTS["star"].token))
PHRASES = ("", " in dotted style", " in lined style", " in barred style", f" in {world.CONCEPTS['stripes'].token} style")


def context_prompts(word: str) -> dict[str, list[str]]:
    """{style phrase (``"solid"`` for none): one prompt per object of ``OBJECTS``, ``word`` in the background's slot}."""
    return {phrase.strip() or "solid": [f"a {colour} {shape}{phrase} on a {word} background" for colour, shape in OBJECTS]
            for phrase in PHRASES}


def cell(backgrounds: list[str]) -> str:
    """``checkerboards/images (the other readings, most common first)``."""
    others = Counter(b for b in backgrounds if b != "checker")
    return f"{len(backgrounds) - sum(others.values())}/{len(backgrounds)}" + (f" ({', '.join(b for b, _ in others.most_common())})" if others else "")


def context_table(pipe, judge, word: str, seeds: list[int], steps: int = 25, guidance_scale: float = 7.5) -> list[str]:
    """Markdown rows: a style phrase per row, an object per column, ``cell`` of the judge's background readings."""
    lines = [f"| before \"on a {word} background\" | " + " | ".join(f"a {c} {s}" for c, s in OBJECTS) + " | all |",
             "|---|" + "---|" * (len(OBJECTS) + 1)]
    for phrase, prompts in context_prompts(word).items():
        row = []
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            images = pipe([prompt] * len(seeds), generator=generators, num_inference_steps=steps,
                          guidance_scale=guidance_scale).images
            row.append([reading["background"] for reading in judge.predict(images)])
        lines.append(f"| {phrase} | " + " | ".join(cell(r) for r in row) + f" | {cell(sum(row, []))} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.trigger_context", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS, help="a built world (default: the shipped one)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lora", metavar="NAME=FILE", help="one LoRA alone at weight 1 (default: the base alone)")
    parser.add_argument("--word", action="append", help="the word in the background's slot (repeat; default: qkx)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt, from --first-seed")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args(argv)
    judge, _ = load_judge(args.assets / "judge")
    pipe = MoLEStableDiffusionPipeline.from_pretrained(args.assets / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        name, _, path = args.lora.partition("=")
        pipe.load_experts({name: path})
        pipe.set_experts([name], [1.0])
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    lines = [f"## {args.lora or 'the base alone'}: the judge's background reading, seeds {seeds[0]}-{seeds[-1]}, "
             f"guidance {args.guidance_scale}", ""]
    for word in args.word or [world.CONCEPTS["checker"].token]:
        lines += [*context_table(pipe, judge, word, seeds, args.steps, args.guidance_scale), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'context.md'}")


if __name__ == "__main__":
    main()
