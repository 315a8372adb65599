"""``salsa convert``: a GGUF checkpoint to a clean Hugging Face model directory.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) by dequantizing them, but the model it returns refuses ``save_pretrained`` and its
config carries a ``quantization_config`` that makes every later save fail too. This module
loads the GGUF file once, copies its dequantized weights into a model built from a clean
config, and writes what the pipeline's stages read: ``config.json`` (no
``quantization_config``), ``model.safetensors`` (tied embeddings stored once),
``generation_config.json``, the tokenizer with its chat template, and ``salsa_convert.json``
(where the weights came from). The directory is written into a hidden sibling and renamed at
the end, so it either holds a complete model or does not exist.

Only causal language models are converted (the architectures transformers reads from GGUF
and has an ``AutoModelForCausalLM`` class for); anything else is refused, naming the file,
before any weight is dequantized.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import written_aside
from salsa_lightning.pretrained import torch_dtype

GGUF_MAGIC = b"GGUF"
PROVENANCE_FILE = "salsa_convert.json"
# Config keys of a GGUF-loaded model that describe the GGUF file, not the model: a
# quantization_config makes every later save_pretrained fail, and ``_model_name_or_path``
# holds the file's ``general.name`` (kept in salsa_convert.json instead).
DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "_name_or_path")
# What tokenizers without a length limit report as model_max_length.
UNBOUNDED_LENGTH = 10**12

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink: library calls print nothing."""


def check_gguf_file(gguf_file: str | os.PathLike) -> Path:
    """The path of an existing file that starts with the GGUF magic bytes."""
    path = Path(gguf_file)
    if not path.is_file():
        raise SalsaError(f"GGUF file {str(path)!r} does not exist.")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SalsaError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})."
        )
    return path


def read_gguf_config(gguf_file: str | os.PathLike) -> dict[str, Any]:
    """The model config a GGUF file describes, read from its header (no tensor is read).

    Raises:
        SalsaError: The file is missing or not a GGUF file, the ``gguf`` package is not
            installed, or transformers cannot read this architecture from GGUF.
    """
    path = check_gguf_file(gguf_file)
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as err:
        raise SalsaError(f"reading {str(path)!r} needs the gguf package: pip install gguf") from err
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        load_gguf_checkpoint,
    )

    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except ValueError as err:  # "GGUF model with architecture X is not supported yet."
        known = ", ".join(
            a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")
        )
        raise SalsaError(
            f"{str(path)!r}: transformers cannot read this GGUF file ({err}). It reads these "
            f"architectures from GGUF: {known}. Convert one of those, or start from the model's "
            "original Hugging Face checkpoint instead."
        ) from err


def check_architecture(gguf_file: str | os.PathLike, config: dict[str, Any]) -> str:
    """The model type of a GGUF config; refused unless it is a causal language model.

    Returns:
        The transformers ``model_type`` (e.g. ``llama``).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SalsaError(
            f"{str(gguf_file)!r} holds a {model_type!r} model, which is not a causal language "
            "model transformers can build (no AutoModelForCausalLM class): the SFT, reward and "
            "PPO stages cannot start from it. Convert a decoder-only chat model instead."
        )
    return model_type


def check_output(output: Path, gguf_file: Path, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, and any output holding the input."""
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise SalsaError(
                f"output {str(output)!r} already exists; choose another --output or pass "
                "--overwrite to replace it."
            )
        if not output.is_dir():
            raise SalsaError(f"output {str(output)!r} is a file, not a directory; choose another.")
    if output.resolve() in gguf_file.resolve().parents:
        raise SalsaError(
            f"output {str(output)!r} holds the GGUF file {str(gguf_file)!r}; choose another "
            "--output (it would be replaced)."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The GGUF file's tokenizer and dequantized causal LM (transformers' own GGUF reader).

    Raises:
        SalsaError: A weight the model needs is not in the file (it would be left random).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SalsaError(
            f"{str(gguf_file)!r} lacks {len(missing)} weight(s) the {type(model).__name__} "
            f"needs ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the file is "
            "incomplete or not a model transformers reads from GGUF."
        )
    return tokenizer, model


def clean_copy(model: Any, dtype: torch.dtype) -> Any:
    """The same weights in a model built from a config without the GGUF quantization state,
    so ``save_pretrained`` works and the saved config loads as a plain model."""
    from transformers import AutoModelForCausalLM

    values = {k: v for k, v in model.config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
    config = type(model.config).from_dict(values)
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.generation_config = copy.deepcopy(model.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    return clean.eval()


def convert_gguf(
    gguf_file: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool = False,
    dtype: str = "float32",
    log: Log | None = None,
) -> Path:
    """Convert a GGUF checkpoint into a Hugging Face model directory.

    Args:
        gguf_file: The ``.gguf`` file.
        output: The directory to write; must not exist unless ``overwrite``.
        overwrite: Replace an existing ``output``.
        dtype: Weights dtype of the output (``float32``, ``bfloat16`` or ``float16``); the
            GGUF weights are dequantized to float32 first.
        log: Receives one progress line per step (the CLI passes ``print``).

    Returns:
        The output directory.

    Raises:
        SalsaError: A bad input or setting, raised before any weight is dequantized where
            the header tells (missing file, not GGUF, unsupported architecture, existing
            output); nothing is left at ``output`` or beside it.
    """
    log = log or _quiet
    source, target = Path(gguf_file), Path(output)
    weights_dtype = torch_dtype(dtype)
    check_output(target, check_gguf_file(source), overwrite)
    config = read_gguf_config(source)
    model_type = check_architecture(source, config)
    log(f"{source}: a {model_type} model; dequantizing its weights")
    start = time.perf_counter()
    tokenizer, gguf_model = load_gguf(source, torch.float32)
    model = clean_copy(gguf_model, weights_dtype)
    del gguf_model
    if tokenizer.model_max_length >= UNBOUNDED_LENGTH:
        # GGUF tokenizers carry no length limit; the model's context window is the real one.
        tokenizer.model_max_length = model.config.max_position_embeddings
    with written_aside(target) as tmp:  # an error or an interrupt leaves nothing behind
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "gguf_file": str(source.resolve()),
            "gguf_sha256": _sha256(source),
            "gguf_name": config.get("_model_name_or_path"),
            "model_type": model_type,
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"written to {target} in {time.perf_counter() - start:.0f} s")
    return target
