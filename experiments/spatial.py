"""A diagnostic: does the demo world compose when the checker LoRA is kept to the background?

    python -m experiments.spatial --out build/spatial --seeds 8 \\
        "alone:split:26:1,0:everywhere:0;judge8:judge:8:1,0:everywhere:0;two_pass:split:8:1,0:two-pass:2"

Each spec is ``label:MASK:LEAD:STAR,STRIPES[,CHECKER]:WHERE:DILATE`` (CHECKER, the checker LoRA's weight, 1 unless given). Every UNet call routes by masks (the regional routing
of ``mole_diffusion.routing``, its masks set here instead of from cross-attention), the text encoders sum the three
LoRAs. Before step LEAD the star LoRA acts alone, everywhere; from then on the checker LoRA acts on the background
and the star and stripes LoRAs (with weights STAR, STRIPES) on the object (WHERE ``object``) or everywhere
(``everywhere``), the object grown by DILATE latent pixels first (the checker kept that far from it). MASK says
where the object is:

- ``judge``: the evaluation judge's object map of the decoded predicted x0 of the step before (every step from
  LEAD): an upper bound, never a method, as it makes the judge part of the sampler;
- ``split``: the predicted x0 of step LEAD (the star LoRA's layout) split in two by ``two_means_object``, then kept;
- ``disc``: a centred disc of radius LEAD latent pixels from the first step, as a user's region mask would be
  (kohya regional LoRA, Mix-of-Show); no star-alone lead.

WHERE ``two-pass`` (MASK ``split`` or ``judge``) runs a regional composite instead (``TwoPassComposite``, as
Mix-of-Show's regional sampling and MultiDiffusion join regions): from step LEAD two UNet calls a step, one with the
star and stripes LoRAs (STAR, STRIPES), one with the checker LoRA alone, their noise predictions joined by the
object mask, so no LoRA's delta reaches the other's region through the convolutions; before LEAD the star LoRA alone.

WHERE ``inpaint`` (MASK ``split``) draws the layout first and the background around it (``LayoutThenBackground``,
as diffusers' inpainting does with a plain UNet): an object pass with the star LoRA and, from step LEAD, the stripes
LoRA (style late), its text encoders adapted by those two; its final latent split by ``two_means_object``, holes
filled, grown by DILATE; then a background pass from the same noise with the checker LoRA alone in the UNet and the
three LoRAs summed in the text encoders, the object's latent put back after every step at that step's noise level,
so the background is drawn around an object it cannot change. WHERE ``inpaint-inside``: the same, but the stripes LoRA
acts from step LEAD only inside the star's own layout (the split of step LEAD - 1's predicted x0), so it cannot round
the star's outline.

4 composition prompts (or --colours) x SEEDS (from --first-seed), DDIM 25 steps, guidance 5; prints the judge's rates:
each concept, the star with the checker, all three, and every concept the spec gives a weight above 0 (``active``).
``--rejudge`` reads the images an earlier run wrote again, with the installed judge, and generates nothing. A
diagnostic: a choice of masks or weights picked by these numbers would make the judge a training signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.attribute_judge import load_judge
from mole_diffusion.eval.presence import AttributeJudgePresence
from mole_diffusion.eval.stats import format_rate
from mole_diffusion.quiet import quiet_loading
from mole_diffusion.schedulers import use_scheduler

from .instances import with_class_word

NAMES = ("star", "stripes", "checker")
MASKS = ("judge", "split", "disc")


def two_means_object(x0: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W), 1 on the object: 2-means over the positions' C-vectors, started from the
    border's mean and the inside's; the background is the cluster that holds most of the border."""
    _, _, height, width = x0.shape
    border = torch.zeros(height, width, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    border = border.flatten()
    objects = []
    for latent in x0.float():
        vectors = latent.flatten(1).T  # (H W, C)
        centres = torch.stack([vectors[border].mean(0), vectors[~border].mean(0)])
        for _ in range(iterations):
            assign = torch.cdist(vectors, centres).argmin(1)
            centres = torch.stack([vectors[assign == k].mean(0) if (assign == k).any() else centres[k] for k in range(2)])
        background = int((assign[border] == 1).float().mean() > 0.5)
        objects.append((assign != background).float().view(height, width))
    return torch.stack(objects)


def guided_x0(scheduler, sample: torch.Tensor, timestep, noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The predicted clean latent of the prompt's half of a classifier-free-guidance batch (negative, prompt)."""
    unconditional, conditional = noise.chunk(2)
    guided = unconditional + guidance_scale * (conditional - unconditional)
    alpha = scheduler.alphas_cumprod[int(timestep)]
    return (sample.chunk(2)[1] - (1 - alpha).sqrt() * guided) / alpha.sqrt()


def solid(obj: torch.Tensor, close: int = 1) -> torch.Tensor:
    """(B, H, W) object map -> the same with gaps up to 2 x ``close`` pixels closed (grow, then shrink) and every
    hole filled: a striped object's dark stripes fall in the background's cluster of ``two_means_object``."""
    obj = obj[:, None].float()
    if close:
        obj = F.max_pool2d(obj, 2 * close + 1, 1, close)
        obj = 1 - F.max_pool2d(1 - obj, 2 * close + 1, 1, close)  # the padding never wins a max: no erosion at the border
    border = torch.ones_like(obj)
    border[..., 1:-1, 1:-1] = 0
    outside = border * (1 - obj)  # background reached from the border; what it cannot reach is object
    while True:
        grown = F.max_pool2d(outside, 3, 1, 1) * (1 - obj)
        if torch.equal(grown, outside):
            return (1 - outside)[:, 0]
        outside = grown


def grow(obj: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, H, W) object map grown by ``pixels`` in every direction (a square neighbourhood)."""
    return F.max_pool2d(obj[:, None], 2 * pixels + 1, 1, pixels)[:, 0] if pixels else obj


def disc(size: tuple[int, int], radius: float) -> torch.Tensor:
    """(H, W): 1 inside the centred disc of ``radius`` pixels."""
    height, width = size
    y, x = torch.meshgrid(torch.arange(height) + 0.5 - height / 2, torch.arange(width) + 0.5 - width / 2, indexing="ij")
    return ((y**2 + x**2).sqrt() <= radius).float()


def expert_masks(obj: torch.Tensor, object_weights: tuple[float, float], everywhere: bool, dilate: int) -> torch.Tensor:
    """(B, H, W) object map -> (B, 3, H, W) masks for star, stripes, checker."""
    obj = grow(obj, dilate)
    where = torch.ones_like(obj) if everywhere else obj
    return torch.stack([where * object_weights[0], where * object_weights[1], 1 - obj], dim=1)


class SpatialMasks:
    """UNet hooks that set the regional routing's masks for the next call from the step's predicted x0."""

    def __init__(self, pipe, judge, mask: str, lead: int, object_weights: tuple[float, float], everywhere: bool,
                 dilate: int, guidance_scale: float):
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.pipe, self.judge, self.mask, self.lead = pipe, judge, mask, lead
        self.object_weights, self.everywhere, self.dilate, self.guidance_scale = object_weights, everywhere, dilate, guidance_scale
        self.step, self.split = 0, None
        self.history: list[torch.Tensor] = []  # the masks each UNet call of a pipeline call ran with (prompt half)
        self.handles = [pipe.unet.register_forward_pre_hook(self.before, with_kwargs=True),
                        pipe.unet.register_forward_hook(self.after, with_kwargs=True)]

    def star_alone(self, batch: int, size: tuple[int, int]) -> torch.Tensor:
        masks = torch.zeros(batch, len(NAMES), *size)
        masks[:, 0] = 1.0
        return masks

    def before(self, unet, args, kwargs):  # runs after the routing's own hook, which set all-ones masks on step 0
        if self.step == 0:
            sample = args[0] if args else kwargs["sample"]
            size = tuple(sample.shape[-2:])
            if self.mask == "disc":
                obj = disc(size, self.lead).expand(len(sample), *size)
                self.routing.masks = expert_masks(obj, self.object_weights, self.everywhere, self.dilate)
            else:
                self.routing.masks = self.star_alone(len(sample), size)
        self.history.append(self.routing.masks[len(self.routing.masks) // 2:].clone())

    @property
    def routing(self):
        return self.pipe.mole.regional

    @torch.no_grad()
    def after(self, unet, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        noise = output[0] if isinstance(output, tuple) else output.sample
        x0 = guided_x0(self.pipe.scheduler, sample, timestep, noise, self.guidance_scale)
        self.step += 1
        size = tuple(x0.shape[-2:])
        if self.mask == "disc":
            obj = disc(size, self.lead).expand(len(x0), *size)
        elif self.step < self.lead:
            self.routing.masks = self.star_alone(len(sample), size)
            return
        elif self.mask == "split":
            if self.step == self.lead:
                self.split = two_means_object(x0)
            obj = self.split
        else:
            obj = judge_object(self.pipe.vae, self.judge, x0)
        self.routing.masks = expert_masks(obj, self.object_weights, self.everywhere, self.dilate).repeat(2, 1, 1, 1)

    def reset(self) -> None:
        self.step, self.split, self.history = 0, None, []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TwoPassComposite:
    """The UNet's forward replaced: before step ``lead`` the star LoRA alone; from it, the object pass (star,
    stripes) and the background pass (checker alone) joined by the object mask, m eps_object + (1 - m) eps_background
    (both guidance halves). The mask comes from the object pass's guided predicted x0: at step ``lead`` split by
    ``two_means_object`` and kept (``split``), or the judge's object map at every step (``judge``)."""

    def __init__(self, pipe, judge, mask: str, lead: int, object_weights: tuple[float, float], dilate: int,
                 guidance_scale: float):
        if mask not in ("split", "judge"):
            raise ValueError(f"the two-pass composite takes its mask from x0: 'split' or 'judge', got {mask!r}")
        self.pipe, self.judge, self.mask, self.lead, self.dilate = pipe, judge, mask, lead, dilate
        self.object_weights, self.guidance_scale = object_weights, guidance_scale
        self.forward = pipe.unet.forward
        pipe.unet.forward = self.composite_forward
        self.reset()

    def reset(self) -> None:
        self.step, self.object = 0, None
        self.pipe.mole.set_experts(list(NAMES), self.unet_weights([1.0, 0.0, 0.0]))  # the prompt's encoding: summed

    def unet_weights(self, weights: list[float]) -> dict[str, list[float]]:
        """Per-gate weights: the text encoders sum the three LoRAs, the UNet's gates get ``weights``."""
        return {g: [1.0] * len(NAMES) if g.startswith("text_encoder") else weights for g in self.pipe.mole.gates}

    def predict(self, weights: list[float], sample, timestep, args, kwargs) -> torch.Tensor:
        self.pipe.mole.set_experts(list(NAMES), self.unet_weights(weights))
        return self.forward(sample, timestep, *args, return_dict=False, **kwargs)[0]

    @torch.no_grad()
    def composite_forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        step, self.step = self.step, self.step + 1
        if step < self.lead:
            noise = self.predict([1.0, 0.0, 0.0], sample, timestep, args, kwargs)
        else:
            object_noise = self.predict([*self.object_weights, 0.0], sample, timestep, args, kwargs)
            if self.object is None or self.mask == "judge":
                x0 = guided_x0(self.pipe.scheduler, sample, timestep, object_noise, self.guidance_scale)
                obj = two_means_object(x0) if self.mask == "split" else judge_object(self.pipe.vae, self.judge, x0)
                self.object = grow(obj, self.dilate)
            background_noise = self.predict([0.0, 0.0, 1.0], sample, timestep, args, kwargs)
            m = self.object[:, None].repeat(2, 1, 1, 1).to(object_noise)
            noise = m * object_noise + (1 - m) * background_noise
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def remove(self) -> None:
        del self.pipe.unet.forward  # back to the class's forward


class LayoutThenBackground:
    """Layout first, then the background around it: two pipeline calls from the same starting noise.

    1. The object pass: the star LoRA (weight ``object_weights[0]``) in the UNet from the first step, the stripes LoRA
       (``object_weights[1]``) from step ``lead`` (style late, as K-LoRA); the text encoders adapted by those two.
       With ``stripes_inside`` the stripes LoRA acts from step ``lead`` only inside the star's own layout (the
       2-means split of step ``lead - 1``'s predicted x0, drawn by the star LoRA alone, so it cannot round the star's
       outline), by the regional routing's masks (its weights then also reach the prompt tokens from the first step).
       Its final latent, split by ``two_means_object``, holes filled (``solid``) and grown by ``dilate``, is the object.
    2. The background pass: the checker LoRA alone in the UNet (weight ``checker_weight``), the three LoRAs summed
       in the text encoders. After every step the object's latent is put back, noised to the next step's level with
       the object pass's starting noise (diffusers' inpainting with a plain UNet), so the background is drawn
       around an object it cannot change and no LoRA's delta crosses into the other's region.
    """

    def __init__(self, pipe, lead: int, object_weights: tuple[float, float], checker_weight: float, dilate: int,
                 guidance_scale: float, steps: int = 25, stripes_inside: bool = False):
        self.pipe, self.lead, self.object_weights, self.checker_weight = pipe, lead, object_weights, checker_weight
        self.dilate, self.guidance_scale, self.steps, self.stripes_inside = dilate, guidance_scale, steps, stripes_inside
        self.history: list[tuple[list[float], list[float]]] = []  # (UNet, text encoders) weights set in the last call
        self.object_masks: list[torch.Tensor] = []  # with stripes_inside: each object-pass UNet call's masks (prompt half)

    def set_weights(self, unet: list[float], text_encoders: list[float]) -> None:
        self.history.append((unet, text_encoders))
        self.pipe.mole.set_experts(list(NAMES), {g: text_encoders if g.startswith("text_encoder") else unet
                                                 for g in self.pipe.mole.gates})

    def object_unet(self, step: int) -> list[float]:
        return [self.object_weights[0], self.object_weights[1] if step >= self.lead else 0.0, 0.0]

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int):
        """(image, object mask (1, H, W) on the latent grid)."""
        latents, _, obj = self.latents(prompt, seed)
        image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0], obj

    @torch.no_grad()
    def latents(self, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final latents, the object pass's final latents, object mask (1, H, W))."""
        pipe = self.pipe
        noise = torch.randn(1, pipe.unet.config.in_channels, *self.latent_size(), generator=torch.Generator().manual_seed(seed))
        common = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale, output_type="latent")
        self.history = []
        try:
            object_pass = self.object_pass_inside if self.stripes_inside else self.object_pass
            layout = object_pass(prompt, noise, common)
            obj = grow(solid(two_means_object(layout)), self.dilate)
            held = obj[:, None]

            def background_step(pipe, step, timestep, tensors):
                tensors["latents"] = hold(pipe.scheduler, step, layout, noise, held, tensors["latents"])
                return tensors

            self.set_weights([0.0, 0.0, self.checker_weight], [1.0, 1.0, 1.0])
            latents = pipe(prompt, latents=noise.clone(), callback_on_step_end=background_step, **common).images
        finally:
            pipe.mole.set_experts()
        return latents, layout, obj

    def object_pass(self, prompt: str, noise: torch.Tensor, common: dict) -> torch.Tensor:
        """The object pass with constant weights, set again after every step for the next (the stripes from ``lead``)."""
        text_encoders = [1.0 if w else 0.0 for w in self.object_weights] + [0.0]

        def next_step(pipe, step, timestep, tensors):
            self.set_weights(self.object_unet(step + 1), text_encoders)
            return tensors

        self.set_weights(self.object_unet(0), text_encoders)
        return self.pipe(prompt, latents=noise.clone(), callback_on_step_end=next_step, **common).images

    def object_pass_inside(self, prompt: str, noise: torch.Tensor, common: dict) -> torch.Tensor:
        """The object pass with the stripes LoRA confined to the star's layout from step ``lead``: the regional
        routing's masks, set before every UNet call (after the routing's own hook, which reads cross-attention)."""
        pipe = self.pipe
        pipe.enable_regional_routing({n: world.CONCEPTS[n].token for n in NAMES}, weights=[*self.object_weights, 0.0])
        routing, state = pipe.mole.regional, {"step": 0, "x0": None, "object": None}
        self.object_masks = []

        def before(unet, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            masks = torch.zeros(len(sample), len(NAMES), *sample.shape[-2:])
            masks[:, 0] = 1.0  # the star everywhere, the checker nowhere
            if state["step"] >= self.lead:
                if state["object"] is None:  # the star's layout so far: plain, no stripes to close
                    state["object"] = solid(two_means_object(state["x0"]), close=0)
                masks[:, 1] = state["object"].repeat(len(sample) // len(state["object"]), 1, 1)
            routing.masks = masks
            self.object_masks.append(masks[len(masks) // 2:].clone())

        def after(unet, args, kwargs, output):
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            noise_prediction = output[0] if isinstance(output, tuple) else output.sample
            state["x0"] = guided_x0(pipe.scheduler, sample, timestep, noise_prediction, self.guidance_scale)
            state["step"] += 1

        handles = [pipe.unet.register_forward_pre_hook(before, with_kwargs=True),
                   pipe.unet.register_forward_hook(after, with_kwargs=True)]
        try:
            return pipe(prompt, latents=noise.clone(), **common).images
        finally:
            for handle in handles:
                handle.remove()
            pipe.disable_regional_routing()

    def latent_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size
        return side, side


def hold(scheduler, step: int, layout: torch.Tensor, noise: torch.Tensor, held: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` after step ``step`` of ``scheduler.timesteps`` with the ``held`` region (B, 1, H, W) put back:
    ``layout`` noised with ``noise`` to the next step's level (``layout`` itself after the last step)."""
    later = scheduler.timesteps[step + 1:step + 2]
    at_next = scheduler.add_noise(layout, noise, later) if len(later) else layout
    return held * at_next + (1 - held) * latents


def spec_row(spec: str, counts: dict[str, tuple[int, int]]) -> str:
    """A markdown row of a spec's rates, in ``COUNTED`` order."""
    return f"| {spec} | " + " | ".join(format_rate(k, n) for k, n in counts.values()) + " |"


def judge_object(vae, judge, x0: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) latent x0 -> (B, H, W): the judge's object map of its decoding, on the latent grid."""
    image = (vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    obj = (judge(image.float())["object"].sigmoid() > 0.5).float()
    return F.interpolate(obj[:, None], tuple(x0.shape[-2:]), mode="nearest")[:, 0]


COUNTED = (*NAMES, "star_and_checker", "all", "active")


def spec_weights(spec: str) -> tuple[float, float, float]:
    """A spec's STAR, STRIPES and CHECKER weights (CHECKER 1 unless given)."""
    star, stripes, *checker = (float(w) for w in spec.split(":")[3].split(","))
    return star, stripes, checker[0] if checker else 1.0


def active_concepts(spec: str) -> list[str]:
    """The concepts a spec gives a weight above 0."""
    return [name for name, weight in zip(NAMES, spec_weights(spec)) if weight > 0]


def add_reading(counts: dict[str, int], seen: dict[str, bool], active: list[str]) -> None:
    """Count one image's reading: each concept, the star with the checker, all three, and every active one."""
    for name in NAMES:
        counts[name] += seen[name]
    counts["star_and_checker"] += seen["star"] and seen["checker"]
    counts["all"] += all(seen.values())
    counts["active"] += all(seen[name] for name in active)


def rejudge(presence, out: Path, spec: str, seeds: int, first_seed: int = 0,
            colours: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
    """The rates of the images an earlier run of ``spec`` wrote, read again by ``presence``; nothing is generated."""
    label, active = spec.split(":")[0], active_concepts(spec)
    counts = dict.fromkeys(COUNTED, 0)
    shots = [(p, prompt, seed) for p, prompt in enumerate(world.composition_prompts(*([colours] if colours else [])))
             for seed in range(first_seed, first_seed + seeds)]
    paths = [out / label / f"p{p}-s{seed}.png" for p, _, seed in shots]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing:
        raise FileNotFoundError(f"{missing}: no image from an earlier run of {label!r} with these seeds and colours")
    for seen, _ in presence.read([Image.open(path).convert("RGB") for path in paths], [prompt for _, prompt, _ in shots]):
        add_reading(counts, seen, active)
    return {name: (count, len(paths)) for name, count in counts.items()}


def run(pipe, judge, presence, out: Path, spec: str, seeds: int, first_seed: int = 0,
        colours: tuple[str, ...] | None = None, steps: int = 25, guidance_scale: float = 5.0,
        word: str = "") -> dict[str, tuple[int, int]]:
    """{rate: (images that show it, images)} for one spec over the composition prompts (``word``: the checker's class
    word, in a set of ``experiments.known_pattern``); the images are written to OUT/<label>/p<prompt index>-s<seed>.png."""
    label, mask, lead, _, where, dilate = spec.split(":")
    if where not in ("object", "everywhere", "two-pass", "inpaint", "inpaint-inside"):
        raise ValueError(f"{spec}: WHERE is 'object', 'everywhere', 'two-pass', 'inpaint' or 'inpaint-inside', got {where!r}")
    inpaint = where.startswith("inpaint")
    if inpaint and mask != "split":
        raise ValueError(f"{spec}: 'inpaint' splits the object pass's own latent: MASK must be 'split', got {mask!r}")
    star, stripes, checker_weight = spec_weights(spec)
    if checker_weight != 1.0 and not inpaint:
        raise ValueError(f"{spec}: a CHECKER weight is read by WHERE 'inpaint' and 'inpaint-inside' only")
    if inpaint:
        masks = LayoutThenBackground(pipe, int(lead), (star, stripes), checker_weight, int(dilate), guidance_scale,
                                     steps=steps, stripes_inside=where == "inpaint-inside")
    elif where == "two-pass":
        masks = TwoPassComposite(pipe, judge, mask, int(lead), (star, stripes), int(dilate), guidance_scale)
    else:
        pipe.enable_regional_routing({n: world.CONCEPTS[n].token for n in NAMES}, weights=[1.0] * len(NAMES))
        masks = SpatialMasks(pipe, judge, mask, int(lead), (star, stripes), where == "everywhere", int(dilate), guidance_scale)
    counts, active = dict.fromkeys(COUNTED, 0), active_concepts(spec)
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [with_class_word(p, word) for p in world.composition_prompts(*([colours] if colours else []))]
    try:
        for p, prompt in enumerate(prompts):
            for seed in range(first_seed, first_seed + seeds):
                if inpaint:
                    image, _ = masks(prompt, seed)
                else:
                    masks.reset()
                    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                 generator=torch.Generator().manual_seed(seed)).images[0]
                image.save(folder / f"p{p}-s{seed}.png")
                add_reading(counts, presence.read([image], [prompt])[0][0], active)
    finally:
        if where in ("object", "everywhere"):
            pipe.disable_regional_routing()
        if not inpaint:
            masks.remove()
    return {k: (v, len(prompts) * seeds) for k, v in counts.items()}


def load_world(assets: Path):
    """(the demo world's pipeline with DDIM and its three LoRAs loaded, no gates; its attribute judge)"""
    with quiet_loading():
        pipe = MoLEStableDiffusionPipeline.from_pretrained(assets / "pipeline", safety_checker=None)
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_experts({name: assets / "loras" / f"{name}.safetensors" for name in NAMES})
    judge, _ = load_judge(assets / "judge")
    return pipe, judge


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.spatial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for each spec's images")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    parser.add_argument("--colours", help="the composition prompts' colours, comma-separated (default: red,blue,yellow,purple)")
    parser.add_argument("--rejudge", action="store_true",
                        help="read the images an earlier run wrote under OUT again with the installed judge; generate nothing")
    parser.add_argument("specs", help="label:MASK:LEAD:STAR,STRIPES[,CHECKER]:WHERE:DILATE specs, separated by ';'")
    args = parser.parse_args(argv)

    presence = AttributeJudgePresence(ASSETS / "judge", list(NAMES))
    colours = tuple(args.colours.split(",")) if args.colours else None
    header = "| spec | " + " | ".join(f"present_{k}" for k in COUNTED) + " |"
    if not args.rejudge:
        pipe, judge = load_world(ASSETS)
    print(header)
    for spec in args.specs.split(";"):
        counts = (rejudge(presence, Path(args.out), spec, args.seeds, args.first_seed, colours) if args.rejudge
                  else run(pipe, judge, presence, Path(args.out), spec, args.seeds, args.first_seed, colours))
        print(spec_row(spec, counts), flush=True)


if __name__ == "__main__":
    main()
