"""The rows file: one JSON line per scored image (``results.jsonl``), appended as a run goes. A run started again
skips the images it holds; the report is written from it."""

from __future__ import annotations

import json
from pathlib import Path

ROWS_FILE = "results.jsonl"
ID_COLUMNS = ("method", "prompt_index", "prompt", "seed", "image")  # what an image is; the other columns score it


def read_rows(path: Path) -> dict[tuple, dict]:
    """{(method, prompt index, seed): row} of the rows whose image is on disk."""
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interrupted write: that image is redone
            continue
        if (path.parent / row["image"]).is_file():
            rows[(row["method"], row["prompt_index"], row["seed"])] = row
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as handle:  # one short append per row: processes do not interleave
        handle.write(json.dumps(row) + "\n")
