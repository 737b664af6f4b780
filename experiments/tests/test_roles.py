"""experiments.roles: regional strengths learned per LoRA, and the background pass's checker strength."""

import math

import pytest
import torch

from experiments.roles import learn_background_strength, learn_region_strengths, region_masks, sampler_specs
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.clip import load_clip


def test_region_masks_put_one_expert_at_its_two_strengths():
    """experiments.roles: expert k at its object strength on the object, its background strength elsewhere, the rest 0."""
    obj = torch.zeros(2, 4, 4)
    obj[0, 1:3, 1:3] = 1.0
    masks = region_masks(torch.tensor([2.0, 0.5]), obj, expert=1, experts=3)
    assert masks.shape == (2, 3, 4, 4)
    assert torch.equal(masks[:, 1], 2.0 * obj + 0.5 * (1 - obj))
    assert masks[:, [0, 2]].abs().sum() == 0
    assert sampler_specs(torch.tensor([[1.0, 0.9], [1.1, 0.2], [0.3, 2.0]])) == [
        "learned:split:4:1.00,1.10,2.00:inpaint-inside:1", "learned_plain:split:0:1.00,1.10,2.00:inpaint:0"]
    assert sampler_specs(torch.tensor([[0.9, 1.0], [1.1, 0.2], [0.3, 2.0]])) == []  # the star learned the background


def test_region_strengths_learn_and_nothing_else_moves(shipped_pipe):
    """experiments.roles: a few steps move the six strengths from 1 (softplus of the start); the UNet, the text encoder and
    the LoRAs stay bit for bit, and regional routing is off again afterwards."""
    frozen = {k: v.clone() for k, v in shipped_pipe.unet.state_dict().items()}
    frozen_text = {k: v.clone() for k, v in shipped_pipe.text_encoder.state_dict().items()}
    lora = next(iter(shipped_pipe.mole.layers.values())).lora_B.clone()
    strengths = learn_region_strengths(shipped_pipe, ASSETS / "concepts.toml", steps=3, batch_size=2)
    assert strengths.shape == (3, 2) and (strengths > 0).all()
    assert not torch.allclose(strengths, torch.ones(3, 2))
    assert all(torch.equal(v, frozen[k]) for k, v in shipped_pipe.unet.state_dict().items())
    assert all(torch.equal(v, frozen_text[k]) for k, v in shipped_pipe.text_encoder.state_dict().items())
    assert torch.equal(next(iter(shipped_pipe.mole.layers.values())).lora_B, lora)
    assert shipped_pipe.mole.regional is None


def test_the_background_strength_learns_through_the_held_object_and_nothing_else_moves(shipped_pipe):
    """experiments.roles: the checker's strength in the layout sampler's background pass moves from 1 under a CLIP's
    composition loss (the evaluator's CLIP here: the machinery only); the models stay, routing is off afterwards."""
    frozen = {k: v.clone() for k, v in shipped_pipe.unet.state_dict().items()}
    strength, losses = learn_background_strength(shipped_pipe, load_clip(f"local-dir:{ASSETS / 'clip'}"), ASSETS / "concepts.toml",
                                                 steps=2, seeds=1, sampling_steps=2)
    assert strength != pytest.approx(1.0, abs=1e-4) and strength > 0
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(v, frozen[k]) for k, v in shipped_pipe.unet.state_dict().items())
    assert shipped_pipe.mole.regional is None and shipped_pipe.mole.constant_weights is None
