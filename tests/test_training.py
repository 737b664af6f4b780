"""Gate training and concept-LoRA training on the tiny checkpoint (CPU, seconds)."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import load, unet_output, write_images
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors.torch import load_file

from mole_diffusion import GateConfig, MoLEError
from mole_diffusion.gates import Gate, balance_loss
from mole_diffusion.train import ConceptError, GateTrainingConfig, add_mixers, load_concepts, train_gates
from mole_diffusion.train import common
from mole_diffusion.train.lora import save_lora


def gate_config(world, concepts_file, out, **kwargs):
    args = dict(base=str(world["base"]), concepts=concepts_file, output_dir=out, steps=6, batch_size=2,
                resolution=32, checkpoint_every=3, learning_rate=5e-2, progress=False)
    return GateTrainingConfig(**{**args, **kwargs})


def fixed_loss(pipe, concepts_file, draws=8):
    """The denoising loss of ``pipe`` on the concepts' images at fixed noise and timesteps."""
    examples = common.encode_examples(load_concepts(concepts_file), pipe.vae, 32, 1.0)
    scheduler = common.DDPMScheduler.from_config(pipe.scheduler.config)
    total = 0.0
    with torch.no_grad():
        for draw in range(draws):
            embeds = common.encode_prompts(pipe, examples.prompts, 32)
            generator = torch.Generator().manual_seed(draw)
            total += common.denoising_loss(pipe, scheduler, examples.latents, embeds, examples.loss_weights, generator).item()
    return total / draws


def test_gate_training_lowers_the_loss_and_changes_only_gates(world, concepts_file, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    frozen = {f"{c}.{n}": t.clone() for c in ("unet", "text_encoder", "vae")
              for n, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()] if "mole_gate" not in n}
    gates_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "mole_gate" in n}
    before = fixed_loss(pipe, concepts_file)

    path = train_gates(gate_config(world, concepts_file, tmp_path, steps=20, checkpoint_every=100), pipe=pipe)

    assert fixed_loss(pipe, concepts_file) < before
    for c in ("unet", "text_encoder", "vae"):
        for n, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()]:
            if "mole_gate" not in n:
                assert torch.equal(t, frozen[f"{c}.{n}"]), f"{c}.{n} changed"
    changed = [n for n, p in pipe.unet.named_parameters() if "mole_gate" in n and not torch.equal(p, gates_before[n])]
    assert len(changed) == len(gates_before)

    # the gate file is the trained gates, usable by a fresh pipeline
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]})
    fresh.load_gates(path)
    torch.testing.assert_close(unet_output(fresh), unet_output(pipe))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert {"loss", "loss_denoising", "loss_balance", "gate_a", "gate_b"} <= set(rows[0])
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("step,loss")


