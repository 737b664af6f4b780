"""How far does the presence judge agree with a person? ``python -m experiments.audit LABELS.csv``

The attribute judge is checked on round trips of drawings (``experiments.quality``), but it scores generated images,
and on some of them it reads shape ``none`` where a person sees a star on a board
(``experiments/docs/composition-experiments.md``). This prints, for a set of generated images a person labelled, how
the judge's reading compares:

- per concept: the rate by eye and by the judge, the judge's recall (of what the eye saw, the share it reads) and
  precision (of what it reads, the share the eye saw), and how many images the two agree on;
- every concept of the prompt, by eye and by the judge, with Wilson 95% intervals.

LABELS.csv has a row per image: ``prompt``, ``image`` (a path relative to the file) and ``eye_<concept>`` (1 or 0)
for each concept; with a ``method`` column it also prints, per method, the images each concept was seen in by the eye,
by the judge and by both. ``experiments/docs/eye-audit-inpaint-inside.csv`` is one: 64 images of the
layout-then-background composite, labelled by the author of that method (criteria in
``experiments/docs/composition-experiments.md``), so a later judge can be measured on the same images.
``experiments/docs/eye-audit-fresh.csv`` is another: 192 images of six methods on seeds no choice looked at, labelled
before any judge read them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image

from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.presence import AttributeJudgePresence
from mole_diffusion.eval.stats import format_rate


def read_labels(path: str | Path) -> tuple[list[dict], list[str]]:
    """The rows of a labels file (``image`` made a path) and its concepts, in column order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no labels file")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    concepts = [c.removeprefix("eye_") for c in (rows[0] if rows else {}) if c.startswith("eye_")]
    if not rows or not concepts or "image" not in rows[0] or "prompt" not in rows[0]:
        raise ValueError(f"{path}: expected a header with prompt, image and eye_<concept> columns, and a row per image")
    for number, row in enumerate(rows, start=2):
        for concept in concepts:
            if row[f"eye_{concept}"] not in ("0", "1"):
                raise ValueError(f"{path}, line {number}: eye_{concept} is {row[f'eye_{concept}']!r}; expected 1 or 0")
        row["image"] = path.parent / row["image"]
    return rows, concepts


def agreement(eye: list[dict[str, bool]], judge: list[dict[str, bool]], concepts: list[str]) -> dict[str, dict[str, float]]:
    """Per concept (and ``all``: every concept at once): counts of images the eye and the judge see it in, both, and
    the images they agree on; recall and precision of the judge against the eye (None where undefined)."""
    table = {}
    for name in [*concepts, "all"]:
        seen_eye = [all(e.values()) if name == "all" else e[name] for e in eye]
        seen_judge = [all(j[c] for c in concepts) if name == "all" else j[name] for j in judge]
        both = sum(e and j for e, j in zip(seen_eye, seen_judge))
        table[name] = {"n": len(eye), "eye": sum(seen_eye), "judge": sum(seen_judge), "both": both,
                       "agree": sum(e == j for e, j in zip(seen_eye, seen_judge)),
                       "recall": both / sum(seen_eye) if sum(seen_eye) else None,
                       "precision": both / sum(seen_judge) if sum(seen_judge) else None}
    return table


def format_table(table: dict[str, dict[str, float]]) -> list[str]:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    lines = ["| concept | by eye | by the judge | judge's recall | judge's precision | agree |", "|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {format_rate(row['eye'], row['n'])} | {format_rate(row['judge'], row['n'])} | {share(row['recall'])} | "
                     f"{share(row['precision'])} | {row['agree']}/{row['n']} |")
    return lines


def format_groups(eye: list[dict[str, bool]], judge: list[dict[str, bool]], concepts: list[str], groups: list[str]) -> list[str]:
    """Per group (a method), each concept's count of images seen by the eye / by the judge / by both."""
    names = [*concepts, "all"]
    lines = ["| method | n | " + " | ".join(f"{name}: eye / judge / both" for name in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for group in dict.fromkeys(groups):
        picked = [i for i, g in enumerate(groups) if g == group]
        table = agreement([eye[i] for i in picked], [judge[i] for i in picked], concepts)
        lines.append(f"| {group} | {len(picked)} | " + " | ".join(f"{table[n]['eye']} / {table[n]['judge']} / {table[n]['both']}" for n in names) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", help="a CSV of prompt, image, eye_<concept> per image")
    parser.add_argument("--judge", help="an attribute judge folder (default: the installed world's)")
    args = parser.parse_args(argv)

    rows, concepts = read_labels(args.labels)
    missing = [str(r["image"]) for r in rows if not Path(r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{args.labels}: {len(missing)} labelled images are missing, e.g. {missing[0]}")
    judge = AttributeJudgePresence(args.judge or ASSETS / "judge", concepts)
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    reads = [seen for seen, _ in judge.read(images, [r["prompt"] for r in rows])]
    eye = [{c: r[f"eye_{c}"] == "1" for c in concepts} for r in rows]
    print("\n".join(format_table(agreement(eye, reads, concepts))))
    if "method" in rows[0]:
        print("\n" + "\n".join(format_groups(eye, reads, concepts, [r["method"] for r in rows])))


if __name__ == "__main__":
    main()
