"""Gate math (docs/method.md) and the concatenated low-rank product (the gated layer)."""

import pytest
import torch
from torch import nn

from mole_diffusion import Gate, MoLELayer
from mole_diffusion.gates import token_mean_direction


def random_gate(n=3, c=16, seed=0):
    gate = Gate(n, c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(n, c, generator=g))
        gate.bias.copy_(torch.randn(n, generator=g))
        gate.log_temperature.fill_(0.3)
    return gate


def test_untrained_gate_returns_prior_for_any_input():
    prior = torch.tensor([0.2, 0.5, 0.3])
    gate = Gate(3, 16, prior)
    for shape in [(2, 77, 16), (2, 16, 8, 8), (2, 16, 32, 32), (2, 16)]:
        out = gate(torch.randn(shape))
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, prior.expand(2, 3))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "softplus"])
def test_a_gate_without_a_prior_starts_uniform(activation):
    """No prior: every expert at 1/N, whatever the activation."""
    out = Gate(4, 16, activation=activation)(torch.randn(2, 16, 8, 8))
    torch.testing.assert_close(out, torch.full((2, 4), 0.25))


def test_a_gates_state_holds_its_parameters_alone():
    """The mask and the constant weights are settings of the pipeline, not trained state: gate files and the
    models' state dicts carry the parameters alone."""
    gate = Gate(3, 8, timestep_knots=2)
    assert gate.state_dict().keys() == dict(gate.named_parameters()).keys()


def test_timestep_knots_are_made_on_the_gates_device():
    gate = Gate(2, 4).to("meta")  # a device other than the CPU, on any machine
    gate.set_timestep_knots(3)
    assert gate.timestep_logits.device.type == "meta" and gate.timestep_logits.shape == (2, 3)


def test_gate_input_is_mean_token_direction_and_resolution_independent():
    h = torch.randn(2, 16, 8, 8)
    expected = (h / h.norm(dim=1, keepdim=True)).mean(dim=(2, 3))
    torch.testing.assert_close(token_mean_direction(h), expected)
    # the same feature map upsampled (each token repeated) gives the same gate input
    torch.testing.assert_close(token_mean_direction(h.repeat_interleave(2, 2).repeat_interleave(2, 3)), expected)
    tokens = h.flatten(2).transpose(1, 2)  # (B, L, C) layout of the same tokens
    torch.testing.assert_close(token_mean_direction(tokens), expected)


def test_temperature_scales_logits():
    gate = random_gate()
    f = torch.randn(4, 16)
    logits = nn.functional.normalize(f, dim=-1) @ gate.weight.T + gate.bias
    torch.testing.assert_close(gate(f), torch.softmax(logits / gate.log_temperature.exp(), -1))


def test_masking_renormalises_proportionally():
    gate = random_gate()
    h = torch.randn(4, 10, 16)
    full = gate(h)
    gate.mask.copy_(torch.tensor([True, False, True]))
    masked = gate(h)
    m = gate.mask.float()
    torch.testing.assert_close(masked, full * m / (full * m).sum(-1, keepdim=True))
    assert (masked[:, 1] == 0).all()


def per_expert_reference(x, base, experts, g):
    """y = base(x) + sum_i G_i s_i B_i A_i x, one expert at a time."""
    y = base(x)
    for i, (down, up, scale) in enumerate(experts):
        if isinstance(base, nn.Conv2d):
            u = nn.functional.conv2d(x, down, None, base.stride, base.padding)
            delta = nn.functional.conv2d(u, up)
            y = y + g[:, i, None, None, None] * scale * delta
        else:
            y = y + g[:, i, None, None] * scale * (x @ down.T @ up.T)
    return y


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_concatenated_product_equals_per_expert_sum(kind):
    torch.manual_seed(0)
    ranks, scales = [4, 2, 3], [0.5, 2.0, 1.0]
    if kind == "linear":
        base, x = nn.Linear(16, 24), torch.randn(3, 10, 16)
        experts = [(torch.randn(r, 16), torch.randn(24, r), s) for r, s in zip(ranks, scales)]
    else:
        base, x = nn.Conv2d(8, 12, 3, padding=1), torch.randn(3, 8, 6, 6)
        experts = [(torch.randn(r, 8, 3, 3), torch.randn(12, r, 1, 1), s) for r, s in zip(ranks, scales)]
    gate = Gate(3, 4)
    gate.weights = torch.softmax(torch.randn(3, 3), -1)  # per-sample weights
    layer = MoLELayer(
        base,
        torch.cat([d for d, _, _ in experts]),
        torch.cat([u for _, u, _ in experts], dim=1),
        torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)]),
        torch.cat([torch.full((r,), s) for r, s in zip(ranks, scales)]),
        gate,
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), per_expert_reference(x, base, experts, gate.weights), rtol=1e-4, atol=1e-4)