def test_resume_gives_the_gates_of_an_uninterrupted_run(world, concepts_file, tmp_path):
    whole = train_gates(gate_config(world, concepts_file, tmp_path / "whole"))
    train_gates(gate_config(world, concepts_file, tmp_path / "split", steps=3))
    split = train_gates(gate_config(world, concepts_file, tmp_path / "split", resume=True))
    a, b = load_file(whole), load_file(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    whole_log = (tmp_path / "whole" / "log.jsonl").read_text()
    assert (tmp_path / "split" / "log.jsonl").read_text().count("\n") == whole_log.count("\n") == 6


def test_resuming_with_gates_of_another_kind_is_refused(world, concepts_file, tmp_path, capsys):
    """Every gate kind has the same parameters: a checkpoint records its gates' kind, and resuming it as another
    (here the paper's gates, against the default gates with trigger words) is refused."""
    train_gates(gate_config(world, concepts_file, tmp_path, steps=3))
    with pytest.raises(common.CheckpointError, match="checkpoint of another run, with other gates \\(block, softplus at prior 1 1, "
                                                     "trigger words a=sks b=zwx; this run: block, softmax at uniform prior\\)"):
        train_gates(gate_config(world, concepts_file, tmp_path, resume=True, by_trigger=False))
    # a checkpoint from before the kind was recorded resumes, saying as what
    state = tmp_path / "checkpoints" / "step-000003" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "kind"}))
    capsys.readouterr()
    train_gates(gate_config(world, concepts_file, tmp_path, resume=True, by_trigger=False))
    assert "does not record what it trained; resuming as block, softmax at uniform prior" in capsys.readouterr().out


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one(world, concepts_file, tmp_path, monkeypatch):
    real_save, calls = common.save_file, []

    def save_then_die(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as handle:
                handle.write(b"half a file")
            raise KeyboardInterrupt("killed")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(common, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_gates(gate_config(world, concepts_file, tmp_path))
    monkeypatch.setattr(common, "save_file", real_save)
    assert [p.name for p in common.list_checkpoints(tmp_path / "checkpoints")] == ["step-000003"]
    train_gates(gate_config(world, concepts_file, tmp_path, resume=True))  # goes on from step 3
    assert [p.name for p in common.list_checkpoints(tmp_path / "checkpoints")] == ["step-000003", "step-000006"]


def test_checkpoints_are_pruned_and_refused_for_another_run(world, concepts_file, tmp_path):
    train_gates(gate_config(world, concepts_file, tmp_path, checkpoint_every=1, keep_checkpoints=2))
    assert [p.name for p in common.list_checkpoints(tmp_path / "checkpoints")] == ["step-000005", "step-000006"]
    with pytest.raises(common.CheckpointError, match="another run"):
        train_gates(gate_config(world, concepts_file, tmp_path, gate=GateConfig(granularity="layer"), resume=True, steps=8))


def test_balance_loss_has_a_gradient_that_pulls_collapsed_gates_to_uniform():
    gates = [Gate(3, 8) for _ in range(2)]
    for gate in gates:
        gate.bias.data = torch.tensor([4.0, 0.0, -4.0])  # collapsed onto expert 0
    optimizer = torch.optim.SGD([p for g in gates for p in g.parameters()], lr=0.5)
    features = torch.randn(4, 10, 8)
    spreads = []
    for _ in range(20):
        weights = [gate(features) for gate in gates]
        loss = balance_loss(weights)
        optimizer.zero_grad()
        loss.backward()
        assert all(g.bias.grad.abs().sum() > 0 for g in gates)
        optimizer.step()
        spreads.append(torch.stack(weights).mean(dim=(0, 1)).max().item() - 1 / 3)
    assert spreads[-1] < 0.5 * spreads[0]
    uniform = balance_loss([torch.full((4, 3), 1 / 3)])
    assert uniform.item() == pytest.approx(3 * math.log(3))  # the minimum, N log N


def test_mixer_folded_into_b_gives_the_unfolded_output(world, tmp_path):
    pipe = load(world["base"], StableDiffusionPipeline)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v", "conv1", "proj_in"])}
    pipe.unet.add_adapter(configs["unet"])
    assert add_mixers(pipe.unet, "orthogonal") > 0
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the mixer matter
                p.normal_(std=0.3)
    unfolded = unet_output(pipe)
    save_lora(pipe, configs, tmp_path / "moslora.safetensors")
    assert not any("lora_B.default.0" in n for n, _ in pipe.unet.named_parameters())  # folded in place
    torch.testing.assert_close(unet_output(pipe), unfolded, rtol=1e-5, atol=1e-5)

    reference = load(world["base"], StableDiffusionPipeline)  # a plain LoRA file any tool reads
    reference.load_lora_weights(tmp_path / "moslora.safetensors")
    torch.testing.assert_close(unet_output(reference), unfolded, rtol=1e-5, atol=1e-5)
    mole = load(world["base"])
    mole.load_experts({"moslora": tmp_path / "moslora.safetensors"})
    torch.testing.assert_close(unet_output(mole), unfolded, rtol=1e-5, atol=1e-5)


def test_a_text_encoder_lora_is_written_with_the_keys_every_tool_reads(world, tmp_path):
    pipe = load(world["base"], StableDiffusionPipeline)
    configs = {"text_encoder": LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"])}
    pipe.text_encoder.add_adapter(configs["text_encoder"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ids = pipe.tokenizer(["a photo of sks"], return_tensors="pt").input_ids
    adapted = pipe.text_encoder(ids)[0].detach()
    save_lora(pipe, configs, tmp_path / "text.safetensors")
    # transformers 5's flattened CLIPTextModel has no text_model; the file keeps the prefix other tools expect
    assert all(k.startswith("text_encoder.text_model.") for k in load_file(tmp_path / "text.safetensors"))
    reference = load(world["base"], StableDiffusionPipeline)
    reference.load_lora_weights(tmp_path / "text.safetensors")
    mole = load(world["base"])
    mole.load_experts({"text": tmp_path / "text.safetensors"})
    with torch.no_grad():
        assert not torch.allclose(reference.text_encoder(ids)[0], load(world["base"]).text_encoder(ids)[0])
        torch.testing.assert_close(reference.text_encoder(ids)[0], adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mole.text_encoder(ids)[0], adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('images = "red"', 'images = "nowhere"'), r"concept 'a': field 'images': folder .*nowhere not found"),
        (lambda t: t.replace('images = "red"', 'images = "empty"'), r"concept 'a': field 'images': no images in"),
        (lambda t: t.replace('images = "red"', 'images = "broken"'), r"concept 'a': field 'images': cannot read image .*bad.png"),
        (lambda t: t.replace('name = "b"', 'name = "a"'), r"concept 'a': duplicate name"),
        (lambda t: t.replace('lora = "', 'lora = "missing/', 1), r"concept 'a': field 'lora': .*missing.* not found"),
        (lambda t: t.replace('prompt = "a photo of sks"\n', ""), r"concept 'a': field 'prompt' is missing"),
        (lambda t: "concepts = 3", r"expected one or more \[\[concepts\]\]"),
        (lambda t: t + "[[[", r"not a valid TOML file"),
        (lambda t: "concepts = [1, 2]", r"concepts entry #1 is not a table"),
    ],
)
def test_bad_concept_files_name_the_concept_and_field(concepts_file, tmp_path, edit, message):
    (concepts_file.parent / "empty").mkdir(exist_ok=True)
    (concepts_file.parent / "broken").mkdir(exist_ok=True)
    (concepts_file.parent / "broken" / "bad.png").write_bytes(b"not a png")
    path = concepts_file.parent / "edited.toml"
    text = concepts_file.read_text()
    path.write_text(edit(text))
    with pytest.raises(ConceptError, match=message):
        load_concepts(path)


def test_clip_objective_trains_gates_and_lowers_its_loss(world, concepts_file, tmp_path):
    from mole_diffusion.testing import make_tiny_clip
    from mole_diffusion.train.gates import clip_objective

    clip_model = make_tiny_clip(tmp_path / "clip")
    config = gate_config(world, concepts_file, tmp_path / "run", objective="clip", clip_model=clip_model, clip_sampling_steps=2,
                         steps=8, checkpoint_every=100)
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    concepts = load_concepts(concepts_file)
    examples = common.encode_examples(concepts, pipe.vae, 32, 1.0)
    objective = clip_objective(pipe, config, concepts, examples, "cpu")

    def fixed_clip_loss():
        with torch.no_grad():
            return sum(objective([0, 3, 1, 4], torch.Generator().manual_seed(d))[0].item() for d in range(4))

    before = fixed_clip_loss()
    train_gates(config, pipe=pipe)
    after = fixed_clip_loss()
    assert after < before
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"loss_clip_global", "loss_clip_directional", "loss_balance"} <= set(rows[0])


def test_clip_objective_needs_a_loadable_clip_model(world, concepts_file, tmp_path):
    from mole_diffusion.clip import ClipError

    with pytest.raises(ValueError, match="needs a CLIP model"):
        train_gates(gate_config(world, concepts_file, tmp_path, objective="clip"))
    with pytest.raises(ClipError, match="cannot load CLIP model local-dir:.*nowhere"):
        train_gates(gate_config(world, concepts_file, tmp_path, objective="clip", clip_model=f"local-dir:{tmp_path / 'nowhere'}"))
    with pytest.raises(ClipError, match="give pretrained="):
        train_gates(gate_config(world, concepts_file, tmp_path, objective="clip", clip_model="ViT-B-32"))


def test_gradient_checkpointing_gives_the_same_gates(world, concepts_file, tmp_path):
    """Non-reentrant checkpointing recomputes blocks in backward; the gates behind them still get their gradients."""
    plain = load_file(train_gates(gate_config(world, concepts_file, tmp_path / "plain", steps=3)))
    checkpointed = load_file(train_gates(gate_config(world, concepts_file, tmp_path / "ckpt", steps=3, gradient_checkpointing=True)))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, load_file(train_gates(gate_config(world, concepts_file, tmp_path / "zero", steps=1)))[k])
               for k, v in plain.items())


