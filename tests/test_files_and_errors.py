"""Gate files (round trip and refusals) and bad LoRA files: clear errors, nothing changed."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_no_experts, assert_refused_leaving_gates_as_they_were, generate, load, randomise_gates
from conftest import read_gate_tensors
from mole_diffusion import ExpertError, GateFileError, MoLELayer
from mole_diffusion.testing import make_tiny_lora, make_tiny_pipeline


@pytest.fixture
def trained(world, mole_pipe, tmp_path):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    path = tmp_path / "gates.safetensors"
    mole_pipe.save_gates(path)
    return mole_pipe, path


def test_gate_round_trip_is_exact_and_order_free(world, trained):
    pipe, path = trained
    expected = generate(pipe)
    same = load(world["base"])
    same.load_experts({"a": world["a"], "b": world["b"]})
    same.load_gates(path)
    np.testing.assert_array_equal(generate(same), expected)
    fresh = load(world["base"])
    fresh.load_experts({"b": world["b"], "a": world["a"]})  # the other order: matched by name
    fresh.load_gates(path)
    np.testing.assert_allclose(generate(fresh), expected, atol=1e-5)  # sums in another order: rounding only
    for name, gate in pipe.mole.gates.items():
        other = fresh.mole.gates[name]
        assert torch.equal(gate.weight, other.weight[[1, 0]]) and torch.equal(gate.bias, other.bias[[1, 0]])
        assert torch.equal(gate.log_temperature, other.log_temperature)


@pytest.mark.parametrize(
    "experts, granularity, message",
    [
        ({"a": "a", "c": "c"}, "block", r"trained for experts \['a', 'b'\].*missing: \['b'\]"),  # other experts
        ({"a": "b", "b": "a"}, "block", r"expert 'a'.*not the LoRA.*knew as 'b'"),  # swapped experts
        ({"a": "a", "b": "b"}, "layer", "granularity 'block'"),  # other granularity
    ],
)
def test_gate_file_refuses_what_it_was_not_trained_for(world, trained, experts, granularity, message):
    _, path = trained
    pipe = load(world["base"])
    pipe.load_experts({name: world[file] for name, file in experts.items()}, granularity=granularity)
    with pytest.raises(GateFileError, match=message):
        pipe.load_gates(path)


def test_gate_file_refuses_other_base(world, trained, tmp_path):
    _, path = trained
    other = make_tiny_pipeline(tmp_path / "other", block_out_channels=(48, 64))
    pipe = load(other)
    pipe.load_experts({"a": make_tiny_lora(other, tmp_path / "a.safetensors", rank=4, alpha=2, seed=1),
                       "b": make_tiny_lora(other, tmp_path / "b.safetensors", rank=2, alpha=4, seed=2)})
    # other LoRA tensors too, so the expert hashes would refuse first: give the file this run's hashes
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    import json
    meta["expert_hashes"] = json.dumps({e.name: e.content_hash for e in pipe.mole.experts})
    save_file(tensors, str(tmp_path / "g.safetensors"), metadata=meta)
    with pytest.raises(GateFileError, match="another base model"):
        pipe.load_gates(tmp_path / "g.safetensors")


def test_a_base_named_by_a_relative_or_an_absolute_path_is_one_base(world, tmp_path, monkeypatch, caplog):
    """A gate file names a local base folder by its absolute path: gates trained with ``--base tiny`` load into the
    same folder named ``/abs/.../tiny`` (or from another working folder) without a warning; a copy of the base in
    another folder (same shapes) still warns, naming both."""
    import shutil

    monkeypatch.chdir(world["base"].parent)
    relative = load(world["base"].name)
    relative.load_experts({"a": world["a"], "b": world["b"]})
    relative.save_gates(tmp_path / "gates.safetensors")
    with safe_open(str(tmp_path / "gates.safetensors"), "pt") as handle:
        assert handle.metadata()["base_model"] == str(world["base"].resolve())
    monkeypatch.chdir(tmp_path)
    for base in (world["base"].resolve(), shutil.copytree(world["base"], tmp_path / "copy")):
        pipe = load(base)
        pipe.load_experts({"a": world["a"], "b": world["b"]})
        caplog.clear()
        with caplog.at_level("WARNING", logger="mole_diffusion.gate_file"):
            pipe.load_gates(tmp_path / "gates.safetensors")
        warnings = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
        if base == world["base"].resolve():
            assert warnings == []
        else:
            assert len(warnings) == 1 and str(world["base"].resolve()) in warnings[0] and "copy" in warnings[0]


def test_gate_file_missing_or_not_a_gate_file(world, trained, tmp_path):
    pipe, _ = trained
    with pytest.raises(GateFileError, match="not found"):
        pipe.load_gates(tmp_path / "nope.safetensors")
    with pytest.raises(GateFileError, match="not a mole-diffusion gate file"):
        pipe.load_gates(world["a"])
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(GateFileError, match="junk.safetensors: not a readable"):
        pipe.load_gates(tmp_path / "junk.safetensors")




def test_lora_that_does_not_fit_is_refused_before_any_change(world, mole_pipe, tmp_path):
    other = make_tiny_pipeline(tmp_path / "other", block_out_channels=(48, 64))
    wrong = make_tiny_lora(other, tmp_path / "wrong.safetensors", text_encoder=False)
    with pytest.raises(ExpertError) as e:
        mole_pipe.load_experts({"a": world["a"], "wrong": wrong})
    message = str(e.value)
    assert "wrong.safetensors" in message and "unet.down_blocks.0.attentions.0" in message
    assert "(4, 48)" in message and "in_features=32" in message  # the file's shape and the base module's
    assert_no_experts(mole_pipe)


def test_lora_for_a_missing_module_is_refused(world, mole_pipe, tmp_path):
    tensors = load_file(world["b"])
    tensors["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(2, 32)
    tensors["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(32, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ExpertError, match=r"extra.safetensors: unet.no_such_block.to_q: .* no such module"):
        mole_pipe.load_experts([tmp_path / "extra.safetensors"])
    assert_no_experts(mole_pipe)


def test_the_package_gate_functions_default_to_stable_diffusion_and_no_named_base(world, mole_pipe, tmp_path):
    from mole_diffusion import load_gates, save_gates
    from mole_diffusion.gate_file import read_gate_file

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    save_gates(mole_pipe.mole, tmp_path / "gates.safetensors")
    _, metadata = read_gate_file(tmp_path / "gates.safetensors")
    assert (metadata["family"], metadata["base_model"]) == ("sd", "")  # not the working folder
    load_gates(mole_pipe.mole, tmp_path / "gates.safetensors")  # read back with the same defaults
    mole_pipe.load_gates(tmp_path / "gates.safetensors")  # and by a Stable Diffusion pipeline


def test_missing_corrupt_and_pickled_files(mole_pipe, tmp_path):
    with pytest.raises(ExpertError, match="nope.safetensors: LoRA file not found"):
        mole_pipe.load_experts([tmp_path / "nope.safetensors"])
    # folders saved with pickled weights only (diffusers' and PEFT's .bin): the file looked for is named
    for folder in ("saved", "peft"):
        (tmp_path / folder).mkdir()
    (tmp_path / "saved" / "pytorch_lora_weights.bin").write_bytes(b"pickled")
    (tmp_path / "peft" / "adapter_model.bin").write_bytes(b"pickled")
    (tmp_path / "peft" / "adapter_config.json").write_text('{"r": 4}')
    for wanted in (tmp_path / "saved" / "pytorch_lora_weights.safetensors", tmp_path / "peft" / "adapter_model.safetensors"):
        with pytest.raises(ExpertError, match="^" + re.escape(f"{wanted}: LoRA file not found (only .safetensors files are read)") + "$"):
            mole_pipe.load_experts([wanted.parent])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ExpertError, match="bad.safetensors: not a readable safetensors"):
        mole_pipe.load_experts([tmp_path / "bad.safetensors"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "old.bin")
    with pytest.raises(ExpertError, match="never unpickled"):
        mole_pipe.load_experts([tmp_path / "old.bin"])
    assert_no_experts(mole_pipe)


def test_bad_prior_weights(world, mole_pipe):
    with pytest.raises(ValueError, match="prior_weights must be 2 positive finite numbers"):
        mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, prior_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="granularity must be one of"):
        mole_pipe.load_experts({"a": world["a"]}, granularity="pixel")


def test_base_with_leftover_peft_layers_is_refused_with_a_hint(world, mole_pipe):
    mole_pipe.load_lora_weights(world["a"], adapter_name="x")
    mole_pipe.delete_adapters(["x"])  # leaves PEFT wrapper layers behind
    with pytest.raises(ExpertError, match="already has a PEFT LoRA layer here; call unload_lora_weights"):
        mole_pipe.load_experts({"a": world["a"]})


def test_save_pretrained_is_refused_while_experts_are_loaded_and_works_after_unloading(world, mole_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    from mole_diffusion import MoLEError

    mole_pipe.load_experts({"a": world["a"]})
    with pytest.raises(MoLEError, match="unload_experts"):
        mole_pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    mole_pipe.unload_experts()
    mole_pipe.save_pretrained(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")  # loads in plain diffusers, the original weights
    for name, tensor in mole_pipe.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[name], tensor), name


def test_experts_given_as_a_list_are_named_by_file_stem_or_folder():
    from mole_diffusion.experts import expert_paths

    assert expert_paths(["loras/dog.safetensors", "loras/hat"]) == {"dog": "loras/dog.safetensors", "hat": "loras/hat"}
    with pytest.raises(ExpertError, match=re.escape("two experts are named 'dog' (a/dog.safetensors, b/dog); pass a dict")):
        expert_paths(["a/dog.safetensors", "b/dog"])
    for nothing in ([], {}):
        with pytest.raises(ExpertError, match="^no experts given$"):
            expert_paths(nothing)


def test_loaded_experts_stay_out_of_the_models_state_dicts(world, mole_pipe):
    """The experts' factors and routing buffers travel with the model (.to) but are not its weights: the state dicts
    hold the base weights (under base_layer) and the gates, nothing else, also while an expert is masked."""
    before = {"unet": dict(mole_pipe.unet.state_dict()), "text_encoder": dict(mole_pipe.text_encoder.state_dict())}
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.mole.mask_experts(["b"])  # "a" masked: its layers hold the rank rows they keep
    assert any(layer.active_rows is not None for layer in mole_pipe.mole.layers.values())
    for name, state in before.items():
        after = getattr(mole_pipe, name).state_dict()
        kept = {k.replace(".base_layer", "") for k in after if ".mole_gate." not in k}
        assert kept == state.keys(), name


def test_a_gate_file_of_other_shapes_names_the_tensor_and_changes_no_gate(world, mole_pipe, tmp_path):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(mole_pipe)
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    tensors, metadata = read_gate_tensors(tmp_path / "gates.safetensors")
    last = sorted(k for k in tensors if k.endswith(".weight"))[-1]
    tensors[last] = tensors[last][:, :-1].contiguous()  # one gate of another width
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    assert_refused_leaving_gates_as_they_were(world, tmp_path / "bad.safetensors", f"tensor {last} has shape")






def test_train_gates_resets_constant_weights_and_masks_it_was_handed(world, concepts_file, tmp_path):
    from mole_diffusion.train import GateTrainingConfig, train_gates

    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    pipe.set_experts(["a"], [1.0])  # constant weights, b masked: the gates would get no gradient
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "mole_gate" in n and n.endswith("bias")}
    train_gates(GateTrainingConfig(base=str(world["base"]), concepts=concepts_file, output_dir=tmp_path / "run",
                                   steps=2, batch_size=2, resolution=32, checkpoint_every=10, learning_rate=5e-2, progress=False), pipe=pipe)
    assert pipe.mole.constant_weights is None and pipe.mole.active == ["a", "b"]
    assert any(not torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters() if n in before)


@pytest.mark.parametrize("key", ["granularity", "expert_hashes", "base_fingerprint"])
def test_a_gate_file_lacking_metadata_names_the_key_and_changes_no_gate(world, trained, tmp_path, key):
    """a gate file without one of its metadata keys is refused by name, not with a raw KeyError."""
    tensors, metadata = read_gate_tensors(trained[1])
    save_file(tensors, tmp_path / "partial.safetensors", metadata={k: v for k, v in metadata.items() if k != key})
    assert_refused_leaving_gates_as_they_were(world, tmp_path / "partial.safetensors",
                                              rf"partial.safetensors: gate file metadata lacks \['{key}'\]")


@pytest.mark.parametrize("failure", ["error", "nan"])
def test_a_failed_fuse_leaves_every_weight_as_it_was(world, mole_pipe, monkeypatch, failure):
    """fuse_experts failing part way (here at the third module: an error such as out of memory, or a
    delta that is not finite) restores the modules fused so far, bit for bit, and a later fuse works."""
    from mole_diffusion import MoLEError

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.set_experts(["a", "b"], [0.7, 0.4])
    before = {k: v.clone() for k, v in {**mole_pipe.unet.state_dict(), **mole_pipe.text_encoder.state_dict()}.items()}
    real, calls = MoLELayer.constant_delta_weight, []

    def failing(layer):
        calls.append(layer)
        delta = real(layer)
        if len(calls) < 3:
            return delta
        if failure == "error":
            raise torch.OutOfMemoryError("pretend")
        return torch.full_like(delta, float("nan"))

    monkeypatch.setattr(MoLELayer, "constant_delta_weight", failing)
    with pytest.raises(torch.OutOfMemoryError if failure == "error" else MoLEError, match="pretend" if failure == "error" else "NaN or inf"):
        mole_pipe.fuse_experts()
    after = {**mole_pipe.unet.state_dict(), **mole_pipe.text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not mole_pipe.mole.fused and not any(layer.fused for layer in mole_pipe.mole.layers.values())
    expected = generate(mole_pipe)
    monkeypatch.setattr(MoLELayer, "constant_delta_weight", real)
    mole_pipe.fuse_experts()
    np.testing.assert_allclose(generate(mole_pipe), expected, atol=1e-5)


def test_a_stopped_log_rewrite_on_resume_loses_no_row(tmp_path, monkeypatch):
    """on resume the log keeps the rows up to the checkpoint; the rewrite goes to new files renamed
    over the old ones, so a run stopped during it leaves the old log whole."""
    import json
    from types import SimpleNamespace

    from mole_diffusion.train.common import TrainingLog

    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    first = TrainingLog(tmp_path, SimpleNamespace(trackers=[]), resumed_from=0)
    for row in rows:
        first.write(row)
    before = {name: (tmp_path / name).read_text() for name in ("log.jsonl", "log.csv")}

    real_write, written = TrainingLog.write, []

    def stopped(self, row, track=True):
        if written:
            raise KeyboardInterrupt
        written.append(row)
        real_write(self, row, track)

    monkeypatch.setattr(TrainingLog, "write", stopped)
    with pytest.raises(KeyboardInterrupt):
        TrainingLog(tmp_path, SimpleNamespace(trackers=[]), resumed_from=3)
    assert {name: (tmp_path / name).read_text() for name in before} == before
    monkeypatch.setattr(TrainingLog, "write", real_write)
    TrainingLog(tmp_path, SimpleNamespace(trackers=[]), resumed_from=3)
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == rows[:3]
    assert (tmp_path / "log.csv").read_text().splitlines() == before["log.csv"].splitlines()[:4]  # header + 3 rows


def test_a_stopped_lora_save_leaves_the_earlier_file(tmp_path, monkeypatch):
    """train-lora's final file is written under another name and renamed: a save stopped half way
    leaves the file that was there."""
    from diffusers import StableDiffusionPipeline

    from mole_diffusion.train.lora import save_lora

    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"w": torch.ones(2)}, path)

    def half_a_save(folder, weight_name, **layers):
        (folder / weight_name).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", half_a_save)
    with pytest.raises(KeyboardInterrupt):
        save_lora(object.__new__(StableDiffusionPipeline), {}, path)  # a pipeline of the family; no models needed
    assert torch.equal(load_file(path)["w"], torch.ones(2))
