"""Gates with trigger words (GateConfig.triggers): an expert weighs 0 in an image whose prompt lacks its trigger,
checked against diffusers' own LoRAs, in training, in gate files and in the CLI."""

import numpy as np
import pytest
import torch
from conftest import generate, load, randomise_gates

from mole_diffusion import GateConfig
from mole_diffusion.cli import main
from mole_diffusion.errors import MoLEError
from mole_diffusion.train import GateTrainingConfig, train_gates

TRIGGERS = {"a": "red", "b": "circle"}  # words of conftest.generate's prompt
SUM = GateConfig(activation="softplus", prior_weights=[1.0, 1.0], triggers=TRIGGERS)


def test_untrained_gates_with_triggers_are_diffusers_loras_of_the_prompts_triggers(world, mole_pipe, ref_pipe):
    """Softplus gates at prior 1: a prompt naming both triggers is the plain sum (set_adapters([1, 1])); one naming
    only a's is diffusers with LoRA a alone; under guidance the negative half follows its image's prompt."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=SUM)
    for name in "ab":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    for prompt, adapters in (("a red circle on a blue background", ["a", "b"]), ("a red square", ["a"])):
        ref_pipe.set_adapters(adapters, [1.0] * len(adapters))
        np.testing.assert_allclose(generate(mole_pipe, prompt=prompt, guidance_scale=3.0),
                                   generate(ref_pipe, prompt=prompt, guidance_scale=3.0), rtol=1e-4, atol=1e-5)
    recorded = mole_pipe.gate_weights  # the last call: b's trigger absent, b at 0 at every gate
    assert all(torch.equal(w[..., 1], torch.zeros_like(w[..., 1])) and bool((w[..., 0] > 0.99).all()) for w in recorded.values())


def test_each_image_of_a_batch_weighs_the_experts_its_own_prompt_names(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=SUM)
    randomise_gates(mole_pipe)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = generate(mole_pipe, prompt=["a red circle", "a blue square"], guidance_scale=3.0, latents=latents)
    weights = mole_pipe.gate_weights["unet.mid_block.attentions.0"]  # (steps, 2 guidance halves x 2 images, N)
    assert bool((weights[:, [1, 3], :] == 0).all()) and bool((weights[:, [0, 2], :] > 0).all())  # no trigger in image 2
    for index, prompt in enumerate(["a red circle", "a blue square"]):
        alone = generate(mole_pipe, prompt=prompt, guidance_scale=3.0, latents=latents[index : index + 1])
        np.testing.assert_allclose(batch[index], alone[0], atol=1e-4)  # batch-size rounding, magnified by guidance


def test_gates_with_triggers_need_the_prompt_and_name_every_expert(world, mole_pipe):
    with pytest.raises(MoLEError, match=r"triggers name the experts \['a'\]; the experts are \['a', 'b'\]"):
        mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=GateConfig(triggers={"a": "red"}))
    with pytest.raises(MoLEError, match="expert 'b' needs a trigger word"):
        GateConfig(triggers={"a": "red", "b": " "})
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=SUM)
    embeds = torch.randn(1, 77, mole_pipe.text_encoder.config.hidden_size)
    with pytest.raises(MoLEError, match="pass prompt=, not prompt_embeds="):
        mole_pipe(prompt_embeds=embeds, num_inference_steps=2, height=32, width=32)
    assert mole_pipe.mole.prompt_experts is None  # nothing of a refused call stays behind


def test_training_by_trigger_learns_and_the_gate_file_keeps_the_triggers(world, concepts_file, tmp_path):
    """train_gates(by_trigger=True) gives the gates the concepts' trigger words; the gate file restores them."""
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=GateConfig(activation="softplus", prior_weights=[1.0, 1.0]))
    before = {name: gate.weight.detach().clone() for name, gate in pipe.mole.gates.items()}
    config = GateTrainingConfig(base=str(world["base"]), concepts=concepts_file, output_dir=tmp_path / "run", steps=4,
                                batch_size=2, resolution=32, learning_rate=5e-2, progress=False, by_trigger=True,
                                gate=GateConfig(activation="softplus", prior_weights=[1.0, 1.0]))
    path = train_gates(config, pipe=pipe)
    assert pipe.mole.gate_config.triggers == {"a": ("sks",), "b": ("zwx",)}
    assert any(not torch.equal(gate.weight, before[name]) for name, gate in pipe.mole.gates.items())  # they learned
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]}, gate_config=GateConfig(activation="softplus"))
    fresh.load_gates(path)
    assert fresh.mole.gate_config.triggers == {"a": ("sks",), "b": ("zwx",)}
    np.testing.assert_allclose(generate(fresh, prompt="a photo of sks"), generate(pipe, prompt="a photo of sks"), atol=1e-6)


