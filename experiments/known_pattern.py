"""A base that knows checkerboards: does the checker LoRA add with the star when its board is one instance of a pattern
the base already draws?

The second world's base knows two black-and-white grounds, ``grid`` and ``banded``, but no checkerboard, so the
checker LoRA must teach one. Here the world's base is fine-tuned on its own world plus one more ground, ``tiled``: a
coarse checkerboard of 4 x 4 cells (the concept's has 8 x 8), which the judge reads as banded or white, almost never
(1 of 64) as the concept. The checker's references are then captioned with that word after the trigger, DreamBooth's class word
("a red circle on a qkx tiled background"), and every LoRA is trained again on the fine-tuned base.

    python -m experiments.known_pattern finetune --assets build/world-v2/assets --out build/known-pattern
    mole-diffusion train-lora --base build/known-pattern/pipeline --images build/known-pattern/checker \\
        --prompt "a shape on a qkx tiled background" ...      # the star and stripes LoRAs as the build trains them
    python -m experiments.known_pattern measure --pipeline build/known-pattern/pipeline \\
        --loras star=STAR stripes=STRIPES checker=CHECKER --class-word tiled

``references --out DIR --class-word WORD`` writes only the checker's references, with another class word (for the
installed base: "banded", "grid"); ``--concept star --tiled`` the star's, drawn over the tiled world's grounds as
well (tiles are a ground the fine-tuned base knows, so the star's references may vary over them too); ``--count N``
draws N of them (the build draws 64).

``assets --pipeline P --loras star=.. stripes=.. checker=.. --gates G --out DIR`` puts the set together as a demo
world folder (the fine-tuned pipeline, its LoRAs and gates, the installed judge and CLIP, every concept's references,
the checker's with the class word, and ``class_word`` in its build settings; with ``--tiled`` the star's and
stripes' references drawn over tiles too; ``--references NAME=DIR`` copies a concept's from DIR, those its LoRA
learned from), so that ``experiments.quality``,
``strengths`` and ``instances --assets DIR`` measure every method on it with the class word in every checker phrase.

``measure`` draws, on the selection seeds (from 0), each LoRA alone on fresh prompts of its own, each pair under the
plain sum, and all three on the composition prompts, every checker phrase with the class word, and prints how often
the judge reads the concepts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from diffusers import StableDiffusionPipeline

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.build import scene_examples, train_denoiser, write_manifest
from mole_diffusion.demo.images import RESOLUTION
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.attribute_judge import load_judge
from mole_diffusion.quiet import quiet_loading
from mole_diffusion.train.common import TrainingSettings

from .instances import draw, shows, with_class_word, with_concept

TILE_CELLS = 4
CLASS_WORD = "tiled"  # the default of every job's --class-word


@contextmanager
def tiled_world() -> Iterator[world.World]:
    """The second world with one more background, ``tiled`` (black and white cells, ``TILE_CELLS`` a side), drawable by
    ``world.draw`` while the block runs."""
    paint, backgrounds = world._pattern, world.ALL_BACKGROUNDS

    def pattern(pen, background: str, resolution: int) -> None:
        if background != CLASS_WORD:
            return paint(pen, background, resolution)
        edges = [resolution * k // TILE_CELLS for k in range(TILE_CELLS + 1)]
        for row, col in itertools.product(range(TILE_CELLS), repeat=2):
            if (row + col) % 2:
                pen.rectangle((edges[col], edges[row], edges[col + 1] - 1, edges[row + 1] - 1), fill=world.PATTERN_DARK)

    world._pattern, world.ALL_BACKGROUNDS = pattern, (*backgrounds, CLASS_WORD)
    try:
        yield replace(world.V2, name="v2-tiled", backgrounds=(*world.V2.backgrounds, CLASS_WORD))
    finally:
        world._pattern, world.ALL_BACKGROUNDS = paint, backgrounds


def write_references(out: Path, count: int = 64, seed: int = 0, word: str = CLASS_WORD, concept: str = "checker",
                     tiled: bool = False) -> Path:
    """A concept's references as a build draws them (``count`` scenes from ``seed``), ``NNN.png`` with its caption
    ``NNN.txt``, the class word after the checker's trigger. With ``tiled`` the other factors vary over the tiled
    world's values, so a star or a striped object is also drawn on tiles ("a red sks on a tiled background")."""
    out.mkdir(parents=True, exist_ok=True)
    with tiled_world() if tiled else nullcontext(world.V2) as drawn_world:
        for i, scene in enumerate(world.concept_scenes(concept, count, seed, drawn_world)):
            world.draw(scene, RESOLUTION).save(out / f"{i:03d}.png")
            (out / f"{i:03d}.txt").write_text(with_class_word(scene.caption, word) + "\n")
    return out


