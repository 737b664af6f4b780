"""A diagnostic for issue 12: does the demo world compose when the checker LoRA is kept to the background?

    python -m mole_diffusion.demo.spatial --out build/spatial --seeds 8 \\
        "alone:split:26:1,0:everywhere:0;judge8:judge:8:1,0:everywhere:0;two_pass:split:8:1,0:two-pass:2"

Each spec is ``label:MASK:LEAD:STAR,STRIPES:WHERE:DILATE``. Every UNet call routes by masks (the regional routing
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

4 composition prompts x SEEDS, DDIM 25 steps, guidance 5; prints the judge's rates and how often the star and the
checker show together. A diagnostic: a choice of
masks or weights picked by these numbers would make the judge a training signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

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


def disc(size: tuple[int, int], radius: float) -> torch.Tensor:
    """(H, W): 1 inside the centred disc of ``radius`` pixels."""
    height, width = size
    y, x = torch.meshgrid(torch.arange(height) + 0.5 - height / 2, torch.arange(width) + 0.5 - width / 2, indexing="ij")
    return ((y**2 + x**2).sqrt() <= radius).float()


def expert_masks(obj: torch.Tensor, object_weights: tuple[float, float], everywhere: bool, dilate: int) -> torch.Tensor:
    """(B, H, W) object map -> (B, 3, H, W) masks for star, stripes, checker."""
    if dilate:
        obj = F.max_pool2d(obj[:, None], 2 * dilate + 1, 1, dilate)[:, 0]
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
        unconditional, conditional = noise.chunk(2)  # classifier-free guidance: (negative, prompt) halves
        noise = unconditional + self.guidance_scale * (conditional - unconditional)
        alpha = self.pipe.scheduler.alphas_cumprod[int(timestep)]
        x0 = (sample.chunk(2)[1] - (1 - alpha).sqrt() * noise) / alpha.sqrt()
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
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        step, self.step = self.step, self.step + 1
        if step < self.lead:
            noise = self.predict([1.0, 0.0, 0.0], sample, timestep, args, kwargs)
        else:
            object_noise = self.predict([*self.object_weights, 0.0], sample, timestep, args, kwargs)
            if self.object is None or self.mask == "judge":
                unconditional, conditional = object_noise.chunk(2)
                guided = unconditional + self.guidance_scale * (conditional - unconditional)
                alpha = self.pipe.scheduler.alphas_cumprod[int(timestep)]
                x0 = (sample.chunk(2)[1] - (1 - alpha).sqrt() * guided) / alpha.sqrt()
                obj = two_means_object(x0) if self.mask == "split" else judge_object(self.pipe.vae, self.judge, x0)
                if self.dilate:
                    obj = F.max_pool2d(obj[:, None], 2 * self.dilate + 1, 1, self.dilate)[:, 0]
                self.object = obj
            background_noise = self.predict([0.0, 0.0, 1.0], sample, timestep, args, kwargs)
            m = self.object[:, None].repeat(2, 1, 1, 1).to(object_noise)
            noise = m * object_noise + (1 - m) * background_noise
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def remove(self) -> None:
        del self.pipe.unet.forward  # back to the class's forward


def judge_object(vae, judge, x0: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) latent x0 -> (B, H, W): the judge's object map of its decoding, on the latent grid."""
    image = (vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    obj = (judge(image.float())["object"].sigmoid() > 0.5).float()
    return F.interpolate(obj[:, None], tuple(x0.shape[-2:]), mode="nearest")[:, 0]


def run(pipe, judge, presence, out: Path, spec: str, seeds: int) -> dict[str, float]:
    from . import world

    label, mask, lead, weights, where, dilate = spec.split(":")
    if where not in ("object", "everywhere", "two-pass"):
        raise ValueError(f"{spec}: WHERE is 'object', 'everywhere' or 'two-pass', got {where!r}")
    star, stripes = (float(w) for w in weights.split(","))
    guidance_scale = 5.0
    if where == "two-pass":
        masks = TwoPassComposite(pipe, judge, mask, int(lead), (star, stripes), int(dilate), guidance_scale)
    else:
        pipe.enable_regional_routing({n: world.CONCEPTS[n].token for n in NAMES}, weights=[1.0] * len(NAMES))
        masks = SpatialMasks(pipe, judge, mask, int(lead), (star, stripes), where == "everywhere", int(dilate), guidance_scale)
    counts = dict.fromkeys([*NAMES, "star_and_checker", "all"], 0)
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    prompts = world.composition_prompts()
    try:
        for p, prompt in enumerate(prompts):
            for seed in range(seeds):
                masks.reset()
                image = pipe(prompt, num_inference_steps=25, guidance_scale=guidance_scale,
                             generator=torch.Generator().manual_seed(seed)).images[0]
                image.save(folder / f"p{p}-s{seed}.png")
                seen, _ = presence.read([image], [prompt])[0]
                for name in NAMES:
                    counts[name] += seen[name]
                counts["star_and_checker"] += seen["star"] and seen["checker"]
                counts["all"] += all(seen.values())
    finally:
        masks.remove()
        if where != "two-pass":
            pipe.disable_regional_routing()
    return {k: 100 * v / (len(prompts) * seeds) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mole_diffusion.demo.spatial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for each spec's images")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("specs", help="label:MASK:LEAD:STAR,STRIPES:WHERE:DILATE specs, separated by ';'")
    args = parser.parse_args(argv)

    from ..eval.presence import AttributeJudgePresence
    from ..pipelines import MoLEStableDiffusionPipeline
    from ..quiet import quiet_loading
    from ..schedulers import use_scheduler
    from .judge import load_judge
    from .run import ASSETS

    with quiet_loading():
        pipe = MoLEStableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_experts({name: ASSETS / "loras" / f"{name}.safetensors" for name in NAMES})
    presence = AttributeJudgePresence(ASSETS / "judge", list(NAMES))
    judge, _ = load_judge(ASSETS / "judge")
    print("| spec | " + " | ".join(f"present_{k}" for k in (*NAMES, "star_and_checker", "all")) + " |")
    for spec in args.specs.split(";"):
        rates = run(pipe, judge, presence, Path(args.out), spec, args.seeds)
        print(f"| {spec} | " + " | ".join(f"{v:.1f}%" for v in rates.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
