"""The ``mole-diffusion`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GENERATE_EXAMPLE = """example:
  mole-diffusion generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --lora dog=loras/dog.safetensors --lora hat=loras/hat.safetensors \\
      --gates gates.safetensors --prompt "a photo of sks dog wearing a hat" --seed 0 --out dog_hat.png

  Without --gates the gates are untrained (NLA with uniform weights); --weights 0.7 0.3 runs constant
  weights instead of gates; --experts dog runs with the other experts masked out.
"""

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def _lora_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep:
        return Path(value).stem, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE or FILE, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole-diffusion", description="Mixture of LoRA Experts for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate images with several LoRAs mixed by MoLE gates",
        epilog=GENERATE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--base", required=True, help="diffusers Stable Diffusion folder or hub id")
    gen.add_argument("--lora", action="append", type=_lora_arg, required=True, metavar="NAME=FILE",
                     help="a LoRA expert (repeat for each; NAME defaults to the file stem)")
    gen.add_argument("--gates", help="gate file from train-gates / save_gates (default: untrained, uniform)")
    gen.add_argument("--granularity", choices=("block", "layer", "network"), default="block")
    gen.add_argument("--weights", type=float, nargs="+", help="constant weights instead of gates, one per active expert")
    gen.add_argument("--experts", nargs="+", metavar="NAME", help="active experts (default: all)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the checkpoint's own")
    gen.add_argument("--device", help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: float16 on cuda, else float32")
    gen.add_argument("--out", required=True, help="PNG file (with --num-images > 1: NAME-0.png, NAME-1.png, ...)")

    tiny = sub.add_parser(
        "tiny-checkpoint",
        help="write a tiny random SD checkpoint and two LoRAs (offline; for tests and CI)",
        epilog="example:\n  mole-diffusion tiny-checkpoint tiny\n  "
        "mole-diffusion generate --base tiny/pipeline --lora tiny/dog.safetensors --lora tiny/hat.safetensors "
        "--prompt 'a dog in a hat' --steps 4 --out tiny.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tiny.add_argument("out", help="folder to write: pipeline/, dog.safetensors (diffusers), hat.safetensors (kohya)")
    return parser


def tiny_checkpoint(args: argparse.Namespace) -> None:
    from .testing import make_tiny_lora, make_tiny_pipeline

    out = Path(args.out)
    base = make_tiny_pipeline(out / "pipeline")
    print(f"wrote {base}")
    for name, layout, seed in (("dog", "diffusers", 1), ("hat", "kohya", 2)):
        print(f"wrote {make_tiny_lora(base, out / f'{name}.safetensors', rank=4, alpha=4, seed=seed, layout=layout)}")


def generate(args: argparse.Namespace) -> list[Path]:
    import diffusers
    import torch

    from .pipelines import MoLEStableDiffusionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    pipe = MoLEStableDiffusionPipeline.from_pretrained(args.base, torch_dtype=dtype, safety_checker=None)
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.load_experts(dict(args.lora), granularity=args.granularity)
    if args.gates:
        pipe.load_gates(args.gates)
    if args.weights is not None:
        pipe.set_experts(args.experts or pipe.expert_names, args.weights)
    elif args.experts:
        pipe.set_experts(args.experts)
    pipe.to(device)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        names = [name for name, _ in args.lora]
        if len(set(names)) != len(names):
            parser.error(f"--lora names must differ, got {names}")
        unknown = [n for n in args.experts or [] if n not in names]
        if unknown:
            parser.error(f"--experts {unknown} not among the --lora names {names}")
        if args.weights is not None and len(args.weights) != len(args.experts or names):
            parser.error(f"--weights has {len(args.weights)} values for {len(args.experts or names)} experts")
        if args.steps < 1:
            parser.error("--steps must be at least 1")
    from .experts import ExpertError
    from .gate_file import GateFileError

    try:
        {"generate": generate, "tiny-checkpoint": tiny_checkpoint}[args.command](args)
    except (ExpertError, GateFileError, FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        print(f"mole-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
