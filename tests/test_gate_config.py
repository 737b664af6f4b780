"""GateConfig: every setting of the gates in one place, checked once. load_experts, gate files, gate training and
the command line take it; gate files from before it (the settings as keys of their own) still load as they were."""

import dataclasses
import json
import re

import pytest
import torch
from conftest import assert_refused_leaving_gates_as_they_were, load, read_gate_tensors, unet_output
from safetensors import safe_open
from safetensors.torch import save_file

from mole_diffusion import GateConfig, MoLEError
from mole_diffusion.cli import main
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.gate_file import GateFileError, base_fingerprint, gate_kind, read_gate_config, read_gate_file

SIGMOID_PER_POSITION = GateConfig(activation="sigmoid", per_position=True, timestep_knots=3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"granularity": "pixel"}, r"granularity must be one of \('block', 'layer', 'network'\), got 'pixel'"),
        ({"activation": "relu"}, r"activation must be one of \('softmax', 'sigmoid', 'softplus'\), got 'relu'"),
        ({"per_position": "yes"}, "per_position must be True or False, got 'yes'"),
        ({"granularity": "layer", "per_position": True},
         "per-position gates read a block's feature map: granularity 'block', not 'layer'"),
        ({"timestep_knots": 1}, r"needs at least 2 knots \(0 for none\), got 1"),
        ({"timestep_knots": -2}, r"needs at least 2 knots \(0 for none\), got -2"),
        ({"timestep_knots": 2.0}, r"needs at least 2 knots \(0 for none\), got 2.0"),
        ({"prior_weights": [float("inf"), 1.0]}, r"prior_weights must be 2 positive finite numbers \(one per expert\), got \[inf, 1.0\]"),
        ({"prior_weights": [float("nan")]}, r"prior_weights must be 1 positive finite numbers \(one per expert\), got \[nan\]"),
        ({"prior_weights": [0.5, 0.0]}, r"prior_weights must be 2 positive finite numbers \(one per expert\), got \[0.5, 0.0\]"),
        ({"prior_weights": [0.5, "half"]}, r"prior_weights must be 2 positive finite numbers \(one per expert\), got \[0.5, 'half'\]"),
        ({"prior_weights": "0.5 0.5"}, r"prior_weights must be numbers, one per expert, or \{expert name: weight\}, got '0.5 0.5'"),
        ({"prior_weights": {"dog": -1.0}}, r"prior_weights must be positive finite numbers, one per expert, got \{'dog': -1.0\}"),
        ({"activation": "sigmoid", "prior_weights": [0.5, 1.0]}, r"^sigmoid gates need prior weights below 1, got \[0.5, 1.0\] "
                                                                 r"\(one expert's default prior is 1: pass prior_weights, e.g. \[0.5\]\)$"),
    ],
)
def test_a_setting_that_cannot_be_is_refused_naming_it_and_what_was_expected(settings, message):
    with pytest.raises(MoLEError, match=message):
        GateConfig(**settings)


def test_gates_keep_the_granularity_they_were_placed_with(world):
    """Turning gates into another kind changes what each gate computes, never where the gates are."""
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    with pytest.raises(MoLEError, match=r"^these gates have granularity 'block', not 'layer': load the experts again with "
                                        r"that granularity$"):
        pipe.mole.set_gate_config(GateConfig(granularity="layer"))


def test_a_config_stays_as_it_was_checked():
    config = GateConfig(activation="softplus", prior_weights=[1, 2])
    assert config.prior_weights == (1.0, 2.0) and all(type(w) is float for w in config.prior_weights)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.activation = "relu"
    with pytest.raises(MoLEError, match="activation must be one of"):  # a changed copy is checked again
        dataclasses.replace(config, activation="relu")


def test_prior_weights_by_name_are_put_in_the_order_of_the_experts():
    by_name = GateConfig(prior_weights={"hat": 0.25, "dog": 0.75})
    assert by_name.for_experts(["dog", "hat"]).prior_weights == (0.75, 0.25)
    assert by_name.for_experts(["hat", "dog"]).prior_weights == (0.25, 0.75)
    with pytest.raises(MoLEError, match=r"prior_weights has no weight for expert\(s\) \['cat'\]; the experts are \['dog', 'cat'\]"):
        by_name.for_experts(["dog", "cat"])
    with pytest.raises(MoLEError, match=r"prior_weights must be 3 positive finite numbers \(one per expert\), got \[1.0, 2.0\]"):
        GateConfig(prior_weights=[1, 2]).for_experts(["a", "b", "c"])
    assert GateConfig().for_experts(["a", "b"]).prior_weights is None  # uniform, whatever the experts


