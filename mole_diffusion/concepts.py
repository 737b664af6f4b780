"""Concepts files (TOML) and their image folders, and which concepts a prompt names (read by training and by
evaluation alike).

    [[concepts]]
    name = "dog"
    lora = "loras/dog.safetensors"       # the concept's expert, a file or folder (gate training only)
    images = "data/dog"                  # its reference images
    prompt = "a photo of sks dog"        # its instance prompt
    class_prompt = "a photo of a dog"    # optional, DreamBooth prior preservation
    class_images = "data/dogs"           # optional, with class_prompt
    presence = "dog"                     # optional: what a detector is asked to find (default: class_prompt)
    trigger = "sks"                      # optional: the word(s) that name the concept (default: found from prompt)

    [compositions]
    prompts = ["a photo of sks dog wearing a hat"]   # optional: prompts that combine the concepts

Relative paths are read relative to the concepts file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .config import text_words
from .errors import MoLEError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FIELDS = ("name", "lora", "images", "prompt", "class_prompt", "class_images", "presence", "trigger")


class ConceptError(MoLEError):
    """A concepts file, or an image folder it names, that cannot be used as it is."""


@dataclass
class Concept:
    name: str
    prompt: str
    images: Path | None  # None only for evaluation from bare LoRA files
    lora: Path | None = None
    class_prompt: str | None = None
    class_images: Path | None = None
    presence: str | None = None  # the detector query for "is it in the image"; default: class_prompt
    trigger: str | None = None  # the word(s) in a prompt that stand for the concept; default: trigger_words()


# words that never name a concept on their own (what is left of an instance prompt once these go is its trigger)
COMMON_WORDS = frozenset("a an the of in on with and at by to for photo picture image style shape background".split())


def trigger_words(concept: Concept, others: list[Concept]) -> list[str]:
    """The words of ``concept``'s instance prompt that name it: its ``trigger`` field, or else the prompt's
    words that are not in its class prompt, not in another concept's prompt and not common words
    ("a photo of sks dog" with class prompt "a photo of a dog" -> ["sks"])."""
    if concept.trigger:
        return text_words(concept.trigger)
    shared = set(text_words(concept.class_prompt or "")) | COMMON_WORDS
    for other in others:
        if other is not concept:
            shared |= set(text_words(other.prompt))
    words = [w for w in text_words(concept.prompt) if w not in shared]
    if not words:
        raise ConceptError(f"concept {concept.name!r}: no word of its prompt {concept.prompt!r} names it alone; "
                           "give its trigger word in the concepts file (trigger = \"...\")")
    return words


def concept_triggers(concepts: list[Concept]) -> dict[str, list[str]] | None:
    """Each concept's trigger words (for regional routing and presence), or None when some concept has none
    (bare LoRA files)."""
    try:
        return {c.name: trigger_words(c, concepts) for c in concepts}
    except ConceptError:
        return None


def composed_concepts(prompt: str, triggers: dict[str, list[str]] | None) -> list[str]:
    """The concepts a prompt asks for: those whose trigger words (``triggers``: {name: ``trigger_words``}) it
    contains (none known: [])."""
    words = set(text_words(prompt))
    return [name for name, trigger in (triggers or {}).items() if all(w in words for w in trigger)]


def load_compositions(path: str | os.PathLike) -> list[str]:
    """The ``[compositions] prompts`` of a concepts file (empty when it has none)."""
    path = Path(path)
    table = tomllib.loads(path.read_text()).get("compositions", {})
    prompts = table.get("prompts", []) if isinstance(table, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConceptError(f"{path}: [compositions] prompts must be a list of non-empty strings")
    return prompts


def load_concepts(path: str | os.PathLike, need_lora: bool = True) -> list[Concept]:
    """Read and check a concepts file: every field, folder, image and LoRA file it names."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"{path}: concepts file not found")
    try:
        entries = tomllib.loads(path.read_text()).get("concepts")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConceptError(f"{path}: not a valid TOML file ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise ConceptError(f"{path}: expected one or more [[concepts]] tables with name, lora, images, prompt")

    concepts, seen = [], set()
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ConceptError(f"{path}: concepts entry #{number} is not a table (write it as [[concepts]] with fields)")
        where = f"{path}: concept {entry.get('name', f'#{number}')!r}"
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
            raise ConceptError(f"{where}: unknown field {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; a concept's fields are {', '.join(FIELDS)}")
        required = ("name", "images", "prompt") + (("lora",) if need_lora else ())
        for field in required:
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise ConceptError(f"{where}: field {field!r} is missing (expected a non-empty string)")
        if entry["name"] in seen:
            raise ConceptError(f"{where}: duplicate name (each concept needs its own)")
        seen.add(entry["name"])
        if ("class_prompt" in entry) != ("class_images" in entry):
            raise ConceptError(f"{where}: class_prompt and class_images go together (prior preservation needs both)")
        concept = Concept(
            name=entry["name"],
            prompt=entry["prompt"],
            images=path.parent / entry["images"],
            lora=path.parent / entry["lora"] if entry.get("lora") else None,
            class_prompt=entry.get("class_prompt"),
            class_images=path.parent / entry["class_images"] if "class_images" in entry else None,
            presence=entry.get("presence") or entry.get("class_prompt"),
            trigger=entry.get("trigger"),
        )
        for field in ("presence", "trigger"):
            if field in entry and (not isinstance(entry[field], str) or not entry[field].strip()):
                raise ConceptError(f"{where}: field {field!r} must be a non-empty string")
        if need_lora and not concept.lora.exists():  # a LoRA file, or a folder holding one
            raise ConceptError(f"{where}: field 'lora': {concept.lora} not found")
        list_images(concept.images, f"{where}: field 'images'")
        if concept.class_images is not None:
            list_images(concept.class_images, f"{where}: field 'class_images'")
        concepts.append(concept)
    return concepts


def list_images(folder: str | os.PathLike, where: str = "") -> list[Path]:
    """The images in ``folder`` (sorted), each checked to be readable."""
    folder = Path(folder)
    where = where or str(folder)
    if not folder.is_dir():
        raise ConceptError(f"{where}: folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConceptError(f"{where}: no images in {folder} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ConceptError(f"{where}: cannot read image {file} ({err})") from None
    return files
