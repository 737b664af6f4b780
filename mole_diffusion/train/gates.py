"""Gate training (docs/method.md): only the gates learn; the base model and every LoRA stay frozen.

    L = L_D + alpha * L_balance

L_D, ``objective="denoising"`` (default): the denoising loss of the MoLE model on each concept's reference
images with its instance prompt (plus prior-preservation images when given); batches take the concepts in
turn, so the gates learn to send each concept's prompts and content to its expert.
L_D, ``objective="clip"`` (the paper's): images sampled from the concept's prompt in a short unrolled DDIM
run, decoded, and compared with CLIP to the concept's reference images: a global loss
1 - cos(E(x), r_k) and a directional loss 1 - cos(E(x) - c, r_k - c), where r_k is the concept's mean
reference embedding and c the mean over concepts (decision: the direction from the average concept to
concept k, so the directional term separates concepts). Far costlier: every step backpropagates through
``clip_sampling_steps`` UNet calls, the VAE decoder and CLIP.
L_D, ``objective="composition"`` (as the official MoLE code trains): the same unrolled sampling, from
the concepts file's ``[compositions]`` prompts; the loss is the image's text alignment to its prompt,
1 - cos(E(x), T(p)), plus every concept the prompt names pushed towards its references, the weakest most:
sum_k s_k (1 - cos(E(x), r_k)), s = softmax over those concepts of their gaps / 0.5 (not differentiated).
The CLIP here must not be the one that judges the results.
L_D, ``objective="distillation"``: on concept k's images the mixture reproduces LoRA k alone, the
MSE between the MoLE UNet's prediction and that of expert k at weight 1 (every gate, no grad) on the same
noisy latents: where LoRA k changes the prediction, the gates must give it k's weight; where the LoRAs agree
they are free. Its target has none of the denoising loss's noise (the true noise is unknowable from x_t), so
the gates' signal is far clearer; one more UNet call per step. SD / SDXL.

For gates off the simplex (sigmoid, softplus) the balance loss counts each expert's share of its gate's total
weight: -sum log q on raw weights would reward raising every weight, not spreading them.

``sparsity_weight`` beta (gates off the simplex only) adds beta * the mean total weight per gate (per
position, for per-position gates): an expert then stays on only where it lowers L_D by more than it costs, so a
per-position gate may learn where each LoRA helps (a background LoRA off the object) from each concept's own
images, without masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from ..clip import load_clip
from ..concepts import Concept, composed_concepts, concept_triggers, list_images, load_compositions, load_concepts, trigger_words
from ..config import GateConfig
from ..errors import MoLEError, load_base_pipeline
from ..gates import balance_loss, mean_expert_weights
from ..pipelines import MoLEPipelineMixin, mole_pipeline_class
from .common import (
    BatchRandom,
    Examples,
    TrainingSettings,
    denoising_objective,
    encode_examples,
    encode_prompts,
    global_batch_means,
    image_caption,
    load_image,
    make_accelerator,
    prepare_pipeline,
    run_training,
    trainable_parameters,
)

OBJECTIVES = ("denoising", "clip", "composition", "distillation")


@dataclass(kw_only=True)
class GateTrainingConfig(TrainingSettings):
    base: str
    concepts: Path
    # the gates to train (granularity, activation, per position, timestep knots, prior weights); with a ``pipe``
    # handed to train_gates, that pipeline's gates are trained as they are
    gate: GateConfig = field(default_factory=GateConfig)
    balance_weight: float = 0.5  # alpha of the training loss in docs/method.md (the paper's value)
    sparsity_weight: float = 0.0  # beta: the cost of each unit of expert weight (sigmoid, softplus; see above)
    learning_rate: float = 5e-3  # zero-initialised gates want a larger lr than the paper's 1e-5 (see README)
    objective: str = "denoising"
    clip_model: str | None = None  # for objective="clip": an open_clip name, or "local-dir:PATH"
    clip_pretrained: str | None = None  # its pretrained tag or checkpoint file
    clip_sampling_steps: int = 4
    # the gates with the concepts' trigger words (GateConfig.triggers): each expert weighs 0 in an example whose
    # prompt lacks its trigger, so each gate learns its LoRA's strength from that concept's images alone. None:
    # yes when the gate's kind is left to the default (``gate.activation`` and ``gate.prior_weights`` None), every
    # concept has a trigger word and every reference image's prompt holds its own; the gates are then softplus at
    # prior 1 (GateConfig), else the paper's
    by_trigger: bool | None = None


def _captions_without_trigger(concepts: list[Concept], triggers: dict[str, list[str]]) -> list[tuple[Path, str, str]]:
    """(image, its prompt, concept) for each reference image whose prompt (its caption file, else the concept's
    prompt) lacks its own concept's trigger words: gates with trigger words would keep its LoRA off there."""
    return [(path, prompt, c.name) for c in concepts for path in list_images(c.images)
            if c.name not in composed_concepts(prompt := image_caption(path, c.prompt), triggers)]


