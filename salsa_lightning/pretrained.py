"""Hugging Face model directories: check a source before loading it, load its tokenizer, and
export a model atomically. Every stage reads and writes models through these."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import check_output_dir, written_aside

# The default chain of stage outputs, so a missing input names the stage that makes it.
STAGE_OUTPUTS = {
    "artifacts/base": "salsa fit --config configs/base.yaml",
    "artifacts/sft-1": "salsa fit --config configs/sft.yaml",
    "artifacts/sft-2": (
        "salsa fit --config configs/sft.yaml --seed_everything 2 --model.export_dir artifacts/sft-2"
    ),
    "artifacts/sft-3": (
        "salsa fit --config configs/sft.yaml --seed_everything 3 --model.export_dir artifacts/sft-3"
    ),
    "artifacts/reward": "salsa fit --config configs/reward.yaml",
    "artifacts/soup": "salsa soup --config configs/soup.yaml",
}

MODEL_FILES = ("config.json", "adapter_config.json")
# Every file a tokenizer may be saved in (soups copy them; a tokenizer directory holds one).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """Map a YAML dtype name ("float32", "bfloat16", "float16" or None) to a torch dtype."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise SalsaError(f"dtype {name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def is_local(name_or_path: str | os.PathLike) -> bool:
    """Whether a model reference is meant as a local path rather than a hub id: it exists,
    starts like a path, is a stage's output, has more than one slash, or is ``DIR/NAME`` where
    ``DIR`` is a local directory (``artifacts/sft-3``; a hub id is ``org/name``)."""
    text = str(name_or_path)
    return (
        Path(text).exists()
        or text.startswith((".", "/", "~"))
        or text.rstrip("/") in STAGE_OUTPUTS
        or text.count("/") > 1
        or org_is_local_dir(text)
    )


def org_is_local_dir(text: str) -> bool:
    """Whether ``text`` has a hub id's shape, ``ORG/NAME``, and ``ORG`` is a directory here."""
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    return Path(text.split("/")[0]).is_dir()


def is_sequence_classifier(config: PretrainedConfig) -> bool:
    """Whether a checkpoint's config names a sequence classifier (a reward model's kind)."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def check_causal_lm(config: PretrainedConfig, path: str, what: str) -> None:
    """Refuse a sequence classifier (a reward model) where a causal LM is read (the policy,
    its reference, the model SFT starts from): transformers would load it with a new, random
    LM head, and the run would train from noise."""
    if is_sequence_classifier(config):
        raise SalsaError(
            f"{what} {path!r} is a sequence classifier ({config.architectures[0]}: a reward "
            "model?), not a causal LM; name a causal LM (a base model, or an SFT model: "
            "`salsa fit --config configs/sft.yaml` writes one)."
        )


def check_causal_lm_dir(path: str | os.PathLike, what: str) -> None:
    """:func:`check_causal_lm` of a local model directory's ``config.json`` (a hub id or a LoRA
    adapter is left to loading)."""
    config = Path(path).expanduser() / "config.json"
    if config.is_file():
        check_causal_lm(AutoConfig.from_pretrained(config.parent), str(path), what)


def check_model_source(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """Fail fast, naming the culprit, when a model reference cannot be loaded.

    A local path must exist and hold a ``config.json`` (or an ``adapter_config.json``).
    A hub id is refused when ``HF_HUB_OFFLINE`` is set and it is not in the local cache,
    so an offline run never waits on the network.

    Returns:
        The reference as a string.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        markers = TOKENIZER_FILES if what == "tokenizer" else MODEL_FILES
        if not any((path / name).exists() for name in markers):
            raise SalsaError(
                f"{what} directory {text!r} holds none of {list(markers)}: not a Hugging Face "
                f"{'tokenizer' if what == 'tokenizer' else 'model'} directory."
            )
        if what != "tokenizer":
            check_weight_files(path)
        return str(path)
    if is_local(text):
        hint = STAGE_OUTPUTS.get(text.rstrip("/"))
        stage = f" It is made by an earlier stage: run `{hint}` first." if hint else ""
        raise SalsaError(f"{what} path {text!r} does not exist.{stage}{hub_hint(text)}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            AutoConfig.from_pretrained(text, local_files_only=True)
        except OSError as err:
            raise SalsaError(
                f"{what} {text!r} is not a local directory and HF_HUB_OFFLINE=1 is set, and it is "
                "not in the local Hugging Face cache. Download it while online, or point to a "
                "local directory."
            ) from err
    return text


def hub_hint(text: str) -> str:
    """Why ``ORG/NAME`` was read as a path and not as a hub id, when that is the reason."""
    if not org_is_local_dir(text):
        return ""
    return (
        f" (Read as a local path because {text.split('/')[0]!r} is a directory here; a hub id "
        "of that name needs another working directory.)"
    )


def check_weight_files(path: Path) -> None:
    """Read the headers of a model directory's safetensors files (no tensor data): a truncated
    or corrupt file is refused by name before anything loads it."""
    from salsa_lightning.soup.files import read_header

    for weights in sorted(path.glob("*.safetensors")):
        read_header(weights)


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token falls back to its EOS token, with a warning."""
    source = check_model_source(name_or_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SalsaError(f"tokenizer {source!r} has neither a pad token nor an EOS token.")
        hf_logging.get_logger(__name__).warning(
            "tokenizer %s has no pad token: using its EOS token %r for padding.",
            source,
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_finite_weights(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Refuse a loaded model whose weights hold NaN or inf, naming the checkpoint's file and
    tensor (returned for chaining).

    A local safetensors checkpoint is checked from its files, one tensor at a time, each file
    mapped only while its tensor is read (as stored, and as loaded when the model's dtype
    differs). Summing the model's own weights would make every page of the checkpoint resident
    in this process for the rest of the run, a reward model's whole embedding among them, where
    its forward reads only the rows of the tokens it scores (a SmolLM2-135M reward model: about
    100 MiB of RSS)."""
    from salsa_lightning.soup.files import INDEX_FILE, SINGLE_FILE, check_finite, read_weights

    root = Path(source)
    if (root / SINGLE_FILE).is_file() or (root / INDEX_FILE).is_file():
        files, dtype = read_weights(root), getattr(model, "dtype", None)
        for name in files.meta:
            tensor = files.get(name)  # refused here if non-finite as stored
            if tensor.is_floating_point() and dtype is not None and tensor.dtype != dtype:
                check_finite(tensor.to(dtype), name, root / files.where[name])
        return model
    for name, tensor in model.state_dict().items():  # another format: the loaded weights
        check_finite(tensor, name, root)
    return model


def load_pretrained(model_class: Any, source: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(source, **kwargs)``, with its weights checked finite."""
    return check_finite_weights(model_class.from_pretrained(source, **kwargs), source)


def check_export_dir(export_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse, before training, an export directory that cannot be written, or one that already
    holds files (unless ``overwrite``)."""
    check_output_dir(
        export_dir, overwrite, "export_dir", "--model.init_args.overwrite true",
        "--model.init_args.export_dir",
    )  # fmt: skip


def export_pretrained(
    model: PreTrainedModel | nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    export_dir: str | os.PathLike,
    extra_files: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a Hugging Face directory atomically: into a temporary sibling, then rename.

    Args:
        model: A ``PreTrainedModel`` or peft model (a peft model writes its adapter).
        tokenizer: Saved beside the weights when given.
        export_dir: Final directory; an existing one is replaced (the caller checked consent).
        extra_files: ``{file name: JSON-serialisable object}`` written beside the model.
        state_dict: A full state dict to save instead of the model's own (for sharded models).
    """
    target = Path(export_dir)
    with written_aside(target) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return target