def test_one_concepts_examples_give_no_gradient_to_the_experts_they_do_not_name(world, mole_pipe):
    from mole_diffusion.train import common

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=SUM)
    randomise_gates(mole_pipe)
    for gate in mole_pipe.mole.gates.values():
        gate.requires_grad_(True)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    conditions = common.encode_prompts(mole_pipe, ["a photo of red", "a red square"], 32)  # a's trigger only
    prediction = mole_pipe.unet(latents, torch.tensor([500, 300]), **conditions).sample
    prediction.square().mean().backward()
    rows = [gate.weight.grad for gate in mole_pipe.mole.gates.values() if gate.weight.grad is not None]
    assert rows and all(bool((grad[1] == 0).all()) for grad in rows) and any(bool(grad[0].abs().sum() > 0) for grad in rows)


def test_train_gates_by_trigger_from_the_command_line(world, concepts_file, tmp_path, capsys):
    rc = main(["train-gates", "--base", str(world["base"]), "--concepts", str(concepts_file), "--out", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "2", "--resolution", "32", "--activation", "softplus",
               "--prior-weights", "1", "1", "--by-trigger", "--checkpoint-every", "2", "--validation-every", "100"])
    assert rc == 0
    from mole_diffusion.gate_file import read_gate_config

    assert read_gate_config(tmp_path / "run" / "gates.safetensors").triggers == {"a": ("sks",), "b": ("zwx",)}


