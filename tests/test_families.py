"""SDXL and Flux: the equivalence suite of the SD pipeline (test_reference.py), against diffusers' own LoRA loading.

Each family gets a tiny random checkpoint (``make_tiny_pipeline(family=...)``) and LoRA files in every layout
diffusers reads for it: a (rank 4, alpha 2), b (rank 2, alpha 4), c (the denoiser only), and twins of a.
"""

import re

import numpy as np
import pytest
import torch
from conftest import randomise_gates
from diffusers import FluxPipeline, StableDiffusionXLPipeline

from mole_diffusion import GateConfig, MoLEFluxPipeline, MoLEStableDiffusionXLPipeline
from mole_diffusion.errors import MoLEError
from mole_diffusion.experts import ExpertError
from mole_diffusion.gate_file import GateFileError
from mole_diffusion.testing import make_tiny_lora, make_tiny_pipeline

FAMILIES = {"sdxl": (MoLEStableDiffusionXLPipeline, StableDiffusionXLPipeline),
            "flux": (MoLEFluxPipeline, FluxPipeline)}
# Several experts: MoLE adds all of them in one low-rank product, diffusers one adapter after another, so the
# sums are ordered differently; measured up to 2.3e-5 on SDXL's images here, hence 1e-4 (one expert: 1e-5)
MIXED_ATOL = 1e-4
LAYOUTS = {"sdxl": ["diffusers", "kohya"], "flux": ["diffusers", "kohya", "ai-toolkit", "xlabs"]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_world(request, tmp_path_factory, world):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = make_tiny_pipeline(root / "base", family=family)
    files = {"family": family, "base": base, "sd_base": world["base"], "sd_lora": world["a"]}
    files["a"] = make_tiny_lora(base, root / "a.safetensors", rank=4, alpha=2, seed=1)
    files["b"] = make_tiny_lora(base, root / "b.safetensors", rank=2, alpha=4, seed=2)
    files["c"] = make_tiny_lora(base, root / "c.safetensors", rank=3, seed=3, text_encoder=False)
    for layout in LAYOUTS[family][1:]:
        files[f"a_{layout}"] = make_tiny_lora(base, root / f"a_{layout}.safetensors", rank=4, alpha=2, seed=1, layout=layout)
    return files


def load(world, mole=True):
    pipe = FAMILIES[world["family"]][0 if mole else 1].from_pretrained(world["base"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    args = dict(prompt="a red circle on a blue background", num_inference_steps=2, height=32, width=32, output_type="np")
    if isinstance(pipe, FluxPipeline):
        args["max_sequence_length"] = 16
    return pipe(generator=torch.Generator().manual_seed(0), **{**args, **kwargs}).images


def denoiser_modules(pipe):
    return {name: getattr(pipe, name) for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "ai-toolkit", "xlabs"])
def test_one_expert_equals_load_lora_weights(family_world, layout):
    if layout not in LAYOUTS[family_world["family"]]:
        pytest.skip(f"{layout} files are Flux's")
    path = family_world["a" if layout == "diffusers" else f"a_{layout}"]
    mole, ref = load(family_world), load(family_world, mole=False)
    base = generate(mole)
    mole.load_experts({"a": path})
    ref.load_lora_weights(path, adapter_name="a")
    image = generate(mole)
    assert np.abs(image - base).max() > 1e-3  # the expert does something
    np.testing.assert_allclose(image, generate(ref), atol=1e-5)


def test_gates_sit_on_the_family_blocks(family_world):
    mole = load(family_world)
    mole.load_experts({"a": family_world["a"], "b": family_world["b"]})
    gates = list(mole.mole.gates)
    if family_world["family"] == "flux":
        assert {g for g in gates if g.startswith("transformer.")} == {
            "transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"}
        assert any(g.startswith("text_encoder.") for g in gates)
    else:  # a gate per transformer block of the UNet and per layer of each text encoder
        assert any(g.startswith("unet.") and ".attentions." in g for g in gates)
        assert {g.split(".")[0] for g in gates} == {"unet", "text_encoder", "text_encoder_2"}
    mole(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
         **({"max_sequence_length": 16} if family_world["family"] == "flux" else {}))
    history = mole.gate_weights
    assert set(history) == set(gates)
    denoiser_gate = next(g for g in gates if not g.startswith("text_encoder"))
    assert history[denoiser_gate].shape[0] == 2  # one call per denoising step


@pytest.mark.parametrize("granularity", ["block", "layer", "network"])
def test_untrained_gates_equal_set_adapters_with_prior(family_world, granularity):
    prior = [0.2, 0.5, 0.3]
    mole, ref = load(family_world), load(family_world, mole=False)
    mole.load_experts({n: family_world[n] for n in "abc"}, granularity, prior_weights=prior)
    for name in "abc":
        ref.load_lora_weights(family_world[name], adapter_name=name)
    ref.set_adapters(["a", "b", "c"], prior)
    np.testing.assert_allclose(generate(mole), generate(ref), atol=MIXED_ATOL)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, 0.3]])