def count_gates(pipe, granularity, world):
    pipe.load_experts({"a": world["a"], "c": world["c"]}, granularity=granularity)
    gates = pipe.mole.gates
    counts = {c: sum(name.startswith(c + ".") or name == c for name in gates) for c in ("unet", "text_encoder")}
    pipe.unload_experts()
    return counts


def test_gate_counts_per_granularity(world, mole_pipe):
    unet, te = mole_pipe.unet, mole_pipe.text_encoder
    transformers = [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    resnets = [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    te_layers = len(te.encoder.layers)
    # a: attention q/k/v/out everywhere; c: to_q/to_v plus resnet conv1 (UNet only)
    assert count_gates(mole_pipe, "block", world) == {"unet": len(transformers) + len(resnets), "text_encoder": te_layers}
    adapted_unet = [n for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "conv1"))]
    adapted_te = [n for n, m in te.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    assert count_gates(mole_pipe, "layer", world) == {"unet": len(adapted_unet), "text_encoder": len(adapted_te)}
    assert count_gates(mole_pipe, "network", world) == {"unet": 1, "text_encoder": 1}
    assert len(transformers) == 4 and te_layers == 2  # the tiny checkpoint's shape, so the counts above mean something


def test_block_modules_share_their_blocks_gate(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"]})
    layers = mole_pipe.mole.layers
    q = layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    k = layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert q.gate is k.gate is mole_pipe.mole.gates["unet.down_blocks.0.attentions.0"]


def test_gradients_reach_every_gate_and_nothing_else(world, mole_pipe):
    """Nothing frozen by hand (the UNet as from_pretrained gives it, every parameter trainable): injection adds
    no trainable tensor but the gates (the experts are buffers), every gate gets a gradient and no expert does.
    That the base weights get none in training is train_gates' freezing, tested in test_training."""
    unet = mole_pipe.unet
    base_names = {n for n, _ in unet.named_parameters()}
    assert all(p.requires_grad for p in unet.parameters())
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    gate_names = {f"{name.removeprefix('unet.')}.mole_gate.{k}" for name, gate in mole_pipe.mole.gates.items()
                  if name.startswith("unet") for k, _ in gate.named_parameters()}
    added = {n.replace(".base_layer", "") for n, _ in unet.named_parameters()} - base_names
    assert added == gate_names
    g = torch.Generator().manual_seed(0)
    out = unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]),
               encoder_hidden_states=torch.randn(2, 77, 32, generator=g)).sample
    out.square().mean().backward()
    for name, gate in mole_pipe.mole.gates.items():
        if name.startswith("unet"):
            assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0, name
    for layer in mole_pipe.mole.layers.values():
        assert not layer.lora_A.requires_grad and layer.lora_A.grad is None and layer.lora_B.grad is None


def test_a_gate_prints_its_kind():
    """A module print of a MoLE pipeline shows each gate's experts, width and kind."""
    assert repr(Gate(2, 4)) == "Gate(num_experts=2, in_features=4, activation=softmax)"
    gate = Gate(3, 8, prior_weights=[0.2, 0.3, 0.5], activation="sigmoid", per_position=True, timestep_knots=2)
    assert repr(gate) == "Gate(num_experts=3, in_features=8, activation=sigmoid, per_position=True, timestep_knots=2)"


# Mutants of the core judged equivalent (no input can tell them apart on one CPU device in float32):
# - gates.py: position_map's F.normalize without dim= (its default is the channel dim it names) and its einsum
#   subscripts in capitals; timestep_offsets' knots moved to device None or built without dtype=float32 (the noise
#   level is 0 or 1 when it is a whole number, a float otherwise); token_weights reading shape[+2:] for shape[-2:]
#   of the 4-D map; _apply moving a tensor of unchanged dtype by t.to(device) instead of the move it was given (the
#   same tensor).
# - layers.py: _rescale's .to(None); the DoRA offsets kept in the dtype they come in rather than cast to float32
#   (injection builds them in float32); select_experts indexing every row when every expert is kept (the same output;
#   not indexing is only faster).
# - inject.py: remove() leaving regional as "" for None: unload_experts drops the MoLE, nothing reads it again;
#   _gate_scope's search for the enclosing block starting at the adapted module itself (a Linear or Conv, never a
#   block).
# - experts.py: _add_dora_scales' stand-in LoRA built with other shapes (only its key names and flattened values
#   are read), and its per-input-channel check on shape[0] == 1 written otherwise (the two differ only for
#   modules of one or two output channels, which no LoRA target has); _split_components telling diffusers' old
#   text-encoder keys by their down suffix alone (a lone up half is refused before, so each up has its down).
