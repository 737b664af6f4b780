"""experiments.region_gates: each reference image again under a composition's caption, its concept's region counted."""

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from PIL import Image

from experiments import region_gates
from experiments.region_gates import (
    company_scene,
    lora_alone,
    masked_denoising_loss,
    reference_scenes,
    region_examples,
    region_pipeline,
    region_weights,
    train_region_gates,
)
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.train.common import BatchRandom, denoising_loss, encode_prompts

COUNT = json.loads((ASSETS / "build_settings.json").read_text())["concept_images"]  # references per concept
ONE_OF_EACH = [0, COUNT + 4, 2 * COUNT + 8]  # a star, a stripes and a checker image


def test_company_captions_name_the_other_region_and_the_regions_split_the_image():
    """A star or stripes image names the checkerboard; a checker image the star and the stripes. The object's
    region and the background's are the latent cells wholly inside each: they never overlap, and only the cells on
    the outline are in neither."""
    star = world.Scene("star", "red", "grid", "large", (0.5, 0.5), style="dotted")
    stripes = world.Scene("circle", "blue", "green", "small", (0.3, 0.6), style="stripes")
    checker = world.Scene("square", "yellow", "checker", "large", (0.6, 0.4), style="lined")
    assert company_scene(star, "star").caption == "a red sks in dotted style on a qkx background"
    assert company_scene(stripes, "stripes").caption == "a blue circle in zwx style on a qkx background"
    assert company_scene(checker, "checker").caption == "a yellow sks in zwx style on a qkx background"
    on_object, on_background = region_weights(star, "star", (16, 16)), region_weights(star, "checker", (16, 16))
    assert set(on_object.unique().tolist()) == {0.0, 1.0} and not (on_object * on_background).any()
    assert on_object[8, 8] == 1 and on_background[0, 0] == 1  # the star's centre, a corner of the grid
    outline = 1 - on_object - on_background
    assert 0 < float(outline.sum()) < float(on_background.sum()) and 0.03 < float(on_object.mean()) < 0.3
    # rows are y, columns x, as the VAE's latents of the drawn image: the small circle centred at x 0.3, y 0.6
    small = region_weights(stripes, "stripes", (16, 16))
    assert small[10, 5] == 1 and small[5, 10] == 0


def test_the_references_are_recomputed_from_the_build_and_a_changed_one_is_named(tmp_path):
    scenes = reference_scenes(ASSETS)
    assert [len(s) for s in scenes.values()] == [COUNT] * 3
    assert all(s.shape == "star" for s in scenes["star"]) and all(s.background == "checker" for s in scenes["checker"])
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    caption = copy / "world" / "concepts" / "stripes" / "003.txt"
    right = caption.read_text()
    caption.write_text("a red circle on a grid background\n")
    with pytest.raises(ValueError, match=r"stripes/003.png: not the scene"):
        reference_scenes(copy)
    caption.write_text(right)
    image = copy / "world" / "concepts" / "checker" / "005.png"
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image)  # the same caption, the object elsewhere
    with pytest.raises(ValueError, match=r"checker/005.png: not the scene"):
        reference_scenes(copy)


@pytest.fixture(scope="module")
def region_pipe():
    return region_pipeline(ASSETS)


@pytest.fixture(scope="module")
def examples(region_pipe):
    return region_examples(region_pipe, ASSETS)


def test_the_masked_loss_over_the_whole_image_is_the_denoising_loss(region_pipe, examples):
    """All cells counted: the package's denoising loss on the same draws; one cell: that cell's squared error."""
    examples, cells = examples
    half = 3 * COUNT
    assert len(examples.prompts) == 2 * half and torch.equal(cells[:half], torch.ones_like(cells[:half]))
    assert examples.prompts[half].endswith("on a qkx background") and "sks" in examples.prompts[half]  # a star image, in company
    assert 0 < float(cells[half:].mean()) < 1
    scheduler = DDPMScheduler.from_config(region_pipe.scheduler.config)
    rows = ONE_OF_EACH
    latents, prompts = examples.latents[rows], [examples.prompts[i] for i in rows]

    def draws():
        return BatchRandom(torch.Generator().manual_seed(5), 3)

    with torch.no_grad():
        masked = masked_denoising_loss(region_pipe, scheduler, latents, torch.ones(3, *cells.shape[1:]), prompts, draws())
        plain = denoising_loss(region_pipe, scheduler, latents, encode_prompts(region_pipe, prompts, 64), torch.ones(3), draws())
        one_cell = torch.zeros(3, *cells.shape[1:])
        one_cell[:, 2, 3] = 1.0
        cell = masked_denoising_loss(region_pipe, scheduler, latents, one_cell, prompts, draws())
        random = draws()
        noise = random.randn(*latents.shape[1:])
        timesteps = random.randint(scheduler.config.num_train_timesteps)
        conditions = encode_prompts(region_pipe, prompts, 64)
        error = region_pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **conditions).sample - noise
    assert torch.allclose(masked, plain, atol=1e-6)
    assert torch.allclose(cell, error[:, :, 2, 3].pow(2).mean(), atol=1e-6)


