"""The shipped demo world: its files load and generate, its gates belong to its experts, the demo writes
every file, and the build command runs end to end (with a handful of steps per stage)."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mole_diffusion.cli import main
from mole_diffusion.demo import CONCEPTS, composition_prompts
from mole_diffusion.demo.build import SHIPPED, BuildSettings, build, install_assets
from mole_diffusion.demo.run import ASSETS, AssetsError, check_assets, demo_methods, run_demo
from mole_diffusion.errors import MoLEError
from mole_diffusion.gate_file import GateFileError, read_gate_file
from mole_diffusion.pipelines import MoLEStableDiffusionPipeline


def test_shipped_files_are_listed_whole_and_under_30_mb():
    files = check_assets()
    assert {"gates.safetensors", "concepts.toml", "pipeline/model_index.json", "clip/open_clip_model.safetensors"} <= set(files)
    assert {f"loras/{name}.safetensors" for name in CONCEPTS} <= set(files)
    assert sum((ASSETS / name).stat().st_size for name in files) < 30 * 2**20


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
    weights = torch.cat([h.flatten(end_dim=-2) for h in shipped_pipe.gate_weights.values()])
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights)), atol=1e-5)


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
    for name in CONCEPTS:
        with safe_open(ASSETS / "loras" / f"{name}.safetensors", "pt") as f:
            text = [k for k in f.keys() if k.startswith("text_encoder.")]
        assert text and all(k.startswith("text_encoder.text_model.") for k in text), name


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
    """Issue 15.6: an earlier install is replaced whole; one holding a file no install wrote is refused and
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
    """Issue 15.6: a stage stopped half way (here the tiny CLIP, after writing its weights file) leaves no
    stage folder, so the next build runs it again; a finished stage is not run twice."""
    import diffusers

    import mole_diffusion.demo.build as build_module
    import mole_diffusion.demo.judge as judge_module

    calls = []

    def clip(folder, settings):
        calls.append("clip")
        (folder / "open_clip_model.safetensors").write_bytes(b"half a file")
        if calls.count("clip") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "train_clip", clip)
    monkeypatch.setattr(build_module, "train_base", lambda folder, settings, work: calls.append("base"))
    monkeypatch.setattr(judge_module, "train_judge", lambda folder, *args: calls.append("judge"))
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
                         judge_steps=2, judge_pool=8, unet_channels=[16, 32, 32])
    assets = install_assets(build(tmp_path / "world", tiny), tmp_path / "assets")
    files = check_assets(assets)
    assert json.loads((assets / "pipeline" / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32, 32]
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


def test_build_demo_takes_the_unet_widths_and_refuses_odd_ones(tmp_path, capsys):
    assert main(["build-demo", "--out", str(tmp_path / "odd"), "--unet-channels", "64", "128", "100"]) == 1
    assert "unet_channels [64, 128, 100]: expected three positive multiples of 8" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()


def test_the_shipped_attribute_judge_is_deterministic_and_reads_round_trips():
    """The judge behind every presence rate: the same answers twice, and right on VAE round trips of fresh scenes
    (the quality script measures 400; a small sample here, with a floor below that measurement)."""
    from diffusers import AutoencoderKL

    from mole_diffusion.demo.judge import load_judge, round_trip_accuracy

    judge, config = load_judge(ASSETS / "judge")
    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    first = round_trip_accuracy(judge, vae, count=64, seed=7)
    assert round_trip_accuracy(judge, vae, count=64, seed=7) == first
    assert all(value >= 0.85 for value in first.values()), first
    assert config["concepts"] == {"star": ["shape", "star"], "stripes": ["style", "stripes"], "checker": ["background", "checker"]}


def test_the_strengths_diagnostic_runs_nla_with_each_weight_triple(tmp_path, monkeypatch, capsys):
    import mole_diffusion.demo.quality as quality
    import mole_diffusion.eval.evaluate as evaluate_module
    from mole_diffusion.demo.strengths import main as strengths

    configs = []

    def fake_evaluate(config):
        configs.append(config)
        return config.output_dir

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(quality, "read_summary", lambda run: [{"method": "nla", "n": 64, "present_all": 0.25,
                                                               "present_all_low": 0.1, "present_all_high": 0.4}])
    strengths(["--out", str(tmp_path), "1.5,0.75,2", "1,1,1"])
    assert [c.nla_weights for c in configs] == [[1.5, 0.75, 2.0], [1.0, 1.0, 1.0]]
    assert all(c.methods == ["nla"] and c.prompts == composition_prompts() and len(c.seeds) == 16 for c in configs)
    assert configs[0].output_dir == tmp_path / "w1.5_0.75_2"
    assert "25.0% [10.0-40.0]" in capsys.readouterr().out


def test_quality_scores_a_spatial_sampler_on_the_methods_prompts_and_seeds(tmp_path, monkeypatch):
    """demo.quality --layout: the spec's images are drawn on the composition prompts and the run's seeds, then handed
    to the same evaluator run as the methods (an image folder under the spec's label)."""
    import mole_diffusion.demo.judge as judge_module
    import mole_diffusion.demo.quality as quality
    import mole_diffusion.demo.spatial as spatial
    import mole_diffusion.eval.evaluate as evaluate_module

    configs, drawn = [], []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda config: configs.append(config) or config.output_dir)
    monkeypatch.setattr(quality, "read_summary", lambda run, label="": [])
    monkeypatch.setattr(quality, "read_rows", lambda run, label="": [])
    monkeypatch.setattr(judge_module, "round_trip_accuracy", lambda judge, vae, count: {"shape": 1.0})
    monkeypatch.setattr(spatial, "load_world", lambda assets: ("pipe", "judge"))
    monkeypatch.setattr(spatial, "run", lambda pipe, judge, presence, out, spec, seeds, first_seed, **kw:
                        drawn.append((out, spec, seeds, first_seed, kw)))
    spec = "layout_without_star:split:4:0,1,2:inpaint-inside:1"
    quality.main(["--out", str(tmp_path), "--seeds", "3", "--first-seed", "100", "--skip-lift", "--layout", spec])
    assert drawn == [(tmp_path / "layout", spec, 3, 100, {"steps": 25, "guidance_scale": 5.0})]
    (composition,) = configs
    assert composition.seeds == [100, 101, 102] and composition.prompts == composition_prompts()
    assert composition.image_folders == {"layout_without_star": str(tmp_path / "layout" / "layout_without_star")}