def write_assets(out: Path, pipeline: Path, loras: dict[str, Path], gates: Path, assets: Path = ASSETS,
                 word: str = CLASS_WORD, tiled: bool = False, references: dict[str, Path] | None = None) -> Path:
    """A demo world folder at ``out`` (checked by ``demo.run.check_assets``) holding ``pipeline``, ``loras`` and
    ``gates``, with ``assets``' judge, CLIP and star and stripes references (with ``tiled``, theirs drawn over the
    tiled world, as ``references --tiled`` draws them); the checker's references, its prompt and the composition
    prompts carry ``word``, which ``build_settings.json`` records as ``class_word``. ``references`` names folders
    copied in place of a concept's drawn references (those its LoRA and the gates learned from, when drawn otherwise,
    say more of them)."""
    references = {name: Path(folder) for name, folder in (references or {}).items()}
    unknown = sorted(set(references) - set(world.CONCEPTS))
    if unknown:
        raise ValueError(f"--references names {unknown}; expected concepts among {sorted(world.CONCEPTS)}")
    empty = [str(folder) for folder in references.values() if not any(folder.glob("*.png"))]
    if empty:
        raise FileNotFoundError(f"no reference images (*.png) in {', '.join(empty)}")
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder")
    if sorted(loras) != sorted(world.CONCEPTS):
        raise ValueError(f"--loras names {sorted(loras)}; expected one LoRA for each of {sorted(world.CONCEPTS)}")
    missing = [str(f) for f in (pipeline / "model_index.json", gates, *loras.values()) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)} (a diffusers pipeline folder, a gate file and three LoRA files)")
    shutil.copytree(pipeline, out / "pipeline")
    for name in ("judge", "clip"):
        shutil.copytree(assets / name, out / name)
    for name in world.CONCEPTS:  # each concept's references: given, or the checker's with the class word, or drawn
        target = out / "world/concepts" / name
        if name in references:
            shutil.copytree(references[name], target)
        elif name == "checker":
            write_references(target, word=word)
        elif tiled:
            write_references(target, concept=name, tiled=True)
        else:
            shutil.copytree(assets / "world/concepts" / name, target)
    (out / "loras").mkdir()
    for name in world.CONCEPTS:
        shutil.copyfile(loras[name], out / "loras" / f"{name}.safetensors")
    shutil.copyfile(gates, out / "gates.safetensors")
    (out / "concepts.toml").write_text(with_class_word((assets / "concepts.toml").read_text(), word))
    settings = json.loads((assets / "build_settings.json").read_text())
    (out / "build_settings.json").write_text(json.dumps({**settings, "class_word": word}, indent=1))
    write_manifest(out)
    return out


def fine_tune(pipeline: Path, out: Path, steps: int, scenes: int = 8000, share: float = 0.2, batch_size: int = 64,
              learning_rate: float = 2e-4, scene_seed: int = 11) -> Path:
    """Train ``pipeline``'s UNet and text encoder on scenes of the tiled world (``share`` of them on tiles) as the build
    trains the base (``build.train_denoiser``), the scenes drawn from ``scene_seed`` (not the base's own, 0);
    writes ``out/pipeline``."""
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    rng = random.Random(scene_seed)
    with tiled_world() as tiled:
        drawn = [world.random_scene(rng, world=tiled) for _ in range(scenes)]
        drawn = [replace(s, background=CLASS_WORD) if rng.random() < share else s for s in drawn]
        examples = scene_examples(pipe.vae, drawn)  # drawn here, where the tiles are
    train_denoiser(pipe, examples, TrainingSettings(output_dir=out / "training", steps=steps, batch_size=batch_size,
                                                    learning_rate=learning_rate, seed=0, checkpoint_every=100,
                                                    keep_checkpoints=1, resume=True, resolution=RESOLUTION))
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


def measure_prompts(prompts: int = 8, pair_prompts: int = 4, word: str = CLASS_WORD) -> dict[str, list[str]]:
    """The prompts ``measure`` draws, by check: each concept alone (``prompts`` fresh scenes of its own), each pair
    (``pair_prompts`` of the first's, with the second's concept), all three (the composition prompts); every checker
    phrase with ``word``."""
    names = tuple(world.CONCEPTS)
    checks = {name: [s.caption for s in world.concept_scenes(name, prompts, seed=7004, world=world.V2)] for name in names}
    for first, second in itertools.combinations(names, 2):
        scenes = world.concept_scenes(first, pair_prompts, seed=7005, world=world.V2)
        checks[f"{first} + {second}"] = [with_concept(s, second).caption for s in scenes]
    checks["all three"] = world.composition_prompts()
    return {check: [with_class_word(p, word) for p in listed] for check, listed in checks.items()}


