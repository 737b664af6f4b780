"""An evaluation's outputs from its rows: ``results.csv`` / ``.json``, ``summary.csv``, ``paired.csv``, a plot per
metric, the image grid, the gate heatmap and ``report.md``; and ``headline_table``, what a command prints."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from .rows import ROWS_FILE, read_rows
from .stats import paired_difference
from .summary import is_rate, paired_reference, paired_table, summarise


def write_outputs(out: Path, methods: list[str], prompts: list[str], seeds: list[int], names: list[str]) -> None:
    rows = [r for r in read_rows(out / ROWS_FILE).values() if r["method"] in methods and r["seed"] in seeds]
    rows.sort(key=lambda r: (methods.index(r["method"]), r["prompt_index"], r["seed"]))
    summary = summarise(rows, methods)
    paired = paired_table(rows, methods, paired_reference(methods))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    for path, table in ((out / "results.csv", rows), (out / "summary.csv", summary), (out / "paired.csv", paired)):
        if not table:
            path.unlink(missing_ok=True)
            continue
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for entry in table for k in entry)))
            writer.writeheader()
            writer.writerows(table)
    _plots(out, summary, methods)
    _grid(out, methods, prompts, seeds[0])
    gate_files = sorted((out / "images" / "mole").glob("*.gates.safetensors"))
    if gate_files:
        per_image = [load_file(str(f)) for f in gate_files]
        _heatmap(out, {gate: torch.stack([g[gate] for g in per_image]).mean(dim=0) for gate in per_image[0]}, names)
    _report(out, rows, summary, paired, prompts, seeds, names)


def _plots(out: Path, summary: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in summary_metrics(summary):
        figure, axis = plt.subplots(figsize=(max(4, 0.6 * len(methods)), 3.2))
        values = [s.get(metric, float("nan")) for s in summary]
        # asymmetric intervals; at 0 or above (a bootstrap mean of equal values can round past the mean)
        errors = [[max(0.0, v - s.get(f"{metric}_low", v)) for v, s in zip(values, summary)],
                  [max(0.0, s.get(f"{metric}_high", v) - v) for v, s in zip(values, summary)]]
        axis.bar([s["method"] for s in summary], values, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_ylabel(metric)
        axis.tick_params(axis="x", rotation=60)
        figure.tight_layout()
        figure.savefig(out / f"plot_{metric}.png", dpi=100)
        plt.close(figure)


def _grid(out: Path, methods: list[str], prompts: list[str], seed: int) -> None:
    from diffusers.utils import make_image_grid

    images = [Image.open(out / "images" / m / f"p{p}-s{seed}.png") for m in methods for p in range(len(prompts))]
    make_image_grid(images, rows=len(methods), cols=len(prompts)).save(out / "grid.png")


def _heatmap(out: Path, gate_means: dict[str, torch.Tensor], names: list[str]) -> None:
    gate_heatmap(gate_means, names).save(out / "gate_heatmap.png")


def gate_heatmap(gate_means: dict[str, torch.Tensor], names: list[str]) -> Image.Image:
    """Gates x experts: each gate's mean weight per expert (rows in ``gate_means`` order); also the app's heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(gate_means)
    figure, axis = plt.subplots(figsize=(2 + 1.2 * len(names), 1 + 0.3 * len(blocks)))
    image = axis.imshow(torch.stack([gate_means[b] for b in blocks]).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names)
    axis.set_yticks(range(len(blocks)), blocks, fontsize=7)
    figure.colorbar(image, label="mean gate weight")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the colour bar's label whole
    plt.close(figure)
    return Image.open(buffer).copy()  # loaded: independent of the buffer


def summary_metrics(summary: list[dict]) -> list[str]:
    """The metric columns of a summary, in order of first appearance (not their interval columns)."""
    metrics = []
    for entry in summary:
        metrics += [k for k in entry if k not in ("method", "n", *metrics) and not k.endswith(("_ci95", "_low", "_high"))]
    return metrics


