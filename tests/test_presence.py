"""Presence metrics: Wilson intervals, hand-counted rates, the detector judge against transformers itself,
and evaluate's present_* columns."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mole_diffusion.concepts import Concept, composed_concepts
from mole_diffusion.eval import evaluate as ev
from mole_diffusion.eval.methods import active_experts
from mole_diffusion.eval.presence import DetectorPresence, PresenceError, load_presence_judge, presence_row
from mole_diffusion.eval.report import format_cell
from mole_diffusion.eval.stats import wilson_interval
from mole_diffusion.eval.summary import summarise
from mole_diffusion.testing import make_concept_images, make_tiny_clip, make_tiny_owlvit


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return make_tiny_owlvit(tmp_path_factory.mktemp("owl") / "owlvit")


def noise_images(count, size=(40, 48)):
    return [Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)) for i in range(count)]


@pytest.mark.parametrize("successes,n,low,high", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (3, 8, 0.1368, 0.6943)])
def test_wilson_interval_matches_the_closed_form(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_presence_row_counts_all_and_active_concepts():
    present = {"a": True, "b": False, "c": True}
    assert presence_row(present, ["a", "b", "c"], ["a", "b", "c"]) == {
        "present_a": 1.0, "present_b": 0.0, "present_c": 1.0, "present_all": 0.0, "present_active": 0.0}
    # b masked: the two it keeps are there
    assert presence_row(present, ["a", "b", "c"], ["a", "c"])["present_active"] == 1.0
    assert presence_row(present, ["a", "b", "c"], ["b"])["present_active"] == 0.0


def test_wilson_interval_of_no_image_one_image_and_all_present():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing observed: anything is possible
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)  # (1 + z^2/2 -+ z^2/2 ... ) / (1 + z^2)
    assert wilson_interval(5, 5)[1] == 1.0  # the closed form rounds to 1.0000000000000002 here: clamped


def test_summary_gives_rates_with_wilson_intervals_and_the_report_prints_them(tmp_path):
    seen = [1, 0, 0, 1, 0, 0, 0, 1]  # 3 of 8
    rows = [{"method": "m", "prompt_index": 0, "prompt": "p", "seed": s, "image": "x", "present_all": float(v), "clip_text": 0.1 * s}
            for s, v in enumerate(seen)]
    rows += [{**r, "method": "never", "present_all": 0.0} for r in rows]
    summary = summarise(rows, ["m", "never"])
    assert summary[0]["present_all"] == pytest.approx(3 / 8)
    assert (summary[0]["present_all_low"], summary[0]["present_all_high"]) == pytest.approx(wilson_interval(3, 8))
    assert "present_all_ci95" not in summary[0] and summary[0]["clip_text_low"] < summary[0]["clip_text"] < summary[0]["clip_text_high"]
    assert format_cell(summary[0], "present_all") == "37.5% [13.7-69.4]"
    assert format_cell(summary[1], "present_all") == "0.0% [0.0-32.4]"  # never "0% ± 0%"


def test_detector_scores_equal_transformers_computed_directly(detector):
    from transformers import OwlViTForObjectDetection, OwlViTProcessor

    images = noise_images(3)
    judge = DetectorPresence(detector, {"dog": "a photo of a dog", "hat": "a hat"})
    assert judge.threshold == ev.EvaluationConfig.presence_threshold  # the evaluator's default is the detector's
    scores = judge.scores(images)

    model, processor = OwlViTForObjectDetection.from_pretrained(detector).eval(), OwlViTProcessor.from_pretrained(detector)
    with torch.no_grad():
        inputs = processor(text=[["a photo of a dog", "a hat"]] * 3, images=images, return_tensors="pt", padding=True)
        expected = model(**inputs).logits.sigmoid().amax(dim=1)
    torch.testing.assert_close(scores, expected)
    assert 0.05 < float(scores.min()) and float(scores.max()) < 0.95  # not saturated, so the threshold below means something

    judge.threshold = float(scores.flatten().sort().values[2])  # the three largest of six are present
    present = judge.present(images)
    assert [[p[c] for c in ("dog", "hat")] for p in present] == (scores >= judge.threshold).tolist()
    assert sum(v for p in present for v in p.values()) == 4


def test_presence_judges_are_chosen_by_folder_and_refuse_what_they_cannot_judge(detector, tmp_path):
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence

    concepts = [Concept("dog", "a sks dog", None, presence="dog"), Concept("hat", "a zwx hat", None, presence="hat")]
    found = load_presence_judge(detector, concepts)
    # its default threshold is the evaluator's
    assert isinstance(found, DetectorPresence) and found.threshold == ev.EvaluationConfig.presence_threshold
    attribute = load_presence_judge(ASSETS / "judge", [Concept("checker", "a qkx", None), Concept("star", "a sks", None)])
    assert isinstance(attribute, AttributeJudgePresence) and attribute.concepts == ["checker", "star"]
    assert attribute.attribute == {"checker": ("background", "checker"), "star": ("shape", "star")}
    with pytest.raises(ValueError, match=r"\['hat'\] have no detector query"):
        load_presence_judge(detector, [concepts[0], Concept("hat", "a zwx hat", None)])
    with pytest.raises(PresenceError, match="nowhere"):
        load_presence_judge(tmp_path / "nowhere", concepts)


def test_evaluate_writes_presence_columns_per_method(world, detector, tmp_path):
    make_concept_images(tmp_path / "red", "circle", (200, 30, 30), count=2)
    make_concept_images(tmp_path / "blue", "square", (30, 30, 200), count=2, seed=1)
    (tmp_path / "concepts.toml").write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a photo of sks"\npresence = "a circle"\n'
        f'[[concepts]]\nname = "b"\nlora = "{world["b"]}"\nimages = "blue"\nprompt = "a photo of zwx"\nclass_prompt = "a square"\n'
        'class_images = "blue"\n')
    out = ev.evaluate(ev.EvaluationConfig(
        base=str(world["base"]), concepts=tmp_path / "concepts.toml", output_dir=tmp_path / "eval", clip_model=make_tiny_clip(tmp_path / "clip"),
        presence_model=str(detector), presence_threshold=0.55, seeds=[0], steps=2, resolution=32, progress=False,
        prompts=["a photo of sks and zwx"], methods=["sum", "single_a", "base"]))
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    for row in rows.values():
        assert {row["present_a"], row["present_b"]} <= {0.0, 1.0}
        assert row["present_all"] == float(row["present_a"] and row["present_b"])
    assert rows["single_a"]["present_active"] == rows["single_a"]["present_a"]
    assert rows["sum"]["present_active"] == rows["sum"]["present_all"]
    assert "present_active" not in rows["base"]  # the base model means to draw no concept
    report = (out / "report.md").read_text()
    assert "present_all" in report and "%" in report


# -- an image counts only where it keeps its prompt (a fooled judge reads concepts into textures) --------
def test_presence_row_with_the_prompt_kept_counts_faithful_compositions():
    every = {"a": True, "b": True}
    assert presence_row(every, ["a", "b"], ["a", "b"], kept=True)["present_all_faithful"] == 1.0
    row = presence_row(every, ["a", "b"], ["a", "b"], kept=False)  # every concept "seen", the prompt lost
    assert (row["present_all"], row["present_prompt"], row["present_all_faithful"]) == (1.0, 0.0, 0.0)
    assert presence_row({"a": True, "b": False}, ["a", "b"], ["a", "b"], kept=True)["present_all_faithful"] == 0.0
    assert "present_all_faithful" not in presence_row(every, ["a", "b"], ["a", "b"])  # a judge that cannot tell


def drawn(scenes):
    from mole_diffusion.demo import world

    return [world.draw(scene) for scene in scenes]


def test_the_attribute_judge_reads_whether_the_prompt_colour_is_kept():
    from mole_diffusion.demo import world
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence

    judge = AttributeJudgePresence(ASSETS / "judge", ["star", "stripes", "checker"])
    scene = lambda colour: world.Scene("star", colour, "checker", "large", (0.5, 0.5), "stripes")
    images = drawn([scene("red"), scene("blue"), scene("yellow")])
    prompts = ["a red sks in zwx style on a qkx background"] * 3
    def kept(images, prompts):
        return [kept for _, kept in judge.read(images, prompts)]

    assert kept(images, prompts) == [True, False, False]
    assert kept(images[:1], ["a sks in zwx style on a qkx background"]) == [None]  # no colour named
    # the first colour a caption names is the object's, not the background's
    assert kept(drawn([world.Scene("circle", "green", "white", "large", (0.5, 0.5))]), ["a green circle on a white background"]) == [True]


def test_the_attribute_judge_sees_no_object_in_a_texture_of_the_prompts_colours():
    """What fooled the colour-only check (experiments/docs/faithful-but-textures.png): checker-and-stripe textures in the
    prompt's colour. Drawn fresh here (a seed the judge's training never drew), they show no star and do not
    keep the prompt; a drawn composition still does."""
    import random

    from mole_diffusion.demo import world
    from mole_diffusion.demo.judge import objectless
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence

    judge = AttributeJudgePresence(ASSETS / "judge", ["star", "stripes", "checker"])
    rng = random.Random("a texture test")
    textures = [objectless(rng)[0] for _ in range(32)]
    read = judge.read(textures, ["a blue sks in zwx style on a qkx background"] * len(textures))
    assert sum(seen["star"] for seen, _ in read) <= 2 and sum(bool(kept) for _, kept in read) <= 2
    composition = drawn([world.Scene("star", "blue", "checker", "large", (0.5, 0.5), "stripes")])
    assert judge.read(composition, ["a blue sks in zwx style on a qkx background"]) == [
        ({"star": True, "stripes": True, "checker": True}, True)]


def test_a_rim_changes_only_a_ring_of_one_colour_around_the_object():
    """The judge's rim augmentation (JudgeSettings.rim_share): the object's own pixels and everything further than
    4 pixels from it stay as drawn; the ring it paints is one colour."""
    import random

    import torch.nn.functional as F
    from PIL import ImageDraw

    from mole_diffusion.demo import world
    from mole_diffusion.demo.judge import with_rim

    scene = world.Scene("star", "red", "checker", "large", (0.5, 0.5))
    image, mask = world.draw(scene), Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).polygon(world.outline(scene, 64), fill=255)
    for seed in range(4):
        rimmed = with_rim(image, mask, random.Random(seed))
        changed = (np.asarray(image) != np.asarray(rimmed)).any(axis=-1)
        inside = torch.from_numpy(np.asarray(mask) > 0)
        near = F.max_pool2d(inside[None, None].float(), 9, 1, 4)[0, 0].bool()
        assert changed.any() and not changed[inside.numpy()].any() and not changed[~near.numpy()].any()
        assert len({tuple(p) for p in np.asarray(rimmed)[changed]}) == 1


def test_present_active_asks_only_for_the_prompts_concepts_the_method_kept():
    """present_active: every concept of the prompt's composition that the method did not mask. A concept the
    method has loaded but the prompt does not name is not asked for; a masked concept of the prompt is not either.
    present_all asks for every concept of the prompt, present_prompt is the judge's word on the rest."""
    present = {"a": True, "b": False, "c": True}
    # the prompt composes a and c; the method runs a, b and c (b loaded, not named, not drawn)
    row = presence_row(present, ["a", "c"], ["a", "b", "c"], kept=True)
    assert row == {"present_a": 1.0, "present_b": 0.0, "present_c": 1.0, "present_prompt": 1.0, "present_all": 1.0,
                   "present_all_faithful": 1.0, "present_active": 1.0}
    # c masked, b active but unnamed: of the prompt's concepts only a is asked for; present_all still wants c
    row = presence_row({"a": True, "b": False, "c": False}, ["a", "c"], ["a", "b"], kept=False)
    assert (row["present_active"], row["present_all"], row["present_prompt"], row["present_all_faithful"]) == (1.0, 0.0, 0.0, 0.0)
    # the prompt's unmasked concept a is missing: 0, whatever the unnamed b shows
    row = presence_row({"a": False, "b": True, "c": True}, ["a", "c"], ["a", "b"])
    assert (row["present_active"], row["present_all"]) == (0.0, 0.0) and "present_prompt" not in row
    # the method keeps none of the prompt's concepts (only the unnamed b): nothing it means to draw, no present_active
    assert "present_active" not in presence_row(present, ["a", "c"], ["b"])