def test_token_routed_prompt_embedding_takes_each_trigger_from_its_own_lora():
    """demo.interference (issue 12's diagnostic): trigger tokens from their own concept's text LoRA, the rest as asked."""
    from mole_diffusion.demo.interference import NAMES, routed_embeddings, text_embeddings, trigger_positions

    pipe = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.load_experts({name: ASSETS / "loras" / f"{name}.safetensors" for name in NAMES})
    prompt, triggers = "a red sks in zwx style on a qkx background", {"star": "sks", "stripes": "zwx", "checker": "qkx"}
    routed = routed_embeddings(pipe, prompt, [0.0, 0.0, 0.0], triggers)
    base, ids = text_embeddings(pipe, prompt, [0.0, 0.0, 0.0])
    positions = {name: trigger_positions(pipe.tokenizer, ids.tolist(), t) for name, t in triggers.items()}
    assert [len(p) for p in positions.values()] == [len(pipe.tokenizer(t, add_special_tokens=False).input_ids) for t in triggers.values()]
    for index, name in enumerate(NAMES):
        alone, _ = text_embeddings(pipe, prompt, [float(i == index) for i in range(3)])
        torch.testing.assert_close(routed[0, positions[name]], alone[0, positions[name]])
        assert not torch.allclose(alone[0, positions[name]], base[0, positions[name]])  # the LoRA changes that token
    others = [p for p in range(len(ids)) if not any(p in where for where in positions.values())]
    torch.testing.assert_close(routed[0, others], base[0, others])


@pytest.fixture
def loaded_experts(monkeypatch) -> list[dict]:
    """The files each ``load_experts`` call got; the call then stops the run (generating would take minutes)."""
    loaded = []

    def stop(self, files):
        loaded.append(dict(files))
        raise SystemExit(0)

    monkeypatch.setattr(MoLEStableDiffusionPipeline, "load_experts", stop)
    return loaded


