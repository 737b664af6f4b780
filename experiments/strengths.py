"""Constant per-expert strengths (star, stripes, checker) on the composition prompts.

``python -m experiments.strengths --out build/grid 1.5,0.75,2 2,1,2`` runs the evaluator's ``nla`` with each
weight triple (4 prompts x 16 seeds, DDIM 25 steps, guidance 5) and prints the presence rates;
``--grid 0.5 1 1.5`` runs every triple of those values. Used two ways: as a diagnostic (is strength what caps
composition?), and to choose the best constant weighting as a baseline, on seeds that no reported table uses
(``--first-seed``), so the baseline is as strong as a user tuning weights by eye could make it. Nothing trained
reads these numbers.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.evaluate import EvaluationConfig, evaluate
from mole_diffusion.eval.report import format_cell

from .instances import built_world, with_class_word
from .quality import read_summary


def label(weights: list[float]) -> str:
    return ",".join(f"{w:g}" for w in weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.strengths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for one evaluator run per weight triple")
    parser.add_argument("weights", nargs="*", help="comma-separated strengths, one per concept: 1.5,0.75,2")
    parser.add_argument("--grid", nargs="+", type=float, help="also every triple of these strengths")
    parser.add_argument("--assets", default=str(ASSETS), help="the demo world (default: the installed one)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (the evaluator's)")
    parser.add_argument("--colours", nargs="+", default=["red", "blue", "yellow", "purple"],
                        help="the composition prompts' colours (one prompt each)")
    args = parser.parse_args(argv)
    triples = [[float(w) for w in text.split(",")] for text in args.weights]
    triples += [list(t) for t in itertools.product(args.grid or [], repeat=len(world.CONCEPTS))]
    if not triples:
        parser.error("give weight triples, --grid, or both")

    assets = Path(args.assets)
    word = built_world(assets)[1].get("class_word", "")  # the checker's class word in a set of experiments.known_pattern
    prompts = [with_class_word(p, word) for p in world.composition_prompts(tuple(args.colours))]
    results = []
    for weights in triples:
        run = evaluate(EvaluationConfig(
            base=str(assets / "pipeline"), concepts=assets / "concepts.toml", clip_model=f"local-dir:{assets / 'clip'}",
            presence_model=str(assets / "judge"), seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
            scheduler="ddim", steps=25, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
            output_dir=Path(args.out) / ("w" + "_".join(f"{w:g}" for w in weights)), prompts=prompts,
            methods=["nla"], nla_weights=weights, progress=False))
        summary = read_summary(run)[0]
        results.append((summary["present_all"], weights))
        print(label(weights), *(format_cell(summary, f"present_{c}") for c in (*world.CONCEPTS, "all")),
              flush=True)
    best, weights = max(results, key=lambda result: result[0])
    print(f"best: {label(weights)} (present_all {best:.1%})")


if __name__ == "__main__":
    main()
