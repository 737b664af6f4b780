"""How good is the shipped demo world? ``python -m mole_diffusion.demo.quality --out DIR`` prints (and writes
``DIR/quality.md``):

1. the tiny CLIP's zero-shot accuracy per attribute on fresh procedural images (shape incl. the star, colour,
   style incl. stripes, background incl. the checkerboard): the caption with that one attribute swapped for
   each alternative, the rest true;
2. whether the base model follows colour-and-shape prompts: the judge's pick among the 15 colour x shape
   captions with the same background (3 shapes x the 5 other colours) equals the prompt;
3. each concept LoRA alone against the base model on that concept's own prompts: how often the judge sees
   the concept, and the image alignment to the concept's reference images and to the prompt's own picture;
4. the evaluator (``evaluate``) on the composition prompts: MoLE against NLA, plain sum and the training-free
   peers, with 95% intervals.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import replace
from pathlib import Path

import torch

from . import world
from .run import ASSETS, check_assets

ATTRIBUTES = {
    "shape": (*world.SHAPES, "star"),
    "colour": tuple(world.COLOURS),
    "style": (None, "stripes"),
    "background": (*world.COLOURS, "checker"),
}


def _mean_ci(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(len(values))


def _alternatives(scene: world.Scene, attribute: str) -> list[world.Scene]:
    """The scene with ``attribute`` set to each of its values (never a shape the colour of its background)."""
    options = []
    for value in ATTRIBUTES[attribute]:
        candidate = replace(scene, **{attribute: value})
        if candidate.colour != candidate.background:
            options.append(candidate)
    return options


class Judge:
    """The tiny CLIP picking, among candidate scenes, the one whose caption is closest to an image."""

    def __init__(self, clip):
        self.clip, self.texts = clip, {}

    @torch.no_grad()
    def pick(self, image_embedding: torch.Tensor, candidates: list[world.Scene]) -> world.Scene:
        missing = [c.caption for c in candidates if c.caption not in self.texts]
        if missing:
            self.texts.update(zip(missing, self.clip.embed_texts(missing)))
        similarity = torch.stack([self.texts[c.caption] for c in candidates]) @ image_embedding
        return candidates[int(similarity.argmax())]

    def embed(self, images) -> torch.Tensor:
        return self.clip.embed_pil(images)


def clip_zero_shot(judge: Judge, count: int = 400, seed: int = 1234) -> dict[str, float]:
    """Accuracy per attribute on ``count`` fresh scenes of the whole world (not the judge's training draw)."""
    rng = random.Random(f"zero-shot-{seed}")
    scenes = [world.any_scene(rng) for _ in range(count)]
    embeddings = judge.embed([world.draw(s) for s in scenes])
    right = {a: 0 for a in ATTRIBUTES}
    for scene, embedding in zip(scenes, embeddings):
        for attribute in ATTRIBUTES:
            right[attribute] += getattr(judge.pick(embedding, _alternatives(scene, attribute)), attribute) == getattr(scene, attribute)
    return {a: n / count for a, n in right.items()}


def _only(pipe, experts: list[str]) -> None:
    """Constant weight 1 for ``experts``, 0 for the others (none: the base model exactly, as 0 * delta adds 0)."""
    names = pipe.mole.expert_names
    pipe.mole.set_experts(names, [float(n in experts) for n in names])


def _generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float):
    return [pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(s)).images[0]
            for p in prompts for s in seeds]


