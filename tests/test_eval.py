"""Evaluation: CLIP scores against open_clip itself, a full comparison run with resume, and each baseline."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, load
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from mole_diffusion.cli import main
from mole_diffusion.eval import evaluate as ev
from mole_diffusion.clip import ClipError, load_clip
from mole_diffusion.eval import methods as composition
from mole_diffusion.eval.scores import embed_pil, score_images
from mole_diffusion.schedulers import use_scheduler
from mole_diffusion.testing import make_concept_images, make_tiny_clip, make_tiny_lora


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def eval_world(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_concept_images(root / "red", "circle", (200, 30, 30), count=3)
    make_concept_images(root / "blue", "square", (30, 30, 200), count=3, seed=1)
    (root / "concepts.toml").write_text(
        f'[[concepts]]\nname = "a"\nlora = "{world["a"]}"\nimages = "red"\nprompt = "a photo of sks"\n'
        f'[[concepts]]\nname = "b"\nlora = "{world["b"]}"\nimages = "blue"\nprompt = "a photo of zwx"\n'
    )
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    with torch.no_grad():
        for gate in pipe.mole.gates.values():
            gate.weight.normal_(std=2.0)
    pipe.save_gates(root / "gates.safetensors")
    return root


def test_scores_equal_open_clip_computed_directly(clip_name):
    clip = load_clip(clip_name)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(5)]
    prompts = [f"a photo number {i}" for i in range(5)]
    refs = {"x": embed_pil(clip, images[:2])}
    rows = score_images(clip, images, prompts, refs, [["x"]] * 5)

    model, _, preprocess = open_clip.create_model_and_transforms(clip_name)
    tokenizer = open_clip.get_tokenizer(clip_name)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_features = model.encode_text(tokenizer(prompts))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    cos = (image_features * text_features).sum(-1)
    ref_cos = (image_features @ image_features[:2].T).mean(-1)
    for i, row in enumerate(rows):
        assert row["clip_text"] == pytest.approx(cos[i].item(), abs=1e-5)
        assert row["clip_score_2.5"] == pytest.approx(2.5 * max(cos[i].item(), 0), abs=1e-5)
        assert row["clip_score_100"] == pytest.approx(100 * max(cos[i].item(), 0), abs=1e-4)
        assert row["clip_image_x"] == pytest.approx(ref_cos[i].item(), abs=1e-5)
        assert row["clip_image_min"] == row["clip_image_x"]
    # any batch size, the same numbers
    torch.testing.assert_close(embed_pil(clip, images, batch_size=1), embed_pil(clip, images, batch_size=4), rtol=0, atol=1e-6)


def test_the_differentiable_image_path_equals_open_clips_preprocessing(clip_name):
    """Gate training's CLIP objective embeds tensors with its own resize, crop and normalisation: at the model's
    size it is open_clip's preprocessing exactly; larger and not square, the same embedding up to resampling."""
    clip = load_clip(clip_name)
    rng = np.random.default_rng(0)
    # smooth images (bicubic resampling of noise differs most between PIL and torch): blurred noise
    def smooth(height, width):
        noise = Image.fromarray(rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8))
        return noise.resize((width, height), Image.BICUBIC)

    def tensor(image):
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255

    exact = [smooth(clip.size, clip.size) for _ in range(3)]
    torch.testing.assert_close(torch.cat([clip.embed_images(tensor(im)) for im in exact]),
                               F.normalize(embed_pil(clip, exact), dim=-1), rtol=0, atol=1e-5)
    larger = [smooth(2 * clip.size + 8, 3 * clip.size) for _ in range(3)]
    ours = torch.cat([clip.embed_images(tensor(im)) for im in larger])
    theirs = F.normalize(embed_pil(clip, larger), dim=-1)
    assert (ours * theirs).sum(-1).min() > 0.99
    wrong = torch.cat([clip.embed_images(tensor(im).flip(-1)) for im in larger])  # what a mistake would look like
    assert (ours * theirs).sum(-1).min() > (wrong * theirs).sum(-1).max()