def measure(pipe, judge, prompts: int = 8, pair_prompts: int = 4, seeds: tuple[int, ...] = tuple(range(8)), steps: int = 25, guidance_scale: float = 7.5,
            word: str = CLASS_WORD) -> dict[str, float]:
    """Share of images showing each check's concepts (every LoRA loaded in ``pipe`` at weight 1 where a check names it)."""
    run = dict(seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    shares = {}
    for check, listed in measure_prompts(prompts, pair_prompts, word).items():
        names = list(world.CONCEPTS) if check == "all three" else check.split(" + ")
        pipe.set_experts(names, [1.0] * len(names))
        seen = [s for prompt in listed for s in judge.predict(draw(pipe, prompt, **run))]
        shares[check] = sum(all(shows(s, n) for n in names) for s in seen) / len(seen)
        if check == "all three":
            shares.update({f"all three: {n}": sum(shows(s, n) for s in seen) / len(seen) for n in names})
    return shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.known_pattern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = parser.add_subparsers(dest="job", required=True)
    tune = jobs.add_parser("finetune", help="fine-tune a world's base on the tiled world; the checker's references with the class word")
    tune.add_argument("--assets", default=str(ASSETS))
    tune.add_argument("--out", required=True)
    tune.add_argument("--steps", type=int, default=400)
    tune.add_argument("--share", type=float, default=0.2, help="share of the scenes on tiles")
    words = jobs.add_parser("references", help="one concept's references: the checker's with a class word, any on tiles too")
    words.add_argument("--out", required=True)
    words.add_argument("--class-word", default=CLASS_WORD)
    words.add_argument("--concept", default="checker", choices=sorted(world.CONCEPTS))
    words.add_argument("--tiled", action="store_true", help="vary the other factors over the tiled world (tiles among the grounds)")
    words.add_argument("--count", type=int, default=64, help="how many references (the build draws 64)")
    put = jobs.add_parser("assets", help="the set as a demo world folder, for experiments.quality and strengths")
    put.add_argument("--assets", default=str(ASSETS), help="the world whose judge, CLIP and references it takes")
    put.add_argument("--pipeline", required=True)
    put.add_argument("--loras", nargs=3, required=True, metavar="NAME=FILE")
    put.add_argument("--gates", required=True)
    put.add_argument("--class-word", default=CLASS_WORD)
    put.add_argument("--tiled", action="store_true", help="the star's and stripes' references drawn over the tiled world")
    put.add_argument("--references", nargs="+", default=[], metavar="NAME=DIR",
                     help="a concept's references copied from DIR (those its LoRA learned from) instead of drawn")
    put.add_argument("--out", required=True)
    check = jobs.add_parser("measure", help="each LoRA alone, each pair and all three, by the judge")
    check.add_argument("--pipeline", required=True)
    check.add_argument("--judge", default=str(ASSETS / "judge"))
    check.add_argument("--loras", nargs=3, required=True, metavar="NAME=FILE")
    check.add_argument("--class-word", default=CLASS_WORD, help="after the checker's trigger ('' for none)")
    check.add_argument("--seeds", type=int, default=8, help="seeds from 0")
    check.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args(argv)
    if args.job == "references":
        print(f"wrote {write_references(Path(args.out), args.count, word=args.class_word, concept=args.concept, tiled=args.tiled)}")
        return
    if args.job == "assets":
        loras = {name: Path(file) for name, file in (spec.split("=", 1) for spec in args.loras)}
        references = dict(spec.split("=", 1) for spec in args.references)
        print(f"wrote {write_assets(Path(args.out), Path(args.pipeline), loras, Path(args.gates), Path(args.assets), args.class_word, args.tiled, references)}")
        return
    if args.job == "finetune":
        assets, out = Path(args.assets), Path(args.out)
        write_references(out / "checker")
        print(f"wrote {fine_tune(assets / 'pipeline', out, args.steps, share=args.share)} and {out / 'checker'}")
        return
    judge, _ = load_judge(Path(args.judge))
    with quiet_loading():
        pipe = MoLEStableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None)
    pipe.load_experts(dict(spec.split("=", 1) for spec in args.loras))
    pipe.set_progress_bar_config(disable=True)
    shares = measure(pipe, judge, seeds=tuple(range(args.seeds)), guidance_scale=args.guidance_scale, word=args.class_word)
    print("\n".join(f"{check}: {100 * share:.1f}%" for check, share in shares.items()))


if __name__ == "__main__":
    main()
