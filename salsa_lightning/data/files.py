"""The data files every stage reads: local json, jsonl, parquet or csv, checked as they load."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets

from salsa_lightning.errors import SalsaError

# File extension -> ``datasets`` builder of every data file the project reads.
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_data_files(files: Sequence[str | os.PathLike]) -> datasets.Dataset:
    """Local data files of one format (json, jsonl, parquet or csv, by extension) as one dataset.

    Raises:
        SalsaError: a file is missing, empty, of another format, or does not parse (for JSON
            lines: which line, and why).
    """
    files = [str(f) for f in files]
    for f in files:
        if not Path(f).is_file():
            raise SalsaError(f"data file {f!r} does not exist.")
        if is_empty(Path(f)):
            raise SalsaError(f"data file {f!r} is empty: it holds no rows.")
    kinds = {DATA_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise SalsaError(
            f"data files {files} must all be one of {sorted(DATA_FORMATS)} (by their extension)."
        )
    kind = kinds.pop()
    try:
        if len(files) == 1:
            return datasets.load_dataset(kind, data_files=files, split="train")
        # One file at a time, joined on the columns they all have: files may differ in extra
        # columns (`salsa pairs` adds chosen_gold and rejected_gold to the task's pair columns).
        parts = [datasets.load_dataset(kind, data_files=[f], split="train") for f in files]
        shared = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
        return datasets.concatenate_datasets([p.select_columns(shared) for p in parts])
    except Exception as err:  # datasets wraps the parser's error differently per format
        if kind == "json":
            for f in files:
                check_json_file(f)
        raise SalsaError(f"data files {files} cannot be read as {kind}: {err}") from err


def is_empty(path: Path, probe: int = 1 << 16) -> bool:
    """Whether a data file holds nothing but whitespace (read only when it is small)."""
    size = path.stat().st_size
    return size == 0 or (size <= probe and not path.read_bytes().strip())


def check_json_file(path: str) -> None:
    """Name the first line of a JSON-lines file (or the place in a JSON file) that does not
    parse."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)  # a whole-file JSON document (array or object)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise SalsaError(
                    f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                    "fix or remove that line."
                ) from None
