"""The `mole-diffusion` command, run in-process."""

import json

import numpy as np
import pytest
import torch
from conftest import randomise_gates
from PIL import Image
from safetensors.torch import load_file

from mole_diffusion.cli import main


def test_generate_writes_a_png(world, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = main(["generate", "--base", str(world["base"]), "--lora", f"a={world['a']}", "--lora", str(world["b"]),
               "--prompt", "a red circle", "--steps", "3", "--seed", "1", "--scheduler", "euler", "--out", str(out)])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_generate_with_gates_weights_and_masking(world, tmp_path, mole_pipe):

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.save_gates(tmp_path / "untrained.safetensors")
    randomise_gates(mole_pipe)  # gates a CLI that ignored --gates could not pass for untrained ones
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    expected = mole_pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    common = ["--base", str(world["base"]), "--lora", f"a={world['a']}", "--lora", f"b={world['b']}",
              "--prompt", "a red circle", "--steps", "2"]
    runs = {
        "gates": ["--gates", str(tmp_path / "gates.safetensors")],
        "untrained": ["--gates", str(tmp_path / "untrained.safetensors")],
        "masked": ["--experts", "a"],
        "weights": ["--weights", "0.5", "0.5"],
    }
    images = {}
    for name, extra in runs.items():
        assert main(["generate", *common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    # the gate file's gates draw the image: the Python API's with those gates, not the untrained one
    assert np.abs(images["gates"] - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(images["gates"] - images["untrained"]).max() > 1
    # untrained gates are NLA with uniform weights: the same image as --weights 0.5 0.5
    assert np.abs(images["untrained"] - images["weights"]).max() <= 1
    assert np.abs(images["masked"] - images["weights"]).max() > 1


def test_generate_with_triggers_routes_by_region_as_the_python_api(world, tmp_path, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing({"a": "red", "b": "circle"}, [0.5, 1.5])
    call = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    expected = {"routed": mole_pipe("a red circle", **call).images[0]}
    mole_pipe.enable_regional_routing({"a": "red", "b": "circle"})
    call["generator"] = torch.Generator().manual_seed(0)
    expected["masked"] = mole_pipe("a red circle", experts=["a"], **call).images[0]
    common = ["--base", str(world["base"]), "--lora", f"a={world['a']}", "--lora", f"b={world['b']}",
              "--prompt", "a red circle", "--steps", "2", "--trigger", "a=red"]
    runs = {"routed": ["--trigger", "b=circle", "--weights", "0.5", "1.5"],
            "b_absent": ["--trigger", "b=square", "--weights", "0.5", "1.5"],  # b's trigger not in the prompt: b is off
            "masked": ["--trigger", "b=circle", "--experts", "a"]}
    images = {}
    for name, extra in runs.items():
        assert main(["generate", *common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    for name in ("routed", "masked"):
        assert np.abs(images[name] - np.asarray(expected[name]).astype(int)).max() <= 1
    assert np.abs(images["routed"] - images["b_absent"]).max() > 1 and np.abs(images["routed"] - images["masked"]).max() > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--base", "b", "--lora", "a=1", "--lora", "b=2", "--trigger", "a=sks", "--prompt", "x", "--out", "o.png"],
         "--trigger needs one NAME=WORDS for every --lora name ['a', 'b'], got ['a']"),
        (["generate", "--base", "b", "--lora", "a=1", "--trigger", "a=sks", "--gates", "g", "--prompt", "x", "--out", "o.png"],
         "give --gates or --trigger, not both"),
        (["generate", "--lora", "a.safetensors", "--prompt", "x", "--out", "o.png"], "--base"),
        (["generate", "--base", "b", "--lora", "=x", "--prompt", "x", "--out", "o.png"], "NAME=FILE"),
        (["generate", "--base", "b", "--lora", "a=1", "--lora", "a=2", "--prompt", "x", "--out", "o.png"], "names must differ"),
        (["generate", "--base", "b", "--lora", "a=1", "--experts", "z", "--prompt", "x", "--out", "o.png"], "not among"),
        (["generate", "--base", "b", "--lora", "a=1", "--weights", "1", "2", "--prompt", "x", "--out", "o.png"], "2 values for 1"),
        (["generate", "--base", "b", "--lora", "a=1", "--prompt", "x", "--steps", "0", "--out", "o.png"], "--steps"),
    ],
)
def test_bad_arguments_print_usage_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" in err and message in err and "Traceback" not in err


def test_bad_files_print_an_error_not_a_traceback(world, tmp_path, capsys):
    rc = main(["generate", "--base", str(world["base"]), "--lora", f"a={tmp_path / 'missing.safetensors'}",
               "--prompt", "x", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.safetensors: LoRA file not found" in err and "Traceback" not in err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "example:" in capsys.readouterr().out


def test_tiny_checkpoint_command(tmp_path, capsys):
    assert main(["tiny-checkpoint", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "pipeline" / "model_index.json").exists()
    assert (tmp_path / "tiny" / "hat.safetensors").exists() and (tmp_path / "tiny" / "dog.safetensors").exists()


def test_readme_training_commands_on_the_tiny_checkpoint(tmp_path, capsys, monkeypatch):
    """The README's training section, command for command: tiny-checkpoint, train-lora (plain and MoSLoRA),
    train-gates on the tiny concepts file, generate with the trained gates."""
    monkeypatch.chdir(tmp_path)
    small = ["--resolution", "32", "--steps", "4", "--checkpoint-every", "2", "--validation-every", "4", "--validation-steps", "2"]
    assert main(["tiny-checkpoint", "tiny"]) == 0
    assert main(["train-lora", "--base", "tiny/pipeline", "--images", "tiny/images/dog", "--prompt", "a photo of sks dog",
                 "--out", "runs/dog", "--train-text-encoder", *small]) == 0
    assert main(["train-lora", "--base", "tiny/pipeline", "--images", "tiny/images/hat", "--prompt", "a photo of sks hat",
                 "--out", "runs/hat", "--mixer", "orthogonal", "--rank", "2", *small]) == 0
    assert main(["train-gates", "--base", "tiny/pipeline", "--concepts", "tiny/concepts.toml", "--out", "runs/gates", *small]) == 0
    assert "wrote runs/gates/gates.safetensors" in capsys.readouterr().out
    assert main(["train-lora", "--base", "tiny/pipeline", "--images", "tiny/images/hat", "--prompt", "a photo of sks hat",
                 "--out", "runs/hat_orthogonal", "--orthogonal-slot", "1", "--rank", "2", *small]) == 0
    down = {k: v for k, v in load_file("runs/hat_orthogonal/pytorch_lora_weights.safetensors").items() if "lora_A" in k}
    assert down and all(torch.allclose(a.flatten(1) @ a.flatten(1).T, torch.eye(2) * a[0].numel() / 4, atol=1e-4)
                        for a in down.values())  # the fixed orthogonal slice, not a trained A
    for run in ("dog", "hat", "gates"):
        assert (tmp_path / "runs" / run / "validation" / "step-000004.png").is_file()
        assert [p.name for p in sorted((tmp_path / "runs" / run / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
        assert (tmp_path / "runs" / run / "log.csv").read_text().count("\n") == 5  # header + 4 steps
    grid = Image.open(tmp_path / "runs" / "gates" / "validation" / "step-000004.png")
    assert grid.size == (2 * 32, 2 * 32)  # rows: the two instance prompts; columns: seeds 0 and 1
    assert main(["generate", "--base", "tiny/pipeline", "--lora", "tiny/dog.safetensors", "--lora", "tiny/hat.safetensors",
                 "--gates", "runs/gates/gates.safetensors", "--prompt", "a photo of sks dog in a hat", "--steps", "2",
                 "--out", "gated.png"]) == 0
    assert main(["generate", "--base", "tiny/pipeline", "--lora", "dog=runs/dog", "--lora", "hat=runs/hat",
                 "--prompt", "a photo of sks dog in a hat", "--steps", "2", "--out", "trained_loras.png"]) == 0


def test_train_gates_bad_concepts_file_is_an_error_without_traceback(world, tmp_path, capsys):
    (tmp_path / "concepts.toml").write_text(f'[[concepts]]\nname = "dog"\nlora = "{world["a"]}"\nimages = "no_such_folder"\nprompt = "sks dog"\n')
    rc = main(["train-gates", "--base", str(world["base"]), "--concepts", str(tmp_path / "concepts.toml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "concept 'dog': field 'images': folder" in err and "no_such_folder not found" in err


def test_train_gates_clip_objective_from_the_command_line(world, tmp_path, capsys):
    """``train-gates --objective clip`` trains what ``train_gates`` does with the same settings: the same gate
    tensors (same seed), which are no longer the untrained ones; the file records the experts, the base and the
    gates' kind; the log holds the CLIP terms and its total is L_D + 0.5 * L_balance (the default alpha)."""
    from safetensors import safe_open

    from mole_diffusion import MoLEStableDiffusionPipeline
    from mole_diffusion.testing import make_concept_images, make_tiny_clip
    from mole_diffusion.train import GateTrainingConfig
    from mole_diffusion.train import train_gates as train_gates_api

    make_concept_images(tmp_path / "red", "circle", (200, 30, 30), count=2)
    make_concept_images(tmp_path / "blue", "square", (30, 30, 200), count=2, seed=1)
    (tmp_path / "concepts.toml").write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "sks"\n'
        f'[[concepts]]\nname = "b"\nlora = "{world["b"]}"\nimages = "blue"\nprompt = "zwx"\n'
    )
    clip = make_tiny_clip(tmp_path / "clip")
    rc = main(["train-gates", "--base", str(world["base"]), "--concepts", str(tmp_path / "concepts.toml"), "--out", str(tmp_path / "out"),
               "--objective", "clip", "--clip-model", clip, "--clip-sampling-steps", "2",
               "--resolution", "32", "--steps", "1", "--validation-steps", "1", "--validation-seeds", "0"])
    assert rc == 0 and f"wrote {tmp_path / 'out' / 'gates.safetensors'}" in capsys.readouterr().out
    api = train_gates_api(GateTrainingConfig(
        base=str(world["base"]), concepts=tmp_path / "concepts.toml", output_dir=tmp_path / "api", objective="clip",
        clip_model=clip, clip_sampling_steps=2, resolution=32, steps=1, validation_steps=1, validation_seeds=[0], progress=False))

    with safe_open(str(tmp_path / "out" / "gates.safetensors"), "pt") as f:
        cli_gates, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    api_gates = load_file(api)
    assert cli_gates.keys() == api_gates.keys()
    for key in cli_gates:
        torch.testing.assert_close(cli_gates[key], api_gates[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    untrained = MoLEStableDiffusionPipeline.from_pretrained(world["base"])
    untrained.load_experts({"a": world["a"], "b": world["b"]})
    untrained.save_gates(tmp_path / "untrained.safetensors")
    start = load_file(tmp_path / "untrained.safetensors")
    assert start.keys() == cli_gates.keys()
    moved = {k.rsplit(".", 1)[1] for k in cli_gates if not torch.equal(cli_gates[k], start[k])}
    assert {"weight", "bias"} <= moved, moved
    assert json.loads(metadata["expert_names"]) == ["a", "b"] and metadata["granularity"] == "block"
    # the default kind: softplus with the concepts' trigger words (the concepts' prompts are their trigger words)
    assert (metadata["activation"], metadata["per_position"], metadata["timestep_knots"]) == ("softplus", "false", "0")
    assert json.loads(metadata["gate_config"])["triggers"] == {"a": ["sks"], "b": ["zwx"]}
    assert metadata["family"] == "sd" and metadata["base_model"] == str(world["base"].resolve())

    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    for row in rows:
        assert row["loss_clip_global"] > 0 and row["loss_clip_directional"] > 0
        assert row["loss"] == pytest.approx(row["loss_clip_global"] + row["loss_clip_directional"] + 0.5 * row["loss_balance"], rel=1e-5)


def test_training_options_must_be_positive(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-lora", "--base", str(world["base"]), "--images", str(tmp_path), "--prompt", "x", "--out", str(tmp_path),
              "--checkpoint-every", "0"])
    assert exit_info.value.code == 2 and "at least 1, got '0'" in capsys.readouterr().err


def test_every_option_of_a_command_with_a_config_sets_one_of_its_fields():
    """The commands fill their config from the options whose dest is a field of it: an option whose dest named no
    field would be dropped without a word."""
    import argparse
    import dataclasses

    from mole_diffusion import GateConfig
    from mole_diffusion.cli import build_parser
    from mole_diffusion.demo.build import BuildSettings
    from mole_diffusion.eval.evaluate import EvaluationConfig
    from mole_diffusion.train import GateTrainingConfig, LoRATrainingConfig

    configs = {"train-gates": (GateTrainingConfig, GateConfig), "train-lora": (LoRATrainingConfig,),
               "evaluate": (EvaluationConfig,), "build-demo": (BuildSettings,)}
    not_settings = {"build-demo": {"out", "assets"}}  # where the build goes, not how
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, classes in configs.items():
        fields = {f.name for cls in classes for f in dataclasses.fields(cls)}
        dests = {action.dest for action in commands[command]._actions} - {"help"}
        assert dests - fields == not_settings.get(command, set()), command
