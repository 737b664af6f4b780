"""Gates beyond the paper's (METHOD.md section 8): sigmoid weights off the simplex and per-position block gates.
Untrained they are NLA; a per-position gate equal everywhere is the block gate; masking removes an expert at
every position; only the gates train; gate files record the kind and old files still load."""

import json

import numpy as np
import pytest
import torch
from conftest import generate, load, unet_output
from safetensors import safe_open
from safetensors.torch import save_file

from mole_diffusion.train import GateTrainingConfig, train_gates

KINDS = [("softmax", True), ("sigmoid", False), ("sigmoid", True), ("softplus", False)]


def randomise_gates(pipe, seed=0):
    """Random W_g (std 3) and b_g; the temperature stays 1, so a gate's rows can be copied to a pipeline of fewer
    experts (test_pipeline's helper also moves log_tau)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in pipe.mole.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 3)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))


@pytest.mark.parametrize("activation,per_position", KINDS)
def test_untrained_gates_of_every_kind_are_nla_with_the_prior(world, mole_pipe, ref_pipe, activation, per_position):
    prior = [0.2, 0.5, 0.3]
    mole_pipe.load_experts({n: world[n] for n in "abc"}, prior_weights=prior, activation=activation, per_position=per_position)
    for name in "abc":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    ref_pipe.set_adapters(["a", "b", "c"], prior)
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_per_position_weights_equal_everywhere_are_the_block_gate(world, activation):
    block, positional = load(world["base"]), load(world["base"])
    block.load_experts({"a": world["a"], "b": world["b"]}, activation=activation)
    positional.load_experts({"a": world["a"], "b": world["b"]}, activation=activation, per_position=True)
    randomise_gates(block)
    randomise_gates(positional)
    assert not torch.allclose(unet_output(block), unet_output(positional), atol=1e-3)  # positions do differ
    for gate in positional.mole.gates.values():  # every position gets the block gate's own weights
        gate.position_map = lambda h, t=None, gate=gate: gate(h, t)[:, :, None, None].expand(-1, -1, *h.shape[-2:])
    torch.testing.assert_close(unet_output(positional), unet_output(block), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(positional, guidance_scale=3.0), generate(block, guidance_scale=3.0), atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_masking_removes_an_expert_at_every_position(world, activation):
    both, only_a = load(world["base"]), load(world["base"])
    both.load_experts({"a": world["a"], "b": world["b"]}, activation=activation, per_position=True)
    only_a.load_experts({"a": world["a"]}, activation=activation, per_position=True, prior_weights=[0.5])
    randomise_gates(both)
    with torch.no_grad():  # the same gate for a; softmax over one expert is 1 whatever its logit
        for name, gate in only_a.mole.gates.items():
            gate.weight.copy_(both.mole.gates[name].weight[:1])
            gate.bias.copy_(both.mole.gates[name].bias[:1])
    both.set_experts(["a"])
    torch.testing.assert_close(unet_output(both), unet_output(only_a), rtol=1e-5, atol=1e-5)
    maps = [g.position_weights for g in both.mole.gates.values() if g.position_weights is not None]
    assert maps and all(bool((m[:, 1] == 0).all()) and bool((m[:, 0] > 0).all()) for m in maps)


def test_sigmoid_gates_leave_the_simplex(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid")
    randomise_gates(mole_pipe)
    unet_output(mole_pipe, batch=1)
    sums = torch.cat([g.weights.sum(dim=-1) for n, g in mole_pipe.mole.gates.items() if n.startswith("unet")])
    assert (sums - 1).abs().max() > 0.1 and bool(((sums > 0) & (sums < 2)).all())


def test_softplus_gates_let_an_expert_act_above_its_strength(world, mole_pipe):
    """Weights in (0, inf): a LoRA at 2 (what the demo world's checker needs in a composition, README)."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="softplus")
    randomise_gates(mole_pipe)
    unet_output(mole_pipe, batch=1)
    weights = torch.cat([g.weights for n, g in mole_pipe.mole.gates.items() if n.startswith("unet")])
    assert weights.max() > 1.5 and bool((weights > 0).all())
    gate = mole_pipe.mole.gates["unet.mid_block.attentions.0"]  # temperature 1, nothing masked: softplus itself
    torch.testing.assert_close(gate.activate(gate.bias[None], dim=-1)[0], torch.nn.functional.softplus(gate.bias))


def test_composition_objective_trains_the_gates_on_composition_prompts(world, tmp_path):
    """Issue 12.3a: gates learn from images of the [compositions] prompts (trainer CLIP loss on each named
    concept, the weakest most); a concepts file without compositions is refused."""
    from mole_diffusion.errors import MoLEError
    from mole_diffusion.testing import make_concept_images, make_tiny_clip

    make_concept_images(tmp_path / "red", "circle", (200, 30, 30), count=2)
    make_concept_images(tmp_path / "blue", "square", (30, 30, 200), count=2, seed=1)
    concepts = (f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a sks"\n'
                f'[[concepts]]\nname = "b"\nlora = "{world["b"]}"\nimages = "blue"\nprompt = "a zwx"\n')
    (tmp_path / "plain.toml").write_text(concepts)
    (tmp_path / "composed.toml").write_text(concepts + '[compositions]\nprompts = ["a sks and a zwx", "a zwx beside a sks"]\n')
    config = dict(base=str(world["base"]), output_dir=tmp_path / "out", steps=2, batch_size=2, resolution=32,
                  checkpoint_every=10, learning_rate=5e-2, progress=False, objective="composition", activation="softplus",
                  clip_model=make_tiny_clip(tmp_path / "clip"), clip_sampling_steps=2)
    with pytest.raises(MoLEError, match=r"plain.toml has no \[compositions\]"):
        train_gates(GateTrainingConfig(concepts=tmp_path / "plain.toml", **config))
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="softplus")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "mole_gate" in n}
    train_gates(GateTrainingConfig(concepts=tmp_path / "composed.toml", **config), pipe=pipe)
    moved = [n for n, p in pipe.unet.named_parameters() if "mole_gate" in n and not torch.equal(p, before[n])]
    assert moved
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss_clip_text"] > 0 and r["loss_clip_concepts"] > 0 for r in rows)