def test_load_experts_takes_a_gate_config_or_its_fields_as_keywords_not_both(world):
    config, keywords = load(world["base"]), load(world["base"])
    settings = dict(activation="sigmoid", per_position=True, timestep_knots=2, prior_weights={"b": 0.2, "a": 0.6})
    config.load_experts({"a": world["a"], "b": world["b"]}, gate_config=GateConfig(**settings))
    keywords.load_experts({"a": world["a"], "b": world["b"]}, **settings)
    expected = GateConfig(activation="sigmoid", per_position=True, timestep_knots=2, prior_weights=[0.6, 0.2])
    assert config.mole.gate_config == keywords.mole.gate_config == expected
    gate = config.mole.gates["unet.mid_block.attentions.0"]
    assert (gate.activation, gate.per_position, tuple(gate.timestep_logits.shape)) == ("sigmoid", True, (2, 2))
    torch.testing.assert_close(torch.sigmoid(gate.bias), torch.tensor([0.6, 0.2]))  # the prior, in the experts' order
    assert torch.equal(unet_output(config), unet_output(keywords))

    other = load(world["base"])
    with pytest.raises(MoLEError, match=r"in gate_config or as keywords, not both: gate_config and \['activation'\] given"):
        other.load_experts({"a": world["a"]}, activation="softmax", gate_config=GateConfig())
    assert other.mole is None


def test_a_gate_file_records_its_config_and_load_gates_restores_it_in_the_loaded_order(world, tmp_path):
    config = dataclasses.replace(SIGMOID_PER_POSITION, prior_weights=[0.3, 0.6])
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=config)
    pipe.save_gates(tmp_path / "gates.safetensors")
    assert read_gate_config(tmp_path / "gates.safetensors") == config
    assert gate_kind(tmp_path / "gates.safetensors") == SIGMOID_PER_POSITION  # the prior only starts untrained gates
    with safe_open(str(tmp_path / "gates.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["gate_config"]) == {"granularity": "block", "activation": "sigmoid", "per_position": True,
                                                   "timestep_knots": 3, "prior_weights": [0.3, 0.6], "triggers": None}
    # the settings also as keys of their own, as older versions of the package read them
    assert [metadata[k] for k in ("granularity", "activation", "per_position", "timestep_knots")] == ["block", "sigmoid", "true", "3"]

    fresh = load(world["base"])
    fresh.load_experts({"b": world["b"], "a": world["a"]})  # plain gates, the experts in the other order
    fresh.load_gates(tmp_path / "gates.safetensors")
    assert fresh.mole.gate_config == dataclasses.replace(config, prior_weights=[0.6, 0.3])
    fresh.save_gates(tmp_path / "again.safetensors")
    assert read_gate_config(tmp_path / "again.safetensors") == fresh.mole.gate_config


def old_gate_file(pipe, path, settings: dict[str, str]) -> None:
    """``pipe``'s gates written as save_gates wrote them before the gate_config key: the settings as keys of
    their own (``settings``, JSON text), no prior weights."""
    mole = pipe.mole
    tensors = {f"{name}.{key}": p.detach().float().contiguous() for name, gate in mole.gates.items()
               for key, p in gate.named_parameters()}
    metadata = {"format": "mole-diffusion-gates", "format_version": "1", "expert_names": json.dumps(mole.expert_names),
                "expert_hashes": json.dumps({e.name: e.content_hash for e in mole.experts}), **settings,
                "family": "sd", "base_model": "", "base_fingerprint": base_fingerprint(mole)}
    save_file(tensors, str(path), metadata=metadata)


def test_a_gate_file_written_the_old_way_loads_with_the_same_settings(world, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, gate_config=dataclasses.replace(SIGMOID_PER_POSITION, prior_weights=[0.3, 0.6]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # gates that compute something of their own, knots included
        for p in pipe.mole.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    old_gate_file(pipe, tmp_path / "old.safetensors",
                  {"granularity": "block", "activation": "sigmoid", "per_position": "true", "timestep_knots": "3"})
    assert read_gate_config(tmp_path / "old.safetensors") == SIGMOID_PER_POSITION  # no prior weights recorded then
    fresh = load(world["base"])
    fresh.load_experts({"a": world["a"], "b": world["b"]}, gate_config=gate_kind(tmp_path / "old.safetensors"))
    fresh.load_gates(tmp_path / "old.safetensors")
    assert fresh.mole.gate_config == SIGMOID_PER_POSITION
    torch.testing.assert_close(unet_output(fresh), unet_output(pipe))

    # older still, from before the kind's keys: the paper's gates
    old_gate_file(pipe, tmp_path / "older.safetensors", {"granularity": "layer"})
    assert read_gate_config(tmp_path / "older.safetensors") == GateConfig(granularity="layer", activation="softmax")
    # an old file whose keys name a kind no GateConfig can be: refused, naming the file
    old_gate_file(pipe, tmp_path / "impossible.safetensors", {"granularity": "layer", "per_position": "true"})
    with pytest.raises(MoLEError, match="^" + re.escape(f"{tmp_path / 'impossible.safetensors'}: gate file metadata: per-position "
                                                        "gates read a block's feature map: granularity 'block', not 'layer'")):
        read_gate_config(tmp_path / "impossible.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation": "softplus"}, "gate file metadata activation is 'softplus', but its gate_config says 'softmax'"),
        ({"timestep_knots": "2"}, "gate file metadata timestep_knots is 2, but its gate_config says 0"),
        ({"gate_config": "{"}, "gate file metadata gate_config is not JSON"),
        ({"gate_config": '{"activation": "softmax", "temperature": 2}'}, r"gate_config should be an object of some of \['granularity'"),
        ({"gate_config": '{"activation": "relu"}'}, "changed.safetensors: gate file metadata: activation must be one of"),
        ({"gate_config": '{"prior_weights": [1.0]}'}, r"gate file metadata: prior_weights must be 2 positive finite numbers"),
        ({"per_position": "yes"}, r"gate file metadata per_position / timestep_knots is not JSON \(Expecting value"),
        ({"activation": "relu"}, r"gate file metadata names an unknown kind of gate \{'activation': 'relu', 'per_position': False, "
                                 r"'timestep_knots': 0\} \(activation one of \('softmax', 'sigmoid', 'softplus'\), per_position "
                                 r"true or false, timestep_knots 0 or at least 2\)$"),
    ],
)
def test_a_gate_file_whose_config_cannot_be_is_refused_and_changes_no_gate(world, tmp_path, change, message):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    pipe.save_gates(tmp_path / "gates.safetensors")
    tensors, metadata = read_gate_tensors(tmp_path / "gates.safetensors")
    save_file(tensors, str(tmp_path / "changed.safetensors"), metadata={**metadata, **change})
    with pytest.raises(MoLEError, match=message):
        read_gate_config(tmp_path / "changed.safetensors")
    assert_refused_leaving_gates_as_they_were(world, tmp_path / "changed.safetensors", message)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda metadata: {"format": "kohya"}, "not a mole-diffusion gate file (metadata format='kohya')"),
        (lambda metadata: {"format_version": "9"}, "gate file format version 9, this version reads 1"),
        (lambda metadata: {"expert_names": "[star"}, "gate file metadata expert_names / expert_hashes is not JSON (Expecting value"),
        # the names again, as a list: every name has an entry, but no hash
        (lambda metadata: {"expert_hashes": metadata["expert_names"]}, "gate file metadata expert_hashes should hold one hash for each of"),
    ],
)
def test_a_gate_file_whose_metadata_cannot_be_read_is_refused_saying_what_it_holds(tmp_path, change, message):
    tensors, metadata = read_gate_tensors(ASSETS / "gates.safetensors")
    path = tmp_path / "changed.safetensors"
    save_file(tensors, str(path), metadata={**metadata, **change(metadata)})
    with pytest.raises(GateFileError, match="^" + re.escape(f"{path}: {message}")):
        read_gate_file(path)


