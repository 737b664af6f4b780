"""What trained gates do with each LoRA: their mean weights on each concept's own prompts and on the composition
prompts.

    python -m experiments.gate_weights --assets build/world-v2/assets
    python -m experiments.gate_weights --assets build/world-v2/assets --gates build/paper-gates/gates.safetensors

Per prompt set, each expert's weight averaged over the denoiser's gates, the steps and both guidance halves
(``pipe.export_block_weights``, 10 DDIM steps, guidance 7.5, seed 100). Gates trained on each concept's own images
that turn every LoRA down alike on the composition prompts cannot compose (docs/demo-world.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS

from .instances import built_world
from .quality import own_scenes
from .spatial import load_world


def mean_denoiser_weights(pipe, prompts: list[str], steps: int = 10) -> list[float]:
    """Each expert's weight averaged over the denoiser's gates (every step, both guidance halves) and the prompts."""
    weights = pipe.export_block_weights(prompts, num_inference_steps=steps, guidance_scale=7.5,
                                        generator=torch.Generator().manual_seed(100))
    denoiser = torch.tensor([w for gate, w in weights.items() if not gate.startswith("text_encoder")])
    return denoiser.mean(dim=0).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.gate_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(ASSETS), help="the demo world (default: the installed one)")
    parser.add_argument("--gates", help="another gate file for the world's LoRAs (default: the world's)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    assets = Path(args.assets)
    gates = Path(args.gates) if args.gates else assets / "gates.safetensors"
    names = list(world.CONCEPTS)
    pipe, _ = load_world(assets)
    pipe.load_gates(gates)  # its kind too (activation, trigger words): block gates, as the world's
    known, _ = built_world(assets)
    print("| prompts | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    sets = [(f"{n}'s own", [s.caption for s in own_scenes(n, known)]) for n in names]
    for label, prompts in [*sets, ("composition", world.composition_prompts())]:
        weights = mean_denoiser_weights(pipe, prompts, args.steps)
        print(f"| {label} | " + " | ".join(f"{w:.2f}" for w in weights) + " |", flush=True)


if __name__ == "__main__":
    main()
