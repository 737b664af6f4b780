import math

import pytest

from experiments import instances
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS


def test_spread_is_the_root_of_the_summed_variances_of_the_centres_found():
    assert instances.spread([(0.2, 0.5), (0.6, 0.5), None]) == pytest.approx(0.2)
    assert instances.spread([(0.2, 0.2), (0.4, 0.4)]) == pytest.approx(math.sqrt(0.01 + 0.01))
    assert instances.spread([(0.5, 0.5), None]) is None


def test_a_pair_prompt_names_both_concepts_and_keeps_the_rest_of_the_scene():
    scene = world.concept_scenes("star", 1, seed=3, world=world.V2)[0]
    both = instances.with_concept(scene, "checker")
    assert (both.shape, both.background, both.colour, both.style) == ("star", "checker", scene.colour, scene.style)
    assert "sks" in both.caption and "qkx" in both.caption


def test_the_checks_run_on_the_shipped_world_and_write_their_tables(tmp_path, capsys):
    assert instances.built_world(ASSETS)[0] is world.V2
    (tmp_path / "old").mkdir()  # a build from before the second world records no world: the first
    (tmp_path / "old" / "build_settings.json").write_text('{"seed": 0}')
    assert instances.built_world(tmp_path / "old")[0] is world.V1
    instances.main(["--out", str(tmp_path), "--prompts", "1", "--seeds", "2", "--steps", "2"])
    text = (tmp_path / "instances.md").read_text()
    assert "| shape | colour | style | background |" in text
    for name in instances.NAMES:
        assert f"| {name} |" in text
    assert text.count(" + ") == 3 and capsys.readouterr().out.endswith(f"wrote {tmp_path / 'instances.md'}\n")


def test_a_set_with_a_class_word_is_drawn_with_it_in_every_checker_phrase(tmp_path, monkeypatch):
    prompts = []
    settings = {**instances.built_world(ASSETS)[1], "class_word": "tiled"}
    monkeypatch.setattr(instances, "built_world", lambda assets: (world.V2, settings))
    monkeypatch.setattr(instances, "draw", lambda pipe, prompt, seeds, **kw: prompts.append(prompt) or [world.draw(world.Scene("circle", "red", "blue", "large", (0.5, 0.5)))] * len(seeds))
    instances.main(["--out", str(tmp_path), "--prompts", "1", "--seeds", "1", "--steps", "1"])
    phrases = [p for p in prompts if "qkx" in p]
    assert len(prompts) == 7 and len(phrases) == 3 and all("qkx tiled background" in p for p in phrases)


def test_the_references_spread_is_read_from_the_images_in_the_folder(tmp_path):
    from mole_diffusion.eval.attribute_judge import load_judge

    judge, _ = load_judge(ASSETS / "judge")
    for name, centres in {"still": [(0.5, 0.5)] * 4, "corners": [(0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3)]}.items():
        (tmp_path / name).mkdir()
        for i, centre in enumerate(centres):
            world.draw(world.Scene("star", "red", "white", "small", centre)).save(tmp_path / name / f"{i:03d}.png")
    assert instances.reference_spread(judge, tmp_path / "still") == pytest.approx(0.0, abs=0.02)
    assert instances.reference_spread(judge, tmp_path / "corners") == pytest.approx(instances.spread([(0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3)]), abs=0.05)