def test_with_trigger_words_the_default_gates_are_gates_with_trigger_words(world, mole_pipe, ref_pipe):
    """load_experts(files, triggers=...) with nothing else: softplus at prior 1 (diffusers' LoRAs of the prompt's
    triggers at weight 1); without triggers the paper's gate (softmax, uniform: NLA); a kind given is kept."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, triggers=TRIGGERS)
    assert mole_pipe.mole.gate_config == SUM.for_experts(["a", "b"])
    for name in "ab":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    ref_pipe.set_adapters(["a"], [1.0])
    np.testing.assert_allclose(generate(mole_pipe, prompt="a red square"), generate(ref_pipe, prompt="a red square"),
                               rtol=1e-4, atol=1e-5)
    mole_pipe.unload_experts()
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    assert (mole_pipe.mole.gate_config.activation, mole_pipe.mole.gate_config.prior_weights) == ("softmax", None)
    mole_pipe.unload_experts()
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, triggers=TRIGGERS, activation="softmax")
    assert (mole_pipe.mole.gate_config.activation, mole_pipe.mole.gate_config.prior_weights) == ("softmax", None)
    assert GateConfig(activation="sigmoid", triggers=TRIGGERS).for_experts(["a", "b"]).prior_weights is None
    mole_pipe.unload_experts()
    with pytest.raises(MoLEError, match=r"not both: gate_config and \['triggers'\] given"):
        mole_pipe.load_experts({"a": world["a"]}, gate_config=SUM, triggers=TRIGGERS)


@pytest.mark.parametrize("extra, kind, printed", [
    # the default: every concept has a trigger word
    ([], ("softplus", (1.0, 1.0), {"a": ("sks",), "b": ("zwx",)}), "block, softplus at prior 1 1, trigger words a=sks b=zwx"),
    (["--no-by-trigger"], ("softmax", None, None), "block, softmax at uniform prior\n"),  # the paper's gates
    (["--activation", "softmax"], ("softmax", None, None), "block, softmax at uniform prior\n"),  # a kind chosen
    (["--activation", "softmax", "--by-trigger"], ("softmax", None, {"a": ("sks",), "b": ("zwx",)}),
     "block, softmax at uniform prior, trigger words a=sks b=zwx"),
])
def test_train_gates_trains_gates_with_trigger_words_by_default(world, concepts_file, tmp_path, capsys, extra, kind, printed):
    from mole_diffusion.gate_file import read_gate_config

    rc = main(["train-gates", "--base", str(world["base"]), "--concepts", str(concepts_file), "--out", str(tmp_path / "run"),
               "--steps", "1", "--batch-size", "2", "--resolution", "32", "--checkpoint-every", "1",
               "--validation-every", "100", *extra])
    assert rc == 0 and f"gates: {printed}" in capsys.readouterr().out
    config = read_gate_config(tmp_path / "run" / "gates.safetensors")
    assert (config.activation, config.prior_weights, config.triggers) == kind


def test_without_a_trigger_word_for_every_concept_the_default_is_the_papers_gate(world, tmp_path):
    both = tmp_path / "concepts.toml"  # the same prompt twice: no word of its own for either concept
    (tmp_path / "red").mkdir()
    from conftest import write_images

    write_images(tmp_path / "red", (200, 20, 20))
    both.write_text("".join(f'[[concepts]]\nname = "{n}"\nlora = "{world[n]}"\nimages = "red"\nprompt = "a photo of sks"\n\n'
                            for n in "ab"))
    args = dict(base=str(world["base"]), concepts=both, steps=1, batch_size=2, resolution=32, progress=False,
                checkpoint_every=1, validation_every=100)
    pipe = load(world["base"])
    train_gates(GateTrainingConfig(**args, output_dir=tmp_path / "default"), pipe=None)
    from mole_diffusion.gate_file import read_gate_config

    config = read_gate_config(tmp_path / "default" / "gates.safetensors")
    assert (config.activation, config.triggers) == ("softmax", None)
    with pytest.raises(MoLEError, match="by_trigger needs each concept's trigger word"):
        train_gates(GateTrainingConfig(**args, output_dir=tmp_path / "asked", by_trigger=True), pipe=pipe)


def test_a_caption_without_its_concepts_trigger_keeps_the_papers_gate(world, concepts_file, tmp_path, capsys):
    """A reference image whose caption file lacks its concept's trigger words would train no gate of its LoRA
    under trigger words: the default falls back to the paper's gate, and asking for trigger words is refused."""
    import shutil

    from mole_diffusion.gate_file import read_gate_config

    shutil.copytree(concepts_file.parent, tmp_path / "concepts")
    image = sorted((tmp_path / "concepts" / "red").glob("*.png"))[0]
    image.with_suffix(".txt").write_text("a red picture")  # neither sks nor zwx
    args = ["train-gates", "--base", str(world["base"]), "--concepts", str(tmp_path / "concepts" / "concepts.toml"),
            "--steps", "1", "--batch-size", "2", "--resolution", "32", "--checkpoint-every", "1", "--validation-every", "100"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert "gates: block, softmax at uniform prior\n" in capsys.readouterr().out
    assert read_gate_config(tmp_path / "default" / "gates.safetensors").triggers is None
    assert main([*args, "--out", str(tmp_path / "asked"), "--by-trigger"]) == 1
    err = capsys.readouterr().err
    assert f"{image}: its prompt 'a red picture' lacks concept 'a''s trigger words 'sks'" in err and "1 such image(s)" in err
    # prior weights given choose the paper's kind too, unless an activation says otherwise
    assert GateConfig(triggers=TRIGGERS, prior_weights=[0.5, 0.5]).for_experts(["a", "b"]).activation == "softmax"
