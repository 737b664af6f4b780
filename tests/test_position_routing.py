"""Per-position routing (docs/method.md): the rank-space scale per token, and training-free regional
routing from the trigger words' cross-attention, against the per-sample gate, the plain sum and diffusers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import generate, load
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

from mole_diffusion.gates import Gate
from mole_diffusion.layers import MoLELayer, token_grid
from mole_diffusion.testing import make_tiny_lora, tiny_lora_deltas

TRIGGERS = {"a": "red", "b": "circle"}  # words of conftest.generate's prompt


def gated_layer(base: nn.Module, ranks=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    if isinstance(base, nn.Conv2d):
        A, B = torch.randn(R, base.in_channels, 3, 3, generator=g), torch.randn(base.out_channels, R, 1, 1, generator=g)
    else:
        A, B = torch.randn(R, base.in_features, generator=g), torch.randn(base.out_features, R, generator=g)
    rank_expert = torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)])
    rank_scale = torch.cat([torch.full((r,), 0.5 * (i + 1)) for i, r in enumerate(ranks)])
    return MoLELayer(base, A, B, rank_expert, rank_scale, Gate(len(ranks), 8))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_position_weights_equal_everywhere_are_the_per_sample_gate(kind):
    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(8, 6, 3, padding=1)
    layer = gated_layer(base)
    x = torch.randn(2, 4 * 6, 8) if kind == "linear" else torch.randn(2, 8, 4, 6)
    weights = torch.tensor([[0.3, 0.9], [1.2, 0.1]])
    layer.gate.weights = weights
    per_sample = layer(x.clone())
    # the map lives on a finer grid (8 x 12) than the layer's (4 x 6): it is pooled to the layer's grid
    layer.gate.position_weights = weights[:, :, None, None].expand(2, 2, 8, 12).contiguous()
    torch.testing.assert_close(layer(x.clone()), per_sample, rtol=1e-5, atol=1e-5)

    # and each position gets its own weights: expert 1 off on the left half is expert 0 alone there
    left_off = layer.gate.position_weights.clone()
    left_off[:, 1, :, :6] = 0
    layer.gate.position_weights = left_off
    layer.gate.weights, layer.gate.position_weights = weights * torch.tensor([1.0, 0.0]), None
    only_first = layer(x.clone())
    layer.gate.position_weights = left_off
    mixed = layer(x.clone())
    grid = lambda y: y.view(2, 4, 6, -1) if kind == "linear" else y.permute(0, 2, 3, 1)  # (B, H, W, C)
    torch.testing.assert_close(grid(mixed)[:, :, :3], grid(only_first)[:, :, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid(mixed)[:, :, 3:], grid(per_sample)[:, :, 3:], rtol=1e-5, atol=1e-5)


def test_layers_on_prompt_tokens_keep_per_sample_weights():
    layer = gated_layer(nn.Linear(8, 6))
    layer.reads_prompt = True
    x = torch.randn(2, 16, 8)  # 16 prompt tokens (they would fit a 4 x 4 grid: only reads_prompt keeps them per sample)
    layer.gate.weights = torch.tensor([[0.3, 0.9], [1.2, 0.1]])
    expected = layer(x.clone())
    layer.gate.position_weights = torch.zeros(2, 2, 4, 4)
    torch.testing.assert_close(layer(x.clone()), expected)


def test_token_grid_halves_with_rounding_up():
    assert token_grid((16, 16), 64) == (8, 8)
    assert token_grid((15, 9), 8 * 5) == (8, 5)
    with pytest.raises(ValueError, match="not an image grid"):
        token_grid((16, 16), 77)
    assert token_grid((4, 4), 1) == (1, 1)  # halved down to a single position
    with pytest.raises(ValueError, match="not an image grid"):  # a 1 x L map (Flux) is never halved
        token_grid((1, 8), 4)


def test_all_ones_regional_weights_are_the_plain_sum_and_diffusers_set_adapters(world, mole_pipe, ref_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.0)  # every position passes: all-ones masks
    regional = generate(mole_pipe, num_inference_steps=4)
    masks = mole_pipe.expert_masks
    assert masks.shape[:3] == (4, 1, 2) and bool((masks == 1).all())
    mole_pipe.disable_regional_routing()
    mole_pipe.set_experts(["a", "b"], [1.0, 1.0])
    np.testing.assert_allclose(regional, generate(mole_pipe, num_inference_steps=4), atol=1e-5)
    for name in "ab":
        ref_pipe.load_lora_weights(world[name], adapter_name=name)
    ref_pipe.set_adapters(["a", "b"], [1.0, 1.0])
    # PEFT adds each adapter's product on its own, MoLE one concatenated product: float32 sums in another order,
    # which on some CPUs' kernels moves a pixel by 1e-5 after four steps and the VAE
    np.testing.assert_allclose(regional, generate(ref_pipe, num_inference_steps=4), rtol=1e-4, atol=1e-5)


def test_regional_masks_change_the_image_and_masking_removes_an_expert_everywhere(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.6)
    routed = generate(mole_pipe, num_inference_steps=4, guidance_scale=3.0)
    masks = mole_pipe.expert_masks
    assert 0 < float(masks[1:].mean()) < 1  # after the first step: some positions in, some out
    mole_pipe.disable_regional_routing()
    mole_pipe.set_experts(["a", "b"], [1.0, 1.0])
    assert np.abs(routed - generate(mole_pipe, num_inference_steps=4, guidance_scale=3.0)).max() > 1e-3

    # masking b: b adds nothing anywhere, so the image is that of a pipeline that only has a
    mole_pipe.set_experts(None)
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.6)
    without_b = generate(mole_pipe, num_inference_steps=4, guidance_scale=3.0, experts=["a"])
    recorded = mole_pipe.gate_weights  # what the gates applied: b at 0, a as routed
    assert recorded and all(torch.equal(w[..., 1], torch.zeros_like(w[..., 1])) and w[..., 0].max() > 0 for w in recorded.values())
    only_a = load(world["base"])
    only_a.load_experts({"a": world["a"]})
    only_a.enable_regional_routing({"a": TRIGGERS["a"]}, threshold=0.6)
    np.testing.assert_allclose(without_b, generate(only_a, num_inference_steps=4, guidance_scale=3.0), atol=1e-5)


class RecordingList(list):
    def __init__(self):
        super().__init__()
        self.appended = []

    def append(self, item):
        self.appended.append(item)
        super().append(item)


def record_maps_and_probabilities(world, mole_pipe):
    """Experts a, b under regional routing at threshold 0; returns the routing, the list its maps are recorded in, and
    the list every cross-attention's head-averaged probabilities (B, L, T) go to, as diffusers' AttnProcessor
    computes them explicitly."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.0)
    regional = mole_pipe.mole.regional
    regional._maps = recorded = RecordingList()
    expected = []
    for name, module in mole_pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(AttnProcessor())

            def get_scores(query, key, mask=None, scores=module.get_attention_scores, heads=module.heads):
                probabilities = scores(query, key, mask)  # (B * heads, L, T)
                expected.append(probabilities.unflatten(0, (-1, heads)).mean(dim=1))
                return probabilities
            module.get_attention_scores = get_scores
    return regional, recorded, expected


