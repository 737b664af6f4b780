"""A diagnostic: constant per-expert strengths (star, stripes, checker) on the composition prompts.

``python -m experiments.strengths --out build/grid 1.5,0.75,2 2,1,2`` runs the evaluator's ``nla`` with each
weight triple (4 prompts x 16 seeds, DDIM 25 steps, guidance 5) and prints the presence rates. Weights picked by
these numbers would make the judge a training signal: this says whether strength is what caps composition.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.evaluate import EvaluationConfig, evaluate
from mole_diffusion.eval.report import format_cell

from .quality import read_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.strengths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for one evaluator run per weight triple")
    parser.add_argument("weights", nargs="+", help="comma-separated strengths, one per concept: 1.5,0.75,2")
    args = parser.parse_args(argv)

    for text in args.weights:
        weights = [float(w) for w in text.split(",")]
        run = evaluate(EvaluationConfig(
            base=str(ASSETS / "pipeline"), concepts=ASSETS / "concepts.toml", clip_model=f"local-dir:{ASSETS / 'clip'}",
            presence_model=str(ASSETS / "judge"), seeds=list(range(16)), scheduler="ddim", steps=25, guidance_scale=5.0,
            output_dir=Path(args.out) / ("w" + "_".join(f"{w:g}" for w in weights)), prompts=world.composition_prompts(),
            methods=["nla"], nla_weights=weights, progress=False))
        summary = read_summary(run)[0]
        print(text, *(format_cell(summary, f"present_{c}") for c in (*world.CONCEPTS, "all")), flush=True)


if __name__ == "__main__":
    main()
