"""Tokenizers built offline, with no hub to download them from: the real CLIP BPE tokenizer, from the vocabulary
file that ships inside ``open_clip``. The demo world's pipeline (``demo/build.py``) and the tiny test checkpoints
(``testing.py``) both use it."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def make_clip_tokenizer(path: str | os.PathLike) -> CLIPTokenizer:
    """Write a real CLIP tokenizer (vocab.json, merges.txt) to ``path`` from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer
