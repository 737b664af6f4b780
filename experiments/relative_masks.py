"""Regional routing with masks that compare the experts' attention maps instead of thresholding each alone.

    python -m experiments.relative_masks --assets build/world-v2/assets --margins 0.05 0.1 0.2 --seeds 8 --first-seed 0

Each trigger's cross-attention map (as regional routing reads it) is divided by its own mean over the image; an
expert acts at a position where its value is within ``margin`` of the highest expert's there (and, as in
regional routing, only in images whose prompt names it). A flat map (a background's trigger) then wins where the
peaked ones (an object's) are low: the question is whether keeping the checker LoRA off the object lets the
object's LoRAs show. Draws the composition prompts (DDIM 25 steps, guidance 7.5) and prints the attribute judge's
rates; margin 1 or more keeps every position (the plain sum).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.routing import RegionalRouting

from .instances import draw, shows
from .spatial import load_world


def masks_within_margin(maps: torch.Tensor, named: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, N, H, W) masks: 1 where an expert's mean-normalised map is within ``margin`` of the highest named
    expert's; experts the prompt does not name (``named`` (B, N) = 0) are 0 everywhere."""
    relative = maps / maps.flatten(2).mean(dim=-1)[..., None, None]
    relative = relative.where(named[..., None, None] > 0, torch.zeros_like(relative))
    best = relative.amax(dim=1, keepdim=True)
    return (relative >= best - margin).float() * named[..., None, None]


class RelativeMasks(RegionalRouting):
    def __init__(self, *args, margin: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def _end_unet_call(self, unet, args, kwargs, output):
        if self.positions is None:
            return
        masks = masks_within_margin(torch.stack(self._maps).mean(dim=0), self._named().to(self._maps[0]), self.margin)
        self.mask_history.append(masks.cpu())
        sample = args[0] if args else kwargs["sample"]
        self.masks = masks.repeat(len(sample) // len(masks), 1, 1, 1)  # both guidance halves
        self._maps.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.relative_masks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(ASSETS), help="the demo world (default: the installed one)")
    parser.add_argument("--margins", nargs="+", type=float, required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, help="a folder for the images (default: not kept)")
    args = parser.parse_args(argv)
    names, triggers = list(world.CONCEPTS), {n: c.token for n, c in world.CONCEPTS.items()}
    pipe, judge = load_world(Path(args.assets))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print("| margin | " + " | ".join(names) + " | all three |\n|---|" + "---|" * (len(names) + 1))
    for margin in args.margins:
        # regional routing at weights 1, its masks by comparison (its own threshold unused)
        pipe.mole.regional = RelativeMasks(pipe.unet, pipe.tokenizer, names, triggers, None, 0.0, margin=margin)
        counts, total = dict.fromkeys([*names, "all"], 0), 0
        for p, prompt in enumerate(world.composition_prompts()):
            images = draw(pipe, prompt, seeds, args.steps, 7.5)
            if args.out:
                (args.out / f"m{margin:g}").mkdir(parents=True, exist_ok=True)
                for seed, image in zip(seeds, images):
                    image.save(args.out / f"m{margin:g}" / f"p{p}-s{seed}.png")
            for seen in judge.predict(images):
                for n in names:
                    counts[n] += shows(seen, n)
                counts["all"] += all(shows(seen, n) for n in names)
                total += 1
        print(f"| {margin:g} | " + " | ".join(f"{100 * counts[k] / total:.1f}%" for k in [*names, "all"]) + " |", flush=True)
        pipe.disable_regional_routing()


if __name__ == "__main__":
    main()
