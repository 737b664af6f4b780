"""Routing: two concept experts that each help their own concept, gates trained on both concepts' images,
and the gates end up sending each concept to its own expert (docs/method.md). CPU, about 30 s.

The world: a tiny base trained on solid colours of random hues ("a photo"), so it denoises colours in
general; a red concept ("a photo of sks") and a blue one ("a photo of zwx"), each with a LoRA trained by
``train_lora`` from that base. The base must be trained first: LoRAs trained from a random base learn
mostly generic denoising, the same for both concepts, and then there is nothing to route.
"""

import json

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.testing import make_tiny_pipeline
from mole_diffusion.train import Concept, GateTrainingConfig, LoRATrainingConfig, load_concepts, train_gates, train_lora
from mole_diffusion.train import common

SIZE = 16  # pixels: 8 x 8 latents keep every stage to seconds


def solid_images(folder, colours, seed):
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i, colour in enumerate(colours):
        pixels = (torch.tensor(colour) + torch.randint(-10, 11, (SIZE, SIZE, 3), generator=generator)).clamp(0, 255)
        Image.fromarray(pixels.byte().numpy()).save(folder / f"{i}.png")
    return folder


def train_colour_base(root):
    hues = torch.rand(16, 3, generator=torch.Generator().manual_seed(1)) * 255
    generic = solid_images(root / "generic", [tuple(c) for c in hues.int().tolist()], seed=0)
    path = make_tiny_pipeline(root / "random")
    # SD's 0.18215 suits SD's VAE; give the random VAE's latents unit variance instead, or the data vanish in the noise
    vae = AutoencoderKL.from_pretrained(path / "vae")
    with torch.no_grad():
        latents = torch.cat([vae.encode(common.load_image(p, SIZE)[None]).latent_dist.mean for p in sorted(generic.iterdir())])
    config = json.loads((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 1 / latents.std().item()}))

    settings = common.TrainingSettings(output_dir=root / "base_run", steps=100, batch_size=16, learning_rate=2e-3,
                                       resolution=SIZE, checkpoint_every=1000, progress=False)
    accelerator = common.make_accelerator(settings)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    common.prepare_pipeline(pipe, accelerator, settings)
    pipe.unet.requires_grad_(True)
    examples = common.encode_examples([Concept(name="generic", prompt="a photo", images=generic)], pipe.vae, SIZE, 1.0)
    common.run_training(settings, accelerator, pipe, common.trainable_parameters(pipe), examples,
                        common.denoising_objective(pipe, examples))
    pipe.save_pretrained(root / "base")
    return root / "base"


def mean_gate_weights(pipe, examples, group):
    """Mean expert weights over all gates, on a concept's images (noised as in training) with its prompt."""
    indices = torch.nonzero(examples.groups == group).flatten().tolist()
    scheduler = common.DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.mole.clear_history()
    pipe.mole.record = True
    with torch.no_grad():
        for draw in range(10):
            embeds = common.encode_prompts(pipe, [examples.prompts[i] for i in indices], SIZE)
            common.denoising_loss(pipe, scheduler, examples.latents[indices], embeds, examples.loss_weights[indices],
                                  torch.Generator().manual_seed(draw))
    pipe.mole.record = False
    return torch.stack([h.mean(dim=(0, 1)) for h in pipe.mole.gate_history().values()]).mean(dim=0)


def test_trained_gates_route_each_concept_to_its_expert(tmp_path):
    torch.manual_seed(0)
    base = train_colour_base(tmp_path)
    solid_images(tmp_path / "red", [(210, 30, 30)] * 4, seed=2)
    solid_images(tmp_path / "blue", [(30, 30, 210)] * 4, seed=3)
    for name, prompt in (("red", "a photo of sks"), ("blue", "a photo of zwx")):
        train_lora(LoRATrainingConfig(base=str(base), images=tmp_path / name, prompt=prompt, output_dir=tmp_path / f"{name}_lora",
                                      steps=30, batch_size=4, learning_rate=1e-2, train_text_encoder=True,
                                      resolution=SIZE, checkpoint_every=1000, progress=False))
    concepts = tmp_path / "concepts.toml"
    concepts.write_text(
        '[[concepts]]\nname = "red"\nlora = "red_lora"\nimages = "red"\nprompt = "a photo of sks"\n'
        '[[concepts]]\nname = "blue"\nlora = "blue_lora"\nimages = "blue"\nprompt = "a photo of zwx"\n'
    )
    pipe = MoLEStableDiffusionPipeline.from_pretrained(base)
    pipe.load_experts({"red": tmp_path / "red_lora", "blue": tmp_path / "blue_lora"})
    examples = common.encode_examples(load_concepts(concepts), pipe.vae, SIZE, 1.0)
    assert torch.allclose(mean_gate_weights(pipe, examples, 0), torch.tensor([0.5, 0.5]))  # untrained: uniform

    train_gates(GateTrainingConfig(base=str(base), concepts=concepts, output_dir=tmp_path / "gates", steps=80, batch_size=8,
                                   learning_rate=5e-2, resolution=SIZE, checkpoint_every=1000, progress=False), pipe=pipe)

    red_on_red = mean_gate_weights(pipe, examples, 0)[0].item()
    blue_on_blue = mean_gate_weights(pipe, examples, 1)[1].item()
    assert red_on_red > 0.5 and blue_on_blue > 0.5, (red_on_red, blue_on_blue)
    assert red_on_red + blue_on_blue - 1 > 0.05, (red_on_red, blue_on_blue)  # red weight on red minus on blue
