"""Can the checker LoRA be kept off the object in the one block where its board and the star collide? A diagnostic.

    python -m experiments.object_gate --assets build/world-v2/assets --out build/object-gate

Under the plain sum, the checker LoRA's delta in the 8x8 up block (``unet.up_blocks.1``) both draws the board and
breaks the star (docs/demo-world.md, "block by block"): no weight per block separates the two, a weight per
position could. Here the checker's row of each gate in that block (``--groups``) becomes a per-position gate fitted
to say where the object is: its weight at each position of the block's input is fitted (least squares) to the
share of that latent cell that is background, 1 on the ground and 0 on the object. Every other weight stays at 1,
so the rest is the plain sum (with the concepts' trigger words, as the shipped gates). The examples are every
concept's reference images, noised at random timesteps, under the composition prompt of their colour ("a red sks
in zwx style on a qkx background", as the UNet reads at sampling), with all three LoRAs on; their object regions
come from the world's scenes recomputed from the build's seed (checked pixel for pixel). The timestep enters as the
gate's offsets at ``--knots`` noise levels (so early steps, which cannot yet see an object, may settle on a weight
of their own). ``--region disc`` counts the disc the object is drawn in as the object (a star's notches with it);
``--references N`` fits on each concept's first N references. No judge and no composition image is seen.

Prints, on the references held out of the fit (every ``--holdout``-th), the mean checker weight on cells wholly in
the object and wholly in the background per band of noise levels, then writes ``OUT/gates.safetensors``, measured
as any other gate file:

    python -m experiments.quality --assets build/world-v2/assets --out build/object-gate-select --seeds 8 \\
        --first-seed 0 --guidance-scale 7.5 --methods sum mole --gates object=build/object-gate/gates.safetensors --skip-lift
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from mole_diffusion.concepts import load_concepts
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.train.common import encode_examples, encode_prompts

from .region_gates import RESOLUTION, object_mask, reference_scenes, region_pipeline

BANDS = ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0))  # noise levels t / 1000


def disc_mask(scene: world.Scene, resolution: int = RESOLUTION) -> torch.Tensor:
    """(resolution, resolution): 1 on the disc the object is drawn in (its centre, its size's radius), so the
    notches between a star's points count as the object's, 0 elsewhere."""
    centre = torch.tensor(scene.center) * resolution
    pixel = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="xy"), -1) + 0.5
    return ((pixel - centre).norm(dim=-1) <= world.SIZES[scene.size] * resolution).float()


OBJECT_MASKS = {"shape": object_mask, "disc": disc_mask}  # --region: what counts as the object


def composition_caption(scene: world.Scene) -> str:
    """The composition prompt of ``scene``'s colour: its object a star in stripes on a checkerboard."""
    return world.composition_prompts((scene.colour,))[0]


@torch.no_grad()
def gate_examples(pipe, gates: list[str], latents: torch.Tensor, captions: list[str], masks: torch.Tensor,
                  draws: int = 4, batch_size: int = 16, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """{gate: (features (M, C), noise levels (M,), background shares (M,), image index (M,))}: each position of the
    gate's input map (unit length, as the gate reads it) for every image noised ``draws`` times, with the share of
    its cell that the image's background covers (``masks``: (B, H, W), 1 on the object)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    seen: dict[str, torch.Tensor] = {}

    def recording(name: str, position_map):
        def record(hidden: torch.Tensor, t=None) -> torch.Tensor:
            seen[name] = hidden
            return position_map(hidden, t)
        return record

    for name in gates:  # each gate's input, as its position map reads it (an instance attribute, removed after)
        pipe.mole.gates[name].position_map = recording(name, pipe.mole.gates[name].position_map)
    collected = {name: [] for name in gates}
    try:
        for start in range(0, len(latents), batch_size):
            rows = list(range(start, min(start + batch_size, len(latents))))
            conditions = encode_prompts(pipe, [captions[i] for i in rows], RESOLUTION)
            for _ in range(draws):
                clean = latents[rows]
                noise = torch.randn(clean.shape, generator=generator)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
                pipe.unet(scheduler.add_noise(clean, noise, timesteps), timesteps, **conditions)
                for name in gates:
                    hidden = F.normalize(seen[name].float(), dim=1)
                    grid = tuple(hidden.shape[-2:])
                    ground = 1 - F.adaptive_avg_pool2d(masks[rows][:, None], grid)[:, 0]
                    cells = grid[0] * grid[1]
                    collected[name].append((hidden.flatten(2).transpose(1, 2).reshape(-1, hidden.shape[1]),
                                            (timesteps.float() / 1000).repeat_interleave(cells), ground.flatten(),
                                            torch.tensor(rows).repeat_interleave(cells)))
    finally:
        for name in gates:
            del pipe.mole.gates[name].position_map
    return {name: tuple(torch.cat(parts) for parts in zip(*chunks)) for name, chunks in collected.items()}


def fit_row(gate, expert: int, features: torch.Tensor, levels: torch.Tensor, ground: torch.Tensor,
            steps: int = 500, learning_rate: float = 0.05) -> float:
    """Fit ``gate``'s row ``expert`` (weight, bias, timestep offsets; the temperature stays) so that its weight at
    each example is ``ground`` in the least-squares sense; under an element-wise activation (sigmoid, softplus) the
    other rows get no gradient, so Adam leaves them. The gate's parameters are left frozen. Returns the final mean
    squared error."""
    if gate.activation == "softmax":
        raise ValueError("fit_row fits one expert's weight alone; a softmax gate's weights move together")
    parameters = [p for p in (gate.weight, gate.bias, gate.timestep_logits) if p is not None]
    for parameter in parameters:
        parameter.requires_grad_(True)
    gate.log_temperature.requires_grad_(False)
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad()
            (row_weights(gate, expert, features, levels) - ground).pow(2).mean().backward()
            optimiser.step()
    for parameter in parameters:
        parameter.requires_grad_(False)
    with torch.no_grad():
        return float((row_weights(gate, expert, features, levels) - ground).pow(2).mean())


def row_weights(gate, expert: int, features: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``expert``'s weight at each example (a position's unit feature at noise level ``levels``), as the gate gives it:
    its logits at each example's own level, then its own activation (``Gate.activate``)."""
    logits = F.linear(features, gate.weight.float(), gate.bias.float())
    if gate.timestep_logits is not None:
        logits = logits + gate.timestep_offsets(levels, len(levels))
    return gate.activate(logits, dim=-1)[:, expert]


def band_weights(weights: torch.Tensor, levels: torch.Tensor, ground: torch.Tensor) -> list[str]:
    """Per noise band of ``BANDS``: "object / ground", the mean weight on cells wholly in the object and wholly in
    the ground ("-" where the band holds none)."""
    cells = []
    for low, high in BANDS:
        band = (levels >= low) & (levels < high)
        means = [weights[band & (ground == side)] for side in (0, 1)]
        cells.append(" / ".join(f"{float(m.mean()):.2f}" if len(m) else "-" for m in means))
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.object_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS, help="a built world (default: the shipped one)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--expert", default="checker", help="the LoRA whose rows learn where the object is")
    parser.add_argument("--groups", nargs="+", default=["unet.up_blocks.1"], help="gate-name prefixes whose rows are fitted")
    parser.add_argument("--knots", type=int, default=4, help="timestep offsets per gate (0: none)")
    parser.add_argument("--draws", type=int, default=4, help="noisings of each reference image")
    parser.add_argument("--holdout", type=int, default=8, help="every HOLDOUT-th reference is held out of the fit")
    parser.add_argument("--references", type=int, help="the first N references of each concept (default: all)")
    parser.add_argument("--region", choices=tuple(OBJECT_MASKS), default="shape",
                        help="what counts as the object: its drawn shape, or the disc it is drawn in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = region_pipeline(args.assets, per_position=True, timestep_knots=args.knots)
    names = pipe.mole.expert_names
    if args.expert not in names:
        parser.error(f"--expert {args.expert}: the experts are {names}")
    gates = [g for g in pipe.mole.gates if any(g.startswith(prefix) for prefix in args.groups)]
    if not gates:
        parser.error(f"--groups {args.groups}: no gate's name starts with one; the gates are {list(pipe.mole.gates)}")
    concepts = load_concepts(args.assets / "concepts.toml")
    scenes = reference_scenes(args.assets)
    ordered = [scene for c in concepts for scene in scenes[c.name]]  # encode_examples' order
    latents = encode_examples(concepts, pipe.vae, RESOLUTION, prior_loss_weight=0.0).latents
    if args.references is not None:
        count = len(scenes[concepts[0].name])
        chosen = [c * count + i for c in range(len(concepts)) for i in range(min(args.references, count))]
        ordered, latents = [ordered[i] for i in chosen], latents[chosen]
    masks = torch.stack([OBJECT_MASKS[args.region](scene) for scene in ordered])
    examples = gate_examples(pipe, gates, latents, [composition_caption(s) for s in ordered], masks, args.draws, seed=args.seed)

    expert = names.index(args.expert)
    print(f"| gate | fit error | {args.expert}'s weight on held-out object / ground cells at t in "
          + " | ".join(f"[{low}, {high})" for low, high in BANDS) + " |")
    print("|---|---|" + "---|" * len(BANDS))
    for name in gates:
        features, levels, ground, image = examples[name]
        held = image % args.holdout == 0
        error = fit_row(pipe.mole.gates[name], expert, features[~held], levels[~held], ground[~held])
        weights = row_weights(pipe.mole.gates[name], expert, features[held], levels[held])
        print(f"| {name} | {error:.3f} | " + " | ".join(band_weights(weights, levels[held], ground[held])) + " |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_gates(args.out / "gates.safetensors")
    print(f"wrote {args.out / 'gates.safetensors'}")


if __name__ == "__main__":
    main()
