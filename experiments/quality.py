"""How well does composition work in the shipped demo world? ``python -m experiments.quality --out DIR``
prints (and writes ``DIR/quality.md``):

1. the attribute judge's accuracy on VAE round trips of fresh scenes (shape incl. the star, colour, style incl.
   stripes, background incl. the checkerboard): the judge is what every presence rate below rests on;
2. the composition table: every method on the composition prompts ("a red sks in zwx style on a qkx
   background"), with ``present_<concept>`` and ``present_all`` (Wilson 95% intervals) beside the CLIP columns,
   and the shipped MoLE against each method on the same images (paired, bootstrap over prompts and seeds);
3. each concept's own prompts: how often base, the LoRA alone, NLA, the sum, regional routing and MoLE show it.
``--layout SPEC`` adds a sampler of ``experiments.spatial`` (e.g. the training-free layout-then-background)
to the composition table: drawn on the same prompts and seeds, scored beside the methods under the spec's label.
The judge is trained on the world's labels only; no method is trained against it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from diffusers import AutoencoderKL

from mole_diffusion.concepts import load_concepts
from mole_diffusion.demo import world
from mole_diffusion.demo.judge import round_trip_accuracy
from mole_diffusion.demo.run import ASSETS, check_assets
from mole_diffusion.eval.attribute_judge import load_judge
from mole_diffusion.eval.evaluate import EvaluationConfig, evaluate
from mole_diffusion.eval.report import format_cell, format_difference
from mole_diffusion.eval.summary import paired_table
from mole_diffusion.eval.presence import AttributeJudgePresence

from . import spatial
from .instances import built_world, with_class_word

METHODS = ["base", "single_{}", "nla", "sum", "set_adapters", "peft_cat", "peft_svd", "peft_ties", "peft_dare_linear",
           "switch", "composite", "regional", "mole", "mole_constant", "mole_without_{}"]


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


def own_scenes(name: str, known: world.World) -> list[world.Scene]:
    """Each concept's own prompts: in the first world one scene per colour (``lift_scenes``); in a later one six
    fresh scenes of the concept, every other factor varied over the world's values (seeds the build never used)."""
    return lift_scenes(name) if known is world.V1 else world.concept_scenes(name, 6, seed=7004, world=known)