def test_evaluate_presence_columns_by_hand_for_prompts_naming_some_concepts():
    """What evaluate passes to presence_row for a prompt naming a and c of three loaded concepts: the composed
    concepts from the trigger words, the active ones from the method's name; present_active by hand."""
    names, triggers = ["a", "b", "c"], {"a": ["sks"], "b": ["zwx"], "c": ["qkx"]}
    prompt = "a sks on a qkx background"
    composed = composed_concepts(prompt, triggers)
    assert composed == ["a", "c"]
    present = {"a": True, "b": False, "c": False}
    expected_active = {"sum": 0.0, "mole_without_c": 1.0, "mole_without_b": 0.0, "single_a": 1.0, "single_b": None}
    for method, expected in expected_active.items():
        row = presence_row(present, composed, active_experts(method, names))
        assert row.get("present_active") == expected, method
        assert row["present_all"] == 0.0


def test_the_attribute_judge_refuses_concepts_it_does_not_know():
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence

    with pytest.raises(PresenceError, match=r"judge: the attribute judge knows concepts \['checker', 'star', 'stripes'\], "
                                            r"not \['dog'\]$"):
        AttributeJudgePresence(ASSETS / "judge", ["star", "dog"])


def test_a_colour_with_no_object_does_not_keep_the_prompt():
    """The judge reads the prompt's colour but no object (shape "none"): the prompt is not kept. Its predictions are
    set by hand here, so the rule itself is what is checked."""
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence

    judge = AttributeJudgePresence(ASSETS / "judge", ["stripes"])  # read from the object's style
    readings = [{"colour": "red", "shape": "none", "style": "plain"}, {"colour": "red", "shape": "circle", "style": "stripes"}]
    judge.judge.predict = lambda pixels: readings
    images = drawn([world_scene(), world_scene()])
    assert judge.read(images, ["a red circle in zwx style"] * 2) == [({"stripes": False}, False), ({"stripes": True}, True)]