def config(world, eval_world, clip_name, out, **kwargs):
    args = dict(base=str(world["base"]), concepts=eval_world / "concepts.toml", gates=eval_world / "gates.safetensors",
                output_dir=out, clip_model=clip_name, seeds=[0, 1], steps=3, resolution=32, progress=False,
                prompts=["a photo of sks and zwx"])
    return ev.EvaluationConfig(**{**args, **kwargs})


def test_a_run_writes_every_output_and_resumes_to_the_same_results(world, eval_world, clip_name, tmp_path, monkeypatch):
    whole = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "whole"))
    methods = composition.method_names(ev.load_concepts(eval_world / "concepts.toml"), True, same_rank=False)  # ranks 4 and 2
    for name in ("results.csv", "results.json", "summary.csv", "report.md", "grid.png", "gate_heatmap.png", "block_weights.json", "plot_clip_text.png",
                 "plot_clip_image_min.png"):
        assert (whole / name).is_file(), name
    rows = json.loads((whole / "results.json").read_text())
    assert len(rows) == len(methods) * 2 and {r["method"] for r in rows} == set(methods)
    assert Image.open(whole / "grid.png").size == (32, 32 * len(methods))
    report = (whole / "report.md").read_text()
    assert "| mole |" in report and "Highest clip_image_min" in report and "Paired against `mole`" in report
    assert "mole,base,clip_image_min" in (whole / "paired.csv").read_text()

    real_draw, count = ev.draw_images, []

    def stop_half_way(*args, **kwargs):
        if len(count) == len(methods):
            raise KeyboardInterrupt
        count.append(1)
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(ev, "draw_images", stop_half_way)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(config(world, eval_world, clip_name, tmp_path / "split"))
    monkeypatch.setattr(ev, "draw_images", real_draw)
    ev.evaluate(config(world, eval_world, clip_name, tmp_path / "split"))
    assert json.loads((tmp_path / "split" / "results.json").read_text()) == rows
    with pytest.raises(ValueError, match="other settings \\(steps\\)"):  # resuming must not mix runs
        ev.evaluate(config(world, eval_world, clip_name, tmp_path / "split", steps=4))


def test_batches_of_images_give_the_images_drawn_one_at_a_time(world, eval_world, clip_name, tmp_path, monkeypatch):
    """--batch-size draws several images of one method in one pipeline call, prompts and seeds mixed: every method's
    images, scores, gate weights and regional masks are those of one image per call, up to float rounding."""
    prompts = ["a photo of sks and zwx", "zwx beside sks, a painting"]  # two prompts: a batch mixes them
    calls = []

    def counted(*args, **kwargs):
        calls.append((kwargs["method"], len(kwargs["seeds"])))
        return composition.draw_images(*args, **kwargs)

    one = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "one", prompts=prompts))
    monkeypatch.setattr(ev, "draw_images", counted)
    batched = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "batched", prompts=prompts, batch_size=3))
    methods = composition.method_names(ev.load_concepts(eval_world / "concepts.toml"), True, same_rank=False)
    assert "regional" in methods and "mole_constant" in methods and "switch" in methods and "base" in methods
    assert calls == [(m, size) for m in methods for size in (3, 1)]  # 2 prompts x 2 seeds: a batch of 3, then 1
    rows, batched_rows = (json.loads((run / "results.json").read_text()) for run in (one, batched))
    assert len(rows) == len(batched_rows) == 4 * len(methods)
    for row, batched_row in zip(rows, batched_rows):
        assert {k: row[k] for k in ("method", "prompt", "seed")} == {k: batched_row[k] for k in ("method", "prompt", "seed")}
        for column in ("clip_text", "clip_image_min"):
            assert batched_row[column] == pytest.approx(row[column], abs=1e-3), (row["method"], column)
        image, batched_image = (np.asarray(Image.open(run / r["image"]), dtype=int) for run, r in ((one, row), (batched, batched_row)))
        assert np.abs(image - batched_image).max() <= 1, row["image"]
    for extra in [*(one / "images" / "mole").glob("*.gates.safetensors"), *(one / "images" / "regional").glob("*.masks.safetensors")]:
        expected, got = load_file(extra), load_file(batched / extra.relative_to(one))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
    # and by hand: the second image of the first batch, its gates' weights over the steps and both guidance halves
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    pipe.load_gates(eval_world / "gates.safetensors")
    use_scheduler(pipe, "ddpm")  # the evaluator's default for SD
    composition.draw(pipe, method="mole", prompt=prompts[0], names=["a", "b"], weights=[0.5, 0.5], seed=1,
                     num_inference_steps=3, guidance_scale=7.5, height=32, width=32)
    saved = load_file(batched / "images" / "mole" / "p0-s1.gates.safetensors")
    for gate, history in pipe.gate_weights.items():
        torch.testing.assert_close(saved[gate], history.mean(dim=(0, 1)), rtol=0, atol=1e-5)
    assert not torch.equal(saved[gate], load_file(batched / "images" / "mole" / "p0-s0.gates.safetensors")[gate])


