"""experiments.interference: token-routed prompt embeddings, and the LoRA files and world it runs on."""

from pathlib import Path

import pytest
import torch

from experiments import interference
from experiments.interference import NAMES, routed_embeddings, text_embeddings, trigger_positions
from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo.run import ASSETS


def test_token_routed_prompt_embedding_takes_each_trigger_from_its_own_lora():
    """experiments.interference: trigger tokens from their own concept's text LoRA, the rest as asked."""
    pipe = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.load_experts({name: ASSETS / "loras" / f"{name}.safetensors" for name in NAMES})
    prompt, triggers = "a red sks in zwx style on a qkx background", {"star": "sks", "stripes": "zwx", "checker": "qkx"}
    routed = routed_embeddings(pipe, prompt, [0.0, 0.0, 0.0], triggers)
    base, ids = text_embeddings(pipe, prompt, [0.0, 0.0, 0.0])
    positions = {name: trigger_positions(pipe.tokenizer, ids.tolist(), t) for name, t in triggers.items()}
    assert [len(p) for p in positions.values()] == [len(pipe.tokenizer(t, add_special_tokens=False).input_ids) for t in triggers.values()]
    changed = []
    for index, name in enumerate(NAMES):
        alone, _ = text_embeddings(pipe, prompt, [float(i == index) for i in range(3)])
        torch.testing.assert_close(routed[0, positions[name]], alone[0, positions[name]])
        changed += [name] if not torch.allclose(alone[0, positions[name]], base[0, positions[name]]) else []
    # the LoRAs with a text-encoder half change their trigger's tokens (the second world's stripes is UNet-only)
    text_halves = [e.name for e in pipe.mole.experts if any(layer.startswith("text_encoder.") for layer in e.layers)]
    assert changed == text_halves and changed
    others = [p for p in range(len(ids)) if not any(p in where for where in positions.values())]
    torch.testing.assert_close(routed[0, others], base[0, others])


@pytest.fixture
def loaded_experts(monkeypatch) -> list[dict]:
    """The files each ``load_experts`` call got; the call then stops the run (generating would take minutes)."""
    loaded = []

    def stop(self, files):
        loaded.append(dict(files))
        raise SystemExit(0)

    monkeypatch.setattr(MoLEStableDiffusionPipeline, "load_experts", stop)
    return loaded


def test_interference_takes_other_lora_files_by_name(tmp_path, loaded_experts, capsys):
    loaded = loaded_experts
    with pytest.raises(SystemExit):
        interference.main(["--out", str(tmp_path), "--lora", "star=mine/star.safetensors", "sum:1,1,1:1,1,1:"])
    assert loaded == [{"star": Path("mine/star.safetensors"), "stripes": ASSETS / "loras" / "stripes.safetensors",
                       "checker": ASSETS / "loras" / "checker.safetensors"}]
    with pytest.raises(SystemExit) as refused:
        interference.main(["--out", str(tmp_path), "--lora", "dog=mine/dog.safetensors", "sum:1,1,1:1,1,1:"])
    assert refused.value.code == 2 and "--lora dog=mine/dog.safetensors: expected NAME=FILE with NAME one of star, stripes, checker" in capsys.readouterr().err


def test_interference_runs_on_a_world_of_your_own(tmp_path, monkeypatch, loaded_experts):
    """--assets: the pipeline and the LoRAs come from that world (build-demo's install folder), not the package's."""
    opened, loaded = [], loaded_experts
    original = MoLEStableDiffusionPipeline.from_pretrained.__func__

    def open_shipped(cls, path, **kwargs):
        opened.append(Path(path))
        return original(cls, ASSETS / "pipeline", **kwargs)  # a pipeline that exists; the path asked is the point

    monkeypatch.setattr(MoLEStableDiffusionPipeline, "from_pretrained", classmethod(open_shipped))
    mine = tmp_path / "world"
    with pytest.raises(SystemExit):
        interference.main(["--out", str(tmp_path / "out"), "--assets", str(mine), "--lora", "star=s.safetensors",
                           "sum:1,1,1:1,1,1:"])
    assert opened == [mine / "pipeline"]
    assert loaded == [{"star": Path("s.safetensors"), "stripes": mine / "loras" / "stripes.safetensors",
                       "checker": mine / "loras" / "checker.safetensors"}]