def test_training_per_position_gates_moves_only_their_parameters(world, concepts_file, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid", per_position=True)
    # parameters that do not train, and a UNet that does not start frozen: train_gates must freeze it itself
    pipe.unet.requires_grad_(True)
    frozen = {n: t.detach().clone() for c in ("unet", "text_encoder") for n, t in getattr(pipe, c).named_parameters()
              if "mole_gate" not in n}
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "mole_gate" in n}
    path = train_gates(GateTrainingConfig(base=str(world["base"]), concepts=concepts_file, output_dir=tmp_path / "run",
                                          steps=3, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2, progress=False,
                                          activation="sigmoid", per_position=True), pipe=pipe)
    after = {n: t for c in ("unet", "text_encoder") for n, t in getattr(pipe, c).named_parameters() if "mole_gate" not in n}
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    moved = [n for n, p in pipe.unet.named_parameters() if "mole_gate" in n and n.endswith(".weight") and not torch.equal(p, before[n])]
    assert moved  # the per-position weights W_g train (at W_g = 0 only the bias would, without per-position features)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["activation"] == "sigmoid" and json.loads(f.metadata()["per_position"]) is True


def test_gate_files_record_their_kind_and_old_files_still_load(world, mole_pipe, tmp_path):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    # a file from before the kind was recorded: softmax, per sample
    with safe_open(str(tmp_path / "gates.safetensors"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    old = {k: v for k, v in metadata.items() if k not in ("activation", "per_position")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})
    fresh.load_gates(tmp_path / "old.safetensors")
    torch.testing.assert_close(unet_output(fresh), unet_output(mole_pipe))

    # experts loaded as another kind: load_gates restores the file's, so the gates compute what was trained
    other = load(world["base"])
    other.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid", per_position=True)
    other.load_gates(tmp_path / "gates.safetensors")
    assert (other.mole.activation, other.mole.per_position) == ("softmax", False)
    assert all((g.activation, g.per_position) == ("softmax", False) for g in other.mole.gates.values())
    torch.testing.assert_close(unet_output(other), unet_output(mole_pipe))


def test_distillation_objective_targets_each_concepts_lora_alone(world, concepts_file, tmp_path):
    """One expert: the mixture is that LoRA at weight 1 everywhere, so the loss is 0; two: it is not, and only the
    gates move towards it."""
    config = dict(base=str(world["base"]), steps=1, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2,
                  progress=False, objective="distillation", per_position=True, timestep_knots=2, validation_every=10)
    lines = concepts_file.read_text().split("\n\n")
    (concepts_file.parent / "one.toml").write_text(lines[0] + "\n")
    one = load(world["base"])
    one.load_experts({"a": world["a"]}, per_position=True, timestep_knots=2)
    train_gates(GateTrainingConfig(concepts=concepts_file.parent / "one.toml", output_dir=tmp_path / "one", **config), pipe=one)
    rows = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss_distillation"] < 1e-10

    two = load(world["base"])
    two.load_experts({"a": world["a"], "b": world["b"]}, per_position=True, timestep_knots=2)
    frozen = {n: t.detach().clone() for c in ("unet", "text_encoder") for n, t in getattr(two, c).named_parameters()
              if "mole_gate" not in n}
    before = {n: p.detach().clone() for c in ("unet", "text_encoder") for n, p in getattr(two, c).named_parameters() if "mole_gate" in n}
    train_gates(GateTrainingConfig(concepts=concepts_file, output_dir=tmp_path / "two", **config), pipe=two)
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss_distillation"] > 1e-6
    after = {n: p for c in ("unet", "text_encoder") for n, p in getattr(two, c).named_parameters()}
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    moved = {n.rsplit(".", 1)[-1] for n in before if not torch.equal(after[n], before[n])}
    assert {"weight", "bias", "timestep_logits"} <= moved
    assert two.mole.constant_weights is None  # the teacher's constant weights are gone after each step
