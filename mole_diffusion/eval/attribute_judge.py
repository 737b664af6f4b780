"""Attribute judges: small supervised image classifiers that read, per image, one value of each attribute (the
demo world's: shape, colour, style, background) and, with an object map, whether the picture holds one compact
object. ``eval.presence.AttributeJudgePresence`` turns a judge's readings into which concepts an image shows.

A judge is a folder: ``config.json`` (format ``mole-diffusion-attribute-judge``, the attributes and their values,
the layer widths, which attribute value each concept is, the resolution images are read at) and
``model.safetensors``. The demo world trains one on its exact labels (``demo/judge.py``, ``mole-diffusion
build-demo``); any labelled set of pictures could train another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MoLEError
from ..files import write_atomically

FORMAT = "mole-diffusion-attribute-judge"


class AttributeJudge(nn.Module):
    """Four stages of two convolutions (each stage halving the side), global mean and max pooling, then one
    linear head per attribute; and (``object_mask``) a map of where the object is, on the 16 x 16 grid, from the
    last three stages.

    Global pooling makes the attribute heads blind to where the shape is; the 4-pixel shifts in training make them
    blind to where stripes and checker cells fall on the pixel grid. The object map is what sees the layout: a
    scene of the world has one compact object (6-41% of the image), a texture has none or many.
    """

    def __init__(self, attributes: Mapping[str, Sequence[str]], widths: tuple[int, ...] = (32, 64, 96, 128),
                 object_mask: bool = True):
        super().__init__()
        self.attributes = {a: tuple(v) for a, v in attributes.items()}
        self.widths = tuple(widths)
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({a: nn.Linear(2 * channels, len(v)) for a, v in self.attributes.items()})
        # one 1x1 convolution per stage from the second on, summed on the second stage's grid
        self.object_mask = nn.ModuleList([nn.Conv2d(w, 1, 1) for w in widths[1:]]) if object_mask else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) in [0, 1] -> {attribute: logits (B, values)}, and ``object``: logits (B, H/4, W/4)
        of each cell being the object's, when the judge has the map."""
        maps, stages = images * 2 - 1, []
        for layer in self.features:
            maps = layer(maps)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(maps)
        # mean and max over positions: the mean reads colours and textures, the max a corner or a point wherever it is
        features = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        logits = {a: head(features) for a, head in self.heads.items()}
        if self.object_mask is not None:
            grid = stages[1].shape[-2:]
            logits["object"] = sum(F.interpolate(conv(stage), grid, mode="bilinear", align_corners=False) if i else conv(stage)
                                   for i, (conv, stage) in enumerate(zip(self.object_mask, stages[1:])))[:, 0]
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[Image.Image]) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image."""
        if isinstance(images, list):
            images = pil_to_tensor(images)
        param = next(self.parameters())
        logits = self(images.to(param.device, param.dtype))
        picks = {a: logits[a].argmax(dim=-1).tolist() for a in self.attributes}
        read = [{a: self.attributes[a][picks[a][i]] for a in self.attributes} for i in range(len(images))]
        if "object" in logits:  # no single compact object: no shape, whatever the shape head says
            for values, cells in zip(read, logits["object"].sigmoid() > 0.5):
                if not one_object(cells):
                    values["shape"] = "none"
        return read

    @torch.no_grad()
    def locate(self, images: torch.Tensor | list[Image.Image]) -> list[tuple[float, float] | None]:
        """Where each image's object is: the centre of the cells its object map marks, as fractions of the side
        (x, y), or None where the map shows no single compact object. How far generated objects move from seed
        to seed tells a LoRA that keeps the base's varied layouts from one that redraws a training picture."""
        if self.object_mask is None:
            raise MoLEError("this attribute judge has no object map, so it cannot say where an object is")
        if isinstance(images, list):
            images = pil_to_tensor(images)
        param = next(self.parameters())
        centres = []
        for cells in self(images.to(param.device, param.dtype))["object"].sigmoid() > 0.5:
            if not one_object(cells):
                centres.append(None)
                continue
            rows, cols = torch.nonzero(cells, as_tuple=True)
            height, width = cells.shape
            centres.append(((cols.float().mean().item() + 0.5) / width, (rows.float().mean().item() + 0.5) / height))
        return centres

    def save(self, folder: str | Path, concepts: Mapping[str, tuple[str, str]], resolution: int) -> Path:
        """Write ``config.json`` (the attributes and their values, the layer widths, which attribute value each of
        ``concepts`` is, the ``resolution`` images are read at) and ``model.safetensors`` to ``folder``, each file
        whole or not there."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "attributes": self.attributes, "widths": self.widths, "object_mask": self.object_mask is not None,
                  "concepts": {c: list(v) for c, v in concepts.items()}, "resolution": resolution}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_atomically(folder / "model.safetensors", lambda temporary: save_file(state, str(temporary)))
        write_atomically(folder / "config.json", lambda temporary: temporary.write_text(json.dumps(config, indent=1)))
        return folder


def one_object(cells: torch.Tensor, smallest: float = 0.03, largest: float = 0.6, whole: float = 0.8) -> bool:
    """Whether a boolean object map (H, W) shows one compact object: its largest 4-connected region covers
    ``smallest``-``largest`` of the image (the world's objects cover 6-41%) and at least ``whole`` of all the
    cells marked object."""
    cells = cells.cpu().tolist()
    height, width, seen, sizes = len(cells), len(cells[0]), set(), []
    for start in ((y, x) for y in range(height) for x in range(width) if cells[y][x]):
        if start in seen:
            continue
        seen.add(start)
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for near in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= near[0] < height and 0 <= near[1] < width and cells[near[0]][near[1]] and near not in seen:
                    seen.add(near)
                    stack.append(near)
        sizes.append(size)
    biggest = max(sizes, default=0)
    return smallest * height * width <= biggest <= largest * height * width and biggest >= whole * sum(sizes)


def is_judge_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an attribute judge: its ``config.json`` names the format."""
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def load_judge(folder: str | Path, device: str | torch.device = "cpu") -> tuple[AttributeJudge, dict]:
    """The judge in ``folder`` and its config (which holds ``concepts``: {concept: [attribute, value]})."""
    folder = Path(folder)
    if not is_judge_folder(folder):
        raise MoLEError(f"{folder}: no attribute judge here (expected config.json with format {FORMAT!r} "
                                "and model.safetensors; build one with `mole-diffusion build-demo`)")
    config = json.loads((folder / "config.json").read_text())
    judge = AttributeJudge(config["attributes"], tuple(config["widths"]), config.get("object_mask", False))
    judge.load_state_dict(load_file(str(folder / "model.safetensors")))
    return judge.eval().to(device), config


def pil_to_uint8(images: list[Image.Image], resolution: int = 64) -> torch.Tensor:
    """(B, 3, resolution, resolution) uint8."""
    arrays = [torch.frombuffer(bytearray(i.convert("RGB").resize((resolution, resolution), Image.BICUBIC).tobytes()),
                               dtype=torch.uint8).view(resolution, resolution, 3) for i in images]
    return torch.stack(arrays).permute(0, 3, 1, 2)


def pil_to_tensor(images: list[Image.Image], resolution: int = 64) -> torch.Tensor:
    """(B, 3, resolution, resolution) in [0, 1]."""
    return pil_to_uint8(images, resolution).float() / 255
