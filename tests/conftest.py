import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors import safe_open

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.gate_file import GateFileError
from mole_diffusion.layers import MoLELayer
from mole_diffusion.testing import make_tiny_lora, make_tiny_pipeline

diffusers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
# `pytest -n auto` (pytest-xdist) runs one worker per core: each worker, and every process it starts, gets one
# thread, since OpenMP threads that outnumber the cores spin and run many times slower
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


# Under mutmut, a mutant runs only the tests that took under this long in its timed clean run: a mutant those
# survive is then checked against the slower tests by hand (README, "Contributing")
MUTANT_TEST_SECONDS = 1.0


def pytest_collection_modifyitems(config, items):
    """Under mutmut (which runs the tests in its mutants/ folder, beside its timings) a mutant runs the fast tests
    that reach it, the fastest files first: most mutants are killed by the first fast test that fails. Files stay
    whole, so that a module's fixtures are built once."""
    timings = Path("mutmut-stats.json")
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", "") or not timings.is_file():
        return
    seconds = json.loads(timings.read_text())["duration_by_test"]
    fast = [item for item in items if seconds.get(item.nodeid, 0.0) < MUTANT_TEST_SECONDS] or items
    kept = set(fast)
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    per_file: dict[str, float] = {}
    for item in fast:
        per_file[item.path.name] = per_file.get(item.path.name, 0.0) + seconds.get(item.nodeid, 0.0)
    items[:] = sorted(fast, key=lambda item: per_file[item.path.name])


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


def randomise_gates(pipe, seed=0, weight_std=2.0, temperature=True):
    """Seeded, clearly input-dependent gates: W_g ~ N(0, weight_std^2), b_g ~ N(0, 1), timestep offsets ~ N(0, 1)
    where a gate has them, and log_tau ~ N(0, 0.3^2) unless ``temperature=False`` (tau stays 1, so a gate's rows can
    be copied into a pipeline of fewer experts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in pipe.mole.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * weight_std)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
            if gate.timestep_logits is not None:
                gate.timestep_logits.copy_(torch.randn(gate.timestep_logits.shape, generator=g))
            if temperature:
                gate.log_temperature.copy_(torch.randn((), generator=g) * 0.3)


def assert_no_experts(pipe):
    """The pipeline holds no MoLE state and no gated layer: as loaded."""
    assert pipe.mole is None
    assert not any(isinstance(m, MoLELayer) for m in pipe.unet.modules())


def read_gate_tensors(path):
    """A gate file's tensors and metadata, to write altered copies."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_refused_leaving_gates_as_they_were(world, path, match):
    """load_gates(path) on a fresh pipeline with experts a, b raises ``match`` and changes no gate parameter."""
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})
    before = {n: p.detach().clone() for n, p in fresh.unet.named_parameters() if "mole_gate" in n}
    with pytest.raises(GateFileError, match=match):
        fresh.load_gates(path)
    assert all(torch.equal(p, before[n]) for n, p in fresh.unet.named_parameters() if "mole_gate" in n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_images(pipe):
    """Two seeded steps at 32x32 of any family's pipeline, as float images (B, H, W, 3)."""
    kwargs = dict(max_sequence_length=16) if isinstance(pipe, FluxPipeline) else {}
    return pipe("a red circle on a blue background", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def hand_merged(pipe, deltas):
    """Images of ``pipe`` with every delta added to its module's weight, the weights put back afterwards."""
    originals = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            component, module = name.split(".", 1)
            weight = getattr(pipe, component).get_submodule(module).weight
            originals[name] = weight.clone()
            weight.add_(delta.reshape(weight.shape))
    try:
        return short_images(pipe)
    finally:
        with torch.no_grad():
            for name, weight in originals.items():
                component, module = name.split(".", 1)
                getattr(pipe, component).get_submodule(module).weight.copy_(weight)
