"""Re-judge evaluator runs with their presence model, adding whether each image keeps its prompt.

``python -m experiments.rejudge build/quality/composition build/quality/composition-t05`` reads each run's
images again with the presence model its run.json names, writes ``present_prompt`` and ``present_all_faithful``
into its rows and summaries (as ``evaluate`` now does for new runs), and prints per method ``present_all`` beside
``present_all_faithful``: the rate of images that show every concept *and* the prompt's colour. No image is
generated again, so runs made before these columns existed need not be redone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from mole_diffusion.concepts import composed_concepts, concept_triggers, load_concepts
from mole_diffusion.eval.methods import active_experts
from mole_diffusion.eval.report import format_cell, write_outputs
from mole_diffusion.eval.rows import read_rows
from mole_diffusion.eval.presence import judged_row, load_presence_judge
from mole_diffusion.eval.summary import summarise
from mole_diffusion.files import write_atomically


def rejudge(run: Path) -> list[dict]:
    """Re-judge the images of one evaluator run in place; returns its new summary rows."""
    settings = json.loads((run / "run.json").read_text())
    concepts = load_concepts(settings["concepts"])
    names = [c.name for c in concepts]
    judge = load_presence_judge(settings["presence_model"], concepts)
    triggers = concept_triggers(concepts)
    rows = list(read_rows(run / "results.jsonl").values())
    for row in rows:
        composed = composed_concepts(row["prompt"], triggers) or names
        row.update(judged_row(judge, Image.open(run / row["image"]), row["prompt"], composed, active_experts(row["method"], names)))
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(run / "results.jsonl", lambda temporary: temporary.write_text(lines))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    seeds = sorted({row["seed"] for row in rows})
    write_outputs(run, methods, settings["prompts"], seeds, names)
    return summarise(rows, methods)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.rejudge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="evaluator output folders (with run.json and results.jsonl)")
    args = parser.parse_args(argv)

    print("| run | method | n | present_all | present_prompt | present_all_faithful |\n|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        for entry in rejudge(run):
            cells = [format_cell(entry, m) if m in entry else "-" for m in ("present_all", "present_prompt", "present_all_faithful")]
            print(f"| {run.name} | {entry['method']} | {int(entry['n'])} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