def test_draw_images_refuses_what_it_cannot_pair(world, eval_world, clip_name, tmp_path, mole_pipe):
    with pytest.raises(ValueError, match="batch size 0: expected at least 1 image per pipeline call"):
        ev.evaluate(config(world, eval_world, clip_name, tmp_path, batch_size=0))
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    args = dict(method="sum", names=["a", "b"], weights=[0.5, 0.5], num_inference_steps=2, height=32, width=32)
    with pytest.raises(ValueError, match="2 prompts for 1 seeds"):
        composition.draw_images(mole_pipe, prompts=["a", "b"], seeds=[0], **args)
    with pytest.raises(ValueError, match="pass seeds, not a generator"):
        composition.draw_images(mole_pipe, prompts=["a"], seeds=[0], generator=torch.Generator(), **args)


def generate_np(pipe, reference_pipe, method, names=("a", "b"), **kwargs):
    args = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np")
    return composition.draw(pipe, method=method, prompt="a photo of sks and zwx", names=list(names), weights=[0.5, 0.5],
                            reference_pipe=reference_pipe, **{**args, **kwargs})


def test_nla_and_set_adapters_give_identical_images(world, ref_pipe, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    ref_pipe.set_adapters(["a", "b"], [0.5, 0.5])
    np.testing.assert_allclose(generate_np(mole_pipe, ref_pipe, "nla"), generate_np(mole_pipe, ref_pipe, "set_adapters"), atol=1e-5)
    assert np.abs(generate_np(mole_pipe, ref_pipe, "base") - generate_np(mole_pipe, ref_pipe, "nla")).max() > 1e-3


def unet_gate_history(pipe):
    """(UNet calls, 1, N): the constant weights each denoising step ran with."""
    return next(h for name, h in pipe.gate_weights.items() if name.startswith("unet"))


def test_switch_activates_one_expert_per_step_in_order(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    generate_np(mole_pipe, None, "switch", num_inference_steps=5)
    history = unet_gate_history(mole_pipe)
    assert [h[0].tolist() for h in history] == [[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]]
    images = [composition._switch(mole_pipe, ["a", "b"], every, "x", dict(num_inference_steps=4, height=32, width=32, output_type="np",
                                                                         generator=torch.Generator().manual_seed(0))) for every in (1, 2)]
    assert [h[0].tolist() for h in unet_gate_history(mole_pipe)] == [[1, 0], [1, 0], [0, 1], [0, 1]]
    assert np.abs(images[0] - images[1]).max() > 1e-4


def test_composite_guidance_is_the_mean_of_the_per_lora_guidances(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, 32, generator=g)  # [unconditional, conditional]
    t, scale = torch.tensor(500), 7.5

    def guided(out):
        return out[0] + scale * (out[1] - out[0])

    per_lora = []
    with torch.no_grad():
        for k in range(2):
            mole_pipe.mole.set_experts(["a", "b"], composition.one_hot(["a", "b"], k))
            per_lora.append(guided(mole_pipe.unet(sample, t, encoder_hidden_states=text).sample))
        with composition.composite(mole_pipe, ["a", "b"]):
            composite = guided(mole_pipe.unet(sample, t, encoder_hidden_states=text).sample)
            as_tuple = mole_pipe.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(composite, (per_lora[0] + per_lora[1]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided(as_tuple), composite)
    assert "forward" not in mole_pipe.unet.__dict__  # the UNet's own forward is back


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "mole", "fancy"], "unknown method(s) ['fancy']"),
        (["--gates", "no_such_gates.safetensors"], "gate file no_such_gates.safetensors not found"),
        (["--clip-model", "local-dir:/no/such/clip"], "cannot load CLIP model local-dir:/no/such/clip"),
        (["--clip-model", "ViT-B-32", "--clip-pretrained", "/no/such/file.safetensors"], "cannot load CLIP model ViT-B-32"),
        (["--images", "sum=/no/such/folder"], "image folders named ['sum'] clash with methods"),
        (["--images", "mine=/no/such/folder"], "/no/such/folder/p0-s0.png: not found"),
    ],
)
def test_bad_evaluate_input_is_a_clear_error(world, eval_world, clip_name, tmp_path, capsys, extra, message):
    argv = ["evaluate", "--base", str(world["base"]), "--concepts", str(eval_world / "concepts.toml"), "--gates",
            str(eval_world / "gates.safetensors"), "--clip-model", clip_name, "--out", str(tmp_path), "--steps", "2"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if extra[0] == "--methods":
        argv += extra[2:]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_concept_without_references_is_refused(world, eval_world, clip_name, tmp_path):
    bad = tmp_path / "concepts.toml"
    text = (eval_world / "concepts.toml").read_text().replace('images = "red"', f'images = "{eval_world / "red"}"')
    bad.write_text(text.replace('images = "blue"', f'images = "{tmp_path / "empty"}"'))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="concept 'b': field 'images': no images in"):
        ev.evaluate(config(world, eval_world, clip_name, tmp_path / "out", concepts=bad))