def read_summary(run: Path, label: str = "") -> list[dict]:
    """An evaluator run's summary rows (``summary.csv``), methods suffixed with `` (label)`` when given."""
    with open(run / "summary.csv") as handle:
        rows = [{k: (v if k == "method" else float(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    for row in rows:
        row["method"] += f" ({label})" if label else ""
    return rows


def read_rows(run: Path, label: str = "") -> list[dict]:
    """An evaluator run's per-image rows (``results.json``), methods suffixed with `` (label)`` when given."""
    rows = json.loads((run / "results.json").read_text())
    return [{**row, "method": row["method"] + (f" ({label})" if label else "")} for row in rows]


def paired_lines(rows: list[dict], names: list[str], reference: str = "mole") -> list[str]:
    """Markdown rows: the reference minus each method on the same prompt and seed, per presence rate and the
    CLIP columns, with two-stage bootstrap intervals over prompts and seeds (``*``: the interval excludes 0)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(e["method"], e["metric"]): format_difference(e) for e in paired_table(rows, methods, reference)}
    columns = [*(f"present_{n}" for n in names), "present_all", "clip_text", "clip_image_min"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {m} | " + " | ".join(cells.get((m, c), "-") for c in columns) + " |" for m in methods if m != reference]
    return lines


def presence_table(summary: list[dict], names: list[str]) -> list[str]:
    """Markdown rows of the evaluator's presence rates: per method present_<concept>, present_all (and
    present_active where a concept is masked), with Wilson 95% intervals, next to the CLIP columns."""
    columns = [*(f"present_{n}" for n in names), "present_all", "present_active", "clip_text", "clip_image_min"]
    lines = ["| method | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in summary:
        lines.append(f"| {row['method']} | {int(row['n'])} | " + " | ".join(format_cell(row, c) for c in columns) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for quality.md and the evaluator's runs")
    parser.add_argument("--assets", default=str(ASSETS), help="the demo world (default: the installed one)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="the composition prompts' seeds: FIRST_SEED .. FIRST_SEED + SEEDS - 1 "
                             "(each concept's own prompts: --lift-first-seed on)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (the evaluator's)")
    parser.add_argument("--lift-seeds", type=int, help="seeds per prompt for each concept's own prompts (default --seeds)")
    parser.add_argument("--lift-first-seed", type=int, default=0, help="the first seed of each concept's own prompts")
    parser.add_argument("--skip-lift", action="store_true", help="only the judge and the composition table")
    parser.add_argument("--gates", action="append", default=[], metavar="NAME=FILE",
                        help="another gate file to compare as `mole (NAME)` (repeat), e.g. a routing variant")
    parser.add_argument("--colours", nargs="+", default=["red", "blue", "yellow", "purple"],
                        help="the composition prompts' colours, one prompt each (held-out colours: green white)")
    parser.add_argument("--methods", nargs="+", help="the evaluator's methods on the composition prompts (default: all; "
                        "`single_{}` and `mole_without_{}` stand for one per concept)")
    parser.add_argument("--constant", action="append", default=[], metavar="W1,W2,...",
                        help="a constant weighting, one weight per concept, scored as `nla (W1,W2,...)` (repeat)")
    parser.add_argument("--reference", default="mole", help="the method the paired table subtracts every other from "
                        "(a variant's label as in the table: `mole (NAME)`)")
    parser.add_argument("--layout", action="append", default=[], metavar="SPEC",
                        help="an experiments.spatial spec (label:MASK:LEAD:STAR,STRIPES[,CHECKER]:WHERE:DILATE), drawn on the "
                             "composition prompts and seeds and scored as LABEL (repeat; LABEL_without_<concept> masks one)")
    args = parser.parse_args(argv)

    assets, out = Path(args.assets), Path(args.out)
    check_assets(assets)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    concepts = load_concepts(assets / "concepts.toml")
    names = [c.name for c in concepts]
    lines = ["## Demo world quality", "", f"`python -m experiments.quality {shlex.join(argv or sys.argv[1:])}` "
             f"({args.steps} DDIM steps, guidance {args.guidance_scale})", ""]

    known, settings = built_world(assets)
    word = settings.get("class_word", "")  # the checker's class word in a set of experiments.known_pattern
    judge, _ = load_judge(assets / "judge")
    vae = AutoencoderKL.from_pretrained(assets / "pipeline" / "vae")
    count = 400
    accuracy = round_trip_accuracy(judge, vae, count, known=known)
    lines += [f"Attribute judge accuracy on VAE round trips of {count} fresh scenes (never a training signal):", "",
              "| " + " | ".join(accuracy) + " |", "|" + "---|" * len(accuracy),
              "| " + " | ".join(f"{v:.1%}" for v in accuracy.values()) + " |", ""]
    print("\n".join(lines[-6:]), flush=True)

    common = dict(base=str(assets / "pipeline"), concepts=assets / "concepts.toml", gates=assets / "gates.safetensors",
                  clip_model=f"local-dir:{assets / 'clip'}", presence_model=str(assets / "judge"), seeds=seeds,
                  scheduler="ddim", steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    methods = [m.format(n) for m in args.methods or METHODS for n in (names if "{}" in m else [None])]
    prompts = [with_class_word(p, word) for p in world.composition_prompts(tuple(args.colours))]
    drawn = {}
    if args.layout:
        pipe, spatial_judge = spatial.load_world(assets)
        presence = AttributeJudgePresence(assets / "judge", names)
        for spec in args.layout:
            spatial.run(pipe, spatial_judge, presence, out / "layout", spec, args.seeds, args.first_seed,
                        steps=args.steps, guidance_scale=args.guidance_scale, word=word)
            drawn[spec.split(":")[0]] = str(out / "layout" / spec.split(":")[0])
        del pipe
    run = evaluate(EvaluationConfig(**common, output_dir=out / "composition", prompts=prompts, methods=methods,
                                    image_folders=drawn))
    summary, rows = read_summary(run), read_rows(run)
    for name, file in (g.split("=", 1) for g in args.gates):
        variant = {**common, "gates": Path(file)}
        run = evaluate(EvaluationConfig(**variant, output_dir=out / f"composition-{name}", prompts=prompts, methods=["mole"]))
        summary, rows = summary + read_summary(run, name), rows + read_rows(run, name)
    for text in args.constant:
        weights = [float(w) for w in text.split(",")]
        run = evaluate(EvaluationConfig(**common, output_dir=out / f"composition-nla-{text.replace(',', '_')}",
                                        prompts=prompts, methods=["nla"], nla_weights=weights))
        summary, rows = summary + read_summary(run, text), rows + read_rows(run, text)
    table = presence_table(summary, names)
    lines += [f"Composition prompts ({len(prompts)} prompts x {len(seeds)} seeds per method, the same for every method; "
              "rates in % with Wilson 95% intervals over images, scores with a two-stage bootstrap over prompts and "
              "seeds; `present_active`: the concepts a method did not mask):", "", *table, ""]
    print("\n".join(lines[-len(table) - 3:]), flush=True)
    paired = paired_lines(rows, names, args.reference)
    lines += [f"`{args.reference}` against each method on the same images ({args.reference} minus the method; 95% two-stage "
              "bootstrap over prompts and seeds; `*`: the interval excludes 0):", "", *paired, ""]
    print("\n".join(lines[-len(paired) - 3:]), flush=True)

    if not args.skip_lift:
        lift_seeds = list(range(args.lift_first_seed, args.lift_first_seed + (args.lift_seeds or args.seeds)))
        lines += ["Each concept's own prompts (one concept per prompt, 6 prompts x "
                  f"{len(lift_seeds)} seeds from {lift_seeds[0]}): how often each method shows it.", "",
                  "| concept | " + " | ".join(["base", "lora alone", "nla", "sum", "regional", "mole"]) + " |", "|---|" + "---|" * 6]
        for name in names:
            own = [with_class_word(s.caption, word) for s in own_scenes(name, known)]
            lift_methods = ["base", f"single_{name}", "nla", "sum", "regional", "mole"]
            run = evaluate(EvaluationConfig(**{**common, "seeds": lift_seeds}, output_dir=out / f"own-{name}", prompts=own,
                                            methods=lift_methods))
            lines.append(f"| {name} | " + " | ".join(format_cell(s, f"present_{name}") for s in read_summary(run)) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    (out / "quality.md").write_text("\n".join(lines))
    print(f"wrote {out / 'quality.md'}")


if __name__ == "__main__":
    main()
