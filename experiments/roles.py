"""Can the layout sampler's settings be learned? A diagnostic.

    python -m experiments.roles --out build/roles --seeds 16 --first-seed 100

The layout-then-background sampler (``spatial.LayoutThenBackground``, ``layout`` in the composition table of
``docs/composition-experiments.md``) composes with hand-set settings: the star and stripes LoRAs in the object pass,
the checker LoRA in the background pass at weight 2. Here each LoRA learns two strengths from its own concept's
reference images alone, one on the object and one on the background, by the denoising loss (the shipped gates'
objective): on concept k's images, LoRA k acts with strength softplus(s_k,object) on the object's positions and
softplus(s_k,background) on the rest (the regional routing's masks; every other LoRA off, the text encoder adapted
by LoRA k). The object is the 2-means split of the clean latent (``two_means_object``, holes filled), as the sampler
finds it. Nothing but these six numbers learns; no judge and no composition prompt is seen.

Then the sampler runs with the learned strengths: each LoRA in the pass of the region where it learned the larger
strength, at that strength, with the hand-set lead (4), stripes inside the layout and dilation (1) kept
(``learned``), and with none of them, every LoRA of the object pass from the first step (``learned_plain``). The
judge reads the images as in ``experiments.spatial``. A diagnostic: no setting here is chosen by the judge.

First it prints why such strengths can (or cannot) be learned: each concept's denoising loss on its own images,
on the same noisy latents, with no LoRA, its LoRA on the object only, on the background only, and everywhere.

    python -m experiments.roles --out build/roles --trainer-clip build/trainer_clip --steps 60

learns instead the one setting the sampler's composition rests on, the checker LoRA's strength in the background
pass, from the composition prompts: the composition objective of ``train-gates --objective composition`` on a
trainer CLIP (a second tiny CLIP, never the evaluator's), through a short unrolled background pass around the held
object (``learn_background_strength``); then samples the layout sampler with it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from mole_diffusion.clip import load_clip
from mole_diffusion.concepts import load_concepts
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.demo.world import CONCEPTS, composition_prompts
from mole_diffusion.eval.presence import AttributeJudgePresence
from mole_diffusion.train.common import encode_examples, encode_prompts
from mole_diffusion.train.gates import composition_loss, reference_directions

from . import spatial
from .spatial import NAMES, LayoutThenBackground, grow, hold, solid, two_means_object

REGIONS = ("object", "background")


def region_masks(strengths: torch.Tensor, obj: torch.Tensor, expert: int, experts: int) -> torch.Tensor:
    """(B, H, W) object map, (2,) strengths (object, background) -> (B, experts, H, W) regional-routing masks:
    ``expert`` at its object strength on the object and its background strength elsewhere, every other expert 0."""
    masks = torch.zeros(len(obj), experts, *obj.shape[1:], dtype=strengths.dtype)
    weighted = strengths[0] * obj + strengths[1] * (1 - obj)
    return torch.cat([masks[:, :expert], weighted[:, None], masks[:, expert + 1:]], dim=1)


def concept_examples(pipe, concepts_file: Path, resolution: int = 64):
    """(the concepts' reference images encoded, their object maps (M, H, W) by the sampler's own split)"""
    concepts = load_concepts(concepts_file)
    if [c.name for c in concepts] != pipe.expert_names:
        raise ValueError(f"{concepts_file}: concepts {[c.name for c in concepts]} are not the pipeline's experts {pipe.expert_names}")
    examples = encode_examples(concepts, pipe.vae, resolution, prior_loss_weight=0.0)
    return examples, solid(two_means_object(examples.latents), close=1)


def enable_trigger_routing(pipe) -> None:
    """Regional routing on the demo world's trigger words; its masks and weights are then set by hand."""
    pipe.enable_regional_routing({n: CONCEPTS[n].token for n in pipe.expert_names})


def regional_loss(pipe, scheduler, examples, objects: torch.Tensor, rows: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor, expert: int, strengths: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """The denoising loss on examples ``rows`` (noised by the DDPM ``scheduler``) with expert ``expert`` alone at
    ``strengths`` (object, background), its text-encoder LoRA at weight 1 (0 when both strengths are 0). Regional
    routing must be enabled."""
    routing, experts = pipe.mole.regional, len(pipe.expert_names)
    text_weight = float(bool(strengths.detach().abs().sum() > 0))
    routing.weights = F.one_hot(torch.tensor([expert]), experts).float() * text_weight
    routing.masks = region_masks(strengths, objects[rows], expert, experts)
    conditions = encode_prompts(pipe, [examples.prompts[i] for i in rows.tolist()], resolution)
    latents = examples.latents[rows]
    prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **conditions).sample
    return F.mse_loss(prediction, noise)


