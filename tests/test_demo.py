"""The shipped demo world: its files load and generate, its gates belong to its experts, the demo writes
every file, and the build command runs end to end (with a handful of steps per stage)."""

import json
import shutil
from pathlib import Path
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mole_diffusion.cli import main
from mole_diffusion.demo import CONCEPTS, composition_prompts, concept_scenes, world
from mole_diffusion.demo.build import SHIPPED, BuildSettings, build, install_assets
from mole_diffusion.demo.run import ASSETS, AssetsError, check_assets, demo_methods, run_demo
from mole_diffusion.errors import MoLEError
from mole_diffusion.gate_file import GateFileError, read_gate_file
from mole_diffusion.pipelines import MoLEStableDiffusionPipeline


def test_shipped_files_are_listed_whole_and_under_60_mb():
    files = check_assets()
    assert {"gates.safetensors", "concepts.toml", "pipeline/model_index.json", "clip/open_clip_model.safetensors"} <= set(files)
    assert {f"loras/{name}.safetensors" for name in CONCEPTS} <= set(files)
    assert sum((ASSETS / name).stat().st_size for name in files) < 60 * 2**20


@pytest.fixture(scope="module")
def shipped_pipe():
    pipe = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.load_experts({name: ASSETS / "loras" / f"{name}.safetensors" for name in CONCEPTS})
    pipe.load_gates(ASSETS / "gates.safetensors")  # refuses gates trained for other experts
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_world_loads_and_generates(shipped_pipe):
    image = shipped_pipe(composition_prompts()[0], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    assert image.size == (64, 64) and pixels.std() > 5  # a picture, not a flat field
    # the shipped gates are the default kind: softplus with the concepts' trigger words
    config = shipped_pipe.mole.gate_config
    assert (config.activation, config.triggers) == ("softplus", {"star": ("sks",), "stripes": ("zwx",), "checker": ("qkx",)})
    weights = torch.cat([h.flatten(end_dim=-2) for h in shipped_pipe.gate_weights.values()])
    assert bool((weights > 0).all())  # the composition prompt names all three
    shipped_pipe("a red sks on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    weights = torch.cat([h.flatten(end_dim=-2) for h in shipped_pipe.gate_weights.values()])
    assert bool((weights[:, 0] > 0).all()) and bool((weights[:, 1:] == 0).all())  # only the star's trigger


def test_shipped_gates_match_the_shipped_experts(shipped_pipe, tmp_path):
    _, metadata = read_gate_file(ASSETS / "gates.safetensors")
    assert json.loads(metadata["expert_hashes"]) == {e.name: e.content_hash for e in shipped_pipe.mole.experts}
    # one changed LoRA tensor and the same gates are refused
    tensors = load_file(ASSETS / "loras" / "star.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, tmp_path / "star.safetensors")
    other = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    other.load_experts({"star": tmp_path / "star.safetensors", **{n: ASSETS / "loras" / f"{n}.safetensors" for n in ("stripes", "checker")}})
    with pytest.raises(GateFileError, match="star"):
        other.load_gates(ASSETS / "gates.safetensors")


def test_a_changed_or_missing_asset_is_named(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    (copy / "concepts.toml").write_text((copy / "concepts.toml").read_text() + "\n")
    with pytest.raises(AssetsError, match="concepts.toml: sha256 differs"):
        check_assets(copy)
    (copy / "gates.safetensors").unlink()
    (copy / "concepts.toml").write_text((ASSETS / "concepts.toml").read_text())
    with pytest.raises(AssetsError, match="gates.safetensors: listed .* but missing"):
        check_assets(copy)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--assets", str(copy)]) == 1


def test_an_unlisted_file_or_a_bad_manifest_is_named(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    (copy / "loras" / "moon.safetensors").write_bytes(b"")
    with pytest.raises(AssetsError, match=r"\['loras/moon.safetensors'\] not listed"):
        check_assets(copy)
    (copy / "loras" / "moon.safetensors").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["gates.safetensors"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AssetsError, match=r"does not list \['gates.safetensors'\]"):
        check_assets(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(AssetsError, match="manifest.json: expected JSON"):
        check_assets(copy)
    with pytest.raises(AssetsError, match=f"no demo world in {tmp_path}"):
        check_assets(tmp_path)


def test_the_shipped_text_files_have_the_layout_transformers_4_and_5_read():
    from transformers import CLIPTokenizer

    # tokenizer.json alone loads on transformers 5 only; vocab.json + merges.txt on both
    folder = ASSETS / "pipeline" / "tokenizer"
    assert {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()} and not (folder / "tokenizer.json").exists()
    tokens = CLIPTokenizer.from_pretrained(folder)("a red sks").input_ids
    assert tokens[0] == 49406 and tokens[-1] == 49407 and len(tokens) == 5
    # transformers 4 loads text-encoder weights without the text_model. prefix as random ones
    with safe_open(ASSETS / "pipeline" / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    text_halves = []  # a LoRA may be UNet-only (the second world's stripes); the others adapt the text encoder too
    for name in CONCEPTS:
        with safe_open(ASSETS / "loras" / f"{name}.safetensors", "pt") as f:
            text = [k for k in f.keys() if k.startswith("text_encoder.")]
        assert all(k.startswith("text_encoder.text_model.") for k in text), name
        text_halves += [name] if text else []
    assert text_halves, "no shipped LoRA has a text-encoder half: the layout check above checked nothing"


def test_install_assets_never_replaces_a_folder_it_did_not_write(tmp_path):
    root, mine = tmp_path / "world", tmp_path / "mine"
    root.mkdir()
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no manifest.json"):
        install_assets(root, mine)
    with pytest.raises(ValueError, match="holds the build folder"):
        install_assets(root, tmp_path)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_install_assets_replaces_only_what_an_install_wrote(tmp_path):
    """an earlier install is replaced whole; one holding a file no install wrote is refused and
    kept; a folder of the user's beside it (``assets.new``, the old staging name) is never touched."""
    root = tmp_path / "world"
    for name in SHIPPED:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            (root / name).write_text(name)
        else:
            (root / name).mkdir()
            (root / name / "weights.bin").write_text(f"{name} v1")
    users = tmp_path / "assets.new"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    assets = install_assets(root, tmp_path / "assets")
    assert (assets / "pipeline" / "weights.bin").read_text() == "pipeline v1" and "pipeline/weights.bin" in json.loads((assets / "manifest.json").read_text())["files"]
    (root / "pipeline" / "weights.bin").write_text("pipeline v2")
    install_assets(root, assets)
    assert (assets / "pipeline" / "weights.bin").read_text() == "pipeline v2"
    (assets / "loras" / "mine.safetensors").write_text("a LoRA of the user's")
    with pytest.raises(ValueError, match=r"holds files no install wrote \(loras/mine.safetensors\)"):
        install_assets(root, assets)
    assert (assets / "loras" / "mine.safetensors").read_text() == "a LoRA of the user's"
    assert (users / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "assets.new", "world"]  # no staging left over


def test_a_stopped_build_stage_counts_as_not_done(tmp_path, monkeypatch):
    """a stage stopped half way (here the tiny CLIP, after writing its weights file) leaves no
    stage folder, so the next build runs it again; a finished stage is not run twice."""
    import diffusers

    import mole_diffusion.demo.build as build_module

    calls = []

    def clip(folder, settings):
        calls.append("clip")
        (folder / "open_clip_model.safetensors").write_bytes(b"half a file")
        if calls.count("clip") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "train_clip", clip)
    monkeypatch.setattr(build_module, "train_base", lambda folder, settings, work: calls.append("base"))
    monkeypatch.setattr(build_module, "train_judge", lambda folder, *args: calls.append("judge"))
    monkeypatch.setattr(build_module, "train_concepts", lambda root, settings: calls.append("concepts"))
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", lambda *args, **kwargs: None)
    settings = BuildSettings(concept_images=1)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "world", settings)
    assert not (tmp_path / "world" / "clip").exists()
    build(tmp_path / "world", settings)
    assert calls == ["clip", "clip", "base", "judge", "concepts"]
    assert (tmp_path / "world" / "clip" / "open_clip_model.safetensors").is_file()
    build(tmp_path / "world", settings)
    assert calls[5:] == ["concepts"]  # its own files are each skipped when written (LoRAs, gates)


def test_demo_writes_every_file(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("grid.png", "gate_heatmap.png", "expert_maps.png", "scores.md", "scores.csv"):
        assert (tmp_path / name).is_file() and f"wrote {tmp_path / name}" in printed
    methods = demo_methods()
    scores = (tmp_path / "scores.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scores[1:]] == methods
    assert "clip_image_min" in scores[0] and "present_all" in scores[0] and "| mole " in printed  # a row of the headline table
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > len(methods) * 128 and grid.height > len(composition_prompts()) * 128


def test_build_demo_is_reproducible_and_installs_a_working_world(tmp_path):
    tiny = BuildSettings(concept_images=4, clip_steps=2, clip_batch_size=8, vae_steps=2, vae_batch_size=4, base_images=16,
                         base_steps=2, base_batch_size=4, lora_steps=2, gate_steps=2, validation_steps=1,
                         judge_steps=2, judge_pool=8, unet_channels=[16, 32, 32], world="v2",
                         unet_cross_attention=[True, True, True], text_width=16, lora_check_prompts=1)
    assets = install_assets(build(tmp_path / "world", tiny), tmp_path / "assets")
    checked = json.loads((tmp_path / "world" / "lora_check.json").read_text())  # each LoRA alone, checked once built
    assert set(checked) == set(CONCEPTS) and all(entry["present"] in (0, 0.25, 0.5, 0.75, 1) for entry in checked.values())
    files = check_assets(assets)
    unet = json.loads((assets / "pipeline" / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [16, 32, 32] and unet["cross_attention_dim"] == 16
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 and unet["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert json.loads((assets / "pipeline" / "text_encoder" / "config.json").read_text())["hidden_size"] == 16
    judge = json.loads((assets / "judge" / "config.json").read_text())["attributes"]
    assert "crescent" in judge["shape"] and "banded" in judge["background"]  # the second world's judge
    assert [(assets / "world" / "concepts" / "star" / f"{i:03d}.txt").read_text().strip() for i in range(4)] == \
        [s.caption for s in concept_scenes("star", 4, 0, world.V2)]
    with pytest.raises(MoLEError, match=r"unet_channels \[16, 30, 32\]: expected three positive multiples of 8"):
        build(tmp_path / "odd", replace(tiny, unet_channels=[16, 30, 32]))
    assert not (tmp_path / "odd").exists()  # refused before anything is written
    assert "pipeline/tokenizer/vocab.json" in files and "pipeline/tokenizer/tokenizer.json" not in files
    assert json.loads((assets / "build_settings.json").read_text())["clip_steps"] == 2
    with pytest.raises(ValueError, match="lora_steps 2 -> 3"):  # a stopped build goes on only as it started
        build(tmp_path / "world", replace(tiny, lora_steps=3))
    again = install_assets(build(tmp_path / "again", tiny), tmp_path / "assets-again")
    assert set(check_assets(again)) == set(files)
    for name in files:  # same settings, same files (safetensors headers order their metadata at random)
        if name.endswith(".safetensors"):
            with safe_open(assets / name, "pt") as a, safe_open(again / name, "pt") as b:
                assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys()), name
                assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name
        else:
            assert (assets / name).read_bytes() == (again / name).read_bytes(), name
    out = run_demo(tmp_path / "demo", steps=1, assets=assets, progress=False)
    assert (out / "grid.png").is_file() and (out / "gate_heatmap.png").is_file()
    _check_loras_names_the_weak_and_draws_only_what_changed(tmp_path / "world", tiny)


def _check_loras_names_the_weak_and_draws_only_what_changed(root: Path, settings: BuildSettings):
    """On a built world: a judge that reads a star in every image (and nothing else) passes the star LoRA alone and
    names the other two; a second check draws nothing; a changed LoRA file is drawn again, alone."""
    from tqdm.auto import tqdm

    from mole_diffusion.demo.build import check_loras
    from mole_diffusion.eval.attribute_judge import AttributeJudge

    readings, printed = [], []
    star_everywhere = {"shape": "star", "colour": "red", "style": "plain", "background": "red"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AttributeJudge, "predict", lambda self, images: readings.append(len(images)) or [star_everywhere] * len(images))
        patch.setattr(tqdm, "write", printed.append)
        (root / "lora_check.json").unlink()
        assert check_loras(root, settings) == {"star": 1.0, "stripes": 0.0, "checker": 0.0}
        assert len(readings) == 3 and "under the 85% target: stripes, checker" in printed[-1]
        assert check_loras(root, settings) == {"star": 1.0, "stripes": 0.0, "checker": 0.0} and len(readings) == 3
        lora = root / "loras" / "checker.safetensors"
        save_file({k: 2 * v for k, v in load_file(lora).items()}, lora)
        check_loras(root, settings)
        assert len(readings) == 4  # the checker LoRA only, one prompt's images


def test_build_demo_builds_the_second_world_with_its_recipe_and_the_options_given(tmp_path, monkeypatch):
    import mole_diffusion.demo.build as build_module

    built = []
    monkeypatch.setattr(build_module, "build", lambda out, settings: built.append(settings) or Path(out))
    monkeypatch.setattr(build_module, "install_assets", lambda root, assets: assets)
    assert main(["build-demo", "--out", str(tmp_path), "--world", "v2", "--lora-steps", "5"]) == 0
    assert main(["build-demo", "--out", str(tmp_path)]) == 0
    second, first = built
    assert (second.world, second.unet_channels, second.unet_cross_attention, second.text_width) == ("v2", [64, 128, 128], [True] * 3, 64)
    assert (second.concept_images, second.lora_steps) == (64, 5)  # the recipe, then the options
    assert first == BuildSettings()
    assert second == BuildSettings.for_world("v2", lora_steps=5)  # what the CLI builds, from Python
    assert BuildSettings.for_world("v2") != BuildSettings(world="v2")  # the world alone keeps the first's sizes
    with pytest.raises(ValueError, match="unknown demo world 'v3': expected one of v1, v2"):
        BuildSettings.for_world("v3")


def test_build_demo_takes_the_unet_widths_and_refuses_odd_ones(tmp_path, capsys):
    assert main(["build-demo", "--out", str(tmp_path / "odd"), "--unet-channels", "64", "128", "100"]) == 1
    assert "unet_channels [64, 128, 100]: expected three positive multiples of 8" in capsys.readouterr().err
    assert main(["build-demo", "--out", str(tmp_path / "odd"), "--world", "v2", "--unet-cross-attention", "0", "0", "0"]) == 1
    assert "unet_cross_attention [0, 0, 0]: expected three booleans (16x16, 8x8, 4x4), at least one true" in capsys.readouterr().err
    assert main(["build-demo", "--out", str(tmp_path / "odd"), "--text-width", "30"]) == 1
    assert "text_width 30: expected a positive multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()


def test_the_shipped_attribute_judge_is_deterministic_and_reads_round_trips():
    """The judge behind every presence rate: the same answers twice, and right on VAE round trips of fresh scenes
    (the quality script measures 400; a small sample here, with a floor below that measurement)."""
    from diffusers import AutoencoderKL

    from mole_diffusion.demo.judge import round_trip_accuracy
    from mole_diffusion.eval.attribute_judge import load_judge

    judge, config = load_judge(ASSETS / "judge")
    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    first = round_trip_accuracy(judge, vae, count=64, seed=7)
    assert round_trip_accuracy(judge, vae, count=64, seed=7) == first
    assert all(value >= 0.85 for value in first.values()), first
    assert config["concepts"] == {"star": ["shape", "star"], "stripes": ["style", "stripes"], "checker": ["background", "checker"]}


def test_each_concept_lora_trains_for_its_own_steps_with_or_without_the_text_encoder(tmp_path, monkeypatch):
    import mole_diffusion.demo.build as build_module

    for name in CONCEPTS:
        folder = tmp_path / "world" / "concepts" / name
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(f"a {name}")
        (folder / "000.txt").write_text(f"a red {name}")
    (tmp_path / "gates.safetensors").write_bytes(b"")  # gates already trained: this is about the LoRAs

    configs = {}

    def fake_train_lora(config):
        configs[config.output_dir.name] = config
        config.output_dir.mkdir(parents=True)
        (config.output_dir / "lora.safetensors").write_text(config.prompt)
        return config.output_dir / "lora.safetensors"

    monkeypatch.setattr(build_module, "train_lora", fake_train_lora)
    settings = BuildSettings(lora_steps=7, lora_concept_steps={"stripes": 11}, lora_text_encoder=False,
                             lora_unconditional_weight=0.5, lora_check_prompts=0)  # fake LoRAs: nothing to draw
    build_module.train_concepts(tmp_path, settings)
    assert {name: configs[f"lora-{name}"].steps for name in CONCEPTS} == {"star": 7, "stripes": 11, "checker": 7}
    assert all(config.unconditional_weight == 0.5 for config in configs.values())
    assert configs["lora-stripes"].checkpoint_every == 11 and configs["lora-stripes"].validation_every == 11
    assert not any(config.train_text_encoder for config in configs.values())
    assert (tmp_path / "loras" / "stripes.safetensors").read_text() == "a stripes"
    assert BuildSettings().lora_text_encoder and BuildSettings().lora_concept_steps == {}  # the first world's recipe

    # the text encoder too, except for the concepts the recipe names
    configs.clear()
    shutil.rmtree(tmp_path / "loras"), shutil.rmtree(tmp_path / "runs")
    build_module.train_concepts(tmp_path, BuildSettings(lora_steps=7, lora_concept_text_encoder={"stripes": False},
                                                        lora_check_prompts=0))
    assert {name: configs[f"lora-{name}"].train_text_encoder for name in CONCEPTS} == {"star": True, "stripes": False, "checker": True}
    recipe = BuildSettings.for_world("v2")
    assert {name: recipe.lora_concept_text_encoder.get(name, recipe.lora_text_encoder) for name in CONCEPTS} == {
        "star": True, "stripes": False, "checker": True}


def test_the_build_trains_the_gates_its_world_recipe_names(tmp_path, monkeypatch):
    """The first world trains the default gates (train_gates decides: softplus at prior 1 with the concepts'
    trigger words, tests/test_trigger_gates.py), the second the same gates spelled out; the settings can ask for
    the paper's."""
    import mole_diffusion.demo.build as build_module

    for name in CONCEPTS:
        folder = tmp_path / "world" / "concepts" / name
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(f"a {name}")
        (tmp_path / "loras").mkdir(exist_ok=True)
        (tmp_path / "loras" / f"{name}.safetensors").write_bytes(b"")  # LoRAs already trained: this is about the gates
    configs = []

    def fake_train_gates(config):
        configs.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(build_module, "train_gates", fake_train_gates)
    for settings in (BuildSettings.for_world("v1", lora_check_prompts=0), BuildSettings.for_world("v2", lora_check_prompts=0),
                     BuildSettings.for_world("v1", gate_activation="softmax", gate_by_trigger=False, lora_check_prompts=0)):
        with pytest.raises(RuntimeError, match="stop after the config"):
            build_module.train_concepts(tmp_path, settings)
    first, second, paper = configs
    assert (first.gate.activation, first.gate.prior_weights, first.by_trigger) == (None, None, None)
    assert (second.gate.activation, second.gate.prior_weights, second.by_trigger) == ("softplus", (1.0, 1.0, 1.0), True)
    assert (paper.gate.activation, paper.gate.prior_weights, paper.by_trigger) == ("softmax", None, False)
