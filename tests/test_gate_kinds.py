"""Gates beyond the paper's (docs/method.md): sigmoid weights off the simplex and per-position block gates.
Untrained they are NLA; a per-position gate equal everywhere is the block gate; masking removes an expert at
every position; only the gates train; gate files record the kind and old files still load."""

import json

import numpy as np
import pytest
import torch
from conftest import generate, load, randomise_gates, unet_output
from safetensors import safe_open
from safetensors.torch import save_file

from mole_diffusion import GateConfig
from mole_diffusion.testing import make_tiny_lora
from mole_diffusion.train import GateTrainingConfig, train_gates

KINDS = [("softmax", True), ("sigmoid", False), ("sigmoid", True), ("softplus", False)]




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
    randomise_gates(block, weight_std=3, temperature=False)
    randomise_gates(positional, weight_std=3, temperature=False)
    assert not torch.allclose(unet_output(block), unet_output(positional), atol=1e-3)  # positions do differ
    for gate in positional.mole.gates.values():  # every position gets the block gate's own weights
        gate.position_map = lambda h, t=None, gate=gate: gate(h, t)[:, :, None, None].expand(-1, -1, *h.shape[-2:])
    torch.testing.assert_close(unet_output(positional), unet_output(block), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(positional, guidance_scale=3.0), generate(block, guidance_scale=3.0), atol=1e-5)


def unet_gate_inputs(pipe):
    """{UNet gate name: the feature map (B, C, H, W) its block receives}, filled by the next UNet forward; returns
    it and the hook handles to remove."""
    seen, handles = {}, []

    def record(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, args[0] if args else kwargs["hidden_states"])
        return hook

    for name in pipe.mole.gates:
        if name.startswith("unet."):
            home = pipe.unet.get_submodule(name.removeprefix("unet."))
            handles.append(home.register_forward_pre_hook(record(name), with_kwargs=True))
    return seen, handles


def zeroed_lora(path, out):
    """A copy of the LoRA file at ``path`` with every up-projection (lora_B) 0: the same modules, ranks and
    alphas (so the same gates), and no effect at any weight."""
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_masking_removes_an_expert_at_every_position(world, ref_pipe, tmp_path, activation):
    """Per-position gates, randomised so that positions differ, on a (attention) and d (attention and resnet convs,
    alpha / r = 3, so the conv and linear per-position paths both run at the LoRA's own strength); each expert masked
    in turn. Every position map gives the masked expert exactly 0, and the one left:

    - softmax: exactly 1 at every position (a softmax over one logit), so the MoLE is that LoRA alone at scale 1:
      its UNet output and its images equal diffusers' ``load_lora_weights`` of that file, ``set_adapters([it], [1])``;
    - sigmoid: experts do not compete, so its map is sigmoid((W_g h_x / |h_x| + b_g) / tau) of its own row at each
      position x, computed here from the block's input; and the output equals the unmasked MoLE in which the masked
      expert's LoRA is replaced by a zeroed copy (same gates, no effect).
    """
    d = make_tiny_lora(world["base"], tmp_path / "d.safetensors", rank=2, alpha=6, seed=4, unet_modules=("to_q", "to_v", "conv1"))
    files = {"a": world["a"], "d": d}
    pipe = load(world["base"])
    pipe.load_experts(files, activation=activation, per_position=True)
    randomise_gates(pipe, weight_std=3, temperature=False)
    if activation == "softmax":
        for name, path in files.items():
            ref_pipe.load_lora_weights(path, adapter_name=name)
    for kept, masked in (("a", "d"), ("d", "a")):
        k, m = pipe.expert_names.index(kept), pipe.expert_names.index(masked)
        pipe.set_experts(None)
        mixed = unet_output(pipe)
        pipe.set_experts([kept])
        inputs, handles = unet_gate_inputs(pipe)
        masked_output = unet_output(pipe)
        for handle in handles:
            handle.remove()
        maps = {n: g.position_weights for n, g in pipe.mole.gates.items() if g.position_weights is not None}
        assert set(maps) == set(inputs) and any(n.split(".")[-2] == "resnets" for n in maps)  # conv blocks too
        for name, weights in maps.items():
            gate = pipe.mole.gates[name]
            assert bool((weights[:, m] == 0).all()), name
            if activation == "softmax":
                assert bool((weights[:, k] == 1).all()), name
            else:
                features = torch.nn.functional.normalize(inputs[name].float(), dim=1)
                logit = torch.einsum("bchw,c->bhw", features, gate.weight[k].detach()) + gate.bias[k].detach()
                expected = torch.sigmoid(logit / gate.log_temperature.detach().exp())
                torch.testing.assert_close(weights[:, k], expected, rtol=1e-5, atol=1e-6)
                assert expected.flatten(1).std(dim=1).min() > 1e-3, name  # the weight does vary over the positions
        if activation == "softmax":
            ref_pipe.set_adapters([kept], [1.0])
            reference = unet_output(ref_pipe)
            torch.testing.assert_close(masked_output, reference, rtol=1e-5, atol=1e-5)
            assert (mixed - reference).abs().max() > 1e-3  # unmasked, the other LoRA does act
            np.testing.assert_allclose(generate(pipe, experts=[kept]), generate(ref_pipe), atol=1e-5)
        else:
            zeroed = load(world["base"])
            zeroed.load_experts({**files, masked: zeroed_lora(files[masked], tmp_path / f"{masked}0.safetensors")},
                                activation=activation, per_position=True)
            randomise_gates(zeroed, weight_std=3, temperature=False)  # the same gates (same shapes, same seed)
            reference = unet_output(zeroed)
            torch.testing.assert_close(masked_output, reference, rtol=1e-5, atol=1e-5)
            assert (mixed - reference).abs().max() > 1e-3


