"""Is each concept of a prompt in the image? Presence judges and presence rates.

CLIP scores track human judgement of multi-concept images poorly (ComposLoRA); a rate of images that show
every concept, from a judge that no method trained against, says whether a composition worked.

A judge answers, per image, {concept: present?}. Two kinds:
- ``AttributeJudgePresence``: an attribute classifier (``attribute_judge.py``; the demo world trains one,
  ``demo/judge.py``), which knows which attribute value each concept is (the star is a shape, stripes a style,
  the checkerboard a background);
- ``DetectorPresence``: a transformers zero-shot object detector folder (OWL-ViT, OWLv2), asked for each
  concept's ``presence`` word (default: its class prompt); present when its best box scores over a threshold.
Rates come with Wilson 95% intervals (never "0% ± 0%").

A judge can be fooled out of its training distribution: on the demo world, gates trained on the composition
prompts drew saturated checker-and-stripe textures in which the attribute judge "saw" all three concepts. So a
judge may also say whether an image keeps the rest of its prompt (the second value ``read`` returns; the
attribute judge: an object in the colour the prompt gives it), and ``present_all_faithful`` counts an image only
where it keeps its prompt and shows every concept. Since the colour alone still let textures in the prompt's
colours through, the attribute judge now also knows pictures of no single object (shape ``none``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..concepts import Concept
from ..errors import MoLEError
from ..quiet import quiet_loading
from .attribute_judge import is_judge_folder, load_judge, pil_to_tensor


class PresenceError(MoLEError):
    """A presence model that cannot judge these concepts."""


class PresenceJudge(Protocol):
    concepts: list[str]

    def read(self, images: list[Image.Image], prompts: list[str]) -> list[tuple[dict[str, bool], bool | None]]:
        """Per image, {concept name: whether the judge sees it}, and whether the image keeps the rest of its
        prompt (None: the judge cannot tell)."""
        ...


class AttributeJudgePresence:
    """An attribute judge (``attribute_judge.py``, such as the demo world's): concept k is present when the judge
    reads k's attribute value."""

    def __init__(self, folder: str | Path, concepts: list[str], device: str = "cpu"):
        self.judge, config = load_judge(folder, device)
        unknown = [c for c in concepts if c not in config["concepts"]]
        if unknown:
            raise PresenceError(f"{folder}: the attribute judge knows concepts {sorted(config['concepts'])}, not {unknown}")
        self.concepts = list(concepts)
        self.attribute = {c: tuple(config["concepts"][c]) for c in concepts}
        self.resolution = config["resolution"]  # written by AttributeJudge.save

    def read(self, images: list[Image.Image], prompts: list[str]) -> list[tuple[dict[str, bool], bool | None]]:
        """One pass of the judge: each concept's attribute value, and whether the image keeps its prompt: an
        object is there (where the judge can say there is none) in the colour the prompt gives it (the world's
        captions name it first: "a red sks on a qkx background"; None where the prompt names no colour the judge
        knows)."""
        colours = self.judge.attributes["colour"]
        named = [next((w for w in re.findall(r"[a-z]+", p.lower()) if w in colours), None) for p in prompts]
        predicted = self.judge.predict(pil_to_tensor(images, self.resolution))
        return [({c: p[self.attribute[c][0]] == self.attribute[c][1] for c in self.concepts},
                 None if colour is None else p["colour"] == colour and p["shape"] != "none")
                for p, colour in zip(predicted, named)]


class DetectorPresence:
    """A zero-shot object detector (transformers ``AutoModelForZeroShotObjectDetection``: OWL-ViT, OWLv2)
    queried with one text per concept; concept k is present when some box scores >= ``threshold`` for it."""

    def __init__(self, folder: str | Path, queries: dict[str, str], threshold: float = 0.1, device: str = "cpu"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        with quiet_loading():  # no "Loading weights" bar before the evaluator's own
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval().to(device)
        self.concepts, self.queries, self.threshold, self.device = list(queries), list(queries.values()), threshold, device

    @torch.no_grad()
    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """(images, concepts): each query's best box score (sigmoid of its logit)."""
        inputs = self.processor(text=[self.queries] * len(images), images=[i.convert("RGB") for i in images],
                                return_tensors="pt", padding=True).to(self.device)
        return self.model(**inputs).logits.sigmoid().amax(dim=1).float().cpu()

    def present(self, images: list[Image.Image]) -> list[dict[str, bool]]:
        scores = self.scores(images)
        return [{c: bool(scores[i, j] >= self.threshold) for j, c in enumerate(self.concepts)} for i in range(len(images))]

    def read(self, images: list[Image.Image], prompts: list[str]) -> list[tuple[dict[str, bool], bool | None]]:
        return [(seen, None) for seen in self.present(images)]  # a detector cannot tell whether the prompt is kept


def load_presence_judge(path: str | Path, concepts: list[Concept], device: str = "cpu", threshold: float = 0.1) -> PresenceJudge:
    """An attribute-judge folder (the demo world's) or a zero-shot detector folder."""
    path = Path(path)
    if not path.is_dir():
        raise PresenceError(f"presence model {path} not found (expected a folder: the demo world's judge, or an "
                                "OWL-ViT / OWLv2 detector saved with save_pretrained)")
    if is_judge_folder(path):
        return AttributeJudgePresence(path, [c.name for c in concepts], device)
    missing = [c.name for c in concepts if not c.presence]
    if missing:
        raise PresenceError(f"concepts {missing} have no detector query: give each a `presence` (or `class_prompt`) "
                         "in the concepts file")
    return DetectorPresence(path, {c.name: c.presence for c in concepts}, threshold, device)


def judged_row(judge: PresenceJudge, image: Image.Image, prompt: str, composed: list[str], active: list[str]) -> dict[str, float]:
    """``presence_row`` of one image, read by ``judge``."""
    present, kept = judge.read([image], [prompt])[0]
    return presence_row(present, composed, active, kept)


def presence_row(present: dict[str, bool], composed: list[str], active: list[str], kept: bool | None = None) -> dict[str, float]:
    """``present_<concept>`` (0/1) for each judged concept, ``present_all``: every concept the prompt composes,
    and ``present_active``: every one of those that the method did not mask (== present_all when none is).
    With ``kept`` (the judge's word on whether the image keeps the rest of its prompt): ``present_prompt`` and
    ``present_all_faithful``, every concept and the prompt kept."""
    row = {f"present_{name}": float(value) for name, value in present.items()}
    if kept is not None:
        row["present_prompt"] = float(kept)
    if composed:
        row["present_all"] = float(all(present[n] for n in composed))
        if kept is not None:
            row["present_all_faithful"] = float(kept and row["present_all"] == 1.0)
    if any(n in active for n in composed):  # the base model means to draw none
        row["present_active"] = float(all(present[n] for n in composed if n in active))
    return row