def world_scene():
    from mole_diffusion.demo import world

    return world.Scene("star", "red", "checker", "large", (0.5, 0.5))


def test_presence_judge_errors_say_what_was_expected(detector, tmp_path):
    concepts = [Concept("dog", "a sks dog", None, presence="dog"), Concept("hat", "a zwx hat", None)]
    with pytest.raises(PresenceError, match=r"nowhere not found \(expected a folder: the demo world's judge, or an "
                                            r"OWL-ViT / OWLv2 detector saved with save_pretrained\)$"):
        load_presence_judge(tmp_path / "nowhere", concepts)
    with pytest.raises(PresenceError, match=r"concepts \['hat'\] have no detector query: give each a `presence` \(or "
                                            r"`class_prompt`\) in the concepts file$"):
        load_presence_judge(detector, concepts)


def test_the_judge_locates_the_object_where_it_was_drawn_and_nowhere_in_a_texture():
    import random

    from mole_diffusion.demo import world
    from mole_diffusion.demo.judge import objectless
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.attribute_judge import load_judge

    judge, _ = load_judge(ASSETS / "judge")
    centres = [(0.3, 0.35), (0.7, 0.3), (0.5, 0.5), (0.32, 0.7), (0.68, 0.66)]
    scenes = [world.Scene(shape, colour, background, "small", centre)
              for (shape, colour, background), centre in zip((("circle", "red", "blue"), ("square", "yellow", "green"),
                                                              ("triangle", "white", "purple"), ("star", "blue", "checker"),
                                                              ("circle", "green", "white")), centres)]
    found = judge.locate(drawn(scenes))
    for (x, y), (fx, fy) in zip(centres, found):
        assert abs(x - fx) < 0.06 and abs(y - fy) < 0.08, (centres, found)
    rng = random.Random(3)
    assert judge.locate([objectless(rng)[0] for _ in range(8)]).count(None) >= 6