@pytest.mark.parametrize("options", [{"gradient_accumulation_steps": 2}, {"mixed_precision": "bf16"}])
def test_accumulation_and_mixed_precision_train(world, concepts_file, tmp_path, options):
    from accelerate.state import AcceleratorState

    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    AcceleratorState._reset_state()  # accelerate allows one mixed-precision setting per process
    try:
        path = train_gates(gate_config(world, concepts_file, tmp_path, steps=2, **options), pipe=pipe)
    finally:
        AcceleratorState._reset_state()
    gates = load_file(path)
    assert all(torch.isfinite(v).all() for v in gates.values())
    assert any(k.endswith("weight") and v.abs().sum() > 0 for k, v in gates.items())  # W_g moved from zero
    # save_gates writes fp32 whatever it is given, so the file's dtype proves nothing: the trained gates
    # themselves are fp32 and the file holds them bit for bit, values a bf16 round trip would not keep
    trained = {f"{g}.{k}": p for g, gate in pipe.mole.gates.items() for k, p in gate.named_parameters()}
    assert all(p.dtype == torch.float32 and torch.equal(p.detach().cpu(), gates[k]) for k, p in trained.items())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in gates.values())
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_train_lora_resume_gives_the_file_of_an_uninterrupted_run(world, concepts_file, tmp_path):
    from mole_diffusion.train import LoRATrainingConfig, train_lora

    def config(out, **kwargs):
        return LoRATrainingConfig(base=str(world["base"]), images=concepts_file.parent / "red", prompt="a photo of sks",
                                  output_dir=out, steps=4, checkpoint_every=2, resolution=32, learning_rate=1e-2,
                                  mixer="kaiming", train_text_encoder=True, progress=False, **kwargs)

    whole = load_file(train_lora(config(tmp_path / "whole")))
    train_lora(replace(config(tmp_path / "split"), steps=2))
    split = load_file(train_lora(config(tmp_path / "split", resume=True)))
    assert whole.keys() == split.keys() and any(k.startswith("text_encoder.") for k in whole)
    for key in whole:
        assert torch.equal(whole[key], split[key]), key


