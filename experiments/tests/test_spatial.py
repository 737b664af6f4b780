"""experiments.spatial: the object split, the masks and the two samplers that keep the checker LoRA off the object,
and the re-reading of an earlier run's images."""

import pytest
import torch
from PIL import Image

from experiments import spatial
from experiments.spatial import (
    NAMES,
    LayoutThenBackground,
    SpatialMasks,
    TwoPassComposite,
    active_concepts,
    expert_masks,
    solid,
    two_means_object,
)
from mole_diffusion.demo import CONCEPTS, composition_prompts, world


def test_two_means_splits_an_object_from_the_background_that_holds_the_border():
    """experiments.spatial: the object is the cluster away from the border, whichever way 2-means
    numbers the clusters, and the masks keep the checker off it (and DILATE pixels around it)."""
    x0 = torch.zeros(2, 4, 8, 8)
    x0[:, :, 2:5, 3:6] = 1.0  # a 3 x 3 object
    x0[1] = 1.0 - x0[1]  # the same layout with the colours swapped
    x0 += 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(8, 8)
    expected[2:5, 3:6] = 1.0
    obj = two_means_object(x0)
    assert torch.equal(obj, expected.expand(2, 8, 8))

    masks = expert_masks(obj, (1.0, 0.5), everywhere=False, dilate=0)
    assert torch.equal(masks[:, 0], obj) and torch.equal(masks[:, 1], 0.5 * obj) and torch.equal(masks[:, 2], 1 - obj)
    grown = expert_masks(obj, (1.0, 1.0), everywhere=True, dilate=1)
    assert torch.equal(grown[:, 0], torch.ones(2, 8, 8))  # the object experts everywhere
    assert grown[:, 2].sum() == 2 * (64 - 25) and grown[:, 2, 1:6, 2:7].sum() == 0  # the checker kept a pixel further away


def test_spatial_masks_run_the_star_alone_then_split_the_layout(shipped_pipe):
    """The masks each UNet call ran with: the star alone everywhere before the lead step, then from the predicted x0
    of the lead step, kept; the stripes (weight 0 here) and the checker off the object."""
    shipped_pipe.enable_regional_routing({name: CONCEPTS[name].token for name in CONCEPTS}, weights=[1.0, 1.0, 1.0])
    masks = SpatialMasks(shipped_pipe, None, "split", 2, (1.0, 0.0), everywhere=True, dilate=0, guidance_scale=5.0)
    try:
        shipped_pipe(composition_prompts()[0], num_inference_steps=4, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0))
    finally:
        masks.remove()
        shipped_pipe.disable_regional_routing()
    history = masks.history
    assert len(history) == 4 and all(m.shape == (1, 3, 16, 16) for m in history)
    star_alone = torch.zeros(1, 3, 16, 16)
    star_alone[:, 0] = 1.0
    assert torch.equal(history[0], star_alone) and torch.equal(history[1], star_alone)
    obj = masks.split
    assert obj.shape == (1, 16, 16) and 0 < obj.sum() < 256
    for later in history[2:]:
        assert torch.equal(later[:, 0], torch.ones(1, 16, 16)) and torch.equal(later[:, 1], torch.zeros(1, 16, 16))
        assert torch.equal(later[:, 2], 1 - obj)


