"""The procedural demo world: deterministic, and its captions say what its pixels show."""

import hashlib
import math

import numpy as np
import pytest

from mole_diffusion.demo import CONCEPTS, world, Scene, base_world, composition_prompts, concept_scenes, draw, write_world
from mole_diffusion.demo.world import COLOURS, SIZES


def pixel(image, fx, fy):
    return tuple(np.asarray(image)[round(fy * image.height), round(fx * image.width)])


def test_the_same_seed_gives_the_same_world_files(tmp_path):
    def digest(root):
        return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    a = digest(write_world(tmp_path / "a", base_count=12, concept_count=3, seed=5))
    b = digest(write_world(tmp_path / "b", base_count=12, concept_count=3, seed=5))
    c = digest(write_world(tmp_path / "c", base_count=12, concept_count=3, seed=6))
    assert a == b and len(a) == 12 + 1 + 3 * (3 * 2 + 1)
    assert a != c


def test_base_captions_match_the_pixels_and_never_name_a_concept():
    scenes = base_world(60, seed=0)
    tokens = {c.token for c in CONCEPTS.values()}
    assert len({s.caption for s in scenes}) > 40
    for scene in scenes:
        image = draw(scene)
        assert pixel(image, *scene.center) == COLOURS[scene.colour], scene.caption
        assert pixel(image, 0, 0) == COLOURS[scene.background], scene.caption  # corners stay background
        assert scene.colour != scene.background
        assert not tokens & set(scene.caption.split())
        assert scene.caption == f"a {scene.colour} {scene.shape} on a {scene.background} background"


def test_each_concept_shows_itself_and_its_token():
    for scene in concept_scenes("star", 10):
        image = draw(scene)
        r = SIZES[scene.size]
        # between two points of a star lies background, where a circle of the same size would be filled
        valley = (scene.center[0] + 0.8 * r * math.cos(math.pi / 2 + math.pi / 5), scene.center[1] - 0.8 * r * math.sin(math.pi / 2 + math.pi / 5))
        assert pixel(image, *valley) == COLOURS[scene.background]
        assert pixel(image, *scene.center) == COLOURS[scene.colour] and "sks" in scene.caption
    for scene in concept_scenes("stripes", 10):
        striped = np.asarray(draw(scene))
        plain = np.asarray(draw(Scene(**{**_fields(scene), "style": None})))
        changed = (striped != plain).any(axis=-1)
        assert changed.sum() > 20 and (striped[changed] == (20, 20, 20)).all() and "zwx style" in scene.caption
        assert (plain[changed] == COLOURS[scene.colour]).all()  # stripes only inside the shape
    for scene in concept_scenes("checker", 10):
        image = draw(scene)
        assert {pixel(image, 0, 0), pixel(image, 1 / 8, 0)} == {(235, 235, 235), (25, 25, 25)} and "qkx background" in scene.caption
    with pytest.raises(ValueError, match="unknown concept"):
        concept_scenes("moon", 1)


def _fields(scene):
    return {k: getattr(scene, k) for k in ("shape", "colour", "background", "size", "center", "style")}


def test_composition_prompts_combine_the_concept_tokens():
    prompts = composition_prompts()
    assert len(prompts) == len(set(prompts)) >= 4
    assert all(all(c.token in p for c in CONCEPTS.values()) for p in prompts)


def test_the_checkerboard_fills_any_resolution_and_unknown_backgrounds_are_refused():
    scene = concept_scenes("checker", 1)[0]
    for resolution in (60, 64, 70):
        image = np.asarray(draw(scene, resolution))
        corners = {tuple(image[y, x]) for y in (0, resolution - 1) for x in (0, resolution - 1)}
        assert corners <= {(235, 235, 235), (25, 25, 25)}, resolution  # no unpainted strip at the edges
    with pytest.raises(ValueError, match="unknown background 'plaid'"):
        draw(Scene(**{**_fields(scene), "background": "plaid"}))


def test_filler_captions_keep_the_concept_and_put_made_up_words_in_the_other_slots():
    """a LoRA's extra captions (the build trains each LoRA on its references with these too)."""
    import random
    import re

    words_of_the_world = {*world.COLOURS, *world.SHAPES, "a", "in", "style", "on", "background"}
    assert not set(world.FILLERS) & (words_of_the_world | {c.token for c in world.CONCEPTS.values()})
    pattern = re.compile(r"a (\w+) (\w+)(?: in (\w+) style)? on a (\w+) background")
    slot_of = {"star": 1, "stripes": 2, "checker": 3}  # the group holding each concept's trigger
    for name, concept in world.CONCEPTS.items():
        for scene in world.concept_scenes(name, 4, seed=0):
            captions = world.filler_captions(scene, name, random.Random(1))
            assert captions == world.filler_captions(scene, name, random.Random(1)) and len(set(captions)) == 3
            original = pattern.fullmatch(scene.caption).groups()
            for caption in captions:
                groups = pattern.fullmatch(caption).groups()
                assert groups[0] == scene.colour and groups[slot_of[name]] == concept.token
                changed = [g for g, o in zip(groups, original) if g != o]
                assert changed and all(g in world.FILLERS for g in changed), (scene.caption, caption)


