import pytest

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import CONCEPTS
from mole_diffusion.demo.run import ASSETS


@pytest.fixture(scope="module")
def shipped_pipe():
    """The shipped world with its LoRAs and gates, one per test module (the experiments set weights and hooks on it)."""
    pipe = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.load_experts({name: ASSETS / "loras" / f"{name}.safetensors" for name in CONCEPTS})
    pipe.load_gates(ASSETS / "gates.safetensors")
    pipe.set_progress_bar_config(disable=True)
    return pipe
