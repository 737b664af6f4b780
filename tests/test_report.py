"""What ``evaluate`` and ``demo`` print: the headline table, a row per method, within a terminal's 100 columns on the
shipped demo world, its cells the summary's own numbers."""

import random

from mole_diffusion.demo.run import demo_methods
from mole_diffusion.demo.world import CONCEPTS
from mole_diffusion.eval.report import headline_table
from mole_diffusion.eval.stats import wilson_interval
from mole_diffusion.eval.summary import summarise

TERMINAL = 100


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def widest_entry(method: str, n: int) -> dict:
    """A summary entry whose every cell is as wide as it gets: rates of 100% [51-100], a score whose mean and
    bounds are all negative."""
    entry = {"method": method, "n": n, "clip_text": -0.1234, "clip_text_low": -0.4567, "clip_text_high": -0.0123,
             "clip_image_min": -0.1234, "clip_image_min_low": -0.4567, "clip_image_min_high": -0.0123}
    for metric in (*(f"present_{c}" for c in CONCEPTS), "present_prompt", "present_all", "present_all_faithful", "present_active"):
        entry.update({metric: 1.0, f"{metric}_low": 0.51, f"{metric}_high": 1.0})
    return entry


def test_the_demo_headline_fits_a_terminal_at_its_widest():
    """Every method of the demo on the shipped world's concepts, 400 images each (100 seeds), every cell at its widest."""
    table = headline_table([widest_entry(m, 400) for m in demo_methods()])
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= TERMINAL, table
    assert cells(lines[0]) == ["method", "n", "all", *CONCEPTS, "clip_text"]
    assert [cells(line)[0] for line in lines[2:2 + len(demo_methods())]] == demo_methods()
    assert cells(lines[2])[2:] == ["100% [51-100]", "100%", "100%", "100%", "-0.123 [-0.457, -0.012]"]


def test_the_headline_cells_are_the_summarys_numbers():
    """Rates as whole percents (present_all with its Wilson interval), the CLIP text score with its bootstrap interval,
    from summarise's own numbers; a concept a method was not judged on is '-'."""
    rng = random.Random(0)
    seen_all = [1, 0, 0, 1, 0, 0, 0, 1]  # 3 of 8
    rows = [{"method": "mole", "prompt_index": i // 4, "prompt": "p", "seed": i % 4, "image": "x", "present_all": float(v),
             "present_star": 1.0, "present_stripes": float(i % 2), "present_prompt": 1.0, "clip_text": rng.uniform(-1, 1)}
            for i, v in enumerate(seen_all)]
    rows += [{k: v for k, v in {**r, "method": "nla", "present_all": 0.0}.items() if k != "present_stripes"} for r in rows]
    summary = summarise(rows, ["mole", "nla"])
    lines = headline_table(summary).splitlines()
    assert cells(lines[0]) == ["method", "n", "all", "star", "stripes", "clip_text"]  # not present_prompt: not a concept
    low, high = wilson_interval(3, 8)
    mole = summary[0]
    clip = f"{mole['clip_text']:.3f} [{mole['clip_text_low']:.3f}, {mole['clip_text_high']:.3f}]"
    assert cells(lines[2]) == ["mole", "8", f"{100 * 3 / 8:.0f}% [{100 * low:.0f}-{100 * high:.0f}]", "100%", "50%", clip]
    assert cells(lines[3])[2:5] == [f"0% [0-{100 * wilson_interval(0, 8)[1]:.0f}]", "100%", "-"]
    assert "star, stripes: % in which it sees that concept" in " ".join(lines[5:])


def test_without_a_presence_judge_the_headline_shows_the_clip_scores():
    entry = {"method": "nla", "n": 2, "clip_text": 0.25, "clip_text_low": 0.2, "clip_text_high": 0.3, "clip_score_2.5": 0.6,
             "clip_image_a": 0.5, "clip_image_min": 0.5, "clip_image_min_low": 0.4, "clip_image_min_high": 0.6}
    lines = headline_table([entry, {**entry, "method": "set_adapters", "dino_image_min": 0.125}]).splitlines()
    assert cells(lines[0]) == ["method", "n", "clip_text", "clip_image_min", "dino_image_min"]
    assert cells(lines[2]) == ["nla", "2", "0.250 [0.200, 0.300]", "0.500 [0.400, 0.600]", "-"]
    assert cells(lines[3])[-1] == "0.125"  # no interval in the summary: the mean alone
    assert lines[1].startswith("|--") and len(lines) == 4  # no presence legend