def test_transformers_clip_folder_scores_equal_transformers_computed_directly(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from mole_diffusion.testing import make_tiny_transformers_clip

    folder = make_tiny_transformers_clip(tmp_path / "hf_clip")
    clip = load_clip(str(folder))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 36, 3), dtype=np.uint8)) for i in range(3)]
    prompts = ["a red circle", "a blue square", "a green star"]
    rows = score_images(clip, images, prompts, {}, [[]] * 3)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding="max_length")
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    for i, row in enumerate(rows):
        assert row["clip_text"] == pytest.approx(cos[i].item(), abs=1e-5)
    # the differentiable path equals the processor's on an image already at the model's size
    image = images[0].resize((32, 32))
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=[image], return_tensors="pt"))
    expected = getattr(expected, "pooler_output", expected)  # a tensor, or an output object in newer transformers
    torch.testing.assert_close(clip.embed_images(pixels), F.normalize(expected, dim=-1), rtol=0, atol=1e-5)


def test_dino_backbone_adds_its_own_image_alignment(world, eval_world, clip_name, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    from mole_diffusion.testing import make_tiny_dino

    dino = make_tiny_dino(tmp_path / "dino")
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "run", methods=["nla", "base"], seeds=[0], image_model=str(dino)))
    rows = json.loads((out / "results.json").read_text())
    assert {"dino_image_a", "dino_image_b", "dino_image_min", "clip_image_min"} <= set(rows[0])
    model, processor = AutoModel.from_pretrained(dino), AutoImageProcessor.from_pretrained(dino)
    with torch.no_grad():
        def embed(images):
            features = model(pixel_values=processor(images=images, return_tensors="pt").pixel_values).last_hidden_state[:, 0]
            return torch.nn.functional.normalize(features, dim=-1)

        generated = embed([Image.open(out / rows[0]["image"]).convert("RGB")])[0]
        refs = embed([Image.open(p).convert("RGB") for p in sorted((eval_world / "red").iterdir())])
    assert rows[0]["dino_image_a"] == pytest.approx((refs @ generated).mean().item(), abs=1e-5)
    assert "dino_image_min" in (out / "summary.csv").read_text()


def test_a_transformers_folder_that_is_not_clip_is_refused(tmp_path):
    from mole_diffusion.testing import make_tiny_dino

    with pytest.raises(ClipError, match="not a CLIPModel"):
        load_clip(str(make_tiny_dino(tmp_path / "dino")))