def describe_gates(config: GateConfig) -> str:
    """One line: "block, softplus at prior 1 1, trigger words a=sks b=zwx" (a MoLE's resolved config)."""
    prior = "uniform prior" if config.prior_weights is None else "prior " + " ".join(f"{w:g}" for w in config.prior_weights)
    kind = [config.granularity, f"{config.activation} at {prior}"]
    kind += ["per position"] * config.per_position + [f"{config.timestep_knots} timestep knots"] * bool(config.timestep_knots)
    if config.triggers:
        kind.append("trigger words " + " ".join(f"{name}={' '.join(words)}" for name, words in config.triggers.items()))
    return ", ".join(kind)


def train_gates(config: GateTrainingConfig, pipe: MoLEPipelineMixin | None = None) -> Path:
    """Train MoLE gates for the concepts file's LoRAs; returns the gate file (``output_dir/gates.safetensors``).

    ``pipe``: a pipeline with these concepts' experts already loaded (default: load ``config.base`` and the
    concepts' LoRAs); its gates are trained in place.
    """
    if config.objective not in OBJECTIVES:
        raise MoLEError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}")
    if config.objective in ("clip", "composition") and not config.clip_model:
        raise MoLEError(f"objective {config.objective!r} needs a CLIP model (--clip-model, and --clip-pretrained for a named one)")
    concepts = load_concepts(config.concepts)
    if config.objective == "composition" and not load_compositions(config.concepts):
        raise MoLEError(f"objective 'composition' samples the composition prompts: {config.concepts} has no "
                        "[compositions] prompts = [...]")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config)

    gate_config, triggers = config.gate, concept_triggers(concepts)
    unnamed = _captions_without_trigger(concepts, triggers) if triggers is not None else []
    by_trigger = config.by_trigger
    if by_trigger is None:  # the default gates: with trigger words where every reference image's prompt has its own
        by_trigger = (pipe is None and gate_config.activation is None and gate_config.prior_weights is None
                      and triggers is not None and not unnamed)
    if by_trigger:
        if triggers is None:
            raise MoLEError(f"by_trigger needs each concept's trigger word: {config.concepts} has a concept whose prompt "
                            "has no word of its own; give it trigger = \"...\"")
        if unnamed:
            image, prompt, name = unnamed[0]
            raise MoLEError(f"{image}: its prompt {prompt!r} lacks concept {name!r}'s trigger words "
                            f"{' '.join(triggers[name])!r}, so with trigger words its LoRA would be off on it; put them "
                            f"in its caption, or train without by_trigger ({len(unnamed)} such image(s))")
        gate_config = replace(gate_config, triggers=triggers)
    names = [c.name for c in concepts]
    activation = (pipe.mole.gate_config if pipe is not None and pipe.mole is not None else gate_config.for_experts(names)).activation
    if config.sparsity_weight and activation == "softmax":
        raise MoLEError("a sparsity weight needs gates off the simplex (activation sigmoid or softplus): softmax weights "
                        "always sum to 1")
    if pipe is None:
        pipe = load_base_pipeline(mole_pipeline_class(config.base), config.base, safety_checker=None)
        pipe.load_experts({c.name: c.lora for c in concepts}, gate_config=gate_config)
    elif by_trigger:
        pipe.mole.set_gate_config(replace(pipe.mole.gate_config, triggers=gate_config.triggers))
    if config.objective in ("clip", "composition") and pipe.family != "sd":
        raise MoLEError(f"objective {config.objective!r} samples through DDIM on a Stable Diffusion 1.x/2.x UNet; "
                        f"on this {type(pipe).__name__} train with --objective denoising")
    if pipe.expert_names != [c.name for c in concepts]:
        raise MoLEError(f"the pipeline's experts {pipe.expert_names} are not the concepts {[c.name for c in concepts]}")
    if pipe.mole.fused:
        raise MoLEError("the pipeline's experts are fused: unfuse_experts() before training its gates")
    # a pipeline left with constant weights, masked experts or regional routing would train nothing, or half
    pipe.disable_regional_routing()
    pipe.mole.set_experts(None)
    prepare_pipeline(pipe, accelerator, config)
    mole = pipe.mole
    accelerator.print(f"gates: {describe_gates(mole.gate_config)}")  # the default kind depends on the concepts file
    for gate in mole.gates.values():  # trainable parameters stay in fp32 whatever the model's dtype
        gate.float().requires_grad_(True)
    if config.objective == "distillation" and pipe.family == "flux":
        raise MoLEError("objective 'distillation' noises latents with the UNet's DDPM schedule; on Flux train with --objective denoising")
    if config.objective in ("clip", "distillation"):  # prior preservation is a denoising-loss device
        concepts = [replace(c, class_images=None, class_prompt=None) for c in concepts]
    examples = encode_examples(concepts, pipe.vae, config.resolution, config.prior_loss_weight)

    if config.objective == "denoising":
        denoising = denoising_objective(pipe, examples)

        def main_loss(indices, generator):
            value, logs = denoising(indices, generator)
            return value, logs, [gate.applied_weights() for gate in mole.gates.values()]
    elif config.objective == "clip":
        main_loss = clip_objective(pipe, config, concepts, examples, accelerator.device)
    elif config.objective == "distillation":
        main_loss = distillation_objective(pipe, examples, config.resolution)
    else:
        main_loss = composition_objective(pipe, config, concepts, accelerator.device)

    coverage = mole.gate_coverage()  # q_i counts only the gates where expert i acts

    def loss_function(indices: list[int], random: BatchRandom) -> tuple[torch.Tensor, dict[str, float]]:
        value, logs, gate_weights = main_loss(indices, random)
        # gate_weights holds every gate once per UNet call (clip: several), in mole.gates order. The sparsity term
        # is a mean over examples (averaging the processes' gradients gives one process's); the balance loss is a
        # statistic of the batch, taken over the global batch (global_batch_means) under several processes
        sparsity = torch.stack([w.sum(dim=-1).mean() for w in gate_weights]).mean() if config.sparsity_weight else None
        if mole.gate_config.activation != "softmax":  # shares of each gate's weight (see the module docstring)
            gate_weights = [w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12) for w in gate_weights]
        gate_weights = global_batch_means(gate_weights, accelerator)  # of the shares: q is their global mean
        cover = coverage.repeat(len(gate_weights) // len(coverage), 1)
        balance = balance_loss(gate_weights, cover)
        mean_weight = mean_expert_weights([w.detach() for w in gate_weights], cover)
        logs = {**logs, "loss_balance": balance.item(), **{f"gate_{n}": float(q) for n, q in zip(mole.expert_names, mean_weight)}}
        value = value + config.balance_weight * balance
        if sparsity is not None:
            logs["gate_total"] = sparsity.item()
            value = value + config.sparsity_weight * sparsity
        return value, logs

    if not config.validation_prompts:
        config.validation_prompts = [c.prompt for c in concepts]
    run_training(config, accelerator, pipe, trainable_parameters(pipe), examples, loss_function,
                 kind=describe_gates(mole.gate_config))

    path = output_dir / "gates.safetensors"
    if accelerator.is_main_process:
        pipe.save_gates(path)
    return path


def expert_alone_predictions(pipe, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str],
                             experts: list[int], resolution: int) -> torch.Tensor:
    """Each row's noise prediction by expert ``experts[row]`` alone, at weight 1 on every gate (text encoder
    included), under ``prompts[row]``; without gradients, and the learned gates in place again afterwards."""
    mole = pipe.mole
    target = torch.empty_like(noisy, dtype=torch.float32)
    try:
        with torch.no_grad():
            for k in sorted(set(experts)):
                rows = [i for i, e in enumerate(experts) if e == k]
                mole.set_experts(None, [float(j == k) for j in range(len(mole.experts))])
                conditions = encode_prompts(pipe, [prompts[i] for i in rows], resolution)
                target[rows] = pipe.unet(noisy[rows], timesteps[rows], **conditions).sample.float()
    finally:
        mole.set_experts(None)  # the learned gates again
    return target