def test_constant_weights_equal_set_adapters_and_fused_equals_unfused(family_world, weights):
    mole, ref = load(family_world), load(family_world, mole=False)
    mole.load_experts({"a": family_world["a"], "b": family_world["b"]})
    mole.set_experts(["a", "b"], weights)
    for name in "ab":
        ref.load_lora_weights(family_world[name], adapter_name=name)
    ref.set_adapters(["a", "b"], weights)
    unfused = generate(mole)
    np.testing.assert_allclose(unfused, generate(ref), atol=MIXED_ATOL)
    mole.fuse_experts()  # the delta added into the weight before the matmul: another summation order
    np.testing.assert_allclose(generate(mole), unfused, atol=MIXED_ATOL)
    ref.fuse_lora(adapter_names=["a", "b"])
    np.testing.assert_allclose(generate(mole), generate(ref), atol=MIXED_ATOL)


def test_masking_one_expert_of_several_equals_that_lora_alone(family_world):
    mole, ref = load(family_world), load(family_world, mole=False)
    mole.load_experts({n: family_world[n] for n in "abc"})
    ref.load_lora_weights(family_world["b"], adapter_name="b")
    # the masked experts' rank rows are still in the product, at weight 0: another summation order
    np.testing.assert_allclose(generate(mole, experts=["b"]), generate(ref), atol=MIXED_ATOL)


def test_kohya_twin_equals_its_diffusers_twin(family_world):
    mole = load(family_world)
    for layout in LAYOUTS[family_world["family"]][1:]:
        if layout == "xlabs":  # XLabs files hold only the double blocks' attention: not a twin of a
            continue
        mole.load_experts({"a": family_world[f"a_{layout}"]})
        twin, twin_hash = generate(mole), mole.mole.experts[0].content_hash
        mole.unload_experts()
        mole.load_experts({"a": family_world["a"]})
        # kohya Flux files come with alpha / r folded into the factors: the same LoRA, rounded differently
        np.testing.assert_allclose(twin, generate(mole), atol=1e-5)
        if family_world["family"] == "sdxl":
            assert mole.mole.experts[0].content_hash == twin_hash
        mole.unload_experts()


def test_unload_restores_every_module_bit_for_bit(family_world):
    mole = load(family_world)
    before = {name: (type(module), {k: v.clone() for k, v in module.state_dict().items()})
              for component, model in denoiser_modules(mole).items() for name, module in model.named_modules(prefix=component)}
    image = generate(mole)
    mole.load_experts({n: family_world[n] for n in "abc"})
    mole.set_experts(["a", "b"], [0.5, 1.5])
    mole.fuse_experts()
    mole.unload_experts()
    after = {name: (type(module), module.state_dict())
             for component, model in denoiser_modules(mole).items() for name, module in model.named_modules(prefix=component)}
    assert after.keys() == before.keys()
    for name, (kind, state) in before.items():
        assert after[name][0] is kind, name
        assert all(torch.equal(state[k], after[name][1][k]) for k in state), name
    np.testing.assert_array_equal(generate(mole), image)


def test_gate_files_round_trip_and_refuse_another_family(family_world, tmp_path):
    mole = load(family_world)
    mole.load_experts({"a": family_world["a"], "b": family_world["b"]})
    with torch.no_grad():
        for gate in mole.mole.gates.values():
            gate.weight.normal_()
    learned = generate(mole)
    mole.save_gates(tmp_path / "gates.safetensors")
    fresh = load(family_world)
    fresh.load_experts({"b": family_world["b"], "a": family_world["a"]})
    fresh.load_gates(tmp_path / "gates.safetensors")
    np.testing.assert_allclose(generate(fresh), learned, atol=1e-5)  # experts in another order: rank rows too

    from mole_diffusion import MoLEStableDiffusionPipeline

    sd = MoLEStableDiffusionPipeline.from_pretrained(family_world["sd_base"])
    sd.load_experts({"a": family_world["sd_lora"], "b": family_world["sd_lora"]})
    with pytest.raises(GateFileError, match="gates were trained on a .* base .* this pipeline is Stable Diffusion"):
        sd.load_gates(tmp_path / "gates.safetensors")
    sd.save_gates(tmp_path / "sd_gates.safetensors")
    with pytest.raises(GateFileError, match="trained on a Stable Diffusion 1.x/2.x base"):
        fresh.load_gates(tmp_path / "sd_gates.safetensors")