def test_peft_merges_cat_is_nla_and_the_others_are_not(world, eval_world, clip_name, tmp_path):
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "run", seeds=[0], methods=["nla", "peft_cat", "peft_svd"]))

    def pixels(method):
        return np.asarray(Image.open(out / "images" / method / "p0-s0.png")).astype(int)

    assert np.abs(pixels("peft_cat") - pixels("nla")).max() <= 1  # exact up to PNG rounding
    assert np.abs(pixels("peft_svd") - pixels("nla")).max() > 1  # truncated to rank 4 of a rank-6 sum
    assert "peft_svd" in (out / "report.md").read_text()


def test_ties_and_dare_need_one_rank(world, eval_world, clip_name, tmp_path):
    with pytest.raises(ValueError, match=r"need LoRAs of one rank .* ranks \[2, 4\]"):
        ev.evaluate(config(world, eval_world, clip_name, tmp_path / "bad", methods=["peft_ties"]))
    twin = make_tiny_lora(world["base"], tmp_path / "a2.safetensors", rank=4, alpha=4, seed=7)
    same_rank = tmp_path / "concepts.toml"
    same_rank.write_text((eval_world / "concepts.toml").read_text().replace(str(world["b"]), str(twin))
                         .replace('images = "red"', f'images = "{eval_world / "red"}"')
                         .replace('images = "blue"', f'images = "{eval_world / "blue"}"'))
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "run", concepts=same_rank, seeds=[0], gates=None,
                             methods=["nla", "peft_ties", "peft_dare_linear"]))
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["nla", "peft_ties", "peft_dare_linear"]
    nla = np.asarray(Image.open(out / rows[0]["image"])).astype(int)
    for row in rows[1:]:
        assert np.abs(np.asarray(Image.open(out / row["image"])).astype(int) - nla).max() > 1


def test_accelerate_launch_shards_the_images_across_processes(world, eval_world, clip_name, tmp_path):
    import os
    import subprocess
    import sys


    common = ["--base", str(world["base"]), "--concepts", str(eval_world / "concepts.toml"), "--gates", str(eval_world / "gates.safetensors"),
              "--clip-model", clip_name, "--steps", "3", "--resolution", "32", "--seeds", "0", "1", "--prompt", "a photo of sks and zwx",
              "--methods", "mole", "nla", "base"]
    # `--cpu` alone starts one process (accelerate needs mpirun for more): two joined CPU processes take this
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "mole_diffusion.cli", "evaluate"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "evaluating on 2 processes" in done.stdout
    assert done.stdout.count("| method |") == 1 and done.stdout.count("wrote ") == 1  # the main process sums up
    assert main(["evaluate", *common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in two] == [(r["method"], r["seed"]) for r in one]
    for a, b in zip(one, two):
        assert a["clip_text"] == pytest.approx(b["clip_text"], abs=1e-4)


def test_evaluate_from_lora_files_scores_text_alignment_only(world, clip_name, tmp_path, capsys):
    argv = ["evaluate", "--base", str(world["base"]), "--lora", f"a={world['a']}", "--lora", f"b={world['b']}",
            "--clip-model", clip_name, "--steps", "2", "--resolution", "32", "--seeds", "0", "--methods", "nla", "single_a",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 1 and "--prompt" in capsys.readouterr().err  # no instance prompts to build prompts from
    assert main([*argv, "--prompt", "a photo of sks and zwx"]) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["nla", "single_a"]
    assert "clip_text" in rows[0] and not any(k.startswith("clip_image") for k in rows[0])


def test_gates_of_another_granularity_are_evaluated_as_trained(world, eval_world, clip_name, tmp_path):
    """Layer-granularity gates (one per adapted module), randomised so that they weigh the experts unevenly and
    differently from module to module: the evaluator's ``mole`` images equal those of a pipeline loaded by hand
    at layer granularity with that file (DDPM, the evaluator's default sampler, same seed), up to PNG rounding,
    and its saved per-image gate means are that pipeline's, gate by gate (one per module). Neither is what the
    untrained gates (NLA at any granularity, what a file not loaded would give) draw."""
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]}, granularity="layer")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in pipe.mole.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 2)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
    gates = tmp_path / "layer_gates.safetensors"
    pipe.save_gates(gates)
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "run", gates=gates, methods=["mole"], seeds=[0]))
    assert [(r["method"], r["seed"]) for r in json.loads((out / "results.json").read_text())] == [("mole", 0)]

    by_hand, untrained = load(world["base"]), load(world["base"])
    for p in (by_hand, untrained):
        p.load_experts({"a": world["a"], "b": world["b"]}, granularity="layer")
        p.scheduler = DDPMScheduler.from_config(p.scheduler.config)
    by_hand.load_gates(gates)
    args = dict(num_inference_steps=3, height=32, width=32)
    image = by_hand("a photo of sks and zwx", generator=torch.Generator().manual_seed(0), **args).images[0]
    history = by_hand.gate_weights
    nla = untrained("a photo of sks and zwx", generator=torch.Generator().manual_seed(0), **args).images[0]
    saved = np.asarray(Image.open(out / "images" / "mole" / "p0-s0.png")).astype(int)
    from_hand, from_nla = (int(np.abs(saved - np.asarray(i).astype(int)).max()) for i in (image, nla))
    assert from_hand <= 1, f"the evaluator's image is up to {from_hand} levels off the hand-loaded pipeline's"
    assert from_nla > 10  # these gates do change the image

    means = load_file(out / "images" / "mole" / "p0-s0.gates.safetensors")
    assert set(means) == set(by_hand.mole.gates) and len(means) > 10  # a gate per adapted module
    spread = []
    for name, mean in means.items():
        torch.testing.assert_close(mean, history[name].mean(dim=(0, 1)), rtol=1e-4, atol=1e-5)
        spread.append((mean - 0.5).abs().max().item())
    assert max(spread) > 0.1  # far from the untrained gates' 0.5, 0.5


