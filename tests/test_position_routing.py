"""Per-position routing (METHOD.md section 8): the rank-space scale per token, and training-free regional
routing from the trigger words' cross-attention, against the per-sample gate, the plain sum and diffusers."""

import numpy as np
import pytest
import torch
from conftest import generate, load
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

from mole_diffusion.gates import Gate
from mole_diffusion.layers import MoLELayer, token_grid

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


def test_regional_maps_are_diffusers_own_attention_probabilities(world, mole_pipe):
    """The maps read from to_q / to_k equal the probabilities diffusers' AttnProcessor computes."""
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    mole_pipe.enable_regional_routing(TRIGGERS, threshold=0.0)
    regional = mole_pipe.mole.regional
    regional._maps = recorded = RecordingList()
    expected = []
    for name, module in mole_pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(AttnProcessor())  # computes the probabilities explicitly

            def get_scores(query, key, mask=None, scores=module.get_attention_scores, heads=module.heads):
                probabilities = scores(query, key, mask)  # (B * heads, L, T)
                expected.append(probabilities.unflatten(0, (-1, heads)).mean(dim=1))
                return probabilities
            module.get_attention_scores = get_scores

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