def test_sigmoid_gates_leave_the_simplex(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid")
    randomise_gates(mole_pipe, weight_std=3, temperature=False)
    unet_output(mole_pipe, batch=1)
    sums = torch.cat([g.weights.sum(dim=-1) for n, g in mole_pipe.mole.gates.items() if n.startswith("unet")])
    assert (sums - 1).abs().max() > 0.1 and bool(((sums > 0) & (sums < 2)).all())


def test_softplus_gates_let_an_expert_act_above_its_strength(world, mole_pipe):
    """Weights in (0, inf): a LoRA at 2 (what the demo world's checker needs in a composition, README)."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="softplus")
    randomise_gates(mole_pipe, weight_std=3, temperature=False)
    unet_output(mole_pipe, batch=1)
    weights = torch.cat([g.weights for n, g in mole_pipe.mole.gates.items() if n.startswith("unet")])
    assert weights.max() > 1.5 and bool((weights > 0).all())
    gate = mole_pipe.mole.gates["unet.mid_block.attentions.0"]  # temperature 1, nothing masked: softplus itself
    torch.testing.assert_close(gate.activate(gate.bias[None], dim=-1)[0], torch.nn.functional.softplus(gate.bias))


def test_composition_objective_trains_the_gates_on_composition_prompts(world, tmp_path):
    """gates learn from images of the [compositions] prompts (trainer CLIP loss on each named
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
                  checkpoint_every=10, learning_rate=5e-2, progress=False, objective="composition", gate=GateConfig(activation="softplus"),
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
    """Sigmoid per-position gates, 2 steps, from a UNet left trainable (train_gates must freeze it itself).

    - Every gate parameter moves: W_g, b_g and log_tau of each UNet (per-position) and text-encoder (per-sample,
      no image positions) gate. None legitimately gets no gradient here: at the start W_g = 0 and b_g =
      logit(1/2) = 0, so every logit is 0 and tau's gradient (d(l / tau)/d tau = -l / tau^2) is exactly 0 at step 1;
      W_g and b_g move from step 1 (the position features and the denoising loss give them a gradient), tau at
      step 2, once the logits are not 0.
    - Nothing else changes, bit for bit: the UNet's, text encoder's and VAE's parameters and buffers, among them
      every MoLELayer's LoRA factors (lora_A, lora_B buffers), their rank scales and the gates' masks.
    - The trained per-position weights vary over the image positions (untrained, with W_g = 0, they are the same at
      every position), and the gate file records the kind.
    """
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid", per_position=True)
    pipe.unet.requires_grad_(True)
    gate_ids = {id(p) for p in pipe.mole.gate_parameters()}

    def everything_else():
        return {f"{c}.{n}": t.detach().clone() for c in ("unet", "text_encoder", "vae") for items in
                (getattr(pipe, c).named_parameters(), getattr(pipe, c).named_buffers()) for n, t in items if id(t) not in gate_ids}

    def position_spread():
        """{UNet gate: the smallest over samples and experts of the weights' spread over the positions}"""
        unet_output(pipe)
        return {n: g.position_weights.flatten(2).std(dim=2).min().item() for n, g in pipe.mole.gates.items()
                if g.position_weights is not None}

    assert set(position_spread().values()) == {0.0}  # untrained: the per-sample weights at every position
    frozen = everything_else()
    assert any(".lora_B" in n for n in frozen) and any(".lora_A" in n for n in frozen)
    before = {f"{g}.{k}": p.detach().clone() for g, gate in pipe.mole.gates.items() for k, p in gate.named_parameters()}
    assert {k.rsplit(".", 1)[1] for k in before} == {"weight", "bias", "log_temperature"}
    assert any(g.startswith("text_encoder.") for g in pipe.mole.gates) and any(g.startswith("unet.") for g in pipe.mole.gates)
    path = train_gates(GateTrainingConfig(base=str(world["base"]), concepts=concepts_file, output_dir=tmp_path / "run",
                                          steps=2, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2,
                                          validation_steps=1, validation_seeds=[0], progress=False,
                                          gate=GateConfig(activation="sigmoid", per_position=True)), pipe=pipe)
    after = everything_else()
    assert after.keys() == frozen.keys()
    changed = [n for n in frozen if not torch.equal(after[n], frozen[n])]
    assert not changed, changed
    after_gates = {f"{g}.{k}": p.detach() for g, gate in pipe.mole.gates.items() for k, p in gate.named_parameters()}
    still = [n for n in before if torch.equal(after_gates[n], before[n])]
    assert not still, f"gate parameters that did not train: {still}"
    spread = position_spread()
    assert spread and all(s > 1e-4 for s in spread.values()), spread
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["activation"] == "sigmoid" and json.loads(f.metadata()["per_position"]) is True


def test_gate_files_record_their_kind_and_old_files_still_load(world, mole_pipe, tmp_path):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe, weight_std=3, temperature=False)
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    # a file from before the kind was recorded: softmax, per sample
    with safe_open(str(tmp_path / "gates.safetensors"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    old = {k: v for k, v in metadata.items() if k not in ("activation", "per_position", "gate_config")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})
    fresh.load_gates(tmp_path / "old.safetensors")
    torch.testing.assert_close(unet_output(fresh), unet_output(mole_pipe))

    # experts loaded as another kind: load_gates restores the file's, so the gates compute what was trained
    other = load(world["base"])
    other.load_experts({"a": world["a"], "b": world["b"]}, activation="sigmoid", per_position=True)
    other.load_gates(tmp_path / "gates.safetensors")
    assert other.mole.gate_config == GateConfig(activation="softmax")  # the paper's gate, as the file was
    assert all((g.activation, g.per_position) == ("softmax", False) for g in other.mole.gates.values())
    torch.testing.assert_close(unet_output(other), unet_output(mole_pipe))


def test_distillation_objective_targets_each_concepts_lora_alone(world, concepts_file, tmp_path):
    """One expert: the mixture is that LoRA at weight 1 everywhere, so the loss is 0; two: it is not, and only the
    gates move towards it."""
    config = dict(base=str(world["base"]), steps=1, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2,
                  progress=False, objective="distillation", gate=GateConfig(per_position=True, timestep_knots=2),
                  validation_every=10)
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