def test_interference_takes_other_lora_files_by_name(tmp_path, loaded_experts, capsys):
    from mole_diffusion.demo import interference

    loaded = loaded_experts
    with pytest.raises(SystemExit):
        interference.main(["--out", str(tmp_path), "--lora", "star=mine/star.safetensors", "sum:1,1,1:1,1,1:"])
    assert loaded == [{"star": Path("mine/star.safetensors"), "stripes": ASSETS / "loras" / "stripes.safetensors",
                       "checker": ASSETS / "loras" / "checker.safetensors"}]
    with pytest.raises(SystemExit) as refused:
        interference.main(["--out", str(tmp_path), "--lora", "dog=mine/dog.safetensors", "sum:1,1,1:1,1,1:"])
    assert refused.value.code == 2 and "--lora dog=mine/dog.safetensors: expected NAME=FILE with NAME one of star, stripes, checker" in capsys.readouterr().err


def test_interference_runs_on_a_world_of_your_own(tmp_path, monkeypatch, loaded_experts):
    """--assets: the pipeline and the LoRAs come from that world (build-demo's install folder), not the package's."""
    from mole_diffusion.demo import interference

    opened, loaded = [], loaded_experts
    original = MoLEStableDiffusionPipeline.from_pretrained.__func__

    def open_shipped(cls, path, **kwargs):
        opened.append(Path(path))
        return original(cls, ASSETS / "pipeline", **kwargs)  # a pipeline that exists; the path asked is the point

    monkeypatch.setattr(MoLEStableDiffusionPipeline, "from_pretrained", classmethod(open_shipped))
    mine = tmp_path / "world"
    with pytest.raises(SystemExit):
        interference.main(["--out", str(tmp_path / "out"), "--assets", str(mine), "--lora", "star=s.safetensors",
                           "sum:1,1,1:1,1,1:"])
    assert opened == [mine / "pipeline"]
    assert loaded == [{"star": Path("s.safetensors"), "stripes": mine / "loras" / "stripes.safetensors",
                       "checker": mine / "loras" / "checker.safetensors"}]


def test_two_means_splits_an_object_from_the_background_that_holds_the_border():
    """demo.spatial (issue 12's diagnostic): the object is the cluster away from the border, whichever way 2-means
    numbers the clusters, and the masks keep the checker off it (and DILATE pixels around it)."""
    from mole_diffusion.demo.spatial import expert_masks, two_means_object

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
    from mole_diffusion.demo.spatial import SpatialMasks

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
    """demo.spatial's regional composite: before the lead step the star LoRA alone; from it, m x (star, stripes
    pass) + (1 - m) x (checker pass), each the UNet with only those LoRAs; the UNet's own forward back after."""
    from mole_diffusion.demo.spatial import NAMES, TwoPassComposite

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
    """demo.spatial's inpaint mask: a striped object's dark stripes fall in the background's 2-means cluster; the
    object handed to the background pass is the whole shape (gaps of a pixel closed, holes filled), nothing more."""
    from mole_diffusion.demo.spatial import solid

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
    """demo.spatial's inpaint mode: the object pass runs the star LoRA, the stripes LoRA from the lead step, text
    encoders with those two; the background pass the checker LoRA alone in the UNet, the three summed in the text
    encoders; the final latent is the object pass's exactly where the object is, and the background pass's elsewhere;
    the pipeline's gates are back afterwards."""
    from mole_diffusion.demo.spatial import LayoutThenBackground

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
    """demo.spatial's inpaint-inside: in the object pass the star LoRA acts everywhere and the checker nowhere at
    every step; the stripes LoRA nowhere before the lead step and, from it, exactly on one fixed object (the split
    of the star's layout); regional routing is off again afterwards, and the object is still held exactly."""
    from mole_diffusion.demo.spatial import LayoutThenBackground

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
    from mole_diffusion.demo import world
    from mole_diffusion.demo.spatial import main

    folder = tmp_path / "drawn"
    folder.mkdir()
    for p, colour in enumerate(("red", "blue", "yellow", "purple")):
        scene = world.Scene("star", colour, "checker", "large", (0.5, 0.5), "stripes") if p < 2 else \
            world.Scene("circle", colour, "white", "large", (0.5, 0.5))
        world.draw(scene).save(folder / f"p{p}-s5.png")
    main(["--out", str(tmp_path), "--seeds", "1", "--first-seed", "5", "--rejudge", "drawn:split:4:1,1,2:inpaint-inside:1"])
    row = capsys.readouterr().out.splitlines()[1].split(" | ")
    assert row[1:] == ["50.0% [15.0-85.0]"] * 5 + ["50.0% [15.0-85.0] |"]  # star, stripes, checker, star and checker, all, active
    with pytest.raises(FileNotFoundError, match=r"p0-s6.png: no image from an earlier run of 'drawn'"):
        main(["--out", str(tmp_path), "--seeds", "2", "--first-seed", "5", "--rejudge", "drawn:split:4:1,1,2:inpaint-inside:1"])


