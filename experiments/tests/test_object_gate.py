"""experiments.object_gate: the checker's row of a block's gates fitted to where the object is."""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from experiments import object_gate
from experiments.object_gate import band_weights, composition_caption, disc_mask, fit_row, gate_examples, row_weights
from experiments.region_gates import object_mask, region_pipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.gates import Gate


def test_the_disc_holds_the_shape_with_its_notches_and_the_caption_names_all_three():
    star = world.Scene("star", "red", "grid", "large", (0.45, 0.55), style="dotted")
    shape, disc = object_mask(star), disc_mask(star)
    assert float((shape * (1 - disc)).sum()) <= 8  # the star's points reach the disc's rim, a few pixels of rounding
    assert float(disc.sum()) > 1.8 * float(shape.sum())  # the notches between the points count too
    assert composition_caption(star) == "a red sks in zwx style on a qkx background"


def test_fitting_one_row_moves_only_that_row():
    torch.manual_seed(0)
    gate = Gate(3, 8, torch.ones(3), activation="softplus", per_position=True, timestep_knots=3)
    ground_direction, object_direction = F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(8), dim=0)
    is_ground = torch.rand(400) < 0.6
    features = F.normalize(torch.where(is_ground[:, None], ground_direction, object_direction) + 0.1 * torch.randn(400, 8), dim=1)
    levels, ground = torch.rand(400), is_ground.float()
    before = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    error = fit_row(gate, 2, features, levels, ground)
    weights = row_weights(gate, 2, features, levels)
    assert error < 0.02 and float(weights[is_ground].min()) > 0.7 and float(weights[~is_ground].max()) < 0.3
    for key in ("weight", "bias", "timestep_logits"):
        assert torch.equal(gate.state_dict()[key][:2], before[key][:2])  # the other experts stay at weight 1
    assert torch.equal(gate.log_temperature, before["log_temperature"])


def test_each_band_averages_its_object_and_ground_cells_and_an_empty_band_says_so():
    weights, levels, ground = torch.tensor([0.1, 0.3, 0.9, 0.5, 1.0]), torch.tensor([0.1, 0.2, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 0.5, 1])
    assert band_weights(weights, levels, ground) == ["0.20 / 0.90", "- / -", "- / 1.00"]  # the half-ground cell in neither


def test_examples_are_each_position_of_the_gates_input_with_its_ground_share():
    pipe = region_pipeline(ASSETS, timestep_knots=2)
    name = "unet.up_blocks.1.attentions.0"
    scenes = [world.Scene("star", "red", "grid", "large", (0.4, 0.5)), world.Scene("circle", "blue", "checker", "small", (0.7, 0.3))]
    latents = torch.randn(2, 4, 16, 16)
    masks = torch.stack([object_mask(s) for s in scenes])
    features, levels, ground, image = gate_examples(pipe, [name], latents, [composition_caption(s) for s in scenes], masks,
                                                    draws=2, batch_size=2)[name]
    assert features.shape == (2 * 2 * 64, pipe.mole.gates[name].weight.shape[1])  # 2 images x 2 draws x the 8x8 grid
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features)), atol=1e-5)
    assert image.tolist() == [0] * 64 + [1] * 64 + [0] * 64 + [1] * 64
    for i in range(2):  # the area shares on the grid keep each image's background area
        assert abs(float(ground[image == i].mean()) - float(1 - masks[i].mean())) < 1e-5
    assert float(levels.min()) >= 0 and float(levels.max()) < 1
    assert "position_map" not in vars(pipe.mole.gates[name])  # the recording is taken off again


def test_the_file_changes_the_checkers_rows_in_the_fitted_gates_only(tmp_path, capsys):
    object_gate.main(["--out", str(tmp_path), "--draws", "1", "--references", "8", "--groups", "unet.up_blocks.1.resnets.1",
                      "--knots", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| unet.")]
    assert [row.split(" | ")[0] for row in rows] == ["| unet.up_blocks.1.resnets.1"]
    tensors = load_file(tmp_path / "gates.safetensors")
    fitted = tensors["unet.up_blocks.1.resnets.1.weight"]
    assert fitted[2].abs().sum() > 0 and fitted[:2].abs().sum() == 0
    assert all(float(tensors[key].abs().sum()) == 0 for key in tensors
               if key.endswith(".weight") and key != "unet.up_blocks.1.resnets.1.weight")