def test_a_judged_row_counts_an_image_faithful_only_where_it_keeps_the_prompts_colour():
    from mole_diffusion.demo import world
    from mole_diffusion.demo.run import ASSETS
    from mole_diffusion.eval.presence import AttributeJudgePresence, judged_row

    judge = AttributeJudgePresence(ASSETS / "judge", ["star", "stripes", "checker"])
    image = drawn([world.Scene("star", "blue", "checker", "large", (0.5, 0.5), "stripes")])[0]
    names = ["star", "stripes", "checker"]
    row = judged_row(judge, image, "a blue sks in zwx style on a qkx background", names, names)
    assert (row["present_all"], row["present_prompt"], row["present_all_faithful"]) == (1.0, 1.0, 1.0)
    row = judged_row(judge, image, "a red sks in zwx style on a qkx background", names, names)
    assert (row["present_all"], row["present_prompt"], row["present_all_faithful"]) == (1.0, 0.0, 0.0)


def test_the_attribute_judge_reads_images_at_the_resolution_it_was_trained_at(tmp_path):
    from mole_diffusion.eval.attribute_judge import AttributeJudge
    from mole_diffusion.eval.presence import AttributeJudgePresence

    torch.manual_seed(0)
    AttributeJudge({"shape": ("circle", "star"), "colour": ("red", "blue")}, widths=(8, 8, 8, 8)).save(
        tmp_path, {"star": ("shape", "star")}, resolution=32)
    judge = AttributeJudgePresence(tmp_path, ["star"])
    seen = []
    predict = judge.judge.predict
    judge.judge.predict = lambda images: seen.append(tuple(images.shape)) or predict(images)
    judge.read([Image.new("RGB", (64, 64), (200, 30, 30))], ["a red sks"])
    assert seen == [(1, 3, 32, 32)]


# Mutants of presence.py that no test can kill, being equivalent: the judge or detector moved to device None or to
# the default "cpu" instead of the "cpu" passed (one CPU device).