def test_regional_maps_are_diffusers_own_attention_probabilities(world, mole_pipe):
    """The maps read from to_q / to_k equal the probabilities diffusers' AttnProcessor computes."""
    regional, recorded, expected = record_maps_and_probabilities(world, mole_pipe)

    generate(mole_pipe, num_inference_steps=2, guidance_scale=3.0)  # guidance: the maps come from the prompt's half
    regional.set_prompts(["a red circle on a blue background"])
    positions = regional.positions
    assert len(recorded.appended) == len(expected) > 0
    for maps, probabilities in zip(recorded.appended, expected):
        per_expert = (probabilities[-1:] @ positions.transpose(1, 2)).transpose(1, 2)  # (B, N, L), the second half
        side = int(per_expert.shape[-1] ** 0.5)
        reference = torch.nn.functional.interpolate(per_expert.unflatten(-1, (side, side)), maps.shape[-2:], mode="bilinear")
        torch.testing.assert_close(maps, reference, rtol=1e-5, atol=1e-6)


def test_regional_routing_refuses_experts_without_triggers_and_prompt_embeds(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    with pytest.raises(ValueError, match=r"none for \['b'\]"):
        mole_pipe.enable_regional_routing({"a": "red"})
    mole_pipe.enable_regional_routing(TRIGGERS)
    embeds = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="prompt_embeds"):
        mole_pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=1, height=32, width=32, experts=["a"])
    assert mole_pipe.mole.record is False and mole_pipe.mole.active == ["a", "b"]  # the refused call changed nothing


