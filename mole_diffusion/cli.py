"""The ``mole-diffusion`` command."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

from .schedulers import SCHEDULERS, use_scheduler

GENERATE_EXAMPLE = """example:
  mole-diffusion generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --lora dog=loras/dog.safetensors --lora hat=loras/hat.safetensors \\
      --gates gates.safetensors --prompt "a photo of sks dog wearing a hat" --seed 0 --out dog_hat.png

  Without --gates the gates are untrained (NLA with uniform weights); --weights 0.7 0.3 runs constant
  weights instead of gates; --experts dog runs with the other experts masked out. --trigger dog=sks
  --trigger hat=zwx routes by region instead (each LoRA where its trigger word's attention points, at its
  --weights, default 1; a LoRA whose trigger the prompt lacks is off): on the second demo world it draws
  compositions as often as the plain sum and each concept's own prompts as its LoRA alone.
"""

TRAIN_GATES_EXAMPLE = """example:
  mole-diffusion train-gates --base stable-diffusion-v1-5/stable-diffusion-v1-5 --concepts concepts.toml \\
      --out runs/dog_hat --steps 400 --checkpoint-every 50

  concepts.toml lists each concept's name, lora, images and prompt (see the README). Writes
  runs/dog_hat/gates.safetensors, for `mole-diffusion generate --gates`. Add --resume to continue a
  stopped run from its newest checkpoint.
"""

TRAIN_LORA_EXAMPLE = """example:
  mole-diffusion train-lora --base stable-diffusion-v1-5/stable-diffusion-v1-5 --images data/dog \\
      --prompt "a photo of sks dog" --out runs/dog --rank 16 --steps 500 --mixer orthogonal

  Writes runs/dog/pytorch_lora_weights.safetensors (diffusers layout; a MoSLoRA mixer is folded into B).
"""

EVALUATE_EXAMPLE = """example:
  mole-diffusion evaluate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --concepts concepts.toml \\
      --gates runs/dog_hat/gates.safetensors --clip-model ViT-B-32 --clip-pretrained openai --out eval/dog_hat

  Paper protocol: DDPM, 50 steps, guidance 7.5 (the defaults). Started again, it skips the images it has.
"""

UI_EXAMPLE = """example:
  mole-diffusion ui                     # the shipped demo world, on http://127.0.0.1:7860
  mole-diffusion ui --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --lora dog=loras/dog.safetensors --lora hat=loras/hat.safetensors --gates gates.safetensors \\
      --trigger dog=sks --trigger hat=zwx

  Needs Gradio: pip install -e ".[ui]". Offline: no analytics, no fonts or scripts from the internet.
