"""Which blocks of one LoRA break the others under the plain sum? A diagnostic.

    python -m experiments.blocks --assets build/world-v2/assets --out build/blocks --expert checker

Draws the composition prompts with every LoRA at weight 1 (the plain sum), then again once per group of gates with
``--expert``'s weight set to ``--weight`` (default 0) in that group's gates only (a group is a prefix of the gates'
names: ``unet.up_blocks.2`` turns the expert down in both of that block's attentions and resnets), and prints how
often the attribute judge sees each concept and all three. A group whose removal keeps the expert's own concept and
gives the others back is where the LoRAs collide; per-block weights (``set_experts(weights={gate: [...]})``, what
the block gates can learn) could then separate them. Selection seeds by default (0-7): a diagnostic, not a choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.presence import AttributeJudgePresence

from .instances import draw
from .spatial import load_world

NAMES = ("star", "stripes", "checker")
GROUPS = ("text_encoder", "unet.down_blocks", "unet.mid_block", "unet.up_blocks.0", "unet.up_blocks.1",
          "unet.up_blocks.2", "unet.")


def group_weights(gates: list[str], expert: int, group: str | None, weight: float, experts: int) -> dict[str, list[float]]:
    """{gate: weights}: all ones, ``expert``'s set to ``weight`` in the gates whose name starts with ``group``."""
    return {gate: [weight if (group is not None and gate.startswith(group) and e == expert) else 1.0
                   for e in range(experts)] for gate in gates}


def rates(pipe, judge, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, out: Path) -> dict[str, float]:
    counts = dict.fromkeys([*NAMES, "all"], 0)
    out.mkdir(parents=True, exist_ok=True)
    for p, prompt in enumerate(prompts):
        images = draw(pipe, prompt, seeds, steps, guidance_scale)
        for seed, image, (seen, _) in zip(seeds, images, judge.read(images, [prompt] * len(images))):
            image.save(out / f"p{p}-s{seed}.png")
            for name in NAMES:
                counts[name] += seen[name]
            counts["all"] += all(seen.values())
    return {k: 100 * v / (len(prompts) * len(seeds)) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.blocks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ASSETS, help="a built world (default: the shipped one)")
    parser.add_argument("--out", type=Path, required=True, help="a folder for each row's images")
    parser.add_argument("--expert", choices=NAMES, default="checker")
    parser.add_argument("--weight", type=float, default=0.0, help="the expert's weight inside each group")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), help="gate-name prefixes, one row each")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--colours", nargs="+", default=["red", "blue", "yellow", "purple"])
    args = parser.parse_args(argv)

    pipe, _ = load_world(args.assets)
    judge = AttributeJudgePresence(args.assets / "judge", list(NAMES))
    gates, expert = list(pipe.mole.gates), NAMES.index(args.expert)
    prompts, seeds = world.composition_prompts(tuple(args.colours)), list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"| {args.expert} at {args.weight:g} in | gates | " + " | ".join(f"{k}" for k in (*NAMES, "all three")) + " |")
    print("|---|---|---|---|---|---|")
    for group in [None, *args.groups]:
        chosen = [g for g in gates if group is not None and g.startswith(group)]
        if group is not None and not chosen:
            parser.error(f"--groups {group}: no gate's name starts with it; the gates are {gates}")
        pipe.set_experts(list(NAMES), group_weights(gates, expert, group, args.weight, len(NAMES)))
        found = rates(pipe, judge, prompts, seeds, args.steps, args.guidance_scale,
                      args.out / (group or "sum").replace(".", "_"))
        print(f"| {group or 'nowhere (the plain sum)'} | {len(chosen)} | "
              + " | ".join(f"{v:.1f}%" for v in found.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
