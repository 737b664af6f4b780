"""trust the learned path: gates compute and stay in fp32 (autocast, half-precision models), the
balance loss counts each expert only at the gates where it acts, the command shows a bug's traceback, and
pyproject asks for the Python the code needs."""

import json
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import generate, randomise_gates, write_images
from mole_diffusion import GateConfig, MoLEStableDiffusionPipeline
from mole_diffusion.cli import main
from mole_diffusion.errors import MoLEError
from mole_diffusion.gates import balance_loss, mean_expert_weights
from mole_diffusion.layers import MoLELayer
from mole_diffusion.train import GateTrainingConfig, train_gates

ROOT = Path(__file__).resolve().parents[1]


# -- item 2: gates stay fp32 ------------------------------------------------------------------------------
def test_trained_gates_compute_in_fp32_under_autocast(world, mole_pipe):
    """Mixed-precision training's setting: bf16 weights under autocast."""
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    randomise_gates(mole_pipe)
    mole_pipe.to(torch.bfloat16)
    mole = mole_pipe.mole
    calls = []  # (gate, its input, its output), every gate call of one text-encoder and one UNet forward
    hooks = [g.register_forward_hook(lambda g, args, out: calls.append((g, args[0], out))) for g in mole.gates.values()]
    ids = mole_pipe.tokenizer(["a red circle"], padding="max_length", max_length=mole_pipe.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
    mole.record = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        text = mole_pipe.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        sample = mole_pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    mole.record = False
    for hook in hooks:
        hook.remove()
    assert sample.dtype == torch.bfloat16
    assert {id(g) for g, _, _ in calls} == {id(g) for g in mole.gates.values()}
    assert all(h.dtype == torch.float32 for h in mole.gate_history().values())
    with torch.no_grad():
        for gate, hidden, weights in calls:  # the same input again, without autocast
            assert weights.dtype == torch.float32
            torch.testing.assert_close(weights, gate(hidden), rtol=1e-5, atol=1e-6)


CASTS = {
    "pipe.to(dtype=bfloat16)": lambda pipe: pipe.to(dtype=torch.bfloat16),
    "pipe.to(float16)": lambda pipe: pipe.to(torch.float16),
    "unet.half(), text_encoder.half()": lambda pipe: (pipe.unet.half(), pipe.text_encoder.half()),
}


@pytest.mark.parametrize("cast", CASTS)
def test_gates_stay_fp32_and_unrounded_when_the_model_is_cast(world, mole_pipe, cast):
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    randomise_gates(mole_pipe)
    gates = mole_pipe.mole.gates
    before = {name: [p.detach().clone() for p in gate.parameters()] for name, gate in gates.items()}
    CASTS[cast](mole_pipe)
    assert mole_pipe.unet.dtype != torch.float32 and mole_pipe.text_encoder.dtype != torch.float32  # the models were cast
    for name, gate in gates.items():
        for param, saved in zip(gate.parameters(), before[name]):
            assert param.dtype == torch.float32 and torch.equal(param, saved), f"{name} was cast"
        assert gate.constant.dtype == torch.float32 and gate.mask.dtype == torch.bool


def test_a_bfloat16_pipeline_generates_with_fp32_gates(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    randomise_gates(mole_pipe)
    mole_pipe.to(torch.bfloat16)
    images = generate(mole_pipe, num_inference_steps=1, height=16, width=16)
    assert np.isfinite(images).all()
    assert all(p.dtype == torch.float32 for p in mole_pipe.mole.gate_parameters())
    assert all(h.dtype == torch.float32 for h in mole_pipe.gate_weights.values())


def test_experts_loaded_into_a_half_precision_model_are_kept_in_its_precision(world, mole_pipe):
    """The LoRA files are fp32: their factors take the model's dtype on loading (an fp32 B would double its memory
    and break the conv branch), while the gates stay fp32."""
    mole_pipe.to(torch.bfloat16)
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    layers = [m for m in mole_pipe.unet.modules() if isinstance(m, MoLELayer)]
    assert any(isinstance(layer.base_layer, torch.nn.Conv2d) for layer in layers)
    for layer in layers:
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    images = generate(mole_pipe, num_inference_steps=1, height=16, width=16)
    assert np.isfinite(images).all()
    assert all(p.dtype == torch.float32 for p in mole_pipe.mole.gate_parameters())


# -- item 3: the balance loss counts only the experts that act at a gate ---------------------------------
def test_mean_expert_weights_averages_each_expert_over_the_gates_that_cover_it():
    unet = torch.tensor([[0.7, 0.3], [0.5, 0.5]])  # experts (a, c); both act here
    text = torch.tensor([[0.9, 0.1], [0.6, 0.4]])  # c (UNet-only) has no branch here
    coverage = torch.tensor([[True, True], [True, False]])
    q = mean_expert_weights([unet, text], coverage)
    q_a, q_c = (0.6 + 0.75) / 2, 0.4  # q_c: the UNet gate alone
    torch.testing.assert_close(q, torch.tensor([q_a, q_c]))
    assert balance_loss([unet, text], coverage).item() == pytest.approx(-math.log(q_a) - math.log(q_c))
    torch.testing.assert_close(mean_expert_weights([unet, text]), torch.tensor([0.675, 0.325]))  # no mask: all gates


def test_gate_coverage_follows_the_experts_modules(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    mole = mole_pipe.mole
    coverage = mole.gate_coverage()
    assert coverage.dtype == torch.bool  # a mask (1.0 == True would pass the rows below)
    for row, (name, gate) in enumerate(mole.gates.items()):
        expected = [any(mole.layers[m].gate is gate for m in expert.layers) for expert in mole.experts]
        assert coverage[row].tolist() == expected, name
        if name.startswith("text_encoder."):
            assert expected == [True, False]  # c is UNet-only
    assert coverage[:, 1].any()


def test_balance_loss_does_not_push_text_encoder_gates_toward_a_unet_only_expert(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "c": world["c"]})
    mole = mole_pipe.mole
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in mole.gates.values():  # trained towards a everywhere: c is under-used where it acts
            gate.weight.normal_(0, 0.1, generator=g)
            gate.bias.copy_(torch.tensor([0.8, 0.2]).log())
    weights = [gate(torch.randn(2, 5, gate.weight.shape[1], generator=g)) for gate in mole.gates.values()]
    balance_loss(weights, mole.gate_coverage()).backward()
    for name, gate in mole.gates.items():
        toward_c = gate.bias.grad[0] - gate.bias.grad[1]  # > 0: a descent step raises c's logit against a's
        if name.startswith("text_encoder."):
            assert toward_c < 0, f"{name}: the balance loss rewards weight on c, which does nothing there"
        elif mole.gate_coverage()[list(mole.gates).index(name), 1]:
            assert toward_c > 0, f"{name}: where c acts, balancing still lifts it"


def covered_means(weights, covered):
    """q_i: expert i's weight averaged over the samples and over the gates that cover it alone, written out;
    ``weights``: one (B, N) tensor per gate, ``covered``: one row of N booleans per gate."""
    q = []
    for i in range(len(covered[0])):
        per_gate = [w[:, i].detach().double().mean().item() for w, row in zip(weights, covered) if row[i]]
        q.append(sum(per_gate) / len(per_gate))
    return q


def closed_form_balance(weights, covered):
    """-sum_i log q_i, q_i as ``covered_means``."""
    return -sum(math.log(q) for q in covered_means(weights, covered))


def test_gate_training_passes_the_coverage_to_the_balance_loss(world, tmp_path):
    """a (UNet and text encoder) and c (UNet only: it covers no text-encoder gate), gates randomised so the
    weights are uneven.

    - ``balance_loss(weights, coverage)`` is -sum_i log q_i with q_i averaged over the covering gates only (written
      out by hand), not the all-gates value; its gradient is exactly 0 on every uncovered (gate, expert) entry and,
      on a covered one, -1 / (q_i * B * n_i) (n_i: the gates covering i).
    - In a training step (one, before any update), the logged ``loss_balance`` and ``gate_<expert>`` are that closed
      form and those q_i for the gate weights the step's forward produced (read by hooks on the gates), with the
      coverage read from the experts' modules; and they differ from what counting every gate would give.
    """
    write_images(tmp_path / "red", (200, 20, 20), count=2)
    write_images(tmp_path / "blue", (20, 20, 200), count=2, seed=1)
    (tmp_path / "concepts.toml").write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a photo of sks"\n\n'
        f'[[concepts]]\nname = "c"\nlora = "{world["c"]}"\nimages = "blue"\nprompt = "a photo of zwx"\n'
    )
    pipe = MoLEStableDiffusionPipeline.from_pretrained(world["base"])
    pipe.load_experts({"a": world["a"], "c": world["c"]})
    mole = pipe.mole
    randomise_gates(pipe)
    # coverage from the experts' modules: the gate of some layer that holds expert i's LoRA
    covered = [[any(mole.layers[m].gate is gate for m in expert.layers) for expert in mole.experts] for gate in mole.gates.values()]
    assert not all(map(all, covered)) and all(map(any, zip(*covered)))  # some pairs uncovered; each expert somewhere
    assert all(row == [True, False] for name, row in zip(mole.gates, covered) if name.startswith("text_encoder."))

    # the function, on weights of the live gates' shapes
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(3, 2, generator=g) * 2).softmax(dim=-1).requires_grad_(True) for _ in covered]
    coverage = torch.tensor(covered)
    value = balance_loss(weights, coverage)
    assert value.item() == pytest.approx(closed_form_balance(weights, covered), rel=1e-6)
    everywhere = closed_form_balance(weights, [[True, True]] * len(covered))
    assert abs(value.item() - everywhere) > 1e-3
    value.backward()
    n, q = [sum(row[i] for row in covered) for i in range(2)], covered_means(weights, covered)
    for w, row in zip(weights, covered):
        for i in range(2):
            expected = -1 / (q[i] * 3 * n[i]) if row[i] else 0.0
            torch.testing.assert_close(w.grad[:, i], torch.full((3,), expected), rtol=1e-5, atol=0.0)

    # a training step: the weights its forward produced, read by hooks on the gates
    produced = {}

    def record(name):
        def hook(gate, args, out):  # the first call: the step's forward (validation images come later)
            if name not in produced:
                produced[name] = out.detach().clone()
        return hook

    hooks = [gate.register_forward_hook(record(name)) for name, gate in mole.gates.items()]
    train_gates(GateTrainingConfig(base=str(world["base"]), concepts=tmp_path / "concepts.toml", output_dir=tmp_path / "out",
                                   steps=1, batch_size=2, resolution=32, validation_steps=1, validation_seeds=[0],
                                   progress=False), pipe=pipe)
    for hook in hooks:
        hook.remove()
    assert set(produced) == set(mole.gates)
    step_weights = [produced[name] for name in mole.gates]
    assert all(w.shape == (2, 2) for w in step_weights)
    row = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    assert row["loss_balance"] == pytest.approx(closed_form_balance(step_weights, covered), rel=1e-5)
    assert abs(row["loss_balance"] - closed_form_balance(step_weights, [[True, True]] * len(covered))) > 1e-3
    assert [row[f"gate_{name}"] for name in mole.expert_names] == pytest.approx(covered_means(step_weights, covered), rel=1e-5)


