"""Learned gates frozen into constant per-block weights: for set_experts, for fusing, and for diffusers."""

import pytest
import torch
from conftest import generate, randomise_gates, unet_output

from mole_diffusion import block_weights_to_diffusers


@pytest.fixture
def gated(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    return mole_pipe


def test_export_is_the_mean_gate_weight_over_prompts_and_steps(gated):
    prompts = ["a red circle", "a blue square"]
    torch.manual_seed(0)  # the pipeline's latents
    exported = gated.export_block_weights(prompts, num_inference_steps=3, height=32, width=32)
    assert set(exported) == set(gated.mole.gates)
    histories = []
    torch.manual_seed(0)
    for prompt in prompts:
        gated(prompt, num_inference_steps=3, height=32, width=32)
        histories.append(gated.gate_weights["unet.mid_block.attentions.0"].mean(dim=(0, 1)))
    torch.testing.assert_close(torch.tensor(exported["unet.mid_block.attentions.0"]), (histories[0] + histories[1]) / 2)
    assert all(sum(w) == pytest.approx(1.0, abs=1e-5) for w in exported.values())
    assert len({tuple(round(x, 4) for x in w) for w in exported.values()}) > 1  # the blocks differ


def test_per_block_weights_equal_diffusers_set_adapters_per_block(world, gated, ref_pipe):
    exported = gated.export_block_weights(["a red circle"], num_inference_steps=3, height=32, width=32)
    gated.set_experts(weights=exported)
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    adapter_weights = block_weights_to_diffusers(exported, ["a", "b"])
    assert set(adapter_weights[0]["unet"]) == {"down", "mid", "up"}
    ref_pipe.set_adapters(["a", "b"], adapter_weights)
    torch.testing.assert_close(unet_output(gated), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    # fused per-block weights compute the same as unfused ones
    unfused = generate(gated)
    gated.fuse_experts()
    torch.testing.assert_close(torch.from_numpy(generate(gated)), torch.from_numpy(unfused), rtol=1e-4, atol=1e-4)
    # switching or masking experts that are fused into the weights is refused, saying how to go on
    for switch in (lambda: gated.set_experts(["a"]), lambda: gated.mole.mask_experts(["a"])):
        with pytest.raises(RuntimeError, match=r"^experts are fused into the base weights: call unfuse_experts\(\) first$"):
            switch()
    gated.unfuse_experts()


def test_per_block_weights_follow_masking_and_are_checked(gated):
    exported = gated.export_block_weights(["a red circle"], num_inference_steps=2, height=32, width=32)
    gated.set_experts(["a"], exported)
    for name, gate in gated.mole.gates.items():
        assert gate.constant.tolist() == [[pytest.approx(exported[name][0]), 0.0]]
    with pytest.raises(ValueError, match="must name every gate"):
        gated.set_experts(weights={"unet.mid_block.attentions.0": [0.5, 0.5]})
    # the message names the first three gates missing and the first three unknown, sorted
    unknown = {f"unet.nowhere.{i}": [0.5, 0.5] for i in range(5)}
    with pytest.raises(ValueError) as refused:
        gated.set_experts(weights={**unknown, **{name: exported[name] for name in sorted(exported)[3:]}})
    assert str(refused.value).endswith(f"missing {sorted(exported)[:3]}, unknown {sorted(unknown)[:3]}")
    with pytest.raises(ValueError) as refused:
        gated.set_experts(weights={name: exported[name] for name in sorted(exported)[4:]})
    assert str(refused.value).endswith(f"missing {sorted(exported)[:3]}, unknown []")
    with pytest.raises(ValueError, match="expected 2 numbers"):
        gated.set_experts(weights={name: [1.0] for name in exported})
    gated.set_experts()
    with pytest.raises(RuntimeError, match="reads the learned gates"):
        gated.set_experts(weights=[0.5, 0.5])
        gated.export_block_weights(["x"])


def test_block_weights_map_to_diffusers_places_and_the_text_encoder_takes_the_mean():
    """The conversion in closed form: each transformer block's weight at its place in diffusers' nested dict
    (layers in order), the text encoder's one scalar the mean of its layers' weights, any other gate refused."""
    weights = {"unet.down_blocks.1.attentions.1": [0.1, 0.9], "unet.down_blocks.1.attentions.0": [0.2, 0.8],
               "unet.mid_block.attentions.0": [0.3, 0.7], "unet.up_blocks.2.attentions.0": [0.4, 0.6],
               "text_encoder.text_model.encoder.layers.0": [0.5, 0.5],
               "text_encoder.text_model.encoder.layers.1": [0.7, 0.3]}
    a, b = block_weights_to_diffusers(weights, ["a", "b"])
    assert a == {"unet": {"down": {"block_1": [0.2, 0.1]}, "mid": 0.3, "up": {"block_2": [0.4]}},
                 "text_encoder": pytest.approx(0.6)}
    assert b["unet"] == {"down": {"block_1": [0.8, 0.9]}, "mid": 0.7, "up": {"block_2": [0.6]}}
    assert b["text_encoder"] == pytest.approx(0.4)
    assert "text_encoder" not in block_weights_to_diffusers({"unet.mid_block.attentions.0": [1.0]}, ["a"])[0]
    for gate in ("unet.down_blocks.0.resnets.0", "unet.down_blocks.0.attentions.0.transformer_blocks.0"):
        with pytest.raises(ValueError) as refused:
            block_weights_to_diffusers({gate: [0.5, 0.5]}, ["a", "b"])
        assert str(refused.value) == (f"gate {gate} has no place in diffusers' per-block weights (block granularity, "
                                      "transformer blocks only)")
