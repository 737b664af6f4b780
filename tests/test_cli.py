"""The `mole-diffusion` command, run in-process."""

import numpy as np
import pytest
from PIL import Image

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
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    common = ["--base", str(world["base"]), "--lora", f"a={world['a']}", "--lora", f"b={world['b']}",
              "--prompt", "a red circle", "--steps", "2"]
    runs = {
        "gates": ["--gates", str(tmp_path / "gates.safetensors")],
        "masked": ["--experts", "a"],
        "weights": ["--weights", "0.5", "0.5"],
    }
    images = {}
    for name, extra in runs.items():
        assert main(["generate", *common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    # untrained gates are NLA with uniform weights: the same image as --weights 0.5 0.5
    assert np.abs(images["gates"] - images["weights"]).max() <= 1
    assert np.abs(images["masked"] - images["weights"]).max() > 1


@pytest.mark.parametrize(
    "argv, message",
    [
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