def test_a_sparsity_weight_lowers_the_total_expert_weight_and_needs_gates_off_the_simplex(world, tmp_path):
    """beta * the mean total weight per gate; the same run with it ends with less weight on the experts."""
    write_images(tmp_path / "red", (200, 20, 20), count=2)
    write_images(tmp_path / "blue", (20, 20, 200), count=2, seed=1)
    (tmp_path / "concepts.toml").write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a photo of sks"\n\n'
        f'[[concepts]]\nname = "c"\nlora = "{world["c"]}"\nimages = "blue"\nprompt = "a photo of zwx"\n'
    )
    totals = {}
    for beta in (0.0, 1.0):
        config = GateTrainingConfig(base=str(world["base"]), concepts=tmp_path / "concepts.toml", output_dir=tmp_path / f"b{beta}",
                                    gate=GateConfig(activation="sigmoid", per_position=True), sparsity_weight=beta, steps=4, batch_size=2,
                                    resolution=32, learning_rate=5e-2, validation_steps=1, validation_seeds=[0], progress=False)
        pipe = MoLEStableDiffusionPipeline.from_pretrained(world["base"])
        pipe.load_experts({"a": world["a"], "c": world["c"]}, activation="sigmoid", per_position=True)
        train_gates(config, pipe=pipe)
        totals[beta] = torch.stack([torch.sigmoid(g.bias.detach()).sum() for g in pipe.mole.gates.values()]).mean().item()
    assert totals[1.0] < totals[0.0] - 0.05, totals
    with pytest.raises(MoLEError, match="off the simplex"):
        train_gates(GateTrainingConfig(base=str(world["base"]), concepts=tmp_path / "concepts.toml", output_dir=tmp_path / "x",
                                       gate=GateConfig(activation="softmax"), sparsity_weight=0.1, steps=1, progress=False))