def test_a_lora_of_another_family_is_refused_before_any_change(family_world):
    mole = load(family_world)
    image = generate(mole)
    with pytest.raises(ExpertError, match=str(family_world["sd_lora"]).replace(".", r"\.") + r": .*(unet|text_encoder)\."):
        mole.load_experts({"a": family_world["a"], "sd": family_world["sd_lora"]})
    assert mole.mole is None
    np.testing.assert_array_equal(generate(mole), image)

    from mole_diffusion import MoLEStableDiffusionPipeline

    sd = MoLEStableDiffusionPipeline.from_pretrained(family_world["sd_base"])
    foreign = {"sdxl": "text_encoder_2", "flux": "transformer"}[family_world["family"]]
    with pytest.raises(ExpertError, match=re.escape(str(family_world["a"])) + rf": {foreign}\.\S+: weights for a {foreign}, "
                       r"which this pipeline \(MoLEStableDiffusionPipeline, components \['unet', 'text_encoder'\]\) "
                       "does not have: a LoRA for another model family$"):
        sd.load_experts({"a": family_world["a"]})
    assert sd.mole is None


def test_flux_refuses_regional_routing(family_world):
    if family_world["family"] != "flux":
        pytest.skip("Flux only")
    mole = load(family_world)
    mole.load_experts({"a": family_world["a"]})
    with pytest.raises(MoLEError, match="regional routing reads the UNet's cross-attention"):
        mole.enable_regional_routing({"a": "sks"})




def test_per_position_gates_on_image_tokens(family_world):
    """Per-position gates on SDXL's UNet blocks and on Flux's image tokens: untrained they are the block gate
    (NLA with the prior == set_adapters); trained, positions get their own weights, gradients reach the gates
    alone, and masking all but one expert leaves that LoRA alone at every position."""
    prior = [0.2, 0.5, 0.3]
    mole, ref = load(family_world), load(family_world, mole=False)
    mole.load_experts({n: family_world[n] for n in "abc"}, per_position=True, prior_weights=prior)
    for name in "abc":
        ref.load_lora_weights(family_world[name], adapter_name=name)
    ref.set_adapters(["a", "b", "c"], prior)
    np.testing.assert_allclose(generate(mole), generate(ref), atol=MIXED_ATOL)

    randomise_gates(mole, weight_std=4)
    per_position = generate(mole)
    block = load(family_world)
    block.load_experts({n: family_world[n] for n in "abc"}, prior_weights=prior)
    block_state = {name: gate.state_dict() for name, gate in mole.mole.gates.items()}
    for name, gate in block.mole.gates.items():
        gate.load_state_dict(block_state[name])
    assert np.abs(per_position - generate(block)).max() > 1e-4  # the same gates, read per position, differ
    denoiser_gates = [g for name, g in mole.mole.gates.items() if not name.startswith("text_encoder")]
    maps = [g.position_weights for g in denoiser_gates]
    assert all(m is not None and float(m.std(dim=(2, 3)).max()) > 1e-3 for m in maps)  # weights vary over positions

    # gradients reach the gate parameters and nothing else (the LoRA factors are buffers: never trainable)
    model = getattr(mole, mole.denoiser)
    model.requires_grad_(False)
    for gate in mole.mole.gates.values():
        gate.requires_grad_(True)
    if family_world["family"] == "flux":
        tokens, text = torch.randn(1, 64, 16), torch.randn(1, 16, 32)
        out = model(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=torch.randn(1, 32),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(16, 3),
                    guidance=torch.tensor([3.5])).sample
    else:
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, 64),
                    added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}).sample
    out.square().mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("mole_gate" in name for name in with_grad)
    assert any(p.grad.abs().max() > 0 for g in denoiser_gates for p in (g.weight,))

    ref.set_adapters(["b"], [1.0])
    np.testing.assert_allclose(generate(mole, experts=["b"]), generate(ref), atol=MIXED_ATOL)


