"""What the evaluator's ``--batch-size`` saves: seconds per image of ``draw_images`` with k images in one pipeline
call, against one image per call (``draw``'s way) in the same process, on the shipped demo world (64 px, 25 DDIM
steps, guidance 5, as ``mole-diffusion demo`` draws), for the plain sum and for MoLE with its gates.

    python benchmarks/bench_evaluate.py                   # CPU, the machine's threads
    python benchmarks/bench_evaluate.py --device cuda --sizes 1 8 32
"""

from __future__ import annotations

import argparse

import torch
from common import header, interleaved

from mole_diffusion.concepts import load_concepts
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.demo.world import composition_prompts
from mole_diffusion.errors import load_base_pipeline
from mole_diffusion.eval.methods import draw_images
from mole_diffusion.pipelines import mole_pipeline_class
from mole_diffusion.schedulers import use_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="images per call (the first: the reference)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = str(ASSETS / "pipeline")
    pipe = load_base_pipeline(mole_pipeline_class(base), base, dtype=torch.float32, safety_checker=None)
    use_scheduler(pipe, "ddim")
    concepts = load_concepts(ASSETS / "concepts.toml")
    pipe.load_experts({c.name: c.lora for c in concepts})
    pipe.load_gates(ASSETS / "gates.safetensors")
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    names, prompts, largest = [c.name for c in concepts], composition_prompts(), max(args.sizes)

    def images(method: str, size: int):
        # ``largest`` images in calls of ``size``: every variant draws the same images
        def run():
            for start in range(0, largest, size):
                seeds = list(range(start, min(start + size, largest)))
                draw_images(pipe, method=method, prompts=[prompts[s % len(prompts)] for s in seeds], seeds=seeds,
                            names=names, weights=[1 / len(names)] * len(names), num_inference_steps=25, guidance_scale=5.0)
        return run

    variants = {(method, size): images(method, size) for method in ("sum", "mole") for size in args.sizes}
    seconds = interleaved(variants, rounds=args.rounds, inner=1, device=args.device)
    print(header(args.device))
    print(f"{largest} images of the demo world's composition prompts, 64 px, 25 DDIM steps, guidance 5")
    print(f"{'method':8} {'images/call':>11} {'s/image':>8} {'x one/call':>10}")
    for (method, size), total in seconds.items():
        reference = seconds[(method, args.sizes[0])]
        print(f"{method:8} {size:11d} {total / largest:8.3f} {total / reference:10.2f}")


if __name__ == "__main__":
    main()