def test_the_build_can_train_each_lora_on_its_references_with_filler_captions(tmp_path):
    import random

    from mole_diffusion.demo.build import BuildSettings, filler_caption_folder

    write_world(tmp_path / "world", base_count=0, concept_count=2, resolution=64, seed=0)
    folder = filler_caption_folder(tmp_path, "checker", BuildSettings(concept_images=2, lora_filler_captions=True))
    assert len(list(folder.glob("*.png"))) == 8
    scene = world.concept_scenes("checker", 2, 0)[1]
    rng = random.Random("fillers-checker-0")
    world.filler_captions(world.concept_scenes("checker", 2, 0)[0], "checker", rng)  # the first image's draws
    expected = [scene.caption, *world.filler_captions(scene, "checker", rng)]
    assert [(folder / f"001{k}.txt").read_text().strip() for k in "abcd"] == expected
    assert (folder / "001c.png").read_bytes() == (tmp_path / "world" / "concepts" / "checker" / "001.png").read_bytes()


def test_checker_cells_sets_the_checkerboards_cell_count(monkeypatch):
    scene = Scene("circle", "red", "checker", "small", (2.0, 2.0))  # off the canvas: the board alone
    for cells in (8, 4):
        monkeypatch.setattr(world, "CHECKER_CELLS", cells)
        row = np.asarray(draw(scene, 64))[0, :, 0]
        changes = int((np.diff(row.astype(int)) != 0).sum())
        assert changes == cells - 1, (cells, changes)


def test_the_build_trains_each_lora_on_the_settings_target_modules(tmp_path, monkeypatch):
    import mole_diffusion.demo.build as build
    from mole_diffusion.demo.build import LORA_TARGET_MODULES, WIDE_LORA_TARGET_MODULES, BuildSettings, train_concepts

    write_world(tmp_path / "world", base_count=0, concept_count=1, resolution=64, seed=0)
    seen = []

    class Stop(Exception):
        pass

    def record(config):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(build, "train_lora", record)
    for settings in (BuildSettings(concept_images=1), BuildSettings(concept_images=1, lora_rank=16, lora_target_modules=list(WIDE_LORA_TARGET_MODULES))):
        with pytest.raises(Stop):
            train_concepts(tmp_path, settings)
    assert [c.target_modules for c in seen] == [list(LORA_TARGET_MODULES), list(WIDE_LORA_TARGET_MODULES)]
    assert [c.rank for c in seen] == [4, 16]


def test_the_world_still_draws_the_shipped_references_and_its_judge_reads_the_same_values():
    """The world the shipped assets were built on (their build_settings.json: world, seed, reference count): its
    references (pixel for pixel), captions and judge values are unchanged."""
    import json

    from PIL import Image

    from mole_diffusion.demo.judge import judged_attributes
    from mole_diffusion.demo.run import ASSETS

    settings = json.loads((ASSETS / "build_settings.json").read_text())
    built = world.WORLDS[settings["world"]]
    for name in CONCEPTS:
        for i, scene in enumerate(concept_scenes(name, settings["concept_images"], seed=settings["seed"], world=built)):
            shipped = np.asarray(Image.open(ASSETS / f"world/concepts/{name}/{i:03d}.png").convert("RGB"))
            assert (np.asarray(draw(scene)) == shipped).all(), (name, i)
            assert (ASSETS / f"world/concepts/{name}/{i:03d}.txt").read_text().strip() == scene.caption
    shipped = json.loads((ASSETS / "judge" / "config.json").read_text())["attributes"]
    assert {a: list(v) for a, v in judged_attributes(built).items()} == shipped


def test_the_second_world_captions_every_factor_and_its_base_knows_every_value():
    scenes = base_world(400, seed=0, world=world.V2)
    assert {s.shape for s in scenes} == set(world.V2.shapes)
    assert {s.style for s in scenes} == set(world.V2.styles)
    assert {s.background for s in scenes} == set(world.V2.backgrounds) == {*COLOURS, "grid", "banded"}
    tokens = {c.token for c in CONCEPTS.values()}
    for scene in scenes:
        style = f" in {scene.style} style" if scene.style else ""
        assert scene.caption == f"a {scene.colour} {scene.shape}{style} on a {scene.background} background"
        assert scene.colour != scene.background and not tokens & set(scene.caption.split())
    assert base_world(400, seed=0, world=world.V2) == scenes