def test_distillation_targets_each_concepts_lora_alone_which_untrained_gates_meet_on_the_plain_rows(examples):
    """Untrained gates with trigger words draw a plain row as its LoRA alone does (loss ~0); a company row, with
    the other region's LoRAs on, does not; the teacher leaves the gates in place."""
    pipe = region_pipeline(ASSETS)
    examples, cells = examples
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    half = len(cells) // 2

    def loss(rows: list[int]) -> float:
        teacher = lora_alone(pipe, [examples.prompts[i % half] for i in rows], [int(examples.groups[i]) % 3 for i in rows])
        with torch.no_grad():
            value = masked_denoising_loss(pipe, scheduler, examples.latents[rows], cells[rows], [examples.prompts[i] for i in rows],
                                          BatchRandom(torch.Generator().manual_seed(1), len(rows)), teacher)
        assert pipe.mole.constant_weights is None  # the learned gates again
        return float(value)

    assert loss(ONE_OF_EACH) < 1e-8  # each alone
    stripes, checker = ONE_OF_EACH[1:]
    assert loss([half + stripes]) > 1e-4 and loss([half + checker]) > 1e-4  # in company: the checker's LoRA on, or the other two


def gate_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, gate in pipe.mole.gates.items() for key, value in gate.state_dict().items()}


def test_region_gates_train_only_the_gates(region_pipe, examples, tmp_path, monkeypatch):
    """Two steps move the per-position gates, each example's loss counted on its own cells; the UNet, the text
    encoder and the LoRAs stay bit for bit, and the gate file loads into the world's pipeline."""
    frozen = {k: v.clone() for k, v in region_pipe.unet.state_dict().items() if "gate" not in k}
    before = {k: v.clone() for k, v in gate_state(region_pipe).items()}
    seen, masked_loss = [], region_gates.masked_denoising_loss

    def recorded(pipe, scheduler, latents, cell_weights, prompts, random, teacher=None):
        seen.append((latents.clone(), cell_weights.clone()))
        return masked_loss(pipe, scheduler, latents, cell_weights, prompts, random, teacher)

    monkeypatch.setattr(region_gates, "masked_denoising_loss", recorded)
    path = train_region_gates(region_pipe, ASSETS, tmp_path / "gates", steps=3, batch_size=2, progress=False,
                              examples=examples)
    examples, cells = examples
    half = len(cells) // 2  # plain rows, then the same images in company
    for batch_latents, batch_cells in seen:  # each row's cells are its own image's, whole or its region
        for row, row_cells in zip(batch_latents, batch_cells):
            image = next(i for i in range(half) if torch.equal(examples.latents[i], row))
            assert torch.equal(row_cells, cells[image]) or torch.equal(row_cells, cells[half + image])
    assert sum(float(c.mean()) < 1 for _, batch in seen for c in batch) >= 2  # company rows were among them
    assert all(torch.equal(v, frozen[k]) for k, v in region_pipe.unet.state_dict().items() if k in frozen)
    after = gate_state(region_pipe)
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    other = region_pipeline(ASSETS)
    other.load_gates(path)
    assert all(torch.equal(gate_state(other)[k], v) for k, v in after.items())


def test_a_company_caption_turns_the_other_regions_loras_on(region_pipe, examples):
    """Gates with trigger words: a star image alone has only the star LoRA on; in company the checker's too; a checker
    image in company all three."""
    examples, _ = examples
    rows = [0, 3 * COUNT, 3 * COUNT + ONE_OF_EACH[2]]  # a star image alone, in company; a checker image in company
    conditions = encode_prompts(region_pipe, [examples.prompts[i] for i in rows], 64)
    with torch.no_grad():
        region_pipe.unet(examples.latents[rows], torch.tensor([500] * 3), **conditions)
    weights = next(iter(region_pipe.mole.gates.values())).applied_weights()
    assert torch.equal(weights > 0, torch.tensor([[True, False, False], [True, False, True], [True, True, True]]))


def test_distillation_training_targets_each_rows_own_concept(examples, tmp_path):
    """The training loop's teacher: the first batch (a star and a stripes image alone) starts at its LoRAs alone,
    loss ~0; the second (a checker image alone, a star image in company) does not."""
    train_region_gates(region_pipeline(ASSETS), ASSETS, tmp_path / "gates", steps=2, batch_size=2, progress=False,
                       objective="distillation", examples=examples)
    logged = [json.loads(line) for line in (tmp_path / "gates" / "log.jsonl").read_text().splitlines()]
    assert logged[0]["loss_distillation"] < 1e-8 < 1e-4 < logged[1]["loss_distillation"]


def test_a_held_concept_keeps_its_untrained_weight_and_the_others_train(examples, tmp_path, monkeypatch):
    """--hold checker: every step, and the file written, sees the checker's rows of every gate as untrained (its
    weight the prior wherever its trigger is) and the temperature 1; the star's and the stripes' rows move."""
    pipe = region_pipeline(ASSETS)
    before = {k: v.clone() for k, v in gate_state(pipe).items()}
    checker = pipe.mole.expert_names.index("checker")
    seen, masked_loss = [], region_gates.masked_denoising_loss

    def recorded(*args, **kwargs):
        seen.append({k: v.clone() for k, v in gate_state(pipe).items()})
        return masked_loss(*args, **kwargs)

    monkeypatch.setattr(region_gates, "masked_denoising_loss", recorded)
    path = train_region_gates(pipe, ASSETS, tmp_path / "gates", steps=3, batch_size=2, progress=False,
                              examples=examples, hold=("checker",))
    other = region_pipeline(ASSETS)
    other.load_gates(path)
    assert len(seen) == 3
    for state in [*seen, gate_state(other)]:
        for key, value in state.items():
            if key.endswith((".weight", ".bias")):
                assert torch.equal(value[checker], before[key][checker]), key
            if key.endswith("log_temperature"):
                assert torch.equal(value, before[key]), key
    assert any(not torch.equal(gate_state(other)[k], v) for k, v in before.items() if k.endswith(".weight"))
    with pytest.raises(ValueError, match=r"hold names \['moon'\]"):
        train_region_gates(pipe, ASSETS, tmp_path / "other", steps=1, progress=False, examples=examples, hold=("moon",))