def test_mole_constant_is_fused_once_and_equals_unfused_per_block_weights(world, eval_world, clip_name, tmp_path):
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "run", methods=["mole_constant", "nla"], seeds=[0, 1]))
    block_weights = json.loads((out / "block_weights.json").read_text())
    pipe = load(world["base"])
    pipe.load_experts({"a": world["a"], "b": world["b"]})
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the evaluator's default sampler
    pipe.set_experts(weights=block_weights)  # unfused, per block
    for seed in (0, 1):
        image = pipe("a photo of sks and zwx", num_inference_steps=3, height=32, width=32,
                     generator=torch.Generator().manual_seed(seed)).images[0]
        saved = Image.open(out / "images" / "mole_constant" / f"p0-s{seed}.png")
        assert np.abs(np.asarray(image).astype(int) - np.asarray(saved).astype(int)).max() <= 1


def test_images_made_elsewhere_are_scored_like_the_generated_ones(world, eval_world, clip_name, tmp_path):
    first = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "first", methods=["sum"]))
    folder = first / "images" / "sum"
    out = ev.evaluate(config(world, eval_world, clip_name, tmp_path / "second", methods=["sum"],
                             image_folders={"again": str(folder), "again_without_b": str(folder)}))
    rows = json.loads((out / "results.json").read_text())
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("sum", "again", "again_without_b")}
    assert [len(v) for v in by_method.values()] == [2, 2, 2]
    scores = [{k: v for k, v in r.items() if k not in ("method", "image")} for r in by_method["sum"]]
    for name in ("again", "again_without_b"):  # the same pictures: the same scores, prompt by prompt and seed by seed
        assert [{k: v for k, v in r.items() if k not in ("method", "image")} for r in by_method[name]] == scores
        assert (out / "images" / name / "p0-s1.png").is_file()
    assert "| again |" in (out / "report.md").read_text()
    assert composition.active_experts("again_without_b", ["a", "b"]) == ["a"]
    (tmp_path / "short").mkdir()
    Image.open(folder / "p0-s0.png").save(tmp_path / "short" / "p0-s0.png")
    with pytest.raises(ValueError, match="short/p0-s1.png: not found"):  # seed 1 is missing
        ev.evaluate(config(world, eval_world, clip_name, tmp_path / "third", methods=["sum"],
                           image_folders={"short": str(tmp_path / "short")}))
