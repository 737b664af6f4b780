"""``mole-diffusion demo --out DIR``: the shipped world's composition prompts through base, each LoRA, NLA, the
plain sum, regional routing and MoLE (and MoLE with each concept masked), scored by the shipped tiny CLIP and,
for which concepts each image shows, by the shipped attribute judge. Offline, a minute or so on CPU.

The shipped files (``ASSETS``) are built by ``mole-diffusion build-demo``; ``assets/manifest.json`` lists
each with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from ..errors import MoLEError
from ..eval.evaluate import EvaluationConfig, evaluate
from .world import CONCEPTS, composition_prompts

if TYPE_CHECKING:
    import torch

ASSETS = Path(__file__).parent / "assets"


# what the demo reads; a manifest without them is not a demo world
NEEDED = ("pipeline/model_index.json", "clip/open_clip_config.json", "clip/open_clip_model.safetensors", "concepts.toml",
          "gates.safetensors", "judge/config.json", "judge/model.safetensors")


class AssetsError(MoLEError, OSError):
    """The demo's shipped files are missing or changed."""


def check_assets(assets: Path = ASSETS) -> dict[str, str]:
    """The manifest lists every file there (and the ones the demo needs), each with its sha256; returns
    {relative path: sha256}."""
    assets = Path(assets)
    manifest = assets / "manifest.json"
    if not manifest.is_file():
        how = "reinstall mole-diffusion, or build it with `mole-diffusion build-demo --out build/world`" if assets == ASSETS \
            else "install one there with `mole-diffusion build-demo --out build/world --assets DIR`"
        raise AssetsError(f"{manifest} not found: no demo world in {assets} ({how})")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict):
        raise AssetsError(f"{manifest}: expected JSON {{\"files\": {{relative path: sha256}}}}")
    missing = [name for name in NEEDED if name not in files]
    if missing:
        raise AssetsError(f"{manifest} does not list {missing}: not a demo world")
    unlisted = sorted(p.relative_to(assets).as_posix() for p in assets.rglob("*") if p.is_file() and p != manifest)
    unlisted = [name for name in unlisted if name not in files]
    if unlisted:
        raise AssetsError(f"{assets}: {unlisted} not listed in {manifest} (files added after the install?)")
    for name, digest in files.items():
        path = assets / name
        if not path.is_file():
            raise AssetsError(f"{path}: listed in {manifest} but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise AssetsError(f"{path}: sha256 differs from {manifest} (a changed or corrupt file)")
    return files


def demo_methods() -> list[str]:
    names = list(CONCEPTS)
    return ["base", *(f"single_{n}" for n in names), "nla", "sum", "regional", "mole", *(f"mole_without_{n}" for n in names)]


def run_demo(out: str | Path, steps: int = 25, seeds: tuple[int, ...] = (0,), guidance_scale: float = 5.0,
             assets: Path = ASSETS, progress: bool = True) -> Path:
    """Write ``grid.png``, ``gate_heatmap.png``, ``expert_maps.png`` (where regional routing let each expert act),
    ``scores.md`` / ``scores.csv`` and the evaluator's folder ``eval/``."""
    check_assets(assets)
    out = Path(out)
    prompts, methods = composition_prompts(), demo_methods()
    evaluate(EvaluationConfig(
        base=str(assets / "pipeline"), concepts=assets / "concepts.toml", gates=assets / "gates.safetensors",
        output_dir=out / "eval", clip_model=f"local-dir:{assets / 'clip'}", prompts=prompts, seeds=list(seeds),
        methods=methods, scheduler="ddim", steps=steps, guidance_scale=guidance_scale, progress=progress,
        presence_model=str(assets / "judge"), batch_size=8,  # 64-pixel images: a batch of 8 costs little memory
    ))
    labelled_grid(out / "eval" / "images", prompts, methods, seeds[0]).save(out / "grid.png")
    expert_maps(out / "eval" / "images" / "regional", prompts, list(CONCEPTS), seeds[0]).save(out / "expert_maps.png")
    shutil.copyfile(out / "eval" / "gate_heatmap.png", out / "gate_heatmap.png")
    shutil.copyfile(out / "eval" / "summary.csv", out / "scores.csv")
    shutil.copyfile(out / "eval" / "report.md", out / "scores.md")
    return out


def labelled_grid(images: Path, prompts: list[str], methods: list[str], seed: int, scale: int = 2) -> Image.Image:
    """Rows: prompts; columns: methods; each image enlarged ``scale`` times (nearest neighbour), labels in the margins."""
    tiles = [[Image.open(images / m / f"p{p}-s{seed}.png").convert("RGB") for m in methods] for p in range(len(prompts))]
    side = tiles[0][0].width * scale
    pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, gap = 12 + int(max(pen.textlength(p) for p in prompts)), 28, 4
    grid = Image.new("RGB", (left + len(methods) * (side + gap), top + len(prompts) * (side + gap)), "white")
    pen = ImageDraw.Draw(grid)
    for column, method in enumerate(methods):
        x = left + column * (side + gap)
        pen.text((x + 2, 4), method.replace("mole_without_", "mole w/o ").replace("single_", "lora "), fill="black")
    for row, prompt in enumerate(prompts):
        y = top + row * (side + gap)
        pen.text((4, y + side // 2 - 6), prompt, fill="black")
        for column, tile in enumerate(tiles[row]):
            grid.paste(tile.resize((side, side), Image.NEAREST), (left + column * (side + gap), y))
    return grid


def expert_maps(images: Path, prompts: list[str], names: list[str], seed: int, side: int = 96) -> Image.Image:
    """Rows: prompts; columns: the regional image, then each expert's mask at the last step (white: it acts there,
    black: it does not)."""
    from safetensors.torch import load_file

    rows = []
    for row, prompt in enumerate(prompts):
        image = images / f"p{row}-s{seed}.png"
        rows.append((prompt, Image.open(image), load_file(str(image.with_suffix(".masks.safetensors")))["masks"]))
    return expert_map_sheet(rows, names, side)


def expert_map_sheet(rows: list[tuple[str, Image.Image, torch.Tensor]], names: list[str], side: int = 96) -> Image.Image:
    """``expert_maps`` from memory (also the app's): rows of (prompt, regional image, masks (N, H, W))."""
    pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, gap = 12 + int(max(pen.textlength(p) for p, _, _ in rows)), 28, 4
    sheet = Image.new("RGB", (left + (len(names) + 1) * (side + gap), top + len(rows) * (side + gap)), "white")
    pen = ImageDraw.Draw(sheet)
    for column, label in enumerate(["regional", *names]):
        pen.text((left + column * (side + gap) + 2, 4), label, fill="black")
    for row, (prompt, image, masks) in enumerate(rows):
        y = top + row * (side + gap)
        pen.text((4, y + side // 2 - 6), prompt, fill="black")
        sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (left, y))
        for column, mask in enumerate(masks, 1):
            tile = Image.fromarray((mask.clamp(0, 1) * 255).byte().numpy(), mode="L").resize((side, side), Image.NEAREST)
            x = left + column * (side + gap)
            sheet.paste(tile.convert("RGB"), (x, y))
            pen.rectangle((x - 1, y - 1, x + side, y + side), outline="grey")  # a white (everywhere) mask shows too
    return sheet