def test_each_image_is_routed_by_its_own_prompt_and_disabling_removes_every_hook(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    attentions = [m for n, m in mole_pipe.unet.named_modules() if n.endswith("attn2")]
    hooks = lambda: (len(mole_pipe.unet._forward_hooks) + len(mole_pipe.unet._forward_pre_hooks)
                     + sum(len(m.to_q._forward_hooks) + len(m.to_k._forward_hooks) for m in attentions))
    before = hooks()
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.6)
    assert hooks() > before
    prompts = ["a red square on a blue background", "a green circle on a yellow background"]  # a's trigger, then b's
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    both = generate(mole_pipe, prompt=prompts, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=3.0, latents=latents)
    masks = mole_pipe.expert_masks  # (calls, 4 images, 2 experts, H, W)
    assert masks.shape[1:3] == (4, 2)
    assert bool((masks[:, :2, 1] == 0).all()) and bool((masks[:, 2:, 0] == 0).all())  # no trigger in its prompt: off
    assert masks[:, :2, 0].sum() > 0 and masks[:, 2:, 1].sum() > 0
    alone = generate(mole_pipe, prompt=prompts[1], num_inference_steps=3, guidance_scale=3.0, latents=latents[2:3])
    np.testing.assert_allclose(both[2], alone[0], atol=1e-4)  # batch-size rounding, magnified by guidance
    mole_pipe.disable_regional_routing()
    assert hooks() == before


# -- non-square latents: the per-position map is read row by row, token y * width + x ---------------------------
def block_input(store, key):
    """A forward pre-hook that keeps the feature map a block (Transformer2DModel or ResnetBlock2D) is given."""
    def hook(module, args, kwargs):
        store[key] = (args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))).detach().clone()
    return hook


def layer_input_output(store, key):
    def hook(module, args, output):
        store[key] = (args[0].detach().clone(), output.detach().clone())
    return hook


def gate_formula_by_position(gate, features):
    """softmax((W_g f_yx + b_g) / tau), f_yx = h_yx / |h_yx|, evaluated at each (y, x) of a (B, C, H, W) map."""
    batch, _, height, width = features.shape
    weights = torch.empty(batch, len(gate.bias), height, width)
    tau = gate.log_temperature.detach().exp()
    for y in range(height):
        for x in range(width):
            h = features[:, :, y, x]
            f = h / h.norm(dim=1, keepdim=True)
            weights[:, :, y, x] = ((f @ gate.weight.detach().T + gate.bias.detach()) / tau).softmax(dim=-1)
    return weights


def test_position_weights_are_averaged_onto_coarser_grids_and_repeated_onto_finer_ones():
    """A layer on another grid than its gate's map (a down- or upsampler in the block) reads the map resampled:
    the mean of each cell's positions on a coarser grid, each position's weights repeated on a finer one."""
    gate = Gate(2, 8)
    gate.position_weights = torch.rand(2, 2, 4, 6, generator=torch.Generator().manual_seed(0))  # (B, N, H, W)
    assert gate.position_weights_on((4, 6)) is gate.position_weights
    coarser = gate.position_weights.reshape(2, 2, 2, 2, 3, 2).mean(dim=(3, 5))  # 2 x 2 cells
    torch.testing.assert_close(gate.position_weights_on((2, 3)), coarser)
    finer = gate.position_weights.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(gate.position_weights_on((8, 12)), finer)