def format_cell(entry: dict, metric: str) -> str:
    """``0.1234 [0.1010, 0.1420]`` for a score, ``43.8% [31.2-57.1]`` for a rate, ``-`` when absent."""
    if metric not in entry:
        return "-"
    if is_rate(metric):
        return f"{100 * entry[metric]:.1f}% [{100 * entry[metric + '_low']:.1f}-{100 * entry[metric + '_high']:.1f}]"
    if metric + "_ci95" in entry:  # a summary.csv written before intervals accounted for prompts
        return f"{entry[metric]:.4f} ± {entry[metric + '_ci95']:.4f}"
    return f"{entry[metric]:.4f} [{entry[metric + '_low']:.4f}, {entry[metric + '_high']:.4f}]"


def format_difference(entry: dict) -> str:
    """A paired difference: ``+12.5 pts [3.1, 21.9] *`` for a rate, ``+0.0312 [0.0101, 0.0533] *`` for a score;
    ``*`` when the interval excludes 0."""
    scale, unit, digits = (100, " pts", 1) if is_rate(entry["metric"]) else (1, "", 4)
    mean, low, high = (scale * entry[k] for k in ("mean", "low", "high"))
    return f"{mean:+.{digits}f}{unit} [{low:.{digits}f}, {high:.{digits}f}]" + (" *" if entry["apart"] else "")


