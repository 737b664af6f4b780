"""A diagnostic: where do the demo world's LoRAs interfere, in the text encoder or in the UNet?

    python -m experiments.interference --out build/diag \\
        "sum:1,1,1:1,1,1:;te_nla_unet_sum:0.3333,0.3333,0.3333:1,1,1:;routed_base_unet_sum:1,1,1:1,1,1:0,0,0"

Each spec is ``label:TEXT:UNET:ROUTED``: constant weights (star, stripes, checker) on the text encoder's gates and
on the UNet's; with ROUTED, the prompt embedding is token-routed instead: each trigger token's embedding from its
own concept's text LoRA alone, the other tokens from the ROUTED weights. 4 composition prompts x 16 seeds, DDIM
25 steps, guidance 5 (the quality tables' settings); prints the attribute judge's rates, ``prompt`` (the colour
kept) and ``faithful`` (every concept and the colour). A diagnostic: weights picked by these numbers would make
the judge a training signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mole_diffusion import MoLEStableDiffusionPipeline
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.eval.presence import AttributeJudgePresence
from mole_diffusion.quiet import quiet_loading
from mole_diffusion.schedulers import use_scheduler

NAMES = ("star", "stripes", "checker")


@torch.no_grad()
def text_embeddings(pipe, prompt: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's embedding (1, 77, D) with constant weights on every gate, and its token ids."""
    pipe.set_experts(list(NAMES), weights)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0], ids[0]


def routed_embeddings(pipe, prompt: str, rest: list[float], triggers: dict[str, str]) -> torch.Tensor:
    """Each trigger token's embedding from its own concept's text LoRA alone, the others with weights ``rest``."""
    embeddings, ids = text_embeddings(pipe, prompt, rest)
    embeddings = embeddings.clone()
    for index, name in enumerate(NAMES):
        alone, _ = text_embeddings(pipe, prompt, [float(i == index) for i in range(len(NAMES))])
        for position in trigger_positions(pipe.tokenizer, ids.tolist(), triggers[name]):
            embeddings[0, position] = alone[0, position]
    return embeddings


def trigger_positions(tokenizer, ids: list[int], trigger: str) -> list[int]:
    """The positions of every occurrence of ``trigger``'s tokens (a rare word may be several) in ``ids``."""
    pattern = tokenizer(trigger, add_special_tokens=False).input_ids
    return [start + k for start in range(len(ids) - len(pattern) + 1) if ids[start:start + len(pattern)] == pattern
            for k in range(len(pattern))]


def run(pipe, judge, out: Path, text: list[float], unet: list[float], routed: list[float] | None, seeds: int) -> dict[str, float]:
    triggers = {name: world.CONCEPTS[name].token for name in NAMES}
    per_gate = {g: list(text if g.startswith("text_encoder") else unet) for g in pipe.mole.gates}
    counts = dict.fromkeys([*NAMES, "all", "prompt", "faithful"], 0)
    out.mkdir(parents=True, exist_ok=True)
    prompts = world.composition_prompts()
    for p, prompt in enumerate(prompts):
        conditions = {"prompt": prompt}
        if routed is not None:
            conditions = {"prompt_embeds": routed_embeddings(pipe, prompt, routed, triggers),
                          "negative_prompt_embeds": text_embeddings(pipe, "", routed)[0]}
        pipe.set_experts(list(NAMES), per_gate)
        for seed in range(seeds):
            image = pipe(**conditions, num_inference_steps=25, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            image.save(out / f"p{p}-s{seed}.png")
            seen, kept = judge.read([image], [prompt])[0]
            for name in NAMES:
                counts[name] += seen[name]
            counts["all"] += all(seen.values())
            counts["prompt"] += bool(kept)
            counts["faithful"] += all(seen.values()) and bool(kept)
    return {k: 100 * v / (len(prompts) * seeds) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.interference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for each spec's images")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=FILE",
                        help="another LoRA file in place of the shipped one for NAME (star, stripes, checker; repeat)")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--assets", type=Path, default=None,
                        help="a world of your own (build-demo's install folder): its pipeline, LoRAs and judge")
    parser.add_argument("specs", help="label:TEXT:UNET:ROUTED specs, separated by ';'")
    args = parser.parse_args(argv)

    assets = args.assets or ASSETS
    with quiet_loading():
        pipe = MoLEStableDiffusionPipeline.from_pretrained(assets / "pipeline", safety_checker=None)
    use_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    files = {name: assets / "loras" / f"{name}.safetensors" for name in NAMES}
    for item in args.lora:
        name, _, file = item.partition("=")
        if name not in NAMES or not file:
            parser.error(f"--lora {item}: expected NAME=FILE with NAME one of {', '.join(NAMES)}")
        files[name] = Path(file)
    pipe.load_experts(files)
    judge = AttributeJudgePresence(assets / "judge", list(NAMES))
    numbers = lambda text: [float(x) for x in text.split(",")]
    print("| spec | " + " | ".join(f"present_{k}" for k in (*NAMES, "all", "prompt", "all_faithful")) + " |")
    for spec in args.specs.split(";"):
        label, text, unet, routed = spec.split(":")
        rates = run(pipe, judge, Path(args.out) / label, numbers(text), numbers(unet), numbers(routed) if routed else None, args.seeds)
        print(f"| {label} | " + " | ".join(f"{v:.1f}%" for v in rates.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
