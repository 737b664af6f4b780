import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.testing import make_tiny_lora, make_tiny_pipeline

diffusers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny SD checkpoint and LoRA files: a, b (mixed ranks and alphas), a kohya twin of a, a UNet-only c."""
    root = tmp_path_factory.mktemp("world")
    base = make_tiny_pipeline(root / "tiny")
    files = {
        "a": make_tiny_lora(base, root / "a.safetensors", rank=4, alpha=2, seed=1),
        "a_kohya": make_tiny_lora(base, root / "a_kohya.safetensors", rank=4, alpha=2, seed=1, layout="kohya"),
        "b": make_tiny_lora(base, root / "b.safetensors", rank=2, alpha=4, seed=2),
        "c": make_tiny_lora(base, root / "c.safetensors", rank=3, seed=3, text_encoder=False, unet_modules=("to_q", "to_v", "conv1")),
    }
    return {"base": base, "root": root, **files}


def load(path, cls=MoLEStableDiffusionPipeline):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def mole_pipe(world):
    return load(world["base"])


@pytest.fixture
def ref_pipe(world):
    return load(world["base"], StableDiffusionPipeline)


def generate(pipe, **kwargs):
    """A short, seeded run returning float images (B, H, W, 3)."""
    args = dict(prompt="a red circle on a blue background", num_inference_steps=3, height=32, width=32, output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


def unet_output(pipe, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500] * batch), encoder_hidden_states=text).sample


def write_images(folder, colour, count=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.tensor(colour) + torch.randint(0, 40, (32, 32, 3), generator=g)).clamp(0, 255).byte()
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def concepts_file(world):
    """Two concepts, a (red images) and b (blue), for the gate-training tests."""
    root = world["root"] / "concepts"
    write_images(root / "red", (200, 20, 20))
    write_images(root / "blue", (20, 20, 200), seed=1)
    path = root / "concepts.toml"
    path.write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a photo of sks"\n\n'
        f'[[concepts]]\nname = "b"\nlora = "{world["b"]}"\nimages = "blue"\nprompt = "a photo of zwx"\n'
    )
    return path
