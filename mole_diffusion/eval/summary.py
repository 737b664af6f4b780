"""What an evaluation's rows add up to, per method: means with 95% intervals (``summarise``), and each method
against a reference on the same images (``paired_table``). The interval arithmetic is ``stats``'."""

from __future__ import annotations

from .rows import ID_COLUMNS
from .stats import bootstrap_interval, by_prompt, paired_difference, wilson_interval


def is_rate(metric: str) -> bool:
    """0/1 metrics (a concept seen or not), summarised as rates with Wilson intervals."""
    return metric.startswith("present_")


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean and 95% interval (``<metric>_low``, ``<metric>_high``) per method and metric: for presence rates the
    Wilson interval over images, for scores a two-stage bootstrap over prompts and their seeds (images of one
    prompt are not independent draws)."""
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in ID_COLUMNS))  # not every method has every metric
    summary = []
    for method in methods:
        values = [r for r in rows if r["method"] == method]
        entry = {"method": method, "n": len(values)}
        for metric in metrics:
            xs = [r[metric] for r in values if metric in r]
            if not xs:  # e.g. no image alignment for a method without reference images
                continue
            entry[metric] = sum(xs) / len(xs)
            if is_rate(metric):
                entry[f"{metric}_low"], entry[f"{metric}_high"] = wilson_interval(sum(xs), len(xs))
            else:
                groups = [list(seeds.values()) for seeds in by_prompt(values, metric).values()]
                entry[f"{metric}_low"], entry[f"{metric}_high"] = bootstrap_interval(groups)
        summary.append(entry)
    return summary


def paired_reference(methods: list[str]) -> str:
    """The method the others are compared with, image by image: MoLE where it ran, else the first method."""
    return "mole" if "mole" in methods else methods[0]


def paired_table(rows: list[dict], methods: list[str], reference: str) -> list[dict]:
    """Per method and metric, reference minus method on the same (prompt, seed), with a two-stage bootstrap
    interval over prompts and seeds; ``apart``: the interval excludes 0."""
    mine = [r for r in rows if r["method"] == reference]
    metrics = list(dict.fromkeys(k for r in mine for k in r if k not in ID_COLUMNS))
    table = []
    for method in methods:
        if method == reference:
            continue
        theirs = [r for r in rows if r["method"] == method]
        for metric in metrics:
            difference = paired_difference(mine, theirs, metric)
            if difference is not None:
                table.append({"reference": reference, "method": method, "metric": metric, **difference})
    return table
