"""experiments.relative_masks: masks by comparing the mean-normalised maps, and the run on the shipped world."""

import torch

from experiments import relative_masks


def test_a_flat_map_wins_where_the_peaked_ones_are_low_and_an_unnamed_expert_nowhere():
    peaked = torch.full((4, 4), 0.5)
    peaked[1:3, 1:3] = 2.0  # an object in the middle
    flat = torch.ones(4, 4)
    maps = torch.stack([peaked, peaked * 0.9, flat, flat])[None]  # (1, 4 experts, 4, 4)
    named = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    masks = relative_masks.masks_within_margin(maps, named, margin=0.2)
    middle = torch.zeros(4, 4, dtype=torch.bool)
    middle[1:3, 1:3] = True
    relative_peaked = 2.0 / peaked.mean()  # about 1.6 in the middle, 0.4 around it; the flat map 1 everywhere
    assert relative_peaked > 1.2
    assert torch.equal(masks[0, 0].bool(), middle) and torch.equal(masks[0, 1].bool(), middle)  # both object experts
    assert torch.equal(masks[0, 2].bool(), ~middle)  # the background expert off the object
    assert not masks[0, 3].any()  # not named: nowhere
    assert bool((relative_masks.masks_within_margin(maps, named, margin=10.0)[0, :3] == 1).all())  # the plain sum


def test_the_run_on_the_shipped_world_prints_a_row_per_margin(tmp_path, capsys):
    relative_masks.main(["--margins", "10", "0.1", "--seeds", "1", "--steps", "2", "--out", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "margin" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 10", "| 0.1"]
    assert len(list((tmp_path / "m0.1").glob("*.png"))) == 4