def test_the_two_pass_composite_joins_the_object_and_background_predictions_by_the_mask(shipped_pipe):
    """experiments.spatial's regional composite: before the lead step the star LoRA alone; from it, m x (star, stripes
    pass) + (1 - m) x (checker pass), each the UNet with only those LoRAs; the UNet's own forward back after."""
    unet = shipped_pipe.unet
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    obj = torch.zeros(1, 16, 16)
    obj[:, 4:12, 3:9] = 1.0
    composite = TwoPassComposite(shipped_pipe, None, "split", 1, (1.0, 0.5), 0, 5.0)
    try:
        first = composite.composite_forward(sample, 500, encoder_hidden_states=prompt).sample
        composite.object = obj  # as the split of the lead step would have kept it
        joined = composite.composite_forward(sample, 400, encoder_hidden_states=prompt).sample
    finally:
        composite.remove()
    assert "forward" not in vars(unet)

    def alone(weights, t):
        shipped_pipe.set_experts(list(NAMES), weights)
        return unet(sample, t, encoder_hidden_states=prompt).sample

    try:
        torch.testing.assert_close(first, alone([1.0, 0.0, 0.0], 500))
        m = obj[:, None]
        expected = m * alone([1.0, 0.5, 0.0], 400) + (1 - m) * alone([0.0, 0.0, 1.0], 400)
        torch.testing.assert_close(joined, expected)
        assert not torch.allclose(joined, alone([1.0, 0.5, 0.0], 400))  # the background pass does show
    finally:
        shipped_pipe.set_experts()  # the fixture's learned gates again


def test_solid_closes_stripe_gaps_and_fills_holes_but_keeps_the_background():
    """experiments.spatial's inpaint mask: a striped object's dark stripes fall in the background's 2-means cluster; the
    object handed to the background pass is the whole shape (gaps of a pixel closed, holes filled), nothing more."""
    shape = torch.zeros(12, 12)
    shape[3:9, 2:9] = 1.0
    striped = shape.clone()
    striped[4:8:2, 2:9] = 0.0  # rows of stripes through the object
    striped[5:7, 4:7] = 0.0  # and a hole
    assert torch.equal(solid(striped[None]), shape[None])
    assert torch.equal(solid(shape[None], close=0), shape[None])
    ring = torch.zeros(12, 12)
    ring[2:10, 2:10] = 1.0
    ring[4:8, 4:8] = 0.0  # a hole wider than a closing bridges is still filled: it does not reach the border
    filled = torch.zeros(12, 12)
    filled[2:10, 2:10] = 1.0
    assert torch.equal(solid(ring[None], close=0), filled[None])
    corner = torch.zeros(12, 12)
    corner[:4, :4] = 1.0  # an object on the border stays as it is
    assert torch.equal(solid(corner[None]), corner[None])


def test_layout_then_background_holds_the_object_and_runs_each_pass_with_its_loras(shipped_pipe):
    """experiments.spatial's inpaint mode: the object pass runs the star LoRA, the stripes LoRA from the lead step, text
    encoders with those two; the background pass the checker LoRA alone in the UNet, the three summed in the text
    encoders; the final latent is the object pass's exactly where the object is, and the background pass's elsewhere;
    the pipeline's gates are back afterwards."""
    compose = LayoutThenBackground(shipped_pipe, lead=2, object_weights=(1.0, 0.5), checker_weight=2.0, dilate=0,
                                   guidance_scale=5.0, steps=4)
    latents, layout, obj = compose.latents(composition_prompts()[1], seed=0)
    assert shipped_pipe.mole.constant_weights is None  # the fixture's learned gates again
    unet = [weights for weights, _ in compose.history]
    text = [weights for _, weights in compose.history]
    assert unet == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 2.0]]
    assert text[:-1] == [[1.0, 1.0, 0.0]] * 5 and text[-1] == [1.0, 1.0, 1.0]
    held = obj[:, None].bool().expand_as(latents)
    assert 0 < obj.sum() < obj.numel()
    torch.testing.assert_close(latents[held], layout[held], rtol=0, atol=0)
    assert not torch.allclose(latents[~held], layout[~held])  # the background pass drew the rest