@torch.no_grad()
def region_losses(pipe, concepts_file: Path, draws: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per concept: the object's share of its images, and its denoising loss on them (each image ``draws`` times,
    the same noise and timesteps for every setting) with no LoRA, its LoRA on the object only, on the background
    only, and everywhere."""
    examples, objects = concept_examples(pipe, concepts_file)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    settings = {"none": (0.0, 0.0), "object": (1.0, 0.0), "background": (0.0, 1.0), "everywhere": (1.0, 1.0)}
    generator = torch.Generator().manual_seed(seed)
    enable_trigger_routing(pipe)
    table = {}
    try:
        for k, name in enumerate(pipe.expert_names):
            rows = (examples.groups == k).nonzero().flatten().repeat(draws)
            noise = torch.randn(examples.latents[rows].shape, generator=generator)
            timesteps = torch.randint(1000, (len(rows),), generator=generator)
            chunks = [slice(i, i + 32) for i in range(0, len(rows), 32)]
            table[name] = {"object_share": objects[rows].mean().item()}
            for label, strengths in settings.items():
                total = sum(regional_loss(pipe, scheduler, examples, objects, rows[c], noise[c], timesteps[c], k,
                                          torch.tensor(strengths)) * len(rows[c]) for c in chunks)
                table[name][label] = (total / len(rows)).item()
    finally:
        pipe.disable_regional_routing()
    return table


def learn_region_strengths(pipe, concepts_file: Path, steps: int = 300, batch_size: int = 6, learning_rate: float = 5e-2,
                           seed: int = 0, resolution: int = 64) -> torch.Tensor:
    """(experts, 2) strengths (object, background) learned as the module docstring says; concepts in turn."""
    examples, objects = concept_examples(pipe, concepts_file, resolution)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    experts = len(pipe.expert_names)
    raw = torch.full((experts, len(REGIONS)), math.log(math.e - 1), requires_grad=True)  # softplus: 1, the LoRA as trained
    optimizer = torch.optim.Adam([raw], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    enable_trigger_routing(pipe)
    try:
        for step in range(steps):
            k = step % experts
            mine = (examples.groups == k).nonzero().flatten()
            rows = mine[torch.randint(len(mine), (batch_size,), generator=generator)]
            noise = torch.randn(examples.latents[rows].shape, generator=generator)
            timesteps = torch.randint(1000, (batch_size,), generator=generator)
            loss = regional_loss(pipe, scheduler, examples, objects, rows, noise, timesteps, k, F.softplus(raw[k]), resolution)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        pipe.disable_regional_routing()
    return F.softplus(raw.detach())


def learn_background_strength(pipe, clip, concepts_file: Path, steps: int = 60, seeds: int = 4, sampling_steps: int = 4,
                              learning_rate: float = 5e-2, seed: int = 0, lead: int = 4, dilate: int = 1,
                              guidance_scale: float = 5.0) -> tuple[float, list[float]]:
    """The checker LoRA's strength in the layout sampler's background pass, learned on the composition prompts by
    a trainer ``clip`` (never the judge) with the composition objective (``train.gates.composition_loss``).

    The object passes are drawn once, as the sampler draws them (the star LoRA, the stripes from ``lead`` inside its
    layout; 25 steps; seeds 1000..), and their objects split off. Each step then unrolls a short background pass
    (``sampling_steps`` DDIM steps from the object pass's noise, the object put back after every step) for every
    prompt, with a random one of the ``seeds`` draws, the checker LoRA alone in the UNet at softplus(s) (from 1), the
    text encoders summing the three LoRAs; decodes it and scores it. Returns (strength, the loss of every step)."""
    prompts, experts = composition_prompts(), len(pipe.expert_names)
    sampler = LayoutThenBackground(pipe, lead, (1.0, 1.0), 1.0, dilate, guidance_scale, stripes_inside=True)
    size = sampler.latent_size()
    noises, layouts, held = [], [], []
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            for draw in range(seeds):
                noise = torch.randn(1, pipe.unet.config.in_channels, *size, generator=torch.Generator().manual_seed(1000 + draw))
                layout = sampler.object_pass_inside(prompt, noise, dict(num_inference_steps=25, guidance_scale=guidance_scale,
                                                                        output_type="latent"))
                noises.append(noise), layouts.append(layout), held.append(grow(solid(two_means_object(layout)), dilate)[:, None])
        pipe.mole.set_experts(list(pipe.expert_names), {g: [1.0] * experts if g.startswith("text_encoder") else [0.0] * experts
                                                        for g in pipe.mole.gates})
        embeds = [pipe.encode_prompt(prompt, "cpu", 1, True) for prompt in prompts]  # (prompt, negative), LoRAs summed
        conditions = torch.cat([*(negative for _, negative in embeds), *(positive for positive, _ in embeds)])
        pipe.mole.set_experts()
        texts = clip.embed_texts(prompts)
        references = reference_directions(clip, load_concepts(concepts_file))
    named = torch.ones(len(prompts), experts, dtype=torch.bool)  # every composition prompt names all three
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sampling_steps)
    raw = torch.tensor(math.log(math.e - 1), requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    enable_trigger_routing(pipe)
    routing, losses = pipe.mole.regional, []
    routing.masks = torch.ones(2 * len(prompts), experts, *size)  # every position: the weights alone
    try:
        for _ in range(steps):
            rows = [p * seeds + int(torch.randint(seeds, (1,), generator=generator)) for p in range(len(prompts))]
            noise, layout, obj = (torch.cat([t[r] for r in rows]) for t in (noises, layouts, held))
            routing.weights = F.pad(F.softplus(raw)[None], (experts - 1, 0))[None]  # (1, N): the checker alone
            latents = noise * scheduler.init_noise_sigma
            for i, t in enumerate(scheduler.timesteps):
                prediction = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=conditions).sample
                unconditional, conditional = prediction.chunk(2)
                latents = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, latents).prev_sample
                latents = hold(scheduler, i, layout, noise, obj, latents)
            images = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
            loss, _ = composition_loss(clip.embed_images(images), texts, references, named)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        pipe.disable_regional_routing()
    return F.softplus(raw).item(), losses


def sampler_specs(strengths: torch.Tensor) -> list[str]:
    """``experiments.spatial`` specs for the learned strengths, or [] when the learned roles are not the sampler's
    (the star and the stripes on the object, the checker on the background): it cannot put them elsewhere."""
    star, stripes, checker = strengths.tolist()
    if not (star[0] > star[1] and stripes[0] > stripes[1] and checker[1] > checker[0]):
        return []
    weights = f"{star[0]:.2f},{stripes[0]:.2f},{checker[1]:.2f}"
    return [f"learned:split:4:{weights}:inpaint-inside:1", f"learned_plain:split:0:{weights}:inpaint:0"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.roles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for each spec's images")
    parser.add_argument("--steps", type=int, default=300, help="training steps (the concepts in turn)")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--trainer-clip", metavar="DIR",
                        help="instead: learn the checker's strength in the background pass from the composition prompts "
                             "with this CLIP (an open_clip local-dir folder; never the evaluator's), then sample with it")
    args = parser.parse_args(argv)

    pipe, judge = spatial.load_world(ASSETS)
    presence = AttributeJudgePresence(ASSETS / "judge", list(NAMES))
    header = "| spec | " + " | ".join(f"present_{k}" for k in spatial.COUNTED) + " |"
    if args.trainer_clip:
        strength, losses = learn_background_strength(pipe, load_clip(f"local-dir:{args.trainer_clip}"), ASSETS / "concepts.toml",
                                                     steps=args.steps)
        tenth = max(1, len(losses) // 10)
        print(f"learned checker strength {strength:.2f}; composition loss {sum(losses[:tenth]) / tenth:.4f} (first tenth "
              f"of the steps) -> {sum(losses[-tenth:]) / tenth:.4f} (last tenth)\n\n{header}")
        spec = f"layout_learned:split:4:1,1,{strength:.2f}:inpaint-inside:1"
        counts = spatial.run(pipe, judge, presence, Path(args.out), spec, args.seeds, args.first_seed)
        print(spatial.spec_row(spec, counts))
        return
    print("| concept | object share | no LoRA | its LoRA on the object only | on the background only | everywhere |\n"
          "|---|---|---|---|---|---|")
    for name, row in region_losses(pipe, ASSETS / "concepts.toml").items():
        print(f"| {name} | {row['object_share']:.0%} | "
              + " | ".join(f"{row[k]:.4f}" for k in ("none", "object", "background", "everywhere")) + " |", flush=True)
    strengths = learn_region_strengths(pipe, ASSETS / "concepts.toml", steps=args.steps)
    print("\n| LoRA | learned strength on the object | on the background |\n|---|---|---|")
    for name, (on_object, on_background) in zip(NAMES, strengths.tolist()):
        print(f"| {name} | {on_object:.2f} | {on_background:.2f} |")
    specs = sampler_specs(strengths)
    if not specs:
        print("the learned roles are not the layout sampler's: nothing to sample")
        return
    print(f"\n{header}")
    for spec in specs:
        counts = spatial.run(pipe, judge, presence, Path(args.out), spec, args.seeds, args.first_seed)
        print(spatial.spec_row(spec, counts), flush=True)


if __name__ == "__main__":
    main()