def test_per_position_weights_on_non_square_latents_follow_the_gate_at_each_row_and_column(world, mole_pipe, tmp_path):
    """On 16 x 24 latents (blocks at 16 x 24 and 8 x 12) with random gates, a block's per-position weights are the
    gate's formula at each (y, x) of its input feature map, and an adapted layer gives image token y * width + x the
    weights of position (y, x): an attention block's attn1.to_q is W x + b + sum_k g_k(token) s_k B_k A_k x, a resnet
    block's conv1 the same with convolutions (s_k B_k A_k from the files' factors, tiny_lora_deltas)."""
    d_spec = dict(rank=2, alpha=1.0, seed=5, text_encoder=False, unet_modules=("to_q", "conv1"))
    specs = {"a": dict(rank=4, alpha=2, seed=1), "c": dict(rank=3, seed=3, text_encoder=False, unet_modules=("to_q", "to_v", "conv1")),
             "d": d_spec}
    files = {"a": world["a"], "c": world["c"], "d": make_tiny_lora(world["base"], tmp_path / "d.safetensors", **d_spec)}
    deltas = {name: tiny_lora_deltas(world["base"], **spec) for name, spec in specs.items()}
    mole_pipe.load_experts(files, per_position=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in mole_pipe.mole.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 4)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator))
            gate.log_temperature.fill_(0.3)

    unet, seen = mole_pipe.unet, {}
    checked = {"down_blocks.0.attentions.0": "transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0": "conv1",
               "mid_block.attentions.0": "transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0": "conv1"}
    for block, layer in checked.items():
        unet.get_submodule(block).register_forward_pre_hook(block_input(seen, block), with_kwargs=True)
        unet.get_submodule(f"{block}.{layer}").register_forward_hook(layer_input_output(seen, f"{block}.{layer}"))
    sample = torch.randn(2, 4, 16, 24, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        unet(sample, torch.tensor([500, 500]), encoder_hidden_states=text)

    for block, layer_name in checked.items():
        features = seen[block]
        height, width = features.shape[-2:]
        assert (height, width) == ((8, 12) if block.startswith(("mid", "down_blocks.1")) else (16, 24))
        gate = unet.get_submodule(block).mole_gate
        expected = gate_formula_by_position(gate, features)  # (B, N, H, W)
        assert float(expected.std(dim=(2, 3)).min()) > 0.05  # every expert's weight varies over the image
        torch.testing.assert_close(gate.position_weights, expected, rtol=1e-5, atol=1e-6)

        layer = unet.get_submodule(f"{block}.{layer_name}")
        x, output = seen[f"{block}.{layer_name}"]
        full_name = f"unet.{block}.{layer_name}"
        base = layer.base_layer
        covering = [(k, deltas[name][full_name]) for k, name in enumerate(files) if full_name in deltas[name]]
        assert len(covering) >= 2
        if isinstance(base, nn.Conv2d):
            reference = F.conv2d(x, base.weight, base.bias, padding=base.padding)
            for k, delta in covering:  # the weight of output position (y, x), on the block's own grid
                reference += expected[:, k : k + 1] * F.conv2d(x, delta, padding=base.padding)
        else:
            tokens = torch.empty(x.shape[0], x.shape[1], expected.shape[1])
            for y in range(height):
                for column in range(width):
                    tokens[:, y * width + column] = expected[:, :, y, column]  # row-major: token y * W + x
            reference = F.linear(x, base.weight, base.bias)
            for k, delta in covering:
                reference += tokens[..., k : k + 1] * (x @ delta.T)
        torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)