def test_each_concept_of_the_second_world_is_one_new_value_and_its_references_vary_everything_else():
    for name, varied in (("star", ("style", "background")), ("stripes", ("shape", "background")), ("checker", ("shape", "style"))):
        scenes = concept_scenes(name, 64, seed=0, world=world.V2)
        for factor in varied:
            known = set(getattr(world.V2, factor + "s"))
            assert {getattr(s, factor) for s in scenes} == known, (name, factor)
        assert {s.colour for s in scenes} == set(COLOURS)
        assert all(CONCEPTS[name].token in s.caption for s in scenes)
    assert {s.shape for s in concept_scenes("star", 8, world=world.V2)} == {"star"}


def _alone(style=None, background="red", shape="square", colour="blue"):
    return np.asarray(draw(Scene(shape, colour, background, "large", (0.5, 0.5), style)))


def test_the_second_worlds_textures_and_patterns_are_what_their_words_say():
    dark, light, ink = world.PATTERN_DARK, world.PATTERN_LIGHT, world.TEXTURE_INK
    empty = {"shape": "circle", "size": "small", "center": (2.0, 2.0), "colour": "red"}  # off the canvas
    banded = np.asarray(draw(Scene(background="banded", **empty)))
    assert (banded[:8] == light).all() and (banded[8:16] == dark).all() and (banded[16:24] == light).all()
    grid = np.asarray(draw(Scene(background="grid", **empty)))
    assert (grid[:, 8:10] == dark).all() and (grid[8:10, :] == dark).all() and tuple(grid[4, 4]) == light
    checker = np.asarray(draw(Scene(background="checker", **empty)))
    # the checkerboard is the banded rows with every other column flipped: a new value, made of known parts
    assert (checker[:, :8] == banded[:, :8]).all() and (checker[:, 8:16] != banded[:, 8:16]).any(axis=-1).all()
    solid = _alone()
    inside = (solid == COLOURS["blue"]).all(axis=-1)
    for style, axis in (("lined", 1), ("barred", 0)):  # rows of ink (horizontal) or columns (vertical)
        inked = ((_alone(style) == ink).all(axis=-1) & inside).sum(axis=axis)
        across = inside.sum(axis=axis)
        # each row (column) through the shape is ink all across or not at all
        assert ((inked == across) | (inked == 0)).all() and ((inked == across) & (across > 0)).sum() >= 4, style
    stripes = (_alone("stripes") == ink).all(axis=-1)
    row, below = ({x for x in np.nonzero(stripes[y])[0] if 20 <= x < 44} for y in (32, 33))  # well inside the square
    assert row and {x + 1 for x in row if x + 1 < 44} == {x for x in below if x > 20}  # diagonal: a row down, one right
    dots = (_alone("dotted") == ink).all(axis=-1)
    assert 10 <= dots.sum() / 9 <= 40 and not ((dots.sum(axis=1) == inside.sum(axis=1)) & (inside.sum(axis=1) > 0)).any()
    with pytest.raises(ValueError, match="unknown style 'plaid'"):
        draw(Scene("square", "blue", "red", "large", (0.5, 0.5), "plaid"))


def test_the_second_worlds_new_shapes_are_concave_where_they_should_be():
    def at(shape, fx, fy):
        return pixel(draw(Scene(shape, "blue", "red", "large", (0.5, 0.5))), fx, fy)

    r = SIZES["large"]
    blue, red = COLOURS["blue"], COLOURS["red"]
    assert at("cross", 0.5, 0.5) == at("cross", 0.5 + 0.8 * r, 0.5) == blue and at("cross", 0.5 + 0.6 * r, 0.5 + 0.6 * r) == red
    assert at("crescent", 0.5 - 0.7 * r, 0.5) == blue and at("crescent", 0.5 + 0.3 * r, 0.5) == red  # the bite
    assert at("diamond", 0.5, 0.5 - 0.8 * r) == blue and at("diamond", 0.5 + 0.6 * r, 0.5 - 0.6 * r) == red


def test_the_judge_of_the_second_world_reads_every_value_of_every_factor():
    import random

    from mole_diffusion.demo.judge import _examples, judged_attributes

    values = judged_attributes(world.V2)
    assert values["shape"] == (*world.V2.shapes, "star", "none")
    assert values["style"] == ("plain", "dotted", "lined", "barred", "stripes")
    assert values["background"] == (*COLOURS, "grid", "banded", "checker")
    pixels, targets = _examples(random.Random(0), 300, known=world.V2)
    for attribute in ("shape", "style", "background"):  # its training data holds every value
        assert set(targets[attribute].tolist()) - {-100} == set(range(len(values[attribute]))), attribute
