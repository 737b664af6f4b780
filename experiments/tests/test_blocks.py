"""experiments.blocks: one LoRA turned down block group by block group, and the run on the shipped world."""

import pytest

from experiments import blocks


def test_only_the_expert_in_the_groups_gates_changes():
    gates = ["text_encoder.encoder.layers.0", "unet.up_blocks.1.attentions.0", "unet.up_blocks.10.resnets.0",
             "unet.up_blocks.1.resnets.1"]
    weights = blocks.group_weights(gates, expert=2, group="unet.up_blocks.1.", weight=0.0, experts=3)
    assert weights == {"text_encoder.encoder.layers.0": [1.0, 1.0, 1.0], "unet.up_blocks.1.attentions.0": [1.0, 1.0, 0.0],
                       "unet.up_blocks.10.resnets.0": [1.0, 1.0, 1.0], "unet.up_blocks.1.resnets.1": [1.0, 1.0, 0.0]}
    assert all(w == [1.0, 1.0, 1.0] for w in blocks.group_weights(gates, 2, None, 0.0, 3).values())  # the plain sum


def test_a_row_per_group_and_the_sum_first(tmp_path, capsys):
    blocks.main(["--out", str(tmp_path), "--groups", "unet.mid_block", "text_encoder", "--seeds", "1", "--steps", "2",
                 "--colours", "red", "blue"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " at 0 in " not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| nowhere (the plain sum)", "| unet.mid_block", "| text_encoder"]
    assert rows[1].split(" | ")[1] == "3"  # the shipped UNet's middle block: one attention, two resnets
    assert len(list((tmp_path / "unet_mid_block").glob("*.png"))) == 2


def test_a_group_no_gate_is_in_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        blocks.main(["--out", str(tmp_path), "--groups", "unet.nowhere", "--seeds", "1", "--steps", "1", "--colours", "red"])
