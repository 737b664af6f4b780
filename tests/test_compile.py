"""torch.compile traces a MoLE UNet as one graph (no breaks from gate code) and matches eager."""

import pytest
import torch

from conftest import randomise_gates, unet_output


def test_mole_unet_compiles_fullgraph_and_matches_eager(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    randomise_gates(mole_pipe)
    eager = unet_output(mole_pipe)
    mole_pipe.unet = torch.compile(mole_pipe.unet, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    torch.testing.assert_close(unet_output(mole_pipe), eager, rtol=1e-5, atol=1e-5)
    mole_pipe.unet._orig_mod.__dict__["_mole"].set_experts(["a", "c"], [0.5, 0.5])  # constant weights: retraced
    compiled_constant = unet_output(mole_pipe)
    torch._dynamo.reset()
    mole_pipe.unet = mole_pipe.unet._orig_mod
    torch.testing.assert_close(compiled_constant, unet_output(mole_pipe), rtol=1e-5, atol=1e-5)
    assert (compiled_constant - eager).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mole_matches_diffusers_in_the_same_dtype(world, mole_pipe, ref_pipe, dtype):
    """fp16/bf16 weights: expert factors follow the model's dtype, gates compute in fp32; the result stays
    as close to diffusers' set_adapters in that dtype as half precision allows."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    ref_pipe.set_adapters(["a", "b"], [0.5, 0.5])
    full = unet_output(mole_pipe)
    mole_pipe.unet.to(dtype)
    ref_pipe.unet.to(dtype)
    assert all(layer.lora_A.dtype == dtype for name, layer in mole_pipe.mole.layers.items() if name.startswith("unet."))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    text = torch.randn(2, 77, 32, generator=g).to(dtype)
    with torch.no_grad():
        half = mole_pipe.unet(sample, torch.tensor([500, 500]), encoder_hidden_states=text).sample
        reference = ref_pipe.unet(sample, torch.tensor([500, 500]), encoder_hidden_states=text).sample
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert mole_pipe.mole.gates["unet.mid_block.attentions.0"].weights.dtype == torch.float32
    scale = full.abs().max()
    assert (half.float() - reference.float()).abs().max() < 2e-2 * scale
    assert (half.float() - full).abs().max() < 5e-2 * scale