def _report(out: Path, rows: list[dict], summary: list[dict], paired: list[dict], prompts: list[str], seeds: list[int],
            names: list[str]) -> None:
    metrics = summary_metrics(summary)
    lines = [
        "# Evaluation report", "",
        f"Concepts: {', '.join(names)}. {len(prompts)} prompts x {len(seeds)} seeds per method, the same for every method.", "",
        "| method | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics),
    ]
    for s in summary:
        lines.append(f"| {s['method']} | {s['n']} | " + " | ".join(format_cell(s, m) for m in metrics) + " |")
    lines.append("")
    for metric in ("present_all", "clip_text", "clip_image_min", "dino_image_min"):
        if metric in metrics:
            best = max((s for s in summary if metric in s), key=lambda s: s[metric])
            if is_rate(metric) and best[metric] == 0:
                lines.append(f"- Highest {metric}: none (0% for every method).")
                continue
            # a higher mean is a claim only where the paired interval against each other method excludes 0
            mine = [r for r in rows if r["method"] == best["method"]]
            tied = [s["method"] for s in summary if s["method"] != best["method"] and metric in s
                    and not (paired_difference(mine, [r for r in rows if r["method"] == s["method"]], metric) or {"apart": True})["apart"]]
            verdict = f"not apart (paired) from {', '.join(tied)}" if tied else "apart (paired) from every other method"
            lines.append(f"- Highest {metric}: **{best['method']}** ({format_cell(best, metric)}); {verdict}.")
    headline = [m for m in metrics if is_rate(m) or m in ("clip_text", "clip_image_min", "dino_image_min")]
    if paired:
        reference = paired[0]["reference"]
        cells = {(e["method"], e["metric"]): format_difference(e) for e in paired}
        others = list(dict.fromkeys(e["method"] for e in paired))
        lines += ["", f"Paired against `{reference}`: {reference} minus each method on the same prompt and seed, with a "
                  "95% two-stage bootstrap interval over prompts and their seeds; `*`: the interval excludes 0.", "",
                  "| method | " + " | ".join(headline) + " |", "|---|" + "---|" * len(headline)]
        lines += [f"| {m} | " + " | ".join(cells.get((m, k), "-") for k in headline) + " |" for m in others]
        lines.append("")
    lines += [
        "- Scores: mean [95% interval], a two-stage bootstrap over prompts and their seeds (images of one prompt are "
        "not independent). `clip_image_min` is the weakest concept's alignment.",
        "- `present_<concept>`: share of images in which the presence judge sees that concept; `present_all`: every "
        "concept of the prompt; `present_active`: every concept the method did not mask (a single LoRA: its own); "
        "`present_prompt`: the image keeps the rest of its prompt (the attribute judge: the object's colour); "
        "`present_all_faithful`: every concept and the prompt kept (a judge fooled into reading concepts in a texture "
        "loses the colour). Rates in %, with Wilson 95% intervals in brackets.",
        "- `nla`, `set_adapters` and `peft_cat` compute the same weighted sum of deltas (exact); `sum` is the "
        "unnormalised sum; `peft_svd` truncates that sum to the largest rank; `peft_ties` / `peft_dare_linear` combine "
        "the LoRAs' A's and B's separately (cross terms), so they are not the weighted sum.",
        "- `mole_constant` is `mole` with each gate frozen to its mean weight over these prompts and fused (no gate "
        "cost); its distance from `mole` is what that costs.",
        "- CLIP scores correlate weakly with human judgement of multi-concept images (ComposLoRA): look at `grid.png`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


HEADLINE_WIDTH = 100  # characters: a terminal's line, where the report's whole table is twice as wide and more
# presence_row's columns that are not one concept's
PRESENCE_SUMMARIES = ("present_all", "present_active", "present_prompt", "present_all_faithful")


def read_summary(path: Path) -> list[dict]:
    """A ``summary.csv`` as ``summarise`` returned it: numbers as floats, absent cells left out."""
    with open(path, newline="") as handle:
        return [{k: v if k == "method" else float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def headline_table(summary: list[dict]) -> str:
    """What ``evaluate`` and ``demo`` print: a row per method, with what says most about composing, in
    ``HEADLINE_WIDTH`` characters for the demo world (the report keeps every column). With a presence judge: the
    share of images in which it saw every concept of the prompt (``all``, with its Wilson 95% interval) and each
    concept (headed by its name), then the CLIP text score; without one, the CLIP scores of the text and of the
    weakest concept's references (and DINO's). Scores with their 95% bootstrap interval."""
    metrics = summary_metrics(summary)
    concepts = [m.removeprefix("present_") for m in metrics if is_rate(m) and m not in PRESENCE_SUMMARIES]
    if any(is_rate(m) for m in metrics):
        columns = [("all", "present_all", _rate_with_interval), *((c, f"present_{c}", _rate) for c in concepts),
                   ("clip_text", "clip_text", _score)]
    else:
        columns = [(m, m, _score) for m in ("clip_text", "clip_image_min", "dino_image_min") if m in metrics]
    table = [["method", "n", *(header for header, _, _ in columns)]]
    table += [[s["method"], str(int(s["n"])), *(cell(s, metric) if metric in s else "-" for _, metric, cell in columns)]
              for s in summary]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(cells: list[str]) -> str:  # the method's name to the left, numbers to the right
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    lines = [line(table[0]), rule, *(line(row) for row in table[1:])]
    if concepts:
        lines += ["", *textwrap.wrap(f"all: % of images in which the presence judge sees every concept of the prompt "
                                     f"[95% interval]; {', '.join(concepts)}: % in which it sees that concept; "
                                     "clip_text: mean [95% interval]", HEADLINE_WIDTH)]
    return "\n".join(lines)


def _rate(entry: dict, metric: str) -> str:
    return f"{100 * entry[metric]:.0f}%"


def _rate_with_interval(entry: dict, metric: str) -> str:
    if metric + "_low" not in entry:
        return _rate(entry, metric)
    return f"{_rate(entry, metric)} [{100 * entry[metric + '_low']:.0f}-{100 * entry[metric + '_high']:.0f}]"


def _score(entry: dict, metric: str) -> str:
    if metric + "_low" in entry:
        return f"{entry[metric]:.3f} [{entry[metric + '_low']:.3f}, {entry[metric + '_high']:.3f}]"
    if metric + "_ci95" in entry:  # a summary.csv written before intervals accounted for prompts
        return f"{entry[metric]:.3f} ± {entry[metric + '_ci95']:.3f}"
    return f"{entry[metric]:.3f}"
