"""Bad input from the wild: non-finite numbers, degenerate LoRA files, and command-line options that would fail
only after the long work. Each is refused with one line naming the file, key or option, and changes nothing."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_no_experts, assert_refused_leaving_gates_as_they_were, generate, load, randomise_gates
from conftest import read_gate_tensors
from mole_diffusion import ExpertError, MoLEError
from mole_diffusion.cli import main
from mole_diffusion.testing import make_tiny_lora
from mole_diffusion.train.common import image_caption
from mole_diffusion.concepts import ConceptError, load_concepts


def altered(source, path, change, metadata=None):
    """A copy of the safetensors file ``source`` with ``change(tensors)`` applied."""
    tensors = load_file(source)
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


# -- non-finite numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, value", [("lora_A.weight", float("nan")), ("lora_B.weight", float("inf"))])
def test_a_lora_holding_nan_or_inf_is_refused_naming_the_key(world, mole_pipe, tmp_path, suffix, value):
    def poison(tensors):
        tensors[first(tensors, suffix)][0, 0] = value

    path = altered(world["a"], tmp_path / "poisoned.safetensors", poison)
    key = first(load_file(world["a"]), suffix).removesuffix("." + suffix)
    with pytest.raises(ExpertError, match=rf"poisoned.safetensors: {key}: {suffix.split('.')[0]} holds 1 NaN or inf"):
        mole_pipe.load_experts({"b": world["b"], "poisoned": path})
    assert_no_experts(mole_pipe)


def tiny_dora(world, tmp_path):
    """A UNet DoRA file, its first magnitude key and that magnitude's length."""
    dora = make_tiny_lora(world["base"], tmp_path / "dora.safetensors", rank=2, seed=4, dora=True, text_encoder=False)
    key = first(load_file(dora), "lora_magnitude_vector")
    return dora, key, load_file(dora)[key].numel()