def test_a_specs_active_concepts_are_those_with_a_weight_above_zero():
    from mole_diffusion.demo.spatial import active_concepts

    assert active_concepts("a:split:4:1,1,2:inpaint-inside:1") == ["star", "stripes", "checker"]
    assert active_concepts("a:split:4:0,1,2:inpaint-inside:1") == ["stripes", "checker"]
    assert active_concepts("a:split:4:1,1,0:inpaint-inside:1") == ["star", "stripes"]
    assert active_concepts("a:split:8:1,0:two-pass:2") == ["star", "checker"]  # CHECKER 1 unless given


def test_region_masks_put_one_expert_at_its_two_strengths():
    """demo.roles: expert k at its object strength on the object, its background strength elsewhere, the rest 0."""
    from mole_diffusion.demo.roles import region_masks, sampler_specs

    obj = torch.zeros(2, 4, 4)
    obj[0, 1:3, 1:3] = 1.0
    masks = region_masks(torch.tensor([2.0, 0.5]), obj, expert=1, experts=3)
    assert masks.shape == (2, 3, 4, 4)
    assert torch.equal(masks[:, 1], 2.0 * obj + 0.5 * (1 - obj))
    assert masks[:, [0, 2]].abs().sum() == 0
    assert sampler_specs(torch.tensor([[1.0, 0.9], [1.1, 0.2], [0.3, 2.0]])) == [
        "learned:split:4:1.00,1.10,2.00:inpaint-inside:1", "learned_plain:split:0:1.00,1.10,2.00:inpaint:0"]
    assert sampler_specs(torch.tensor([[0.9, 1.0], [1.1, 0.2], [0.3, 2.0]])) == []  # the star learned the background


def test_region_strengths_learn_and_nothing_else_moves(shipped_pipe):
    """demo.roles: a few steps move the six strengths from 1 (softplus of the start); the UNet, the text encoder and
    the LoRAs stay bit for bit, and regional routing is off again afterwards."""
    from mole_diffusion.demo.roles import learn_region_strengths

    frozen = {k: v.clone() for k, v in shipped_pipe.unet.state_dict().items()}
    frozen_text = {k: v.clone() for k, v in shipped_pipe.text_encoder.state_dict().items()}
    lora = next(iter(shipped_pipe.mole.layers.values())).lora_B.clone()
    strengths = learn_region_strengths(shipped_pipe, ASSETS / "concepts.toml", steps=3, batch_size=2)
    assert strengths.shape == (3, 2) and (strengths > 0).all()
    assert not torch.allclose(strengths, torch.ones(3, 2))
    assert all(torch.equal(v, frozen[k]) for k, v in shipped_pipe.unet.state_dict().items())
    assert all(torch.equal(v, frozen_text[k]) for k, v in shipped_pipe.text_encoder.state_dict().items())
    assert torch.equal(next(iter(shipped_pipe.mole.layers.values())).lora_B, lora)
    assert shipped_pipe.mole.regional is None


def test_the_background_strength_learns_through_the_held_object_and_nothing_else_moves(shipped_pipe):
    """demo.roles: the checker's strength in the layout sampler's background pass moves from 1 under a CLIP's
    composition loss (the evaluator's CLIP here: the machinery only); the models stay, routing is off afterwards."""
    from mole_diffusion.demo.roles import learn_background_strength
    from mole_diffusion.eval.clip import load_clip

    frozen = {k: v.clone() for k, v in shipped_pipe.unet.state_dict().items()}
    strength, losses = learn_background_strength(shipped_pipe, load_clip(f"local-dir:{ASSETS / 'clip'}"), ASSETS / "concepts.toml",
                                                 steps=2, seeds=1, sampling_steps=2)
    assert strength != pytest.approx(1.0, abs=1e-4) and strength > 0
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(v, frozen[k]) for k, v in shipped_pipe.unet.state_dict().items())
    assert shipped_pipe.mole.regional is None and shipped_pipe.mole.constant_weights is None
