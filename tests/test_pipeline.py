"""Pipeline API: masking, unloading, components, gate weights of the last call, schedulers, CFG."""

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from PIL import Image

from conftest import generate, randomise_gates, unet_output
from mole_diffusion import MoLELayer, MoLEStableDiffusionPipeline




def test_masking_every_expert_raises(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    with pytest.raises(ValueError, match="masking every expert"):
        mole_pipe.set_experts([])
    with pytest.raises(ValueError, match="unknown expert"):
        mole_pipe.set_experts(["nope"])


def test_per_call_masking_equals_set_experts_and_is_undone(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]})
    randomise_gates(mole_pipe)
    full = generate(mole_pipe)
    per_call = generate(mole_pipe, experts=["a", "c"])
    mole_pipe.set_experts(["a", "c"])
    np.testing.assert_allclose(per_call, generate(mole_pipe), atol=1e-6)
    assert np.abs(per_call - full).max() > 1e-3
    mole_pipe.set_experts()
    np.testing.assert_allclose(generate(mole_pipe), full, atol=1e-6)
    # the recorded weights of a masked call put nothing on the masked expert and renormalise the rest
    generate(mole_pipe, experts=["a", "c"])
    for weights in mole_pipe.gate_weights.values():
        assert (weights[..., 1] == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_gate_weights_of_last_call_per_step(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    generate(mole_pipe, num_inference_steps=4, num_images_per_prompt=2)
    weights = mole_pipe.gate_weights
    assert set(weights) == set(mole_pipe.mole.gates)
    unet_gate = weights["unet.down_blocks.0.attentions.0"]
    assert unet_gate.shape == (4, 4, 2)  # steps, CFG batch (2 unconditional + 2 conditional), experts
    assert not torch.allclose(unet_gate[0], unet_gate[-1])  # gates depend on the denoising state
    assert weights["text_encoder.encoder.layers.0"].shape[-1] == 2


def test_unload_restores_original_modules_bit_for_bit(world, mole_pipe):
    originals = {n: m for n, m in mole_pipe.unet.named_modules()}
    state = {k: v.clone() for k, v in {**mole_pipe.unet.state_dict(), **mole_pipe.text_encoder.state_dict()}.items()}
    before = unet_output(mole_pipe)
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    mole_pipe.set_experts(["a", "c"], [0.6, 0.9])
    mole_pipe.fuse_experts()
    mole_pipe.unload_experts()
    assert not any(isinstance(m, MoLELayer) or hasattr(m, "mole_gate") for m in mole_pipe.unet.modules())
    assert {n: m for n, m in mole_pipe.unet.named_modules()} == originals
    after = {**mole_pipe.unet.state_dict(), **mole_pipe.text_encoder.state_dict()}
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(unet_output(mole_pipe), before)
    assert mole_pipe.expert_names == []


def test_fusing_needs_constant_weights_and_blocks_switching(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    with pytest.raises(RuntimeError, match="constant weights"):
        mole_pipe.fuse_experts()
    mole_pipe.set_experts(["a", "b"], [0.5, 0.5])
    mole_pipe.fuse_experts()
    with pytest.raises(RuntimeError, match="unfuse"):
        mole_pipe.set_experts(["a"])
    mole_pipe.unfuse_experts()
    mole_pipe.set_experts(["a"])


def test_constant_weights_per_call_mask_zeroes_the_masked_expert(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.set_experts(["a", "b"], [0.7, 0.3])
    masked = generate(mole_pipe, experts=["a"])
    mole_pipe.set_experts(["a"], [0.7])
    np.testing.assert_allclose(masked, generate(mole_pipe), atol=1e-6)


def test_pipeline_from_components_shares_experts(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    twin = MoLEStableDiffusionPipeline(**mole_pipe.components)
    twin.set_progress_bar_config(disable=True)
    assert twin.expert_names == ["a", "b"]
    np.testing.assert_allclose(generate(twin, experts=["b"]), generate(mole_pipe, experts=["b"]), atol=1e-6)


def test_scheduler_negative_prompt_and_pil_output(world, mole_pipe):
    mole_pipe.load_experts([world["a"], world["b"]])
    assert mole_pipe.expert_names == ["a", "b"]
    mole_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(mole_pipe.scheduler.config)
    images = generate(mole_pipe, negative_prompt="blurry", output_type="pil", guidance_scale=5.0)
    assert isinstance(images[0], Image.Image) and images[0].size == (32, 32)
    a = generate(mole_pipe, negative_prompt="blurry")
    assert np.abs(a - generate(mole_pipe, negative_prompt="a green square")).max() > 1e-4


def test_loading_twice_needs_unload(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"]})
    with pytest.raises(RuntimeError, match="unload_experts"):
        mole_pipe.load_experts({"b": world["b"]})
