"""Intervals that account for how the images were drawn.

An evaluation draws every method on the same prompts x seeds. Images of one prompt are not independent (a
prompt the model cannot draw fails on every seed), so an interval over images as if they were independent is
too narrow, and two methods seen on the same images are compared best image by image:

- ``bootstrap_interval``: a two-stage (cluster) bootstrap, resampling prompts and then the seeds within each
  drawn prompt; the percentile interval of the mean. It is conservative (both stages add their variance).
- ``paired_difference``: method minus reference on the same (prompt, seed), with that bootstrap interval;
  ``apart`` when the interval excludes 0.
- ``wilson_interval``: a binomial rate's interval over images (good at 0 and 1, where the normal one collapses);
  ``format_rate`` writes a rate with it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (good at 0 and 1, where the normal one collapses)."""
    if n == 0:
        return 0.0, 1.0
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, n: int) -> str:
    """``43.8% [32.3-55.9]``: a rate of images with its Wilson 95% interval."""
    low, high = wilson_interval(successes, n)
    return f"{100 * successes / n:.1f}% [{100 * low:.1f}-{100 * high:.1f}]"


def bootstrap_interval(groups: list[list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of all values, resampling groups (prompts) and then the values
    (seeds) within each drawn group. Deterministic for a given seed."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    # per group and bootstrap sample: the sum of its values resampled with replacement
    sums = np.stack([g[rng.integers(len(g), size=(samples, len(g)))].sum(axis=1) for g in groups], axis=1)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    drawn = rng.integers(len(groups), size=(samples, len(groups)))  # which groups each bootstrap sample holds
    means = np.take_along_axis(sums, drawn, axis=1).sum(axis=1) / sizes[drawn].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def by_prompt(rows: list[dict], metric: str) -> dict[int, dict[int, float]]:
    """{prompt index: {seed: value}} of one method's rows."""
    table: dict[int, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if metric in row:
            table[row["prompt_index"]][row["seed"]] = float(row[metric])
    return table


def paired_difference(rows: list[dict], reference: list[dict], metric: str) -> dict | None:
    """Mean of (method - reference) over the (prompt, seed) pairs both have, with its two-stage bootstrap
    interval; ``apart`` when the interval excludes 0. None when they share no image with this metric."""
    mine, theirs = by_prompt(rows, metric), by_prompt(reference, metric)
    groups = [[mine[p][s] - theirs[p][s] for s in sorted(mine[p]) if s in theirs[p]] for p in sorted(mine) if p in theirs]
    groups = [g for g in groups if g]
    if not groups:
        return None
    n = sum(len(g) for g in groups)
    mean = sum(sum(g) for g in groups) / n
    low, high = bootstrap_interval(groups)
    return {"mean": mean, "low": low, "high": high, "n": n, "apart": low > 0 or high < 0}