def test_stripes_inside_act_only_within_the_stars_own_layout_from_the_lead_step(shipped_pipe):
    """experiments.spatial's inpaint-inside: in the object pass the star LoRA acts everywhere and the checker nowhere at
    every step; the stripes LoRA nowhere before the lead step and, from it, exactly on one fixed object (the split
    of the star's layout); regional routing is off again afterwards, and the object is still held exactly."""
    compose = LayoutThenBackground(shipped_pipe, lead=2, object_weights=(1.0, 1.0), checker_weight=2.0, dilate=0,
                                   guidance_scale=5.0, steps=4, stripes_inside=True)
    latents, layout, obj = compose.latents(composition_prompts()[1], seed=0)
    assert shipped_pipe.mole.regional is None and shipped_pipe.mole.constant_weights is None
    masks = compose.object_masks
    assert len(masks) == 4 and all(m.shape == (1, 3, 16, 16) for m in masks)
    assert all(torch.equal(m[:, 0], torch.ones(1, 16, 16)) and not m[:, 2].any() for m in masks)
    assert not masks[0][:, 1].any() and not masks[1][:, 1].any()
    inside = masks[2][:, 1]
    assert 0 < inside.sum() < inside.numel() and torch.equal(masks[3][:, 1], inside)
    held = obj[:, None].bool().expand_as(latents)
    torch.testing.assert_close(latents[held], layout[held], rtol=0, atol=0)


def test_spatial_rejudge_reads_an_earlier_runs_images_again_and_names_a_missing_one(tmp_path, capsys):
    """--rejudge generates nothing: it reads OUT/<label>/p<prompt>-s<seed>.png with the installed judge. Drawn
    striped stars on boards for two prompts and plain circles for the other two: all three in 2 of 4."""
    folder = tmp_path / "drawn"
    folder.mkdir()
    for p, colour in enumerate(("red", "blue", "yellow", "purple")):
        scene = world.Scene("star", colour, "checker", "large", (0.5, 0.5), "stripes") if p < 2 else \
            world.Scene("circle", colour, "white", "large", (0.5, 0.5))
        world.draw(scene).save(folder / f"p{p}-s5.png")
    spatial.main(["--out", str(tmp_path), "--seeds", "1", "--first-seed", "5", "--rejudge",
                  "drawn:split:4:1,1,2:inpaint-inside:1"])
    row = capsys.readouterr().out.splitlines()[1].split(" | ")
    assert row[1:] == ["50.0% [15.0-85.0]"] * 5 + ["50.0% [15.0-85.0] |"]  # star, stripes, checker, star and checker, all, active
    with pytest.raises(FileNotFoundError, match=r"p0-s6.png: no image from an earlier run of 'drawn'"):
        spatial.main(["--out", str(tmp_path), "--seeds", "2", "--first-seed", "5", "--rejudge",
                      "drawn:split:4:1,1,2:inpaint-inside:1"])


def test_a_specs_active_concepts_are_those_with_a_weight_above_zero():
    assert active_concepts("a:split:4:1,1,2:inpaint-inside:1") == ["star", "stripes", "checker"]
    assert active_concepts("a:split:4:0,1,2:inpaint-inside:1") == ["stripes", "checker"]
    assert active_concepts("a:split:4:1,1,0:inpaint-inside:1") == ["star", "stripes"]
    assert active_concepts("a:split:8:1,0:two-pass:2") == ["star", "checker"]  # CHECKER 1 unless given


def test_the_layout_sampler_draws_the_composition_prompts_with_a_sets_class_word(tmp_path, monkeypatch):
    drawn = []

    class Sampler:  # records the prompts it is asked for, draws a blank image
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, prompt, seed):
            drawn.append((prompt, seed))
            return Image.new("RGB", (64, 64)), None

    class Presence:
        def read(self, images, prompts):
            return [({name: True for name in spatial.NAMES}, None) for _ in images]

    monkeypatch.setattr(spatial, "LayoutThenBackground", Sampler)
    counts = spatial.run(None, None, Presence(), tmp_path, "layout:split:4:1,1,2:inpaint-inside:1", 1, 100, word="tiled")
    assert drawn == [(p.replace("qkx", "qkx tiled"), 100) for p in world.composition_prompts()]
    assert counts["all"] == (4, 4) and len(list((tmp_path / "layout").glob("*.png"))) == 4