"""


def _lora_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep:
        return Path(value).stem, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE or FILE, got {value!r}")
    return name, path


BASE_HELP = "diffusers folder or hub id of a Stable Diffusion 1.x/2.x, SDXL or Flux pipeline"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole-diffusion", description="Mixture of LoRA Experts for Stable Diffusion.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in (add_generate_parser, add_train_gates_parser, add_train_lora_parser, add_evaluate_parser,
                       add_demo_parser, add_build_demo_parser, add_ui_parser, add_tiny_checkpoint_parser):
        add_parser(subparsers)
    return parser


def _add_command(subparsers, name: str, run, help: str, epilog: str, check=None) -> argparse.ArgumentParser:
    """A subcommand that ``run(args)`` carries out, after ``check(parser, args)`` (its own early checks, which
    need no model) and the checks every command shares (``main``)."""
    parser = subparsers.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run_command=run, check_options=check)
    return parser


# Options that fill a config dataclass have the field's name as their dest (``_config_from``): one line per option.


def add_generate_parser(subparsers) -> None:
    parser = _add_command(subparsers, "generate", generate, "generate images with several LoRAs mixed by MoLE gates",
                          GENERATE_EXAMPLE, check=_check_generate)
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--lora", action="append", type=_lora_arg, required=True, metavar="NAME=FILE",
                        help="a LoRA expert (repeat for each; NAME defaults to the file stem)")
    parser.add_argument("--gates", help="gate file from train-gates / save_gates (default: untrained, uniform)")
    parser.add_argument("--granularity", choices=("block", "layer", "network"),
                        help="for untrained gates (default block); with --gates, the gate file says")
    parser.add_argument("--weights", type=float, nargs="+",
                        help="constant weights instead of gates, one per active expert")
    parser.add_argument("--experts", nargs="+", metavar="NAME", help="active experts (default: all)")
    parser.add_argument("--trigger", action="append", type=_trigger_arg, metavar="NAME=WORDS",
                        help="an expert's trigger word(s) in the prompt (one for every expert): regional routing "
                             "instead of gates")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-images", type=_positive, default=1)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the checkpoint's own")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on cuda, else float32")
    parser.add_argument("--out", required=True, help="image file, .png (or any type Pillow writes: .jpg, .webp...); "
                                                     "with --num-images > 1: NAME-0.png, NAME-1.png, ...")


def add_train_gates_parser(subparsers) -> None:
    """Options of GateTrainingConfig, of its GateConfig (granularity to prior weights) and TrainingSettings."""
    parser = _add_command(subparsers, "train-gates", train_gates,
                          "train MoLE gates on each concept's reference images (LoRAs and base frozen)",
                          TRAIN_GATES_EXAMPLE)
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--concepts", type=Path, required=True,
                        help="concepts TOML file (name, lora, images, prompt per concept)")
    parser.add_argument("--granularity", choices=("block", "layer", "network"), default="block")
    parser.add_argument("--activation", choices=("softmax", "sigmoid", "softplus"),
                        help="softmax: the paper's gate (weights sum to 1); sigmoid: a weight in (0, 1) per expert; "
                             "softplus: a weight in (0, inf) per expert (a LoRA may act above its trained strength). "
                             "Default: softplus at prior 1 with the concepts' trigger words (--by-trigger), else "
                             "softmax")
    parser.add_argument("--per-position", action="store_true",
                        help="block gates also weigh each image position by its own feature (docs/method.md)")
    parser.add_argument("--timestep-knots", type=int, default=0, metavar="K",
                        help="the denoiser's gates also read the step's noise level: K >= 2 learned logit offsets per "
                             "expert at evenly spaced noise levels, interpolated (default 0: off)")
    parser.add_argument("--balance-weight", type=float, default=0.5, help="alpha of the balance loss (default 0.5)")
    parser.add_argument("--sparsity-weight", type=float, default=0.0,
                        help="beta: cost per unit of expert weight, so a LoRA stays on only where it helps (sigmoid or "
                             "softplus gates; default 0)")
    parser.add_argument("--prior-weights", type=float, nargs="+", metavar="W",
                        help="what the untrained gates return, one per concept (default uniform, NLA; sigmoid needs "
                             "each below 1; softplus: 1 1 1 starts from the plain sum)")
    parser.add_argument("--by-trigger", action=argparse.BooleanOptionalAction, default=None,
                        help="each expert's gate weighs 0 in an image whose prompt lacks its trigger word (the concepts "
                             "file's), so each learns its LoRA's strength from its own concept's images (docs/method.md). "
                             "Default: on unless --activation or --prior-weights is given, a concept has no trigger "
                             "word, or a reference image's caption lacks its concept's; --no-by-trigger trains the "
                             "paper's gates")
    parser.add_argument("--objective", choices=("denoising", "clip", "composition", "distillation"),
                        default="denoising",
                        help="denoising loss on the reference images (default), the paper's CLIP-guided loss, that "
                             "loss on images of the concepts file's [compositions] prompts, every named concept "
                             "pushed, or distillation: on each concept's images the mixture reproduces that "
                             "concept's LoRA alone")
    parser.add_argument("--clip-model",
                        help="for --objective clip/composition: open_clip name (ViT-B-32) or local-dir:PATH")
    parser.add_argument("--clip-pretrained",
                        help="for --objective clip/composition: pretrained tag (openai) or checkpoint file")
    parser.add_argument("--clip-sampling-steps", type=int, default=4, help="unrolled DDIM steps per image (default 4)")
    _add_training_options(parser, steps=400, lr=5e-3, batch_size=2)


def add_train_lora_parser(subparsers) -> None:
    """Options of LoRATrainingConfig and TrainingSettings."""
    parser = _add_command(subparsers, "train-lora", train_lora,
                          "train one concept's LoRA (DreamBooth, on PEFT); --mixer trains a MoSLoRA expert",
                          TRAIN_LORA_EXAMPLE)
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--images", type=Path, required=True, help="folder of the concept's images")
    parser.add_argument("--prompt", required=True, help='instance prompt, e.g. "a photo of sks dog"')
    parser.add_argument("--class-prompt", help="prior preservation: class prompt (with --class-images)")
    parser.add_argument("--class-images", type=Path, help="prior preservation: folder of class images")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    parser.add_argument("--target-modules", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"])
    parser.add_argument("--train-text-encoder", action="store_true", help="also adapt the text encoder's attention")
    parser.add_argument("--mixer", choices=("orthogonal", "kaiming"), help="train MoSLoRA with this mixer init")
    parser.add_argument("--orthogonal-slot", type=int, metavar="K",
                        help="orthogonal adaptation: fix A to slot K of a basis shared by every LoRA trained so (one "
                             "slot per concept), train only B")
    parser.add_argument("--unconditional-weight", type=float, default=0.0, metavar="W",
                        help="hold the LoRA's prediction for the empty prompt to the base model's, with this weight on "
                             "that loss: the concept then rides on the prompt, which guidance scales (default 0: off)")
    _add_training_options(parser, steps=500, lr=1e-4, batch_size=1)


def _add_training_options(parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int) -> None:
    """Options of TrainingSettings, common to train-gates and train-lora."""
    parser.add_argument("--out", dest="output_dir", type=Path, required=True, metavar="OUT",
                        help="output folder (result, checkpoints/, log.csv, validation/)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--learning-rate", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-every", type=_positive, default=100, metavar="K")
    parser.add_argument("--keep-checkpoints", type=_positive, default=3)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--validation-prompt", action="append", dest="validation_prompts", metavar="PROMPT",
                        help="repeat for several (default: the instance prompts)")
    parser.add_argument("--validation-every", type=_positive, default=100, metavar="K")
    parser.add_argument("--validation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--validation-steps", type=int, default=25)


def add_evaluate_parser(subparsers) -> None:
    """Options of EvaluationConfig."""
    parser = _add_command(subparsers, "evaluate", evaluate,
                          "generate the same prompts and seeds under every composition method and score them with CLIP",
                          EVALUATE_EXAMPLE)
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--concepts", type=Path, help="concepts TOML file (its LoRAs, reference images and prompts)")
    parser.add_argument("--lora", dest="loras", action=_NamedValues, type=_lora_arg, metavar="NAME=FILE",
                        help="instead of --concepts: LoRA files (no reference images: text alignment only; needs "
                             "--prompt)")
    parser.add_argument("--gates", type=Path, help="gate file for the mole methods (without it they are skipped)")
    parser.add_argument("--images", dest="image_folders", action=_NamedValues, type=_lora_arg, metavar="NAME=DIR",
                        help="images made elsewhere, scored beside the methods: DIR holds p<prompt index>-s<seed>.png "
                             "for every prompt and seed (repeat; NAME defaults to the folder's name)")
    parser.add_argument("--clip-model", required=True, help="open_clip name (ViT-B-32) or local-dir:PATH")
    parser.add_argument("--clip-pretrained", help="pretrained tag (openai) or checkpoint file for a named model")
    parser.add_argument("--image-model",
                        help="second image backbone for image alignment, e.g. a DINO transformers folder")
    parser.add_argument("--presence-model", metavar="PATH",
                        help="presence judge: columns present_<concept>, present_all (the demo world's judge folder, "
                             "or an OWL-ViT/OWLv2 detector folder queried with each concept's `presence` word, default "
                             "its class_prompt)")
    parser.add_argument("--presence-threshold", type=float, default=0.1,
                        help="a detector's box score that counts as present")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="PROMPT",
                        help="repeat; default: templates over the instance prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", help="default: all that apply (mole, mole_without_<name>, nla, sum, "
                                                     "set_adapters, switch, composite, single_<name>, base)")
    parser.add_argument("--nla-weights", type=float, nargs="+",
                        help="weights for nla and set_adapters (default uniform)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                        help="default: ddpm for SD and SDXL; Flux keeps its flow-matching scheduler")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, help="default: the model's")
    parser.add_argument("--switch-every", type=int, default=1, help="LoRA Switch: steps per LoRA")
    parser.add_argument("--batch-size", type=_positive, default=1,
                        help="images of one method per pipeline call (each from its own seed): faster, more memory")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--out", dest="output_dir", type=Path, required=True, metavar="OUT",
                        help="output folder (results.csv/json, summary.csv, report.md, plots, grid)")


def add_demo_parser(subparsers) -> None:
    parser = _add_command(
        subparsers, "demo", demo,
        "the shipped demo world: composition prompts through base, each LoRA, NLA and MoLE (offline, ~1 min on CPU)",
        "example:\n  mole-diffusion demo --out demo\n\n  Writes demo/grid.png (rows: prompts; columns: methods), "
        "demo/gate_heatmap.png, demo/scores.md and scores.csv (the evaluator's table; its run is in demo/eval).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=_positive, default=25, help="DDIM steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (the grid shows the first)")
    parser.add_argument("--assets", help="a demo world installed by build-demo --assets (default: the shipped one)")


def add_build_demo_parser(subparsers) -> None:
    """Options of BuildSettings, and where the build goes."""
    parser = _add_command(
        subparsers, "build-demo", build_demo,
        "rebuild the demo world from nothing: tiny CLIP, tiny SD, concept LoRAs, gates (~1.5 h on 2 CPU cores)",
        "example:\n  mole-diffusion build-demo --out build/world\n"
        "  mole-diffusion demo --out demo --assets build/world/assets\n\n"
        "  Trains into build/world (a stopped build goes on where it stopped), then installs the shipped files into "
        "--assets (default: build/world/assets). Maintainers refresh the package's own with "
        "--assets mole_diffusion/demo/assets.",
    )
    parser.add_argument("--out", required=True, help="working folder (checkpoints, logs, validation grids)")
    parser.add_argument("--assets", help="where to install the shipped files (default: OUT/assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--unet-channels", type=int, nargs=3, metavar="C",
                        help="the base UNet's widths (default 32 64 64; 64 128 128: 6.5 M parameters, its training "
                             "about 2x as long on CPU)")
    parser.add_argument("--world", choices=("v1", "v2"), help="what the base model learns: v1 (default) solid circles, "
                        "squares and triangles on plain backgrounds; v2 every kind the concepts belong to, with its "
                        "recipe (a 4x UNet attending at 16x16, 64 references per concept; the options below override it)")
    parser.add_argument("--unet-cross-attention", type=int, nargs=3, choices=(0, 1), metavar="0|1",
                        help="whether the UNet attends to the text at 16x16, 8x8 and 4x4 (default 0 1 1)")
    parser.add_argument("--text-width", type=int, help="the text encoder's width (default 32)")
    parser.add_argument("--concept-images", type=int, help="reference images per concept (default 16)")
    parser.add_argument("--lora-steps", type=int, help="training steps of each concept LoRA (default 2000)")
    parser.add_argument("--lora-unconditional-weight", type=float, metavar="W",
                        help="train-lora's --unconditional-weight for each concept LoRA (default 0: off)")


def add_ui_parser(subparsers) -> None:
    parser = _add_command(subparsers, "ui", ui,
                          'an app in the browser: mask experts, move weights, compare methods (needs pip install -e ".[ui]")',
                          UI_EXAMPLE, check=_check_ui)
    parser.add_argument("--base", help=f"{BASE_HELP} (default: the shipped demo world)")
    parser.add_argument("--lora", action="append", type=_lora_arg, metavar="NAME=FILE",
                        help="with --base: a LoRA expert (repeat for each; NAME defaults to the file stem)")
    parser.add_argument("--gates", help="with --base: gate file from train-gates (default: untrained, uniform)")
    parser.add_argument("--trigger", action="append", type=_trigger_arg, metavar="NAME=WORDS",
                        help="with --base: an expert's trigger word(s) in prompts, for regional routing (one for "
                             "every expert)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                        help="default: the checkpoint's own (ddim for the demo world)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", help="default: cuda if available, else cpu")


def add_tiny_checkpoint_parser(subparsers) -> None:
    parser = _add_command(
        subparsers, "tiny-checkpoint", tiny_checkpoint,
        "write a tiny random SD, SDXL or Flux checkpoint and two LoRAs (offline; for tests and CI)",
        "example:\n  mole-diffusion tiny-checkpoint tiny --family sdxl\n  "
        "mole-diffusion generate --base tiny/pipeline --lora tiny/dog.safetensors --lora tiny/hat.safetensors "
        "--prompt 'a dog in a hat' --steps 4 --out tiny.png",
    )
    parser.add_argument("out", help="folder to write: pipeline/, dog.safetensors (diffusers), hat.safetensors (kohya), "
                                    "images/dog, images/hat and concepts.toml (for train-lora / train-gates)")
    parser.add_argument("--family", choices=["sd", "sdxl", "flux"], default="sd",
                        help="Stable Diffusion 1.x (default), SDXL (two text encoders) or Flux "
                             "(a FluxTransformer2DModel)")


class _NamedValues(argparse.Action):
    """A repeated NAME=VALUE option (``type`` gives the pair) as {name: value}; a name given twice keeps the last."""

    def __call__(self, parser, namespace, pair, option_string=None):
        name, value = pair
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), name: value})


def _trigger_arg(value: str) -> tuple[str, str]:
    name, sep, words = value.partition("=")
    if not sep or not name or not words.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=WORDS, got {value!r}")
    return name, words.strip()


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _check_image_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Refuse an --out that no image can be written to before any model loads: a folder, a type Pillow does not
    write, a folder that cannot be made or written."""
    from PIL import Image

    Image.init()
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give an image file name, e.g. {out / 'image.png'}")
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:
        parser.error(f"--out {out}: {out.suffix or 'no extension'} is not an image type Pillow writes (use .png, .jpg, .webp)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        parser.error(f"--out {out}: cannot write in {out.parent} ({e.strerror or e})")


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse a device torch does not know or this machine does not have, before any model loads."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        parser.error(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {e}")
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if parsed.type == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        parser.error(f"--device {device}: this machine has no {parsed.type} device (use cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        parser.error(f"--device {device}: this machine has {count} {parsed.type} device(s), numbered from 0")


Config = TypeVar("Config")


def _config_from(cls: type[Config], args: argparse.Namespace, **values) -> Config:
    """A ``cls`` config dataclass from the options whose dest is one of its fields; an option left out (None)
    leaves its field at the config's default. ``values``: the fields no option sets (a nested config)."""
    from dataclasses import MISSING, fields

    for field in fields(cls):
        if field.init and field.name not in values and hasattr(args, field.name):
            value = getattr(args, field.name)
            if value is not None or (field.default is MISSING and field.default_factory is MISSING):
                values[field.name] = value
    return cls(**values)


def train_gates(args: argparse.Namespace) -> Path:
    from .config import GateConfig
    from .train import GateTrainingConfig
    from .train import train_gates as run

    path = run(_config_from(GateTrainingConfig, args, gate=_config_from(GateConfig, args)))
    _print_once(f"wrote {path}")
    return path


def train_lora(args: argparse.Namespace) -> Path:
    from .train import LoRATrainingConfig
    from .train import train_lora as run

    path = run(_config_from(LoRATrainingConfig, args))
    _print_once(f"wrote {path}")
    return path


def _print_once(message: str) -> None:
    """Print from the main process only: under `accelerate launch` every process runs the command."""
    from accelerate import PartialState

    PartialState().print(message)


def evaluate(args: argparse.Namespace) -> Path:
    from .eval.evaluate import EvaluationConfig
    from .eval.evaluate import evaluate as run
    from .eval.report import headline_table, read_summary

    out = run(_config_from(EvaluationConfig, args))
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate launch, one summary
        print(headline_table(read_summary(out / "summary.csv")))
        print(f"\nwrote {out}/report.md (the full report), results.csv, results.json, summary.csv, paired.csv, grid.png, plot_*.png")
    return out


def tiny_checkpoint(args: argparse.Namespace) -> None:
    from .testing import make_concept_images, make_tiny_lora, make_tiny_pipeline

    out = Path(args.out)
    base = make_tiny_pipeline(out / "pipeline", family=args.family)
    print(f"wrote {base}")
    for name, layout, seed in (("dog", "diffusers", 1), ("hat", "kohya", 2)):
        print(f"wrote {make_tiny_lora(base, out / f'{name}.safetensors', rank=4, alpha=4, seed=seed, layout=layout)}")
    concepts = []
    for name, shape, colour in (("dog", "circle", (200, 120, 40)), ("hat", "square", (40, 60, 200))):
        folder = make_concept_images(out / "images" / name, shape, colour, count=4, size=32, seed=len(concepts))
        concepts.append(f'[[concepts]]\nname = "{name}"\nlora = "{name}.safetensors"\nimages = "images/{name}"\n'
                        f'prompt = "a photo of sks {name}"\n')
        print(f"wrote {folder}")
    (out / "concepts.toml").write_text("\n".join(concepts))
    print(f"wrote {out / 'concepts.toml'}")


def generate(args: argparse.Namespace) -> list[Path]:
    import torch

    from .errors import load_base_pipeline
    from .pipelines import mole_pipeline_class

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    pipe = load_base_pipeline(mole_pipeline_class(args.base), args.base, dtype=dtype, safety_checker=None)
    if args.scheduler:
        use_scheduler(pipe, args.scheduler)
    from .config import GateConfig
    from .gate_file import gate_kind

    pipe.load_experts(dict(args.lora), gate_config=gate_kind(args.gates) if args.gates else _config_from(GateConfig, args))
    if args.gates:
        pipe.load_gates(args.gates)
    if args.trigger:  # each expert at its weight (default 1) where its trigger points; masked experts stay off
        active = args.experts or pipe.expert_names
        weights = dict(zip(active, args.weights or [1.0] * len(active)))
        pipe.enable_regional_routing(dict(args.trigger), [weights.get(name, 0.0) for name in pipe.expert_names])
        if args.experts:
            pipe.set_experts(args.experts)
    elif args.weights is not None:
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


def demo(args: argparse.Namespace) -> None:
    from .demo.run import ASSETS, run_demo
    from .eval.report import headline_table, read_summary

    out = run_demo(args.out, steps=args.steps, seeds=tuple(args.seeds), assets=Path(args.assets) if args.assets else ASSETS)
    print(headline_table(read_summary(out / "scores.csv")) + "\n")
    for name in ("grid.png", "gate_heatmap.png", "expert_maps.png", "scores.md", "scores.csv"):
        print(f"wrote {out / name}")
    print(f"(scores.md is the full report; {out / 'eval'} holds every image and its scores)")


def ui(args: argparse.Namespace) -> None:
    from .ui import Studio, import_gradio, launch

    import_gradio()  # a missing Gradio is said before the models load
    if args.base:
        studio = Studio(args.base, dict(args.lora), args.gates, dict(args.trigger or []), scheduler=args.scheduler,
                        device=args.device)
    else:
        studio = Studio.demo(device=args.device, scheduler=args.scheduler or "ddim")
    launch(studio, host=args.host, port=args.port)


def build_demo(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .demo.build import BuildSettings, build, install_assets

    given = {f.name: getattr(args, f.name) for f in fields(BuildSettings)
             if f.name != "world" and getattr(args, f.name, None) is not None}
    root = build(args.out, BuildSettings.for_world(args.world or "v1", **given))
    print(f"installed the demo world in {install_assets(root, Path(args.assets) if args.assets else root / 'assets')}")


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    names = [name for name, _ in args.lora]
    if len(set(names)) != len(names):
        parser.error(f"--lora names must differ, got {names}")
    unknown = [n for n in args.experts or [] if n not in names]
    if unknown:
        parser.error(f"--experts {unknown} not among the --lora names {names}")
    if args.experts and len(set(args.experts)) != len(args.experts):
        parser.error(f"--experts names an expert twice: {args.experts}")
    if args.weights is not None and len(args.weights) != len(args.experts or names):
        parser.error(f"--weights has {len(args.weights)} values for {len(args.experts or names)} experts")
    if not all(math.isfinite(w) for w in args.weights or []):
        parser.error(f"--weights must be finite numbers, got {args.weights}")
    if args.trigger:
        if args.gates:
            parser.error("--trigger routes by region instead of gates: give --gates or --trigger, not both")
        triggered = [name for name, _ in args.trigger]
        if sorted(set(triggered)) != sorted(names):
            parser.error(f"--trigger needs one NAME=WORDS for every --lora name {names}, got {triggered}")
    _check_image_out(parser, Path(args.out))
    for option, size in (("--height", args.height), ("--width", args.width)):  # as diffusers' pipeline requires
        if size is not None and (size < 8 or size % 8):
            parser.error(f"{option} must be a positive multiple of 8, got {size}")


def _check_ui(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [option for option, value in (("--lora", args.lora), ("--gates", args.gates), ("--trigger", args.trigger)) if value]
    if given and not args.base:
        parser.error(f"{', '.join(given)} need --base (without --base the app opens the shipped demo world)")
    if args.base and not args.lora:
        parser.error("--base needs at least one --lora NAME=FILE")
    names = [name for name, _ in args.lora or []]
    if len(set(names)) != len(names):
        parser.error(f"--lora names must differ, got {names}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_options is not None:
        args.check_options(parser, args)
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps must be at least 1")
    prior = getattr(args, "prior_weights", None) or []
    if not all(math.isfinite(w) and w > 0 for w in prior):
        parser.error(f"--prior-weights must be positive finite numbers, got {prior}")
    if getattr(args, "device", None):
        _check_device(parser, args.device)
    from .errors import MoLEError

    try:
        args.run_command(args)
    except MoLEError as e:  # bad files, concepts, options and refusals; anything else is a bug: its traceback shows
        print(f"mole-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