def test_a_dora_magnitude_holding_nan_is_refused_naming_the_module(world, mole_pipe, tmp_path):
    dora, key, _ = tiny_dora(world, tmp_path)

    def poison(tensors):
        tensors[key][0] = float("nan")

    with safe_open(dora, "pt") as f:  # the metadata holds the file's alpha
        metadata = f.metadata()
    path = altered(dora, tmp_path / "poisoned.safetensors", poison, metadata=metadata)
    module = key.removesuffix(".lora_magnitude_vector")
    with pytest.raises(ExpertError, match=re.escape(f"{path}: {module}: lora_magnitude_vector holds 1 NaN or inf")):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_a_dora_magnitude_of_the_wrong_length_is_refused_naming_the_module(world, mole_pipe, tmp_path):
    dora, key, channels = tiny_dora(world, tmp_path)

    def shorten(tensors):
        tensors[key] = tensors[key][:3]

    path = altered(dora, tmp_path / "short.safetensors", shorten)
    module = key.removesuffix(".lora_magnitude_vector")
    with pytest.raises(ExpertError, match=re.escape(f"{path}: {module}: DoRA lora_magnitude_vector (3,) does not fit the "
                                                    f"module's {channels} output channels")):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_a_kohya_alpha_of_inf_is_refused(world, mole_pipe, tmp_path):
    def poison(tensors):
        tensors[first(tensors, ".alpha")] = torch.tensor(float("inf"))

    path = altered(world["a_kohya"], tmp_path / "alpha.safetensors", poison)
    with pytest.raises(ExpertError, match="alpha.safetensors: .*: alpha holds 1 NaN or inf"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


@pytest.mark.parametrize("parameter", ["bias", "log_temperature"])
def test_a_gate_file_holding_nan_or_inf_is_refused(world, mole_pipe, tmp_path, parameter):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.save_gates(tmp_path / "gates.safetensors")
    tensors, metadata = read_gate_tensors(tmp_path / "gates.safetensors")
    key = first(tensors, parameter)
    tensors[key] = torch.full_like(tensors[key], float("nan") if parameter == "bias" else float("inf"))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    assert_refused_leaving_gates_as_they_were(world, tmp_path / "bad.safetensors", f"gate tensor {key} holds NaN or inf")


def test_non_finite_weights_and_priors_are_refused(world, mole_pipe):
    with pytest.raises(MoLEError, match="prior_weights must be 2 positive finite numbers"):
        mole_pipe.load_experts({"a": world["a"], "b": world["b"]}, prior_weights=[float("inf"), 1.0])
    assert_no_experts(mole_pipe)
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.set_experts(["a", "b"], [0.7, 0.3])
    for weights in ([float("inf"), 1.0], [float("nan"), 1.0]):
        with pytest.raises(MoLEError, match="weights must be finite numbers"):
            mole_pipe.set_experts(["a", "b"], weights)
    assert mole_pipe.mole.constant_weights == [0.7, 0.3]  # as it was


def test_masking_takes_an_expert_out_of_every_product(world, mole_pipe):
    """A masked expert is left out, not multiplied by 0: even a term that overflowed to inf or NaN is gone, and the
    image equals a pipeline that has only the other expert."""
    mole_pipe.load_experts({"a": world["a"]})
    alone = generate(mole_pipe)
    mole_pipe.unload_experts()
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    with torch.no_grad():
        for layer in mole_pipe.mole.layers.values():
            rows = layer.rank_expert == 1
            layer.lora_A[rows] = float("inf")
            layer.lora_B[:, rows] = float("nan")
    mole_pipe.set_experts(["a"])
    np.testing.assert_allclose(generate(mole_pipe), alone, atol=1e-6)


def test_a_run_that_turns_non_finite_raises_instead_of_writing_a_black_image(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    with torch.no_grad():
        next(iter(layer for name, layer in mole_pipe.mole.layers.items() if name.startswith("unet."))).lora_B.fill_(float("inf"))
    with pytest.raises(MoLEError, match="prediction holds NaN or inf"):
        generate(mole_pipe)


# -- degenerate LoRA files --------------------------------------------------------------------------------------
def rank_zero(tensors):
    for key in [k for k in tensors if "lora_A" in k or "lora_down" in k]:
        tensors[key] = tensors[key][:0].contiguous()
    for key in [k for k in tensors if "lora_B" in k or "lora_up" in k]:
        tensors[key] = tensors[key][:, :0].contiguous()


@pytest.mark.parametrize("source", ["a", "a_kohya", "no_metadata"])
def test_a_rank_zero_lora_is_refused_and_the_pipeline_works_after(world, mole_pipe, tmp_path, source):
    metadata = None
    if source == "a":  # with lora_adapter_metadata (r and lora_alpha)
        from safetensors import safe_open

        with safe_open(str(world["a"]), "pt") as f:
            metadata = f.metadata()
    path = altered(world["a_kohya" if source == "a_kohya" else "a"], tmp_path / "r0.safetensors", rank_zero, metadata)
    before = generate(mole_pipe)
    with pytest.raises(ExpertError, match=r"r0.safetensors: .*: rank 0 .*a LoRA needs rank >= 1"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)
    np.testing.assert_array_equal(generate(mole_pipe), before)


@pytest.mark.parametrize("removed,kept", [("lora_A", "lora_B"), ("lora_B", "lora_A")])
def test_an_orphan_half_is_refused(world, mole_pipe, tmp_path, removed, kept):
    def orphan(tensors):
        del tensors[first(tensors, f"{removed}.weight")]

    path = altered(world["a"], tmp_path / "orphan.safetensors", orphan)
    with pytest.raises(ExpertError, match=f"orphan.safetensors: .* has {kept} but no {removed}: every module needs both$"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


@pytest.mark.parametrize("removed,kept", [("lora_down", "lora_up"), ("lora_up", "lora_down")])
def test_a_kohya_half_without_its_pair_is_refused(world, mole_pipe, tmp_path, removed, kept):
    """Named before diffusers' key conversion, which fails on a lone half saying keys were not renamed."""
    def halves_alone(tensors):
        for key in [k for k in tensors if k.startswith("lora_te_") and k.endswith(f"{removed}.weight")]:
            del tensors[key]

    path = altered(world["a_kohya"], tmp_path / "half.safetensors", halves_alone)
    with pytest.raises(ExpertError, match=rf"half.safetensors: lora_te_\w+\.{kept}\.weight has no "
                                          rf"lora_te_\w+\.{removed}\.weight: every module needs both$"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_a_lora_file_with_nothing_to_load_is_refused(mole_pipe, tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    with pytest.raises(ExpertError, match=re.escape(f"{path}: no LoRA weights for unet or text_encoder found (keys start: [])")):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_keys_diffusers_cannot_convert_are_refused_with_its_reason(mole_pipe, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"lora_te_nonsense.lora_down.weight": torch.zeros(2, 4), "lora_te_nonsense.lora_up.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(ExpertError, match=re.escape(
            f"{path}: diffusers' MoLEStableDiffusionPipeline.lora_state_dict could not convert its keys (a LoRA for another "
            "model family? keys start ['lora_te_nonsense.lora_down.weight', 'lora_te_nonsense.lora_up.weight']; "
            "ValueError: Could not automatically infer state dict type)")):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_integer_tensors_are_refused(world, mole_pipe, tmp_path):
    def to_int8(tensors):
        key = first(tensors, "lora_B.weight")
        tensors[key] = tensors[key].to(torch.int8)

    path = altered(world["a"], tmp_path / "int8.safetensors", to_int8)
    with pytest.raises(ExpertError, match="int8.safetensors: .*: lora_B is torch.int8 \\(expected floating-point"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


@pytest.mark.parametrize("metadata, message", [
    ("{not json", "lora_adapter_metadata: not valid JSON"),
    ('["r", 4]', "lora_adapter_metadata is not a JSON object"),
    ('{"unet.r": 4, "unet.lora_alpha": "eight", "text_encoder.r": 4, "text_encoder.lora_alpha": 4}',
     "unet LoRA config: lora_alpha of .* is 'eight' \\(expected a number\\)"),
])
def test_bad_adapter_metadata_is_refused_naming_the_file(world, mole_pipe, tmp_path, metadata, message):
    path = altered(world["a"], tmp_path / "meta.safetensors", lambda tensors: None,
                   {"format": "pt", "lora_adapter_metadata": metadata})
    with pytest.raises(ExpertError, match=f"meta.safetensors: {message}"):
        mole_pipe.load_experts([path])
    assert_no_experts(mole_pipe)


def test_a_bad_adapter_config_json_is_refused_naming_it(world, mole_pipe, tmp_path):
    folder = make_tiny_lora(world["base"], tmp_path / "peft", layout="peft")
    (folder / "adapter_config.json").write_text("{'r': 4,")
    with pytest.raises(ExpertError, match="adapter_config.json: not valid JSON"):
        mole_pipe.load_experts([folder])
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ExpertError, match="adapter_config.json: not valid JSON"):
        mole_pipe.load_experts([folder])
    assert_no_experts(mole_pipe)


def test_an_unknown_gate_granularity_is_refused_naming_the_file(world, tmp_path):
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    randomise_gates(pipe)
    pipe.save_gates(tmp_path / "gates.safetensors")
    tensors, metadata = read_gate_tensors(tmp_path / "gates.safetensors")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "granularity": "pixel"})
    from mole_diffusion.gate_file import gate_kind

    with pytest.raises(MoLEError, match="bad.safetensors: gate file metadata granularity is 'pixel'"):
        gate_kind(tmp_path / "bad.safetensors")
    assert_refused_leaving_gates_as_they_were(world, tmp_path / "bad.safetensors", "granularity is 'pixel'")


def test_a_caption_that_is_not_utf8_is_refused_naming_it(tmp_path):
    (tmp_path / "0.png").write_bytes(b"")
    (tmp_path / "0.txt").write_bytes("a photo of a caf\xe9".encode("latin-1"))
    with pytest.raises(ConceptError, match=r"0.txt: the caption of 0.png is not UTF-8"):
        image_caption(tmp_path / "0.png", "a photo")


def test_a_misspelled_concepts_field_is_refused_with_the_closest_name(concepts_file, tmp_path):
    text = concepts_file.read_text().replace('prompt = "a photo of zwx"', 'prompt = "a photo of zwx"\nclass_promt = "x"')
    path = concepts_file.parent / "misspelled.toml"
    path.write_text(text)
    with pytest.raises(ConceptError, match="concept 'b': unknown field 'class_promt' \\(did you mean 'class_prompt'\\?\\)"):
        load_concepts(path)


# -- the command line checks what it can before loading anything -----------------------------------------------
def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" in err and "Traceback" not in err
    return err


def generate_argv(tmp_path, *extra, out="o.png"):
    # a base that does not exist: a check that came after loading would say "cannot load", not the option
    return ["generate", "--base", str(tmp_path / "no-such-model"), "--lora", "a=a.safetensors", "--lora",
            "b=b.safetensors", "--prompt", "x", "--out", str(tmp_path / out), *extra]


def test_an_out_that_cannot_be_written_fails_before_loading(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert "is a folder" in usage_error(generate_argv(tmp_path, out="folder"), capsys)
    assert "not an image type" in usage_error(generate_argv(tmp_path, out="o.xyz"), capsys)
    assert "not an image type" in usage_error(generate_argv(tmp_path, out="o"), capsys)
    (tmp_path / "file").write_text("")
    assert "cannot write in" in usage_error(generate_argv(tmp_path, out="file/o.png"), capsys)


@pytest.mark.parametrize("extra, message", [
    (["--num-images", "0"], "at least 1"),
    (["--device", "tpu9"], "not a torch device"),
    (["--device", "cuda:7"], "cuda"),
    (["--experts", "a", "a"], "names an expert twice"),
    (["--weights", "inf", "1"], "finite numbers"),
])
def test_options_that_would_fail_late_fail_first(tmp_path, capsys, extra, message):
    if extra[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert message in usage_error(generate_argv(tmp_path, *extra), capsys)


def test_train_gates_refuses_non_finite_priors_before_loading(tmp_path, capsys):
    argv = ["train-gates", "--base", "b", "--concepts", "c.toml", "--out", str(tmp_path / "run")]
    assert "--prior-weights must be positive finite" in usage_error(argv + ["--prior-weights", "inf", "1"], capsys)
