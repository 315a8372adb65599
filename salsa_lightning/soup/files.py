"""Checkpoint files of a soup: safetensors headers and tensors read one at a time, a streaming
safetensors writer, and content hashes."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from salsa_lightning.errors import SalsaError

SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_FILE = "adapter_model.safetensors"


RECIPE_FILE = "soup_recipe.json"


@dataclass
class TensorFiles:
    """Header-only view of the safetensors files of one checkpoint or adapter."""

    root: Path
    files: list[str]  # file names relative to root, in index order
    where: dict[str, str]  # tensor name -> file name
    meta: dict[str, tuple[list[int], str]]  # tensor name -> (shape, safetensors dtype)

    def get(self, name: str) -> Tensor:
        """Read one tensor from disk; a float tensor holding NaN or inf is refused (a corrupted
        file of the right size passes every header check).

        The file is opened for this one read: safetensors memory-maps it, and pages of a
        map that stays open count towards RSS until it is closed.
        """
        path = self.root / self.where[name]
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(name)
        check_finite(tensor, name, path)
        return tensor


def check_finite(tensor: Tensor, name: str, path: str | Path) -> None:
    """Refuse model weights that hold NaN or inf, naming the file and the tensor.

    First one float32 sum (NaN or inf make it non-finite): it reads the weight once and writes
    nothing, where ``isfinite`` writes a mask as large as the weight (a gpt2-small model: 0.05
    against 0.67 s, one thread). Only a non-finite sum, which a finite weight can also give by
    overflowing float32, is checked element by element."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise SalsaError(
            f"{path}: tensor '{name}' holds {bad} non-finite value(s) (NaN or inf): the "
            "checkpoint is corrupt or diverged; re-copy it or use an earlier one."
        )


def read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor shapes and dtypes of one safetensors file, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            return {k: (list(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except Exception as e:  # SafetensorError is not importable under a stable name
        raise SalsaError(
            f"{path}: cannot read it as safetensors ({e}); the file is truncated or corrupt, "
            "re-save or re-copy it"
        ) from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SalsaError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SalsaError(f"{path}: cannot read it as JSON ({e}); re-save it") from e
    if not isinstance(data, dict):
        raise SalsaError(f"{path}: expected a JSON object")
    return data


def read_weights(root: Path) -> TensorFiles:
    """Index the safetensors weights of a full checkpoint directory (headers only)."""
    index = root / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SalsaError(f"{index}: has no 'weight_map'; re-save the checkpoint")
        files = list(dict.fromkeys(weight_map.values()))
    elif (root / SINGLE_FILE).exists():
        files, weight_map = [SINGLE_FILE], None
    else:
        raise SalsaError(
            f"{root}: no {SINGLE_FILE} or {INDEX_FILE}; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    where: dict[str, str] = {}
    meta: dict[str, tuple[list[int], str]] = {}
    for fname in files:
        if not (root / fname).is_file():
            raise SalsaError(f"{root / fname} is missing but listed in {index}")
        header = read_header(root / fname)
        for k, m in header.items():
            where[k], meta[k] = fname, m
    if weight_map is not None and weight_map != where:
        bad = sorted(set(weight_map.items()) ^ set(where.items()))[0][0]
        raise SalsaError(
            f"{index}: tensor '{bad}' is not where the index says; re-save the checkpoint"
        )
    return TensorFiles(root, files, where, meta)


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256(path: Path) -> str:
    """sha256 of a file, streamed; cached per (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def file_hashes(t: TensorFiles) -> dict[str, str]:
    return {f: sha256(t.root / f) for f in t.files}


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)


# safetensors dtype names and their torch dtypes.


ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_bytes(meta: Mapping[str, tuple[list[int], str]]) -> int:
    """Bytes the tensors of a safetensors header take on disk (``{name: (shape, dtype)}``)."""
    return sum(math.prod(shape) * ST_DTYPES[dtype].itemsize for shape, dtype in meta.values())


def write_safetensors(
    path: Path, names: Sequence[str], meta: Mapping[str, tuple[list[int], str]], make: Callable
) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` needs every tensor of the file in memory and then
    serializes them into one more buffer of the same size. The output's shapes and dtypes
    are known from the inputs' headers, so the header is written first and each tensor is
    computed (``make(name)``), written and dropped in turn. The layout is the documented
    one: 8-byte little-endian header length, JSON header, then the raw little-endian bytes.
    """
    if sys.byteorder != "little":  # raw tensor bytes are written as they are in memory
        raise SalsaError("writing soups needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        shape, dtype = meta[n]
        if dtype not in ST_DTYPES:
            raise SalsaError(f"tensor '{n}' has dtype {dtype}, which soups do not support")
        size = tensor_bytes({n: meta[n]})
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            t = make(n)
            assert list(t.shape) == meta[n][0] and t.dtype == ST_DTYPES[meta[n][1]], n
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