def test_flux_single_block_text_tokens_keep_the_per_sample_weights():
    from torch import nn

    from mole_diffusion.gates import Gate
    from mole_diffusion.layers import MoLELayer

    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(8, 6)
    layer = MoLELayer(base, torch.randn(5, 8, generator=generator), torch.randn(6, 5, generator=generator),
                      torch.tensor([0, 0, 1, 1, 1]), torch.ones(5), Gate(2, 8))
    text, image = 3, 10
    x = torch.randn(2, text + image, 8, generator=generator)  # a single block's joint sequence: text first
    weights = torch.tensor([[0.3, 0.9], [1.2, 0.1]])
    layer.gate.weights, layer.gate.leading_tokens = weights, text
    per_sample = layer(x.clone())
    image_off = torch.zeros(2, 2, 1, image)  # every image position: no expert
    layer.gate.position_weights = image_off
    mixed = layer(x.clone())
    torch.testing.assert_close(mixed[:, :text], per_sample[:, :text])  # the prompt's tokens: per-sample weights
    torch.testing.assert_close(mixed[:, text:], base(x[:, text:]))  # the image's: their own (none)
    layer.gate.position_weights = weights[:, :, None, None].expand(2, 2, 1, image).contiguous()
    torch.testing.assert_close(layer(x.clone()), per_sample, rtol=1e-5, atol=1e-5)


def test_a_layer_on_the_image_tokens_alone_gets_the_position_weights_alone():
    """A gate whose block leads with the prompt's tokens prepends their per-sample weights only for a layer that
    sees them too; a layer on the image tokens alone reads the positions' weights, one token each."""
    from mole_diffusion.gates import Gate

    gate = Gate(2, 8)
    text, image = 3, 10
    gate.weights = torch.tensor([[0.3, 0.9], [1.2, 0.1]])
    gate.leading_tokens = text
    gate.position_weights = torch.rand(2, 2, 1, image, generator=torch.Generator().manual_seed(0))
    on_image = gate.position_weights.flatten(2).transpose(1, 2)  # (B, tokens, N)
    torch.testing.assert_close(gate.token_weights(image), on_image)
    joint = gate.token_weights(text + image)
    torch.testing.assert_close(joint[:, text:], on_image)
    torch.testing.assert_close(joint[:, :text], gate.weights[:, None].expand(-1, text, -1))


def test_export_block_weights_then_fused_constant_weights(family_world):
    """export_block_weights reads the learned gates' mean weights per gate; set as constant weights and fused
    they drive every gate at that mean (no gate cost), as the SD pipeline does."""
    mole = load(family_world)
    mole.load_experts({"a": family_world["a"], "b": family_world["b"]})
    randomise_gates(mole, seed=1, weight_std=4)
    kwargs = dict(num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    weights = mole.export_block_weights(["a red circle"], **kwargs)
    assert set(weights) == set(mole.mole.gates) and all(len(w) == 2 for w in weights.values())
    assert len({tuple(round(x, 4) for x in w) for w in weights.values()}) > 1  # the gates learned different mixes
    mole.set_experts(["a", "b"], weights)
    constant = generate(mole)
    mole.fuse_experts()
    np.testing.assert_allclose(generate(mole), constant, atol=MIXED_ATOL)
    mole.unfuse_experts()
    generate(mole)  # unfused constant weights: every gate records its constant
    for gate, history in mole.gate_weights.items():
        torch.testing.assert_close(history[0, 0], torch.tensor(weights[gate]))


def test_gates_read_the_prompt_where_diffusers_passes_it_by_position():
    """A scope called positionally: the gate's input (and a single block's prompt length) is the argument that
    diffusers' own signatures put there."""
    import inspect

    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from mole_diffusion.inject import _scope_input, _scope_input_prompt

    for cls in (UNet2DConditionModel, FluxTransformer2DModel, FluxSingleTransformerBlock):
        names = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
        args = tuple(torch.full((1,), float(i)) for i in range(len(names)))
        position = names.index("encoder_hidden_states")
        if cls is FluxSingleTransformerBlock:
            assert _scope_input_prompt(args, {}) is args[position]
        else:
            scope = cls.__new__(cls)  # the type is what is read
            assert _scope_input(scope, args, {}) is args[position], cls.__name__
    prompt = torch.zeros(1)
    assert _scope_input_prompt((), {"encoder_hidden_states": prompt}) is prompt


def test_gates_with_triggers_are_set_adapters_of_the_loras_the_prompt_names(family_world):
    """Softplus gates at prior 1 with trigger words, untrained: the prompt "a red circle ..." names a ("red") and c
    ("circle"), not b ("square"), so the image is diffusers' a and c at weight 1."""
    mole, ref = load(family_world), load(family_world, mole=False)
    config = GateConfig(activation="softplus", prior_weights=[1.0, 1.0, 1.0], triggers={"a": "red", "b": "square", "c": "circle"})
    mole.load_experts({n: family_world[n] for n in "abc"}, gate_config=config)
    for name in "ac":
        ref.load_lora_weights(family_world[name], adapter_name=name)
    ref.set_adapters(["a", "c"], [1.0, 1.0])
    np.testing.assert_allclose(generate(mole), generate(ref), atol=MIXED_ATOL)