def test_regional_maps_on_non_square_latents_are_the_attention_probabilities_row_by_row(world, mole_pipe):
    """On 16 x 24 latents (attention at 16 x 24 and, in the mid block, 8 x 12), each expert's map at (y, x) of an
    attention's grid is the probability token y * width + x gives its trigger (diffusers' AttnProcessor), resampled
    to the latents: not a transposed or re-wrapped reading of the attention rows."""
    regional, recorded, expected = record_maps_and_probabilities(world, mole_pipe)

    generate(mole_pipe, num_inference_steps=2, height=32, width=48)
    regional.set_prompts(["a red circle on a blue background"])
    positions = regional.positions
    assert len(recorded.appended) == len(expected) > 0
    grids = {16 * 24: (16, 24), 8 * 12: (8, 12)}
    assert {p.shape[-2] for p in expected} == set(grids)  # both grids are read
    for maps, probabilities in zip(recorded.appended, expected):
        per_expert = (probabilities[-1:] @ positions.transpose(1, 2))[0]  # (tokens, N), the prompt's half
        height, width = grids[per_expert.shape[0]]
        grid = torch.empty(1, per_expert.shape[1], height, width)
        for y in range(height):
            for x in range(width):
                grid[0, :, y, x] = per_expert[y * width + x]
        reference = F.interpolate(grid, (16, 24), mode="bilinear", align_corners=False)
        assert maps.shape[-2:] == (16, 24)
        torch.testing.assert_close(maps, reference, rtol=1e-5, atol=1e-6)


# -- an expert whose trigger the prompt lacks -----------------------------------------------------------------------
NO_CIRCLE = "a red square on a green background"  # a's trigger ("red"), not b's ("circle")


@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_regional_routing_leaves_off_an_expert_whose_trigger_the_prompt_lacks(world, mole_pipe, ref_pipe, tmp_path, threshold):
    """A prompt with a's trigger and not b's: b's mask is zero at every step and b adds nothing (the image of a
    pipeline without b), while a acts. b adapts image-token layers only (to_q, to_out, conv1), which the masks
    weigh. At threshold 0 every position passes, so a acts everywhere at weight 1: diffusers with a alone."""
    image_only = make_tiny_lora(world["base"], tmp_path / "b_image.safetensors", rank=2, alpha=4, seed=2,
                                text_encoder=False, unet_modules=("to_q", "to_out.0", "conv1"))
    bare = generate(ref_pipe, prompt=NO_CIRCLE, guidance_scale=3.0)
    mole_pipe.load_experts({"a": world["a"], "b": image_only})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=threshold)
    routed = generate(mole_pipe, prompt=NO_CIRCLE, guidance_scale=3.0)
    masks = mole_pipe.expert_masks
    assert float(masks[:, :, 1].max()) == 0.0  # b's trigger is not in the prompt: b is nowhere
    assert float(masks[:, :, 0].sum()) > 0 and np.abs(routed - bare).max() > 1e-3  # a is somewhere, and acts
    if threshold == 0.0:
        assert bool((masks[:, :, 0] == 1).all())
        ref_pipe.load_lora_weights(world["a"], adapter_name="a")
        ref_pipe.set_adapters(["a"], [1.0])
        reference = generate(ref_pipe, prompt=NO_CIRCLE, guidance_scale=3.0)
    else:
        assert float(masks[1:, :, 0].mean()) < 1  # a is routed, not everywhere
        only_a = load(world["base"])
        only_a.load_experts({"a": world["a"]})
        only_a.enable_regional_routing({"a": TRIGGERS["a"]}, threshold=threshold)
        reference = generate(only_a, prompt=NO_CIRCLE, guidance_scale=3.0)
    np.testing.assert_allclose(routed, reference, atol=1e-5)


