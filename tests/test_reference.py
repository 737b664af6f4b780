"""MoLE against diffusers' own LoRA application (load_lora_weights + set_adapters)."""

import numpy as np
import pytest
import torch

from conftest import generate, unet_output


def test_experts_change_the_output(world, mole_pipe):
    base_images, base_unet = generate(mole_pipe), unet_output(mole_pipe)
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    assert np.abs(generate(mole_pipe) - base_images).max() > 1e-2
    assert (unet_output(mole_pipe) - base_unet).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_single_expert_equals_diffusers(world, mole_pipe, ref_pipe, name):
    mole_pipe.load_experts({name: world[name]})
    ref_pipe.load_lora_weights(world[name], adapter_name=name)
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(mole_pipe), generate(ref_pipe), atol=1e-5)


def test_one_active_expert_of_several_equals_diffusers(world, mole_pipe, ref_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]})
    mole_pipe.set_experts(["b"])
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(mole_pipe), generate(ref_pipe), atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "layer", "network"])
def test_untrained_gates_equal_set_adapters_with_prior(world, mole_pipe, ref_pipe, granularity):
    prior = [0.2, 0.5, 0.3]
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]}, granularity, prior_weights=prior)
    for name in "abc":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    ref_pipe.set_adapters(["a", "b", "c"], prior)
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(mole_pipe), generate(ref_pipe), atol=1e-5)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, 0.3]])
def test_constant_weights_equal_set_adapters_and_fused_equals_unfused(world, mole_pipe, ref_pipe, weights):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.set_experts(["a", "b"], weights)
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    ref_pipe.set_adapters(["a", "b"], weights)
    unfused = generate(mole_pipe)
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unfused, generate(ref_pipe), atol=1e-5)

    mole_pipe.fuse_experts()
    np.testing.assert_allclose(generate(mole_pipe), unfused, atol=1e-5)
    ref_pipe.fuse_lora(adapter_names=["a", "b"])
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)


def test_kohya_twin_gives_the_same_output(world, mole_pipe, ref_pipe):
    mole_pipe.load_experts({"a": world["a_kohya"]})
    kohya = generate(mole_pipe)
    kohya_hash = mole_pipe.mole.experts[0].content_hash
    mole_pipe.unload_experts()
    mole_pipe.load_experts({"a": world["a"]})
    np.testing.assert_allclose(kohya, generate(mole_pipe), atol=1e-6)
    assert mole_pipe.mole.experts[0].content_hash == kohya_hash
    ref_pipe.load_lora_weights(world["a_kohya"], adapter_name="a")
    np.testing.assert_allclose(kohya, generate(ref_pipe), atol=1e-5)


def test_peft_adapter_folder(world, mole_pipe, tmp_path):
    from peft import LoraConfig, get_peft_model

    unet = mole_pipe.unet
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v"], init_lora_weights=False)
    peft_unet = get_peft_model(unet, config)
    peft_unet.save_pretrained(tmp_path / "peft_adapter")
    expected = unet_output(mole_pipe)  # computed through PEFT's own LoRA layers
    mole_pipe.unet = peft_unet.unload()
    assert (expected - unet_output(mole_pipe)).abs().max() > 1e-3
    mole_pipe.load_experts([tmp_path / "peft_adapter"])
    assert mole_pipe.expert_names == ["peft_adapter"]
    torch.testing.assert_close(unet_output(mole_pipe), expected, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_and_alphas_within_one_file(world, mole_pipe, ref_pipe, tmp_path):
    """A kohya file with per-module alphas and ranks: each module scaled by its own alpha / rank.

    diffusers 0.42 gives every UNet module of such a file the most common alpha (its alpha_pattern keys do not
    match the module names), so the reference is PEFT's layers with each scale set to the file's alpha / rank.
    """
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    tensors = load_file(world["a_kohya"])
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))
    for i, down in enumerate(downs):
        module = down.removesuffix(".lora_down.weight")
        tensors[f"{module}.alpha"] = torch.tensor(float(1 + i % 3))
        if i % 4 == 0:  # every fourth module gets rank 2
            tensors[down] = tensors[down][:2].contiguous()
            tensors[f"{module}.lora_up.weight"] = tensors[f"{module}.lora_up.weight"][:, :2].contiguous()
    save_file(tensors, str(tmp_path / "mixed.safetensors"))

    mole_pipe.load_experts({"mixed": tmp_path / "mixed.safetensors"})
    ref_pipe.load_lora_weights(tmp_path / "mixed.safetensors", adapter_name="mixed")
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for name, layer in getattr(ref_pipe, component).named_modules():
            if isinstance(layer, LoraLayer):
                key = prefix + name.replace(".", "_")
                layer.scaling["mixed"] = float(tensors[f"{key}.alpha"]) / tensors[f"{key}.lora_down.weight"].shape[0]
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(mole_pipe), generate(ref_pipe), atol=1e-5)


def test_diffusers_file_without_metadata_has_scale_one(world, mole_pipe, ref_pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(world["b"]), str(tmp_path / "no_metadata.safetensors"))  # no lora_adapter_metadata
    mole_pipe.load_experts([tmp_path / "no_metadata.safetensors"])
    assert {lora.scale for lora in mole_pipe.mole.experts[0].layers.values()} == {1.0}
    ref_pipe.load_lora_weights(tmp_path / "no_metadata.safetensors", adapter_name="x")
    torch.testing.assert_close(unet_output(mole_pipe), unet_output(ref_pipe), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generate(mole_pipe), generate(ref_pipe), atol=1e-5)
