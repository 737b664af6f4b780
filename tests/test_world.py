"""The procedural demo world: deterministic, and its captions say what its pixels show."""

import hashlib
import math

import numpy as np
import pytest

from mole_diffusion.demo import CONCEPTS, Scene, base_world, composition_prompts, concept_scenes, draw, write_world
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
