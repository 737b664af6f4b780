"""Every job on tiny SDXL and Flux checkpoints, from the command line: the pipeline class comes from the base
folder's model_index.json (tiny-checkpoint --family, train-lora, train-gates, generate, evaluate)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mole_diffusion.cli import main
from mole_diffusion.pipelines import MoLEFluxPipeline, MoLEStableDiffusionXLPipeline, mole_pipeline_class
from mole_diffusion.testing import make_tiny_clip

CLASSES = {"sdxl": MoLEStableDiffusionXLPipeline, "flux": MoLEFluxPipeline}
SMALL = ["--resolution", "32", "--steps", "3", "--checkpoint-every", "3", "--validation-every", "3", "--validation-steps", "2"]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_every_job_runs_on_the_family(family, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny-checkpoint", "tiny", "--family", family]) == 0
    assert mole_pipeline_class("tiny/pipeline") is CLASSES[family]

    # train-lora: a LoRA of this family, in diffusers' layout for it, that the MoLE pipeline loads
    assert main(["train-lora", "--base", "tiny/pipeline", "--images", "tiny/images/dog", "--prompt", "a photo of sks dog",
                 "--out", "runs/dog", "--train-text-encoder", "--learning-rate", "1e-2", *SMALL]) == 0
    with safe_open("runs/dog/pytorch_lora_weights.safetensors", "pt") as f:
        components = {key.split(".")[0] for key in f.keys()}
    assert components == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"transformer", "text_encoder"})
    # the empty prompt held to the base's: SDXL's unconditional prediction is its zero conditions; Flux has no
    # classifier-free guidance to hold it for
    held = ["train-lora", "--base", "tiny/pipeline", "--images", "tiny/images/dog", "--prompt", "a photo of sks dog",
            "--out", "runs/held", "--unconditional-weight", "1", *SMALL]
    if family == "sdxl":
        assert main(held) == 0
        assert json.loads((tmp_path / "runs/held/log.jsonl").read_text().splitlines()[-1])["loss_unconditional"] > 0
    else:
        capsys.readouterr()
        assert main(held) == 1 and "--unconditional-weight is for classifier-free guidance" in capsys.readouterr().err

    # train-gates on the tiny concepts file: the gates move from their untrained values, nothing else trains
    assert main(["train-gates", "--base", "tiny/pipeline", "--concepts", "tiny/concepts.toml", "--out", "runs/gates",
                 "--learning-rate", "5e-2", *SMALL]) == 0
    assert "wrote runs/gates/gates.safetensors" in capsys.readouterr().out
    assert (tmp_path / "runs" / "gates" / "validation" / "step-000003.png").is_file()
    pipe = CLASSES[family].from_pretrained("tiny/pipeline")
    pipe.load_experts({"dog": "tiny/dog.safetensors", "hat": "tiny/hat.safetensors"})
    untrained = {name: gate.weight.detach().clone() for name, gate in pipe.mole.gates.items()}
    pipe.load_gates("runs/gates/gates.safetensors")
    assert any(not torch.equal(gate.weight, untrained[name]) for name, gate in pipe.mole.gates.items())
    with safe_open("runs/gates/gates.safetensors", "pt") as f:
        assert f.metadata()["family"] == family

    # generate with the trained gates: the image the Python API makes with them
    assert main(["generate", "--base", "tiny/pipeline", "--lora", "dog=tiny/dog.safetensors", "--lora", "hat=tiny/hat.safetensors",
                 "--gates", "runs/gates/gates.safetensors", "--prompt", "a photo of sks dog", "--steps", "2", "--guidance-scale", "4",
                 "--height", "32", "--width", "32", "--out", "out.png"]) == 0
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=4.0, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_allclose(np.asarray(Image.open("out.png")) / 255.0, expected, atol=1.5 / 255)

    # evaluate: every method that applies to the family, scored
    clip = make_tiny_clip(tmp_path / "clip")
    assert main(["evaluate", "--base", "tiny/pipeline", "--concepts", "tiny/concepts.toml", "--gates", "runs/gates/gates.safetensors",
                 "--clip-model", clip, "--steps", "2", "--resolution", "32", "--seeds", "0", "--prompt", "a photo of sks dog and hat",
                 "--out", "eval"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    methods = {row["method"] for row in rows}
    assert {"mole", "mole_constant", "nla", "sum", "set_adapters", "peft_cat", "switch", "composite", "single_dog", "base"} <= methods
    assert ("regional" in methods) == (family == "sdxl")  # regional routing reads a UNet's cross-attention maps
    assert all(np.isfinite(row["clip_text"]) for row in rows)
    images = {row["method"]: np.asarray(Image.open(tmp_path / "eval" / row["image"])) for row in rows}
    assert np.abs(images["mole"].astype(int) - images["base"].astype(int)).max() > 0  # the experts act
    assert (tmp_path / "eval" / "report.md").is_file()


def test_flux_refuses_a_sampler_of_sd(tmp_path, capsys):
    assert main(["tiny-checkpoint", str(tmp_path / "tiny"), "--family", "flux"]) == 0
    assert main(["generate", "--base", str(tmp_path / "tiny/pipeline"), "--lora", str(tmp_path / "tiny/dog.safetensors"),
                 "--scheduler", "ddim", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "o.png")]) == 1
    assert "flow matching" in capsys.readouterr().err
