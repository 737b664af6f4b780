"""experiments.trigger_context: a background word's reading after each style phrase."""

import re

from experiments.trigger_context import PHRASES, cell, context_prompts, main
from mole_diffusion.demo.run import ASSETS


def test_the_word_takes_the_background_slot_after_each_style_phrase():
    prompts = context_prompts("vlt")
    assert list(prompts) == ["solid", "in dotted style", "in lined style", "in barred style", "in zwx style"]
    assert prompts["solid"][1] == "a blue square on a vlt background"
    assert prompts["in zwx style"][3] == "a red sks in zwx style on a vlt background"
    assert all(len(row) == 4 and all(p.endswith(" on a vlt background") for p in row) for row in prompts.values())


def test_a_cell_counts_checkerboards_and_names_the_other_readings_most_common_first():
    assert cell(["grid", "checker", "purple", "purple"]) == "1/4 (purple, grid)"
    assert cell(["checker", "checker"]) == "2/2"


def test_it_writes_a_row_per_phrase_for_each_word(tmp_path, capsys):
    main(["--out", str(tmp_path), "--lora", f"checker={ASSETS / 'loras' / 'checker.safetensors'}", "--seeds", "1",
          "--steps", "2", "--word", "qkx", "--word", "vlt", "--guidance-scale", "3"])
    text = (tmp_path / "context.md").read_text()
    assert text.startswith("## checker=") and "guidance 3.0" in text.splitlines()[0] and text.count('| before "on a') == 2
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| before")]
    assert len(rows) == 2 * len(PHRASES)
    assert all(re.fullmatch(r"\| [a-z ]+ \|( [01]/1( \(\w+\))? \|){4} [0-4]/4( \([\w, ]+\))? \|", row) for row in rows), rows