def test_injection_refuses_a_granularity_where_the_gate_config_goes():
    """inject_experts once took the granularity as its third argument; a caller still passing one is told what
    the argument is now."""
    from mole_diffusion.inject import inject_experts

    with pytest.raises(TypeError, match="^gate_config must be a GateConfig, got 'block'$"):
        inject_experts({}, [], "block")


def test_train_gates_builds_the_gate_config_from_its_options(world, concepts_file, tmp_path, capsys):
    common = ["--base", str(world["base"]), "--concepts", str(concepts_file), "--resolution", "32", "--steps", "1",
              "--batch-size", "2", "--validation-steps", "1", "--validation-seeds", "0"]
    assert main(["train-gates", *common, "--out", str(tmp_path / "run"), "--activation", "sigmoid", "--per-position",
                 "--timestep-knots", "3", "--prior-weights", "0.3", "0.6"]) == 0
    assert read_gate_config(tmp_path / "run" / "gates.safetensors") == dataclasses.replace(SIGMOID_PER_POSITION, prior_weights=[0.3, 0.6])
    capsys.readouterr()
    # a combination GateConfig refuses: the command's one-line error
    assert main(["train-gates", *common, "--out", str(tmp_path / "bad"), "--granularity", "layer", "--per-position"]) == 1
    err = capsys.readouterr().err
    assert "train-gates: error: per-position gates read a block's feature map: granularity 'block', not 'layer'" in err
    assert not (tmp_path / "bad").exists()  # refused before the run began


# Mutants of gate_file.py judged equivalent: `known = None` for `known = False` (both falsy); an old file's config
# checked with no expert names (files from before the gate_config key recorded no prior weights to put in order).
