"""experiments.known_pattern: a base fine-tuned on a coarse checkerboard, and the checker captioned with that class word."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from experiments.known_pattern import CLASS_WORD, fine_tune, main, measure, measure_prompts, tiled_world, with_class_word, write_references
from mole_diffusion.concepts import load_compositions, load_concepts
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS, check_assets


def test_tiles_are_a_coarse_checkerboard_drawable_only_inside_the_block():
    scene = world.Scene("circle", "red", CLASS_WORD, "small", (0.8, 0.8))
    with tiled_world() as tiled:
        assert CLASS_WORD in tiled.backgrounds and CLASS_WORD not in world.V2.backgrounds
        image = world.draw(scene)
    cell = 64 // 4
    light, dark = image.getpixel((2, 2)), image.getpixel((cell + 2, 2))
    assert light == world.PATTERN_LIGHT and dark == world.PATTERN_DARK
    assert image.getpixel((cell + 2, cell + 2)) == light and image.getpixel((2, cell + 2)) == dark
    with pytest.raises(ValueError, match="unknown background"):
        world.draw(scene)  # the world is as it was


def test_the_class_word_follows_the_checker_trigger_and_nothing_else(tmp_path):
    assert with_class_word("a red sks in zwx style on a qkx background", CLASS_WORD) == f"a red sks in zwx style on a qkx {CLASS_WORD} background"
    assert with_class_word("a red sks on a grid background", CLASS_WORD) == "a red sks on a grid background"
    assert with_class_word("a red circle on a qkx background", "") == "a red circle on a qkx background"
    write_references(tmp_path, count=3)
    for i, scene in enumerate(world.concept_scenes("checker", 3, 0, world.V2)):  # the build's first three references
        assert (tmp_path / f"{i:03d}.txt").read_text() == scene.caption.replace("qkx", f"qkx {CLASS_WORD}") + "\n"
        assert Image.open(tmp_path / f"{i:03d}.png").tobytes() == world.draw(scene).tobytes()
    main(["references", "--out", str(tmp_path / "banded"), "--class-word", "banded"])
    assert (tmp_path / "banded" / "000.txt").read_text().endswith("on a qkx banded background\n")
    assert len(list((tmp_path / "banded").glob("*.png"))) == 64
    main(["references", "--out", str(tmp_path / "more"), "--concept", "star", "--tiled", "--count", "5"])
    assert sorted(f.name for f in (tmp_path / "more").iterdir()) == [f"{i:03d}.{e}" for i in range(5) for e in ("png", "txt")]


def test_a_concepts_references_on_tiles_vary_the_ground_over_the_tiled_world(tmp_path):
    main(["references", "--out", str(tmp_path / "star"), "--concept", "star", "--tiled"])
    captions = [(tmp_path / "star" / f"{i:03d}.txt").read_text() for i in range(64)]
    assert all(c.startswith("a ") and " sks " in c for c in captions)
    on_tiles = [i for i, c in enumerate(captions) if c.endswith(f"on a {CLASS_WORD} background\n")]
    assert 0 < len(on_tiles) < 64  # tiles are one ground among the world's
    with tiled_world() as tiled:
        scenes = world.concept_scenes("star", 64, 0, tiled)
        assert Image.open(tmp_path / "star" / f"{on_tiles[0]:03d}.png").tobytes() == world.draw(scenes[on_tiles[0]]).tobytes()
    write_references(tmp_path / "plain", count=8, concept="star")  # without --tiled: the build's references
    assert [(tmp_path / "plain" / f"{i:03d}.txt").read_text() for i in range(8)] == [
        s.caption + "\n" for s in world.concept_scenes("star", 8, 0, world.V2)]


def test_every_check_names_its_concepts_with_the_checker_class_word():
    checks = measure_prompts(3, 2)
    assert list(checks) == ["star", "stripes", "checker", "star + stripes", "star + checker", "stripes + checker", "all three"]
    trigger = {name: concept.token for name, concept in world.CONCEPTS.items()}
    assert [len(p) for p in checks.values()] == [3, 3, 3, 2, 2, 2, 4]
    for check, prompts in checks.items():
        names = list(world.CONCEPTS) if check == "all three" else check.split(" + ")
        for prompt in prompts:
            assert all(trigger[n] in prompt.split() for n in names), prompt
            assert ("qkx" in prompt) == (f"qkx {CLASS_WORD} background" in prompt), prompt


def test_fine_tuning_moves_the_unet_and_writes_a_pipeline(tmp_path):
    written = fine_tune(ASSETS / "pipeline", tmp_path, steps=1, scenes=4, batch_size=2, learning_rate=1e-3)
    before, after = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (ASSETS / "pipeline", written))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (written / "model_index.json").is_file() and (written / "text_encoder").is_dir()


class _RecordingPipe:
    """Records which experts are on for each prompt drawn; every image is the prompt itself."""

    def __init__(self):
        self.on, self.drawn = [], []

    def set_experts(self, names, weights):
        self.on = dict(zip(names, weights))

    def __call__(self, prompts, generator, num_inference_steps, guidance_scale):
        self.drawn.append((prompts[0], dict(self.on), len(prompts)))
        return type("Output", (), {"images": list(prompts)})()


class _StarsOnlyJudge:
    """Reads a star wherever the prompt names one, never stripes or a checkerboard."""

    def predict(self, prompts):
        return [{"shape": "star" if "sks" in p else "circle", "style": "solid", "background": "white"} for p in prompts]


def test_measure_draws_each_check_with_its_loras_at_weight_one_and_counts_images_showing_all_of_them():
    pipe = _RecordingPipe()
    shares = measure(pipe, _StarsOnlyJudge(), prompts=2, pair_prompts=1, seeds=(0, 1, 2), steps=1)
    assert shares["star"] == 1.0 and shares["stripes"] == 0.0 and shares["checker"] == 0.0
    assert shares["star + stripes"] == 0.0 and shares["all three"] == 0.0 and shares["all three: star"] == 1.0
    on = {}
    for prompt, experts, images in pipe.drawn:
        on.setdefault(frozenset(experts), []).append(prompt)
        assert images == 3 and set(experts.values()) == {1.0}
    assert len(on[frozenset(["star"])]) == 2 and len(on[frozenset(["star", "checker"])]) == 1
    assert on[frozenset(world.CONCEPTS)] == [with_class_word(p, CLASS_WORD) for p in world.composition_prompts()]


def test_the_set_is_put_together_as_a_demo_world_whose_checker_phrases_carry_the_class_word(tmp_path):
    pipeline = tmp_path / "tuned"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    loras = {name: tmp_path / f"{name}-lora.safetensors" for name in world.CONCEPTS}
    for name, file in loras.items():
        file.write_bytes(name.encode())
    (tmp_path / "g.safetensors").write_bytes(b"gates")
    out = tmp_path / "set"
    main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(out),
          "--loras", *(f"{n}={f}" for n, f in loras.items())])
    assert sorted(check_assets(out)) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != "manifest.json" and p.is_file())
    assert [(out / "loras" / f"{n}.safetensors").read_bytes() for n in world.CONCEPTS] == [n.encode() for n in world.CONCEPTS]
    assert (out / "gates.safetensors").read_bytes() == b"gates"
    concepts = {c.name: c for c in load_concepts(out / "concepts.toml")}
    assert concepts["checker"].prompt == f"a shape on a qkx {CLASS_WORD} background" and concepts["star"].prompt == "a sks"
    assert all(f"qkx {CLASS_WORD} background" in p for p in load_compositions(out / "concepts.toml"))
    assert (out / "world/concepts/checker/000.txt").read_text().endswith(f"qkx {CLASS_WORD} background\n")
    assert (out / "world/concepts/star/000.png").read_bytes() == (ASSETS / "world/concepts/star/000.png").read_bytes()
    assert json.loads((out / "build_settings.json").read_text())["class_word"] == CLASS_WORD
    main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "tiles"),
          "--loras", *(f"{n}={f}" for n, f in loras.items()), "--tiled"])
    write_references(tmp_path / "star-on-tiles", concept="star", tiled=True)
    for name in ("000.png", "001.txt", "063.png"):  # the references the set's star was trained on
        assert (tmp_path / "tiles/world/concepts/star" / name).read_bytes() == (tmp_path / "star-on-tiles" / name).read_bytes()
    assert any(CLASS_WORD in f.read_text() for f in (tmp_path / "tiles/world/concepts/stripes").glob("*.txt"))
    own = tmp_path / "own-star"
    write_references(own, count=3, concept="star", seed=5)
    main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "own"),
          "--loras", *(f"{n}={f}" for n, f in loras.items()), "--tiled", "--references", f"star={own}"])
    copied = tmp_path / "own/world/concepts/star"  # exactly the folder given; the others drawn as before
    assert sorted(f.name for f in copied.iterdir()) == sorted(f.name for f in own.iterdir())
    assert all((copied / f.name).read_bytes() == f.read_bytes() for f in own.iterdir())
    assert len(list((tmp_path / "own/world/concepts/stripes").glob("*.png"))) == 64
    with pytest.raises(ValueError, match=r"--references names \['stars'\]"):
        main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "other"),
              "--loras", *(f"{n}={f}" for n, f in loras.items()), "--references", f"stars={own}"])
    with pytest.raises(FileNotFoundError, match=r"no reference images \(\*.png\) in .*empty"):
        (tmp_path / "empty").mkdir()
        main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "other"),
              "--loras", *(f"{n}={f}" for n, f in loras.items()), "--references", f"checker={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match=r"expected one LoRA for each of \['checker', 'star', 'stripes'\]"):
        main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "other"),
              "--loras", f"star={loras['star']}", f"stripes={loras['stripes']}", f"chekcer={loras['checker']}"])
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "nothing.safetensors"), "--out", str(tmp_path / "other"),
              "--loras", *(f"{n}={f}" for n, f in loras.items())])
    assert not (tmp_path / "other").exists()  # nothing written before the inputs are checked
    with pytest.raises(FileExistsError, match="exists"):
        main(["assets", "--pipeline", str(pipeline), "--gates", str(tmp_path / "g.safetensors"), "--out", str(out),
              "--loras", *(f"{n}={f}" for n, f in loras.items())])