def test_regional_routing_leaves_off_every_layer_of_an_expert_whose_trigger_the_prompt_lacks(world, mole_pipe):
    """The same with b a full LoRA (text encoder, cross-attention keys and values too): b should add nothing
    anywhere, so the image should be that of the same pipeline with b masked."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.0)
    routed = generate(mole_pipe, prompt=NO_CIRCLE, guidance_scale=3.0)
    assert bool((mole_pipe.expert_masks[:, :, 1] == 0).all())
    np.testing.assert_allclose(routed, generate(mole_pipe, prompt=NO_CIRCLE, guidance_scale=3.0, experts=["a"]), atol=1e-5)


def test_regional_routing_reads_triggers_only_in_the_tokens_the_text_encoder_sees(world, mole_pipe):
    """A trigger found anywhere in the 77 tokens the text encoder reads, up to the last one before the end token,
    names its expert; a trigger the tokenizer truncates away does not. Each prompt's trigger map has the text
    encoder's length."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.5)
    regional = mole_pipe.mole.regional
    length = mole_pipe.tokenizer.model_max_length
    filler = ["square"] * (length - 4)  # start token, "red", the filler, "circle", end token: 77 tokens
    last_kept, cut = " ".join(["red", *filler, "circle"]), " ".join(["red", *filler, "big", "circle"])
    assert len(mole_pipe.tokenizer(last_kept).input_ids) == length  # "circle" is the last token before the end
    regional.set_prompts([last_kept, cut])
    assert regional.positions.shape == (2, 2, length)
    assert regional._named().tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert regional.positions[0, 1].nonzero().flatten().tolist() == [length - 2]


def test_regional_routing_without_prompts_is_the_plain_sum_and_removes_its_hooks_once(world, mole_pipe):
    """The UNet called by keyword, before any pipeline call has given prompts: every expert at its weight
    everywhere (the plain sum); removing the hooks twice is harmless."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, mole_pipe.unet.config.cross_attention_dim, generator=g)
    call = dict(sample=sample, timestep=torch.tensor([500, 500]), encoder_hidden_states=text)
    mole_pipe.set_experts(weights=[1.0, 1.0])
    with torch.no_grad():
        plain_sum = mole_pipe.unet(**call).sample
    mole_pipe.set_experts()
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.5)
    with torch.no_grad():
        routed = mole_pipe.unet(**call).sample
    torch.testing.assert_close(routed, plain_sum)
    mole_pipe.mole.regional.remove()
    mole_pipe.mole.regional.remove()
    mole_pipe.disable_regional_routing()


def test_regional_routing_checks_its_threshold_weights_and_triggers(world, mole_pipe):
    from mole_diffusion.errors import MoLEError

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    for threshold in (1.0, -0.1):
        with pytest.raises(MoLEError, match=rf"threshold is a fraction of each map's maximum, in \[0, 1\); got {threshold}"):
            mole_pipe.enable_regional_routing(TRIGGERS, threshold=threshold)
    with pytest.raises(MoLEError, match=r"^1 weights for 2 experts \['a', 'b'\]$"):
        mole_pipe.enable_regional_routing(TRIGGERS, weights=[1.0])
    with pytest.raises(MoLEError, match=r"^expert 'a': its trigger ' ' has no tokens to find in a prompt$"):
        mole_pipe.enable_regional_routing({"a": " ", "b": "circle"})
    assert mole_pipe.mole.regional is None


def test_regional_weights_everywhere_are_the_constant_weights_and_words_may_come_as_a_list(world, mole_pipe):
    """At threshold 0 every position is in each named expert's mask: the weights given are the constant weights;
    a trigger given as a list of words is read as those words."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.set_experts(weights=[0.5, 1.5])
    constant = generate(mole_pipe)
    mole_pipe.set_experts()
    mole_pipe.enable_regional_routing({"a": "red", "b": "circle"}, weights=[0.5, 1.5], threshold=0.0)
    np.testing.assert_allclose(generate(mole_pipe), constant, atol=1e-5)
    mole_pipe.enable_regional_routing({"a": "red circle", "b": "blue"}, threshold=0.5)
    words = generate(mole_pipe)
    mole_pipe.enable_regional_routing({"a": ["red", "circle"], "b": "blue"}, threshold=0.5)
    np.testing.assert_allclose(generate(mole_pipe), words, atol=1e-6)
    mole_pipe.enable_regional_routing({"a": "red", "b": "blue"}, threshold=0.5)
    assert np.abs(generate(mole_pipe) - words).max() > 1e-4  # the second word counts


