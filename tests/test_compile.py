"""torch.compile traces a MoLE UNet as one graph (no breaks from gate code) and matches eager."""

import torch

from conftest import unet_output
from test_pipeline import randomise_gates


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
