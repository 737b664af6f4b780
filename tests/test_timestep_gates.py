"""Timestep-aware gates : the denoiser's gates add c(t), one learned logit offset per expert at
K evenly spaced noise levels, interpolated. Untrained they are the plain gate; c(t) has its closed form; a gate
file records the knots and load_gates restores them into a pipeline loaded the default way."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load
from safetensors import safe_open
from safetensors.torch import save_file

from mole_diffusion import GateConfig, MoLEFluxPipeline
from mole_diffusion.gate_file import GateFileError
from mole_diffusion.gates import Gate
from mole_diffusion.testing import make_tiny_lora, make_tiny_pipeline
from mole_diffusion.train import GateTrainingConfig, train_gates


def unet_at(pipe, timestep, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, timestep, encoder_hidden_states=text).sample


def test_timestep_offsets_interpolate_between_knots():
    gate = Gate(2, 4, timestep_knots=4)  # knots at t = 0, 1/3, 2/3, 1
    with torch.no_grad():
        gate.timestep_logits.copy_(torch.tensor([[0.0, 3.0, -3.0, 6.0], [1.0, 1.0, 1.0, 1.0]]))
    t = torch.tensor([0.0, 1 / 3, 0.5, 1.0, 1.7])
    expected = torch.tensor([[0.0, 1.0], [3.0, 1.0], [0.0, 1.0], [6.0, 1.0], [6.0, 1.0]])  # 0.5: halfway 3 -> -3
    torch.testing.assert_close(gate.timestep_offsets(t, 5), expected)
    # noise levels outside [0, 1] are held at the end knots
    torch.testing.assert_close(gate.timestep_offsets(torch.tensor([-0.5, 2.0]), 2), torch.tensor([[0.0, 1.0], [6.0, 1.0]]))
    torch.testing.assert_close(gate.timestep_offsets(1, 2), torch.tensor([[6.0, 1.0], [6.0, 1.0]]))  # a plain number, for a batch
    features = torch.randn(5, 7, 4)
    logits = torch.nn.functional.linear(torch.nn.functional.normalize(features, dim=-1).mean(1), gate.weight, gate.bias)
    torch.testing.assert_close(gate(features, t), (logits + expected).softmax(-1))
    torch.testing.assert_close(gate(features), logits.softmax(-1))  # no noise level: the plain gate
    with pytest.raises(ValueError, match="at least 2 knots"):
        Gate(2, 4, timestep_knots=1)


@pytest.mark.parametrize("per_position", [False, True])
def test_untrained_timestep_aware_gates_are_the_plain_gates(world, per_position):
    plain, aware = load(world["base"]), load(world["base"])
    plain.load_experts({"a": world["a"], "b": world["b"]}, per_position=per_position)
    aware.load_experts({"a": world["a"], "b": world["b"]}, per_position=per_position, timestep_knots=3)
    gates = aware.mole.gates
    assert all((g.timestep_logits is None) == n.startswith("text_encoder") for n, g in gates.items())
    for step in (0, 500, 999):
        assert torch.equal(unet_at(aware, torch.tensor([step, step])), unet_at(plain, torch.tensor([step, step])))


def test_timestep_aware_weights_match_diffusers_at_their_noise_level(world, ref_pipe):
    """Knots only (W_g = 0): the weights are softmax(b + c(t)), the same in every block, so the UNet is diffusers'
    set_adapters with those weights, and they differ between an early and a late step."""
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, timestep_knots=2)
    with torch.no_grad():
        for name, gate in pipe.mole.gates.items():
            if gate.timestep_logits is not None:
                gate.timestep_logits.copy_(torch.tensor([[-2.0, 2.0], [0.0, 0.0]]))  # a: late off, early on
    for name in "ab":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    for step in (100, 900):
        a = torch.tensor([-2.0 + 4.0 * step / 1000, 0.0]).softmax(0)
        ref_pipe.set_adapters(["a", "b"], a.tolist())
        torch.testing.assert_close(unet_at(pipe, torch.tensor(step)), unet_at(ref_pipe, torch.tensor(step)), rtol=1e-5, atol=1e-5)


def test_training_moves_the_knots_and_a_default_load_restores_them(world, concepts_file, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, timestep_knots=3)
    frozen = {n: t.detach().clone() for c in ("unet", "text_encoder") for n, t in getattr(pipe, c).named_parameters()
              if "mole_gate" not in n}
    path = train_gates(GateTrainingConfig(base=str(world["base"]), concepts=concepts_file, output_dir=tmp_path / "run",
                                          steps=3, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2,
                                          progress=False, gate=GateConfig(timestep_knots=3)), pipe=pipe)
    after = {n: t for c in ("unet", "text_encoder") for n, t in getattr(pipe, c).named_parameters() if "mole_gate" not in n}
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    knots = [g.timestep_logits for g in pipe.mole.gates.values() if g.timestep_logits is not None]
    assert knots and all(k.abs().sum() > 0 for k in knots)  # every denoiser gate's knots learned
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["timestep_knots"]) == 3
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})  # the default kind: load_gates turns it into the file's
    fresh.load_gates(path)
    assert fresh.mole.gate_config.timestep_knots == 3
    for step in (50, 950):
        assert torch.equal(unet_at(fresh, torch.tensor(step)), unet_at(pipe, torch.tensor(step)))


def test_bad_knots_in_a_gate_file_are_refused_and_change_nothing(world, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, timestep_knots=3)
    pipe.save_gates(tmp_path / "gates.safetensors")
    with safe_open(str(tmp_path / "gates.safetensors"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / "one.safetensors"), metadata={**metadata, "timestep_knots": "1"})
    four = json.dumps({**json.loads(metadata["gate_config"]), "timestep_knots": 4})  # the file says 4, its tensors 3
    save_file(tensors, str(tmp_path / "four.safetensors"), metadata={**metadata, "timestep_knots": "4", "gate_config": four})
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})
    with pytest.raises(GateFileError, match="one.safetensors: gate file metadata names an unknown kind"):
        fresh.load_gates(tmp_path / "one.safetensors")
    with pytest.raises(GateFileError, match=r"timestep_logits has shape \(2, 3\), this pipeline's gate has \(2, 4\)"):
        fresh.load_gates(tmp_path / "four.safetensors")
    assert fresh.mole.gate_config.timestep_knots == 0 and all(g.timestep_logits is None for g in fresh.mole.gates.values())


def test_flux_timestep_aware_gates_read_sigma_as_the_noise_level(tmp_path):
    """Flux's transformer is given sigma in [0, 1] as its timestep (diffusers passes t / 1000): each step's gate
    weights are softmax((W_g f + b_g + c(sigma)) / tau) at that step's own sigma (W_g = 0, b_g = 0 for the uniform
    prior), c interpolating the knots at 0, 1/2, 1; not at sigma / 1000."""
    base = make_tiny_pipeline(tmp_path / "flux", family="flux")
    files = {name: make_tiny_lora(base, tmp_path / f"{name}.safetensors", rank=2, seed=seed, text_encoder=False)
             for name, seed in (("a", 1), ("b", 2))}
    pipe = MoLEFluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_experts(files, timestep_knots=3)
    knots = torch.tensor([[2.0, -1.0, -3.0], [-2.0, 1.0, 3.0]])
    log_tau = 0.2
    with torch.no_grad():
        for gate in pipe.mole.gates.values():
            gate.timestep_logits.copy_(knots)
            gate.log_temperature.fill_(log_tau)
    given = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: given.append(kwargs["timestep"].clone()),
                                               with_kwargs=True)
    pipe("a red circle", num_inference_steps=3, height=32, width=48, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    sigmas = pipe.scheduler.sigmas[:3].float()
    assert torch.allclose(sigmas, torch.tensor([1.0, 2 / 3, 1 / 3]))  # no shift in the tiny pipeline's scheduler
    torch.testing.assert_close(torch.stack([t[0] for t in given]).float(), sigmas)  # what the transformer reads
    offsets = torch.tensor([[np.interp(float(s), [0.0, 0.5, 1.0], knots[k].tolist()) for k in range(2)] for s in sigmas])
    expected = (offsets / math.exp(log_tau)).softmax(dim=-1).float()  # (steps, N)
    history = pipe.gate_weights
    assert set(history) == set(pipe.mole.gates) and len(history) == 2  # the double and the single block
    for name, weights in history.items():
        assert weights.shape == (3, 1, 2)
        torch.testing.assert_close(weights[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_a_timestep_aware_per_position_map_is_the_gate_at_each_position_and_step(activation):
    """position_map at noise level t, at every position of a non-square map, equals the gate applied to that
    position's feature alone at the same t: the offsets c(t) enter the position logits with their sign."""
    g = torch.Generator().manual_seed(0)
    gate = Gate(3, 8, prior_weights=[0.2, 0.5, 0.3], activation=activation, per_position=True, timestep_knots=3)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        gate.timestep_logits.copy_(torch.randn(gate.timestep_logits.shape, generator=g) * 2)
    features = torch.randn(2, 8, 3, 5, generator=g)
    t = torch.tensor([0.9, 0.25])
    maps = gate.position_map(features, t)
    assert maps.shape == (2, 3, 3, 5)
    for y in range(3):
        for x in range(5):
            torch.testing.assert_close(maps[:, :, y, x], gate(features[:, :, y, x][:, None, :], t))
    assert not torch.allclose(maps, gate.position_map(features))  # the step matters