def test_regional_routing_reads_the_latents_whether_the_unet_is_called_by_position_or_keyword(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.5)
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, mole_pipe.unet.config.cross_attention_dim, generator=g)
    outputs = []
    for by_keyword in (False, True):
        mole_pipe.mole.regional.set_prompts(["a red circle on a blue background"])
        with torch.no_grad():
            for _ in range(2):  # the second call is routed by the first call's maps
                if by_keyword:
                    out = mole_pipe.unet(sample=sample, timestep=torch.tensor([500]), encoder_hidden_states=text).sample
                else:
                    out = mole_pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    assert 0 < float(mole_pipe.mole.regional.masks.mean()) < 1


def test_regional_routing_refuses_an_attention_processor_that_reads_no_map(world, mole_pipe):
    """A processor that computes keys without calling attn2.to_k: the hooks read nothing, and routing would
    silently be the plain sum."""
    from mole_diffusion.errors import MoLEError

    class KeysByHand:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            keys = F.linear(encoder_hidden_states, getattr(attn.to_k, "base_layer", attn.to_k).weight)  # to_k itself never runs
            q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), keys, attn.to_v(encoder_hidden_states)))
            attended = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k), v))
            return attn.to_out[1](attn.to_out[0](attended))

    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.5)
    for name, module in mole_pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(KeysByHand())
    with pytest.raises(MoLEError, match=r"^regional routing read no cross-attention map in this UNet call \(an attention "
                                        r"processor that does not call attn2.to_k\?\)$"):
        generate(mole_pipe)


@pytest.mark.parametrize("attention", [None, "to_q"], ids=["no cross-attention", "no to_k"])
def test_regional_routing_refuses_a_unet_whose_cross_attention_it_cannot_read(world, attention):
    from mole_diffusion.errors import MoLEError
    from mole_diffusion.routing import RegionalRouting

    unet = nn.Module()
    unet.block = nn.Module()
    if attention:
        unet.block.attn2 = nn.Module()
        unet.block.attn2.to_q = nn.Linear(4, 4)  # fused key and value projections leave no to_k
    tokenizer = load(world["base"]).tokenizer
    with pytest.raises(MoLEError, match=r"^regional routing reads the cross-attention \(attn2.to_q / attn2.to_k\) of a UNet's "
                                        r"transformer blocks; this UNet has none \(or fused projections: "
                                        r"unfuse_qkv_projections\(\) first\)$"):
        RegionalRouting(unet, tokenizer, ["a"], {"a": "red"}, None, 0.5)


# Mutants of routing.py that no test can kill, being equivalent: set_prompts padding to "max_length" with or without
# max_length= (the tokenizer's model_max_length either way); a window start past the end of the ids (it never
# matches); trigger positions marked 2 instead of 1 (maps are divided by their peak); .to(device) on one CPU device;
# sample.shape[+2:] for shape[-2:] of a 4-D latent; initial values of mask_history, _latent_size and _query, each
# set before it is read; the map hook's guard on _query (diffusers' processors call to_q before to_k);
# transpose(-1, +2) of a 4-D tensor; align_corners=None (False for bilinear); ">=" for ">" against the threshold
# (a float ratio equal to it).


# -- each trigger word's tokens keep their own expert ---------------------------------------------------------------
def test_prompt_token_weights_weigh_each_prompt_token_by_its_own_row():
    layer = gated_layer(nn.Linear(8, 6))
    layer.reads_prompt = True
    x = torch.randn(2, 5, 8)
    per_sample = torch.tensor([[0.3, 0.9], [1.2, 0.1]])
    token_weights = per_sample[:, None, :].repeat(1, 5, 1)
    token_weights[0, 2] = torch.tensor([0.3, 0.0])  # sample 0's token 2: expert 0 only
    layer.gate.weights = per_sample
    expected = layer(x.clone())
    layer.gate.weights = per_sample * torch.tensor([1.0, 0.0])
    expected[0, 2] = layer(x.clone())[0, 2]
    layer.gate.weights, layer.gate.prompt_token_weights = per_sample, token_weights
    torch.testing.assert_close(layer(x.clone()), expected, rtol=1e-5, atol=1e-6)
    layer.reads_prompt = False  # a layer on the image's tokens never reads them
    layer.gate.prompt_token_weights = None
    without = layer(x.clone())
    layer.gate.prompt_token_weights = token_weights
    torch.testing.assert_close(layer(x.clone()), without)