def base_following(pipe, judge: Judge, seeds: list[int], steps: int, guidance_scale: float) -> dict[str, float]:
    """Share of base images whose colour and shape the judge reads as prompted (15-way), and each alone."""
    colours = list(world.COLOURS)
    scenes = [world.Scene(shape, colour, colours[(i + 2) % len(colours)], "large", (0.5, 0.5))
              for shape in world.SHAPES for i, colour in enumerate(colours)]
    _only(pipe, [])
    images = _generate(pipe, [s.caption for s in scenes], seeds, steps, guidance_scale)
    both = colour = shape = 0
    for index, image in enumerate(judge.embed(images)):
        scene = scenes[index // len(seeds)]
        candidates = [replace(scene, shape=s, colour=c) for s in world.SHAPES for c in colours if c != scene.background]
        picked = judge.pick(image, candidates)
        both += picked.shape == scene.shape and picked.colour == scene.colour
        colour += picked.colour == scene.colour
        shape += picked.shape == scene.shape
    return {"colour and shape": both / len(images), "colour": colour / len(images), "shape": shape / len(images), "images": len(images)}


def lift_scenes(name: str) -> list[world.Scene]:
    """Scenes showing only concept ``name`` (captions in its token), one per colour."""
    colours = list(world.COLOURS)
    scenes = []
    for i, colour in enumerate(colours):
        background = colours[(i + 3) % len(colours)]
        shape = world.SHAPES[i % len(world.SHAPES)]
        scene = world.Scene(shape, colour, background, "large", (0.5, 0.5))
        scenes.append(replace(scene, **{"star": {"shape": "star"}, "stripes": {"style": "stripes"},
                                        "checker": {"background": "checker"}}[name]))
    return scenes


def concept_lift(pipe, judge: Judge, references: dict[str, torch.Tensor], seeds: list[int], steps: int, guidance_scale: float) -> list[dict]:
    """Per concept: base vs the concept's LoRA alone on its own prompts. ``seen``: the judge picks the concept's
    value for its attribute (star shape / stripes style / checker background); ``alignment``: mean cosine
    similarity to the concept's reference images (``evaluate``'s ``clip_image``); ``picture``: cosine similarity
    to the prompt's own scene, drawn (the same colours and shape as asked, so what differs is mostly the concept)."""
    attribute = {"star": "shape", "stripes": "style", "checker": "background"}
    rows = []
    for name in world.CONCEPTS:
        scenes = lift_scenes(name)
        for method, experts in (("base", []), (f"lora {name}", [name])):
            _only(pipe, experts)
            images = _generate(pipe, [s.caption for s in scenes], seeds, steps, guidance_scale)
            embeddings = judge.embed(images)
            truth = [scenes[i // len(seeds)] for i in range(len(images))]
            seen = [float(getattr(judge.pick(e, _alternatives(t, attribute[name])), attribute[name]) == getattr(t, attribute[name]))
                    for e, t in zip(embeddings, truth)]
            alignment = (embeddings @ references[name].T).mean(dim=1).tolist()
            picture = (embeddings * judge.embed([world.draw(t) for t in truth])).sum(dim=1).tolist()
            rows.append({"concept": name, "method": method, "seen": _mean_ci(seen), "alignment": _mean_ci(alignment),
                         "picture": _mean_ci(picture), "prompts": len(scenes)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mole_diffusion.demo.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for quality.md and the evaluator's run")
    parser.add_argument("--assets", default=str(ASSETS), help="the demo world (default: the installed one)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    args = parser.parse_args(argv)

    from ..eval.clip import load_clip
    from ..eval.evaluate import EvaluationConfig, evaluate
    from ..eval.scores import reference_embeddings
    from ..pipelines import MoLEStableDiffusionPipeline
    from ..train.concepts import load_concepts

    assets, out = Path(args.assets), Path(args.out)
    check_assets(assets)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    clip = load_clip(f"local-dir:{assets / 'clip'}")
    concepts = load_concepts(assets / "concepts.toml")
    references = {c.name: reference_embeddings(clip, c.images) for c in concepts}
    pipe = MoLEStableDiffusionPipeline.from_pretrained(assets / "pipeline", safety_checker=None)
    pipe.load_experts({c.name: c.lora for c in concepts})
    pipe.set_progress_bar_config(disable=True)

    lines = ["## Demo world quality", "", f"`python -m mole_diffusion.demo.quality --out {out} --seeds {args.seeds}` "
             f"({args.steps} DDIM steps, guidance {args.guidance_scale})", ""]
    judge = Judge(clip)
    count = 400
    zero_shot = clip_zero_shot(judge, count)
    lines += [f"Tiny CLIP zero-shot accuracy on {count} fresh images (one attribute swapped, the rest true):", "",
              "| " + " | ".join(zero_shot) + " |", "|" + "---|" * len(zero_shot),
              "| " + " | ".join(f"{v:.1%}" for v in zero_shot.values()) + " |", ""]
    print("\n".join(lines[-6:]), flush=True)
    following = base_following(pipe, judge, seeds, args.steps, args.guidance_scale)
    lines += [f"Base model on the 18 colour x shape prompts x {len(seeds)} seeds ({following['images']} images), judged right: "
              f"colour and shape {following['colour and shape']:.1%} (colour {following['colour']:.1%}, shape {following['shape']:.1%}).", ""]
    print(lines[-2], flush=True)
    lift = concept_lift(pipe, judge, references, seeds, args.steps, args.guidance_scale)
    lines += [f"Each concept LoRA alone vs the base model on that concept's prompts ({lift[0]['prompts']} prompts x "
              f"{len(seeds)} seeds; ± 95% interval):", "",
              "| concept | method | judge sees the concept | alignment to its references | alignment to the prompt's picture |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['method']} | {r['seen'][0]:.1%} ± {r['seen'][1]:.1%} | {r['alignment'][0]:.3f} ± {r['alignment'][1]:.3f} "
              f"| {r['picture'][0]:.3f} ± {r['picture'][1]:.3f} |" for r in lift]
    lines.append("")
    print("\n".join(lines[-8:]), flush=True)

    names = [c.name for c in concepts]
    methods = ["mole", "mole_constant", "nla", "sum", "set_adapters", "peft_cat", "peft_svd", "peft_ties", "peft_dare_linear",
               "switch", "composite", *(f"single_{n}" for n in names), "base"]
    run = evaluate(EvaluationConfig(
        base=str(assets / "pipeline"), concepts=assets / "concepts.toml", gates=assets / "gates.safetensors", output_dir=out / "evaluate",
        clip_model=f"local-dir:{assets / 'clip'}", prompts=world.composition_prompts(), seeds=seeds, methods=methods,
        scheduler="ddim", steps=args.steps, guidance_scale=args.guidance_scale,
    ))
    report = (run / "report.md").read_text().removeprefix("# Evaluation report\n\n")
    lines += [f"Composition prompts ({len(world.composition_prompts())} x {len(seeds)} seeds), `evaluate` "
              f"(report: {run / 'report.md'}):", "", report]
    (out / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines[-3:]))
    print(f"wrote {out / 'quality.md'}")


if __name__ == "__main__":
    main()