def distillation_objective(pipe, examples: Examples, resolution: int):
    """Self-distillation L_D (see the module docstring), as ``main_loss(indices, random)``."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    mole, unet = pipe.mole, pipe.unet

    def main_loss(indices: list[int], random: BatchRandom | torch.Generator):
        random = BatchRandom.of(random, len(indices))
        prompts = [examples.prompts[i] for i in indices]
        latents = examples.latents[indices].to(unet.device, unet.dtype)
        noise = random.randn(*latents.shape[1:]).to(latents)
        timesteps = random.randint(scheduler.config.num_train_timesteps).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        experts = examples.groups[indices].tolist()  # instance images only: group k is expert k's
        target = expert_alone_predictions(pipe, noisy, timesteps, prompts, experts, resolution)
        prediction = unet(noisy, timesteps, **encode_prompts(pipe, prompts, resolution)).sample
        value = F.mse_loss(prediction.float(), target)
        return value, {"loss_distillation": value.item()}, [gate.applied_weights() for gate in mole.gates.values()]

    return main_loss


def unrolled_sampler(pipe, config: GateTrainingConfig, device):
    """``sample(prompt_embeds, random) -> (images in [0, 1], gate weights of every UNet call)``: a short DDIM run
    (``clip_sampling_steps``) from noise, differentiable through the UNet and the VAE decoder."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.clip_sampling_steps)
    latent_size = config.resolution // pipe.vae_scale_factor

    def sample(conditions: dict, random: BatchRandom) -> tuple[torch.Tensor, list[torch.Tensor]]:
        latents = random.randn(pipe.unet.config.in_channels, latent_size, latent_size).to(device, pipe.unet.dtype) * scheduler.init_noise_sigma
        gate_weights = []
        for t in scheduler.timesteps:
            noise = pipe.unet(scheduler.scale_model_input(latents, t), t, **conditions).sample
            gate_weights += [gate.applied_weights() for gate in pipe.mole.gates.values()]
            latents = scheduler.step(noise, t, latents).prev_sample
        images = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return images, gate_weights

    return sample