def test_own_trigger_tokens_give_each_trigger_only_its_expert_in_the_prompt_and_its_negative(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, weights=[0.5, 2.0], own_trigger_tokens=True)
    regional = mole_pipe.mole.regional
    regional.set_prompts(["a red circle on a blue background"])
    ids = mole_pipe.tokenizer("a red circle on a blue background").input_ids
    red, circle = (ids.index(mole_pipe.tokenizer(word, add_special_tokens=False).input_ids[0]) for word in ("red", "circle"))
    sample = regional.sample_weights(torch.ones(2, dtype=torch.bool), 2)  # the UNet under guidance
    weights = regional.prompt_token_weights(sample)
    assert weights.shape == (2, 77, 2)
    assert bool((weights[0] == torch.tensor([0.5, 2.0])).all())  # the negative half: no trigger
    assert weights[1, red].tolist() == [0.5, 0.0] and weights[1, circle].tolist() == [0.0, 2.0]
    others = [t for t in range(77) if t not in (red, circle)]
    assert bool((weights[1, others] == torch.tensor([0.5, 2.0])).all())

    # the text encoder finds the triggers in its own call's tokens: the negative prompt's encoding is unrouted
    def encode(pipe):
        embeds, negative = pipe.encode_prompt("a red circle on a blue background", "cpu", 1, True, negative_prompt="")
        return embeds, negative

    routed, routed_negative = encode(mole_pipe)
    mole_pipe.enable_regional_routing(TRIGGERS, weights=[0.5, 2.0])
    mole_pipe.mole.regional.set_prompts(["a red circle on a blue background"])
    plain, plain_negative = encode(mole_pipe)
    torch.testing.assert_close(routed_negative, plain_negative)
    assert (routed - plain).abs().amax() > 1e-4  # each trigger without the other LoRA's text half


def test_own_trigger_tokens_with_one_expert_are_diffusers_own_lora(world, mole_pipe, ref_pipe):
    """One expert: its trigger keeps it and every other token has it too, so nothing changes: diffusers' LoRA."""
    mole_pipe.load_experts({"a": world["a"]})
    mole_pipe.enable_regional_routing({"a": TRIGGERS["a"]}, threshold=0.0, own_trigger_tokens=True)
    routed = generate(mole_pipe, num_inference_steps=4)
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    np.testing.assert_allclose(routed, generate(ref_pipe, num_inference_steps=4), rtol=1e-4, atol=1e-5)


def test_own_trigger_tokens_change_only_what_reads_the_prompt(world, mole_pipe, tmp_path):
    """Experts on image tokens only (self-attention queries and outputs, convs): own_trigger_tokens changes
    nothing. Full LoRAs (text encoder, cross-attention keys and values): it changes the image."""
    image_only = {name: make_tiny_lora(world["base"], tmp_path / f"{name}.safetensors", rank=2, seed=seed, text_encoder=False,
                                       unet_modules=("to_q", "to_out.0", "conv1")) for name, seed in (("a", 1), ("b", 2))}
    images = {}
    for files in ("image_only", "full"):
        mole_pipe.load_experts(image_only if files == "image_only" else {"a": world["a"], "b": world["b"]})
        for own in (False, True):
            mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.0, own_trigger_tokens=own)
            images[files, own] = generate(mole_pipe, guidance_scale=3.0)
        mole_pipe.unload_experts()
    np.testing.assert_allclose(images["image_only", True], images["image_only", False], atol=1e-6)
    assert np.abs(images["full", True] - images["full", False]).max() > 1e-3