# -- item 7: the command prints the errors it knows, and shows the others --------------------------------
def test_a_missing_base_model_is_a_one_line_error(tmp_path, capsys):
    rc = main(["generate", "--base", str(tmp_path / "no_model"), "--lora", str(tmp_path / "a.safetensors"),
               "--prompt", "x", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("mole-diffusion generate: error: ") and "no_model" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("option, message", [(["--weights", "nan"], "--weights must be finite numbers"),
                                             (["--height", "33"], "--height must be a positive multiple of 8")])
def test_bad_values_that_the_library_would_refuse_are_usage_errors(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base", "b", "--lora", "a=1", "--prompt", "x", "--out", "o.png", *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), ValueError("a bug"), OSError("a bug")],
                         ids=["out of memory", "ValueError", "OSError"])
def test_an_unexpected_error_inside_a_command_propagates(world, tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(MoLEStableDiffusionPipeline, "__call__", fail)
    with pytest.raises(type(error), match=str(error)):
        main(["generate", "--base", str(world["base"]), "--lora", f"a={world['a']}", "--prompt", "x", "--steps", "1",
              "--out", str(tmp_path / "o.png")])


# -- item 8 ------------------------------------------------------------------------------------------------
def test_requires_python_covers_the_standard_library_the_code_imports():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = int(re.fullmatch(r">=\s*3\.(\d+)", spec).group(1))
    if any("import tomllib" in p.read_text() for p in (ROOT / "mole_diffusion").rglob("*.py")):
        assert minor >= 11, f"tomllib is Python 3.11+, pyproject says {spec}"