def test_orthogonal_slots_fix_a_to_orthogonal_subspaces_and_train_only_b(world, concepts_file, tmp_path):
    from mole_diffusion.errors import MoLEError
    from mole_diffusion.train import LoRATrainingConfig, train_lora

    def trained(slot):
        return load_file(train_lora(LoRATrainingConfig(
            base=str(world["base"]), images=concepts_file.parent / "red", prompt="a photo of sks", output_dir=tmp_path / str(slot),
            steps=3, resolution=32, learning_rate=1e-2, train_text_encoder=True, target_modules=["to_q", "to_k", "conv1"],
            orthogonal_slot=slot, progress=False)))

    first, second = trained(0), trained(1)
    downs = [k for k in first if "lora_A" in k]
    assert downs and any(k.startswith("text_encoder.") for k in downs) and first.keys() == second.keys()
    for key in downs:
        a0, a1 = first[key].flatten(1).double(), second[key].flatten(1).double()
        rank, inputs = a0.shape
        # each A its own slice of one orthogonal basis, rows at the gaussian init's length: untouched by training
        torch.testing.assert_close(a0 @ a0.T, torch.eye(rank, dtype=torch.float64) * inputs / rank**2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a0 @ a1.T, torch.zeros(rank, rank, dtype=torch.float64), atol=1e-5, rtol=0)
        up0 = first[key.replace("lora_A", "lora_B")].flatten(1).double()
        up1 = second[key.replace("lora_A", "lora_B")].flatten(1).double()
        assert up0.abs().sum() > 0 and up1.abs().sum() > 0  # B moved from its zero init
        # the two deltas' row spaces are orthogonal: (B0 A0)(B1 A1)^T = 0
        torch.testing.assert_close((up0 @ a0) @ (up1 @ a1).T, torch.zeros(up0.shape[0], up1.shape[0], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    with pytest.raises(MoLEError, match=r"has \d+ inputs: at rank 4 it holds orthogonal slots 0\.\.\d+, not slot 99"):
        trained(99)


def test_a_new_run_into_an_old_runs_folder_is_refused(world, concepts_file, tmp_path):
    train_gates(gate_config(world, concepts_file, tmp_path, steps=3))
    with pytest.raises(common.CheckpointError, match="earlier run .*pass --resume"):
        train_gates(gate_config(world, concepts_file, tmp_path, steps=3))


def test_resume_with_other_shapes_names_the_tensor(world, concepts_file, tmp_path):
    from mole_diffusion.train import LoRATrainingConfig, train_lora

    def config(rank, **kwargs):
        return LoRATrainingConfig(base=str(world["base"]), images=concepts_file.parent / "red", prompt="sks", output_dir=tmp_path,
                                  steps=2, resolution=32, rank=rank, progress=False, **kwargs)

    train_lora(config(4))
    with pytest.raises(common.CheckpointError, match=r"lora_A.default.weight has shape \(4, .*\) there and \(2, .*\) in this run"):
        train_lora(config(2, resume=True))
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
        train_lora(config(4, resume=True, checkpoint_every=0))


def test_an_image_caption_file_replaces_the_concept_prompt_for_that_image(world, tmp_path):
    folder = write_images(tmp_path / "captioned", (200, 20, 20))
    (folder / "1.txt").write_text("a red sks on a blue background\n")
    (folder / "2.txt").write_text("  \n")  # empty: the concept's prompt
    pipe = load(world["base"], StableDiffusionPipeline)
    concept = common.Concept(name="a", prompt="a photo of sks", images=folder)
    examples = common.encode_examples([concept], pipe.vae, 32, 1.0)
    assert examples.prompts == ["a photo of sks", "a red sks on a blue background", "a photo of sks"]


def test_gradient_accumulation_equals_the_larger_batch(world, concepts_file, tmp_path):
    """two accumulated micro-batches of 2 give the gates of one batch of 4 (the same examples, noise
    and timesteps; the denoising loss is a mean over examples). The balance loss is a statistic of each
    micro-batch, not a mean, so it is off here. Both agree to float rounding, which Adam magnifies (the paper's
    gates 2e-6 seen, the default gates, softplus with trigger words set per micro-batch, 2e-5); one micro-batch
    alone is over 1e-3 off (the last check)."""
    options = dict(steps=3, balance_weight=0.0, checkpoint_every=10)
    for kind, tolerance in ((dict(by_trigger=False), 1e-5), ({}, 1e-4)):
        accumulated = load_file(train_gates(gate_config(world, concepts_file, tmp_path / "accumulated", batch_size=2,
                                                        gradient_accumulation_steps=2, **options, **kind)))
        larger = load_file(train_gates(gate_config(world, concepts_file, tmp_path / "larger", batch_size=4, **options, **kind)))
        smaller = load_file(train_gates(gate_config(world, concepts_file, tmp_path / "smaller", batch_size=2, **options, **kind)))
        for key in larger:
            torch.testing.assert_close(accumulated[key], larger[key], rtol=1e-5, atol=tolerance)
        assert max((smaller[k] - larger[k]).abs().max().item() for k in larger) > 1e-3  # the batch matters
        for folder in ("accumulated", "larger", "smaller"):
            shutil.rmtree(tmp_path / folder)


def test_the_unconditional_term_keeps_the_empty_prompts_prediction_the_bases(world, concepts_file, tmp_path):
    from mole_diffusion.train import LoRATrainingConfig, train_lora

    def trained(out, weight):
        return train_lora(LoRATrainingConfig(
            base=str(world["base"]), images=concepts_file.parent / "red", prompt="a photo of sks", output_dir=out,
            steps=6, checkpoint_every=6, resolution=32, learning_rate=5e-2, train_text_encoder=True,
            unconditional_weight=weight, progress=False))

    def drift(path):  # how far the LoRA (read by diffusers) moves the UNet's prediction, per prompt
        pipe = load(world["base"], StableDiffusionPipeline)
        pipe.load_lora_weights(str(path))
        latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        moved = {}
        with torch.no_grad():
            for prompt in ("", "a photo of sks"):
                predictions = []
                for enabled in (True, False):
                    pipe.enable_lora() if enabled else pipe.disable_lora()
                    embeds = pipe.encode_prompt(prompt, "cpu", 2, False)[0]
                    predictions.append(pipe.unet(latents, 500, encoder_hidden_states=embeds).sample)
                moved[prompt] = float((predictions[0] - predictions[1]).pow(2).mean())
        return moved

    plain, held = drift(trained(tmp_path / "plain", 0.0)), drift(trained(tmp_path / "held", 10.0))
    assert held[""] < 0.5 * plain[""], (plain, held)  # a target read with the adapters on would hold nothing
    # the adapters are back on after each term: the LoRA goes on learning (a tiny random model's prompt barely steers
    # its UNet, so here the term holds the prompt's prediction back too; the demo world's LoRAs keep their concepts)
    assert held["a photo of sks"] > 0.1 * plain["a photo of sks"], (plain, held)
    last = json.loads((tmp_path / "held" / "log.jsonl").read_text().splitlines()[-1])
    assert last["loss_unconditional"] > 0 and last["loss"] > last["loss_denoising"]


def test_a_negative_unconditional_weight_is_refused(world, concepts_file, tmp_path):
    from mole_diffusion.train import LoRATrainingConfig, train_lora

    with pytest.raises(MoLEError, match="--unconditional-weight must be a number >= 0, got -1"):
        train_lora(LoRATrainingConfig(base=str(world["base"]), images=concepts_file.parent / "red", prompt="a photo of sks",
                                      output_dir=tmp_path, steps=1, unconditional_weight=-1.0, progress=False))