@torch.no_grad()
def reference_directions(clip, concepts) -> torch.Tensor:
    """(concepts, D): each concept's mean reference embedding, unit length."""
    return torch.stack([
        F.normalize(clip.embed_images(torch.stack([load_image(p, clip.size) for p in list_images(c.images)]) / 2 + 0.5).mean(0), dim=0)
        for c in concepts
    ])


def clip_objective(pipe, config: GateTrainingConfig, concepts, examples: Examples, device):
    """The paper's CLIP-guided L_D (see the module docstring), as ``main_loss(indices, generator)``."""
    clip = load_clip(config.clip_model, config.clip_pretrained, device=device)
    references = reference_directions(clip, concepts)
    center = references.mean(dim=0)
    sample = unrolled_sampler(pipe, config, device)

    def main_loss(indices: list[int], random: BatchRandom | torch.Generator):
        concept = examples.groups[indices].to(device)
        conditions = encode_prompts(pipe, [examples.prompts[i] for i in indices], config.resolution)
        images, gate_weights = sample(conditions, BatchRandom.of(random, len(indices)))
        embeds, target = clip.embed_images(images), references[concept]
        global_loss = (1 - (embeds * target).sum(dim=-1)).mean()
        directional = (1 - F.cosine_similarity(embeds - center, target - center, dim=-1)).mean()
        logs = {"loss_clip_global": global_loss.item(), "loss_clip_directional": directional.item()}
        return global_loss + directional, logs, gate_weights

    return main_loss


# how much more the weakest concept is pushed (0.05 lost the demo world's stripes altogether). Beware: on that
# world these gates push the images into saturated textures the attribute judge misreads (README)
CONCEPT_PUSH_TEMPERATURE = 0.5


def composition_objective(pipe, config: GateTrainingConfig, concepts, device):
    """Composition-aware L_D (see the module docstring), as ``main_loss(indices, random)``: sample ``indices[i]``
    draws from composition prompt ``indices[i] % len(prompts)``."""
    prompts = load_compositions(config.concepts)
    triggers = {c.name: trigger_words(c, concepts) for c in concepts}
    named = torch.tensor([[c.name in composed_concepts(p, triggers) for c in concepts] for p in prompts])
    if not bool(named.any(dim=1).all()):
        empty = [p for p, row in zip(prompts, named.tolist()) if not any(row)]
        raise MoLEError(f"composition prompts {empty} name no concept (no trigger word of {[c.name for c in concepts]})")
    named = named.to(device)
    clip = load_clip(config.clip_model, config.clip_pretrained, device=device)
    references = reference_directions(clip, concepts)
    texts = clip.embed_texts(prompts)
    sample = unrolled_sampler(pipe, config, device)

    def main_loss(indices: list[int], random: BatchRandom | torch.Generator):
        which = torch.tensor([i % len(prompts) for i in indices], device=device)
        conditions = encode_prompts(pipe, [prompts[i] for i in which.tolist()], config.resolution)
        images, gate_weights = sample(conditions, BatchRandom.of(random, len(indices)))
        value, logs = composition_loss(clip.embed_images(images), texts[which], references, named[which])
        return value, logs, gate_weights

    return main_loss


def composition_loss(embeds: torch.Tensor, texts: torch.Tensor, references: torch.Tensor,
                     named: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The composition objective on unit image embeddings (B, D): 1 - cos to each image's prompt ``texts`` (B, D),
    plus every concept its prompt names (``named`` (B, concepts)) pushed towards its ``references`` (concepts, D),
    the weakest most (see the module docstring)."""
    text_loss = (1 - (embeds * texts).sum(dim=-1)).mean()
    gaps = (1 - embeds @ references.T).masked_fill(~named, float("-inf"))  # (B, concepts)
    push = (gaps.detach() / CONCEPT_PUSH_TEMPERATURE).softmax(dim=-1)  # the weakest concept most
    concept_loss = (push * gaps.nan_to_num(neginf=0.0)).sum(dim=-1).mean()
    return text_loss + concept_loss, {"loss_clip_text": text_loss.item(), "loss_clip_concepts": concept_loss.item()}
