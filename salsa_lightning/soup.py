"""Model soups: weight averages of SFT checkpoints fine-tuned from one base model.

SALSA uses a soup as the KL reference of PPO. This module builds soups three ways:

* :func:`write_soup` streams Hugging Face checkpoint directories into a new checkpoint
  directory (``salsa soup``). It reads one tensor per input at a time and writes each output
  tensor as soon as it is computed, so peak memory is about one tensor per input plus its
  float32 accumulator, whatever the model size.
* :func:`soup_state_dict` / :func:`load_soup` build the soup in memory (no disk round trip).
* :class:`SoupReference` is the YAML-facing recipe the PPO module takes as
  ``reference: {checkpoints: [...], weights: [...]}``.

Inputs are either full checkpoints (``config.json`` + ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``) or PEFT LoRA adapter
directories (``adapter_config.json`` + ``adapter_model.safetensors``) on one local base model.
A LoRA soup is the weighted average of the *merged* models,
``W = W_base + sum_i w_i * s_i * B_i @ A_i``; averaging the A and B factors separately would
add cross terms ``B_i @ A_j`` and is never done.

Every bad input raises :class:`~salsa_lightning.errors.SalsaError` before anything is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from salsa_lightning.errors import SalsaError

__all__ = [
    "SoupReference",
    "alpha_line",
    "average_state_dicts",
    "barycentric_grid",
    "check_weights",
    "load_soup",
    "soup_main",
    "soup_state_dict",
    "write_soup",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
RECIPE_FILE = "soup_recipe.json"
_PEFT_PREFIX = "base_model.model."

# config.json fields that do not change the weights or how they are used: bookkeeping,
# the storage dtype (tensor dtypes are compared separately), runtime switches and special
# token ids (those live in the tokenizer, which is compared on its own). Every other field,
# at any nesting level (e.g. ``text_config``), must be equal across the soup's inputs.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "_attn_implementation",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "repetition_penalty",
        "task_specific_params",
    }
)

# adapter_config.json fields that define which tensors a LoRA adapter has and how they are
# applied; they must agree across the soup's adapters. Rank and alpha may differ (each
# adapter's scale is applied before averaging).
LORA_LAYOUT_KEYS = (
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "bias",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
)

# LoRA variants whose merged weight is not ``W + s * B @ A``; refused rather than guessed.
UNSUPPORTED_LORA = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "lora_bias",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
}

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

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink: library calls print nothing."""


# --------------------------------------------------------------------------- weights


def check_weights(weights: Sequence[float] | None, n: int, normalize: bool = False) -> list[float]:
    """Validate soup weights.

    Args:
        weights: One weight per checkpoint, or None for the uniform soup.
        n: Number of checkpoints.
        normalize: Rescale the weights to sum to 1 instead of requiring it.

    Returns:
        The weights as floats summing to 1.

    Raises:
        SalsaError: Empty soup, wrong count, a negative or non-finite weight, all zeros,
            or (without ``normalize``) a sum that is not 1 within 1e-6.
    """
    if n < 1:
        raise SalsaError("a soup needs at least one checkpoint; pass --checkpoints DIR [DIR ...]")
    if weights is None:
        return [1.0 / n] * n
    out = [float(w) for w in weights]
    if len(out) != n:
        raise SalsaError(
            f"got {len(out)} weights for {n} checkpoints; pass exactly one weight per "
            "checkpoint (or none for a uniform soup)"
        )
    for i, w in enumerate(out):
        if not math.isfinite(w):
            raise SalsaError(f"weight {i} ({w}) is not a finite number")
        if w < 0:
            raise SalsaError(f"weight {i} is negative ({w}); soup weights must be >= 0")
    total = sum(out)
    if total <= 0:
        raise SalsaError("all soup weights are zero; give at least one positive weight")
    if normalize:
        return [w / total for w in out]
    if abs(total - 1.0) > 1e-6:
        raise SalsaError(
            f"weights {out} sum to {total:.6g}, not 1; fix them or pass --normalize "
            "(normalize=True) to rescale them"
        )
    return out


def alpha_line(n_points: int) -> list[list[float]]:
    """Weights ``[a, 1 - a]`` for ``n_points`` values of ``a`` from 0 to 1 inclusive.

    Args:
        n_points: Number of points on the line between two models (>= 2).

    Returns:
        The list of weight pairs, starting at ``[0, 1]`` and ending at ``[1, 0]``.
    """
    if n_points < 2:
        raise SalsaError(f"alpha_line needs n_points >= 2, got {n_points}")
    return [[k / (n_points - 1), 1.0 - k / (n_points - 1)] for k in range(n_points)]


def barycentric_grid(resolution: int) -> list[list[float]]:
    """All weights ``[w1, w2, w3]`` with ``w_i = k_i / resolution`` and ``sum = 1``.

    Args:
        resolution: Number of steps along each edge of the simplex (>= 1).

    Returns:
        ``(resolution + 1) * (resolution + 2) / 2`` weight triples.
    """
    if resolution < 1:
        raise SalsaError(f"barycentric_grid needs resolution >= 1, got {resolution}")
    return [
        [i / resolution, j / resolution, (resolution - i - j) / resolution]
        for i in range(resolution + 1)
        for j in range(resolution + 1 - i)
    ]


# --------------------------------------------------------------------------- averaging


def _weighted_sum(name: str, tensors: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted sum of one tensor across inputs, consuming ``tensors`` one at a time.

    Floating tensors accumulate in at least float32 (bf16/fp16 sums would lose precision)
    and are cast back to the first input's dtype. Non-float tensors (e.g. integer buffers)
    cannot be averaged; they must be equal and are returned unchanged.
    """
    acc: Tensor | None = None
    first: Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if first is None:
            first = t
            if not t.is_floating_point():
                continue
            acc = t.to(torch.promote_types(t.dtype, torch.float32)) * w
        elif not first.is_floating_point():
            if not torch.equal(first, t):
                raise SalsaError(
                    f"non-float tensor '{name}' differs between checkpoints and cannot be "
                    "averaged; such tensors must be identical in every input"
                )
        else:
            acc.add_(t.to(acc.dtype), alpha=w)
    assert first is not None
    return first if acc is None else acc.to(first.dtype)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted average of state dicts (pure: the inputs are not modified).

    Args:
        state_dicts: State dicts with the same keys, shapes and dtypes.
        weights: One weight per state dict (use :func:`check_weights` first).

    Returns:
        A new state dict in the inputs' dtype.

    Raises:
        SalsaError: Different keys, shapes or dtypes, or non-float tensors that differ.
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise SalsaError(f"got {len(state_dicts)} state dicts and {len(weights)} weights")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise SalsaError(f"state dict {i} and state dict 0 differ in tensor '{diff[0]}'")
        for k, t in sd.items():
            if t.shape != ref[k].shape or t.dtype != ref[k].dtype:
                raise SalsaError(
                    f"state dict {i}: tensor '{k}' is {list(t.shape)} {t.dtype}, but state "
                    f"dict 0 has {list(ref[k].shape)} {ref[k].dtype}"
                )
    return {k: _weighted_sum(k, (sd[k] for sd in state_dicts), weights) for k in ref}


# --------------------------------------------------------------------------- reading inputs


@dataclass
class _Tensors:
    """Header-only view of the safetensors files of one checkpoint or adapter."""

    root: Path
    files: list[str]  # file names relative to root, in index order
    where: dict[str, str]  # tensor name -> file name
    meta: dict[str, tuple[list[int], str]]  # tensor name -> (shape, safetensors dtype)

    def get(self, name: str) -> Tensor:
        """Read one tensor from disk.

        The file is opened for this one read: safetensors memory-maps it, and pages of a
        map that stays open count towards RSS until it is closed.
        """
        with safe_open(str(self.root / self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


def _read_header(path: Path) -> dict[str, tuple[list[int], str]]:
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


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SalsaError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SalsaError(f"{path}: cannot read it as JSON ({e}); re-save it") from e
    if not isinstance(data, dict):
        raise SalsaError(f"{path}: expected a JSON object")
    return data


def _read_weights(root: Path) -> _Tensors:
    """Index the safetensors weights of a full checkpoint directory (headers only)."""
    index = root / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
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
        header = _read_header(root / fname)
        for k, m in header.items():
            where[k], meta[k] = fname, m
    if weight_map is not None and weight_map != where:
        bad = sorted(set(weight_map.items()) ^ set(where.items()))[0][0]
        raise SalsaError(
            f"{index}: tensor '{bad}' is not where the index says; re-save the checkpoint"
        )
    return _Tensors(root, files, where, meta)


@dataclass
class _Adapter:
    """A PEFT LoRA adapter directory."""

    path: Path
    config: dict
    tensors: _Tensors
    base: Path


@dataclass
class _Plan:
    """Validated inputs of a soup: what to read and how to combine it."""

    kind: str  # "full" or "lora"
    given: list[str]  # paths as given
    sources: list[_Tensors]  # full: the checkpoints; lora: the adapters
    adapters: list[_Adapter]
    base: _Tensors | None  # lora only
    config_dir: Path  # where config.json comes from
    tokenizer_dir: Path

    def weight_roots(self) -> list[Path]:
        """Every directory the soup reads weights from (an output must not replace one)."""
        return [s.root for s in self.sources] + ([self.base.root] if self.base else [])


def _config_diffs(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted names of all fields where two configs differ, outside IGNORED_CONFIG_KEYS."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [where]
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in IGNORED_CONFIG_KEYS:
            sub = f"{where}.{k}" if where else k
            out += [sub] if k not in a or k not in b else _config_diffs(a[k], b[k], sub)
    return out


def _get_path(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part, "<absent>") if isinstance(cfg, dict) else "<absent>"
    return cfg


def _check_configs(dirs: Sequence[Path], configs: Sequence[dict]) -> None:
    for d, c in zip(dirs[1:], configs[1:], strict=True):
        diffs = _config_diffs(configs[0], c)
        if diffs:
            detail = ", ".join(
                f"'{k}' is {_get_path(c, k)!r} vs {_get_path(configs[0], k)!r}" for k in diffs
            )
            raise SalsaError(
                f"{d / 'config.json'} differs from {dirs[0]}: {detail}; a soup needs models "
                "of one architecture fine-tuned from one base"
            )


def _check_tensors(sources: Sequence[_Tensors], lora: bool = False) -> None:
    """Same tensor names, shapes and dtypes (LoRA: the rank dimension may differ)."""
    ref = sources[0]
    for src in sources[1:]:
        for name in sorted(set(ref.meta) | set(src.meta)):
            if name not in src.meta or name not in ref.meta:
                has, lacks = (ref, src) if name in ref.meta else (src, ref)
                raise SalsaError(
                    f"{lacks.root}: tensor '{name}' is missing, but {has.root} has it; "
                    "all checkpoints must have the same tensors"
                )
            (s0, t0), (s1, t1) = ref.meta[name], src.meta[name]
            if lora and ".lora_" in name and len(s0) == len(s1) == 2:
                # lora_A is [r, in], lora_B is [out, r]: only the non-rank dim must match.
                rank_dim = 0 if ("lora_A" in name or "lora_embedding_A" in name) else 1
                s0, s1 = s0[1 - rank_dim], s1[1 - rank_dim]
            if s0 != s1 or t0 != t1:
                shape_or_dtype = ("shape", s1, s0) if s0 != s1 else ("dtype", t1, t0)
                raise SalsaError(
                    f"{src.root / src.where[name]}: tensor '{name}' has {shape_or_dtype[0]} "
                    f"{shape_or_dtype[1]}, but {ref.root} has {shape_or_dtype[2]}; all "
                    "checkpoints must be fine-tuned from one base model and saved in one dtype"
                )


def _vocab(d: Path) -> dict[str, int] | None:
    """The tokenizer vocabulary of a directory, or None if it has no tokenizer."""
    tj = d / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        vocab = dict(data.get("model", {}).get("vocab") or {})
        if isinstance(data.get("model", {}).get("vocab"), list):  # Unigram: [[piece, score]]
            vocab = {p[0]: i for i, p in enumerate(data["model"]["vocab"])}
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        return vocab
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d)).get_vocab()
    except Exception as e:
        raise SalsaError(f"{d}: cannot load its tokenizer ({e}); re-save it") from e


def _check_vocabs(dirs: Sequence[Path]) -> None:
    vocabs = [(d, _vocab(d)) for d in dirs]
    vocabs = [(d, v) for d, v in vocabs if v is not None]
    for d, v in vocabs[1:]:
        d0, v0 = vocabs[0]
        if v != v0:
            token = sorted(set(v.items()) ^ set(v0.items()))[0][0]
            raise SalsaError(
                f"{d}: tokenizer vocabulary differs from {d0} (first difference: token "
                f"{token!r}); soup only models trained with the same tokenizer"
            )


def _resolve_base(adapter_dir: Path, cfg: dict) -> Path:
    name = cfg.get("base_model_name_or_path")
    if not name:
        raise SalsaError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty; set it to "
            "the local base model directory"
        )
    for cand in (Path(name), adapter_dir / name):
        if (cand / "config.json").is_file():
            return cand.resolve()
    raise SalsaError(
        f"{adapter_dir / ADAPTER_CONFIG}: base model '{name}' is not a local checkpoint "
        "directory; set base_model_name_or_path to a directory with config.json and weights"
    )


def config_dir(checkpoint: str | Path) -> Path:
    """The directory whose config.json describes ``checkpoint``'s model: the checkpoint itself,
    or the base model of a LoRA adapter directory."""
    checkpoint = Path(checkpoint)
    if (checkpoint / ADAPTER_CONFIG).is_file():
        return _resolve_base(checkpoint, _read_json(checkpoint / ADAPTER_CONFIG))
    return checkpoint


def _read_adapter(d: Path) -> _Adapter:
    cfg = _read_json(d / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise SalsaError(
            f"{d / ADAPTER_CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LoRA "
            "adapters can be souped"
        )
    for key, what in UNSUPPORTED_LORA.items():
        if cfg.get(key):
            raise SalsaError(
                f"{d / ADAPTER_CONFIG}: {what} is not supported in soups; train the "
                "adapters without it or merge them first (merge_and_unload) and soup the "
                "full models"
            )
    if not (d / ADAPTER_FILE).is_file():
        raise SalsaError(f"{d / ADAPTER_FILE} is missing; save the adapter with safetensors")
    meta = _read_header(d / ADAPTER_FILE)
    tensors = _Tensors(d, [ADAPTER_FILE], dict.fromkeys(meta, ADAPTER_FILE), meta)
    for name, (shape, _) in meta.items():
        if not name.startswith(_PEFT_PREFIX):
            raise SalsaError(f"{d / ADAPTER_FILE}: unexpected tensor '{name}'")
        is_a = "lora_A" in name or "lora_embedding_A" in name
        rank = shape[0] if is_a else shape[-1]
        if ".lora_" in name and (len(shape) != 2 or rank != cfg["r"]):
            raise SalsaError(
                f"{d / ADAPTER_FILE}: tensor '{name}' has shape {shape}, expected a 2-D "
                f"LoRA factor of rank r={cfg['r']}; only Linear/Embedding LoRA is supported"
            )
    return _Adapter(d, cfg, tensors, _resolve_base(d, cfg))


def _lora_modules(adapter: _Adapter) -> dict[str, tuple[str, str, bool]]:
    """Base weight name -> (A name, B name, transposed) for each LoRA'd module."""
    out = {}
    for name in adapter.tensors.meta:
        for a, b, emb in (
            ("lora_A", "lora_B", False),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            if name.endswith(f".{a}.weight") or name.endswith(f".{a}"):
                module = name[len(_PEFT_PREFIX) :].split(f".{a}")[0]
                b_name = name.replace(a, b)
                # Embedding LoRA stores A as [r, vocab] and B as [dim, r]; the delta is
                # (B @ A).T. fan_in_fan_out (GPT-2 Conv1D) stores weights transposed too.
                out[f"{module}.weight"] = (
                    name,
                    b_name,
                    emb or bool(adapter.config["fan_in_fan_out"]),
                )
    return out


def _plain_tensors(adapter: _Adapter) -> dict[str, str]:
    """Base weight name -> adapter tensor name, for tensors the adapter replaces outright
    (modules_to_save copies and trained biases)."""
    return {
        n[len(_PEFT_PREFIX) :].replace(".modules_to_save", ""): n
        for n in adapter.tensors.meta
        if ".lora_" not in n
    }


def _plan(checkpoints: Sequence[str | Path]) -> _Plan:
    """Read and cross-check the inputs (headers and JSON only; no tensor data)."""
    if not checkpoints:
        raise SalsaError("no checkpoints given; pass at least one checkpoint directory")
    dirs = [Path(c) for c in checkpoints]
    for d in dirs:
        if not d.is_dir():
            raise SalsaError(f"checkpoint directory {d} does not exist (or is not a directory)")
    is_lora = [(d / ADAPTER_CONFIG).is_file() for d in dirs]
    if any(is_lora) and not all(is_lora):
        raise SalsaError(
            f"{dirs[is_lora.index(not is_lora[0])]} and {dirs[0]}: cannot mix LoRA adapter "
            "directories and full checkpoints in one soup; merge the adapters first"
        )
    given = [str(c) for c in checkpoints]
    if not all(is_lora):
        configs = [_read_json(d / "config.json") for d in dirs]
        _check_configs(dirs, configs)
        sources = [_read_weights(d) for d in dirs]
        _check_tensors(sources)
        _check_vocabs(dirs)
        return _Plan("full", given, sources, [], None, dirs[0], dirs[0])

    adapters = [_read_adapter(d) for d in dirs]
    a0 = adapters[0]
    for a in adapters[1:]:
        if a.base != a0.base:
            raise SalsaError(
                f"{a.path / ADAPTER_CONFIG}: base model is {a.base}, but "
                f"{a0.path / ADAPTER_CONFIG} has {a0.base}; LoRA soups need one base model"
            )
        for key in LORA_LAYOUT_KEYS:
            v0, v1 = a0.config.get(key), a.config.get(key)
            if isinstance(v0, list) and isinstance(v1, list):
                v0, v1 = sorted(v0), sorted(v1)
            if v0 != v1:
                raise SalsaError(
                    f"{a.path / ADAPTER_CONFIG}: {key} is {v1!r}, but "
                    f"{a0.path / ADAPTER_CONFIG} has {v0!r}; soup only adapters with the "
                    "same LoRA layout"
                )
    _check_tensors([a.tensors for a in adapters], lora=True)
    base = _read_weights(a0.base)
    _read_json(a0.base / "config.json")  # fail now, not after writing, if it is broken
    for name, (a_name, b_name, t) in _lora_modules(a0).items():
        if name not in base.meta:
            raise SalsaError(
                f"{a0.path / ADAPTER_FILE}: '{a_name}' has no base weight '{name}' in {a0.base}"
            )
        out_dim, in_dim = a0.tensors.meta[b_name][0][0], a0.tensors.meta[a_name][0][1]
        want = [in_dim, out_dim] if t else [out_dim, in_dim]
        if base.meta[name][0] != want:
            raise SalsaError(
                f"{a0.path / ADAPTER_FILE}: LoRA on '{name}' is {want}, but the base has "
                f"{base.meta[name][0]}; the adapter was trained on another base model"
            )
    for name, a_name in _plain_tensors(a0).items():
        if name not in base.meta or base.meta[name] != a0.tensors.meta[a_name]:
            raise SalsaError(
                f"{a0.path / ADAPTER_FILE}: tensor '{a_name}' does not match base weight "
                f"'{name}' in {a0.base}"
            )
    _check_vocabs(dirs)
    tok_dir = dirs[0] if any((dirs[0] / f).is_file() for f in TOKENIZER_FILES) else a0.base
    return _Plan("lora", given, [a.tensors for a in adapters], adapters, base, a0.base, tok_dir)


# --------------------------------------------------------------------------- combining


def _scale(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _merged_tensor(plan: _Plan, name: str, weights: Sequence[float]) -> Tensor:
    """One output tensor of the soup (full average, or merged-LoRA average)."""
    if plan.kind == "full":
        return _weighted_sum(name, (s.get(name) for s in plan.sources), weights)
    a0 = plan.adapters[0]
    plain = _plain_tensors(a0)
    if name in plain:  # every merged model carries its own trained copy: average them
        return _weighted_sum(name, (a.tensors.get(plain[name]) for a in plan.adapters), weights)
    base_t = plan.base.get(name)
    module = _lora_modules(a0).get(name)
    if module is None:
        return base_t
    a_name, b_name, transposed = module
    acc = base_t.to(torch.promote_types(base_t.dtype, torch.float32))
    for a, w in zip(plan.adapters, weights, strict=True):
        delta = a.tensors.get(b_name).to(acc.dtype) @ a.tensors.get(a_name).to(acc.dtype)
        acc.add_(delta.T if transposed else delta, alpha=w * _scale(a.config))
    return acc.to(base_t.dtype)


def _layout(plan: _Plan) -> _Tensors:
    """The output's files and tensors follow the first input (LoRA: the base) exactly."""
    return plan.sources[0] if plan.kind == "full" else plan.base


def soup_state_dict(
    checkpoints: Sequence[str | Path], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Build the soup's full state dict in memory, streaming tensors from disk.

    Args:
        checkpoints: Full checkpoint directories, or LoRA adapter directories on one base
            (these give the merged full weights).
        weights: One weight per checkpoint summing to 1, or None for uniform.

    Returns:
        The soup's state dict in the inputs' dtype (tied weights appear once, as on disk).
    """
    weights = check_weights(weights, len(checkpoints))
    plan = _plan(checkpoints)
    return {name: _merged_tensor(plan, name, weights) for name in _layout(plan).meta}


# --------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
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


def _hashes(t: _Tensors) -> dict[str, str]:
    return {f: _sha256(t.root / f) for f in t.files}


# --------------------------------------------------------------------------- writing


def _copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)


# safetensors dtype names and their torch dtypes.
_ST_DTYPES = {
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


def _write_safetensors(
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
        if dtype not in _ST_DTYPES:
            raise SalsaError(f"tensor '{n}' has dtype {dtype}, which soups do not support")
        size = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            t = make(n)
            assert list(t.shape) == meta[n][0] and t.dtype == _ST_DTYPES[meta[n][1]], n
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_full(plan: _Plan, weights: Sequence[float], tmp: Path, log: Log) -> list[str]:
    layout = _layout(plan)
    total, done = len(layout.meta), 0
    log(f"averaging {total} tensors from {len(weights)} inputs into {len(layout.files)} file(s)")
    for fname in layout.files:
        names = [n for n, f in layout.where.items() if f == fname]
        _write_safetensors(
            tmp / fname, names, layout.meta, lambda n: _merged_tensor(plan, n, weights)
        )
        done += len(names)
        log(f"  {fname}: {done}/{total} tensors")
    if (layout.root / INDEX_FILE).exists():
        shutil.copy2(layout.root / INDEX_FILE, tmp / INDEX_FILE)
    _copy_files(plan.config_dir, tmp, ["config.json", "generation_config.json"])
    _copy_files(plan.tokenizer_dir, tmp, TOKENIZER_FILES)
    return layout.files


def _write_adapter(plan: _Plan, weights: Sequence[float], tmp: Path, log: Log) -> list[str]:
    """Exact adapter of the soup by rank concatenation.

    ``A = cat_i A_i`` (rows) and ``B = cat_i w_i s_i B_i`` (columns) give
    ``B @ A = sum_i w_i s_i B_i @ A_i``; with ``lora_alpha = r = sum_i r_i`` the new scale is 1.
    """
    a0 = plan.adapters[0]
    r_new = sum(a.config["r"] for a in plan.adapters)
    out: dict[str, Tensor] = {}
    for a_name, b_name, _ in _lora_modules(a0).values():
        out[a_name] = torch.cat([a.tensors.get(a_name) for a in plan.adapters], dim=0)
        bs = []
        for a, w in zip(plan.adapters, weights, strict=True):
            b = a.tensors.get(b_name)
            bs.append((b.float() * (w * _scale(a.config))).to(b.dtype))
        out[b_name] = torch.cat(bs, dim=1)
    for a_name in _plain_tensors(a0).values():
        out[a_name] = _weighted_sum(a_name, (a.tensors.get(a_name) for a in plan.adapters), weights)
    log(f"concatenating {len(plan.adapters)} adapters into one of rank {r_new}")
    save_file(out, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = copy.deepcopy(a0.config)
    cfg.update(r=r_new, lora_alpha=r_new, use_rslora=False, rank_pattern={}, alpha_pattern={})
    cfg["base_model_name_or_path"] = str(a0.base)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _copy_files(plan.tokenizer_dir, tmp, TOKENIZER_FILES)
    return [ADAPTER_FILE]


def write_soup(
    checkpoints: Sequence[str | Path],
    weights: Sequence[float] | None,
    output: str | Path,
    normalize: bool = False,
    lora_output: str = "merged",
    overwrite: bool = False,
    *,
    log: Log | None = None,
) -> Path:
    """Write the soup of ``checkpoints`` as a new checkpoint directory, streaming.

    Everything is validated before anything is written. The soup is written into a hidden
    sibling ``.{name}.tmp-<pid>`` and renamed to ``output`` at the end, so ``output`` either
    holds a complete soup or does not exist. The output keeps the inputs' dtype and the
    first input's sharding, copies config, generation config and tokenizer files, and holds
    ``soup_recipe.json`` (sources, weights, sha256 of every input and output weight file).
    Tied weights stay tied: the tied tensor is absent from the inputs and thus the output.

    Args:
        checkpoints: Full HF checkpoint directories, or PEFT LoRA adapter directories on
            one local base model.
        weights: One weight per checkpoint (sum 1), or None for uniform.
        output: Output directory; must not exist unless ``overwrite``.
        normalize: Rescale the weights to sum to 1.
        lora_output: For LoRA inputs: ``"merged"`` writes a full model,
            ``"adapter"`` writes one exact adapter (rank concatenation).
        overwrite: Replace an existing ``output``.
        log: Receives one progress line per step (the CLI passes ``print``).

    Returns:
        The output directory.

    Raises:
        SalsaError: Any bad input or setting; nothing is left at ``output``.
    """
    log = log or _quiet
    if lora_output not in ("merged", "adapter"):
        raise SalsaError(f"lora_output is {lora_output!r}; use 'merged' or 'adapter'")
    log(f"validating {len(checkpoints)} checkpoints")
    weights = check_weights(weights, len(checkpoints), normalize)
    plan = _plan(checkpoints)
    if lora_output == "adapter" and plan.kind != "lora":
        raise SalsaError("lora_output='adapter' needs LoRA adapter directories as checkpoints")
    output = Path(output)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise SalsaError(f"output {output} already exists; choose another or pass --overwrite")
        if any(output.resolve() == r.resolve() for r in plan.weight_roots()):
            raise SalsaError(f"output {output} is one of the soup's inputs; choose another")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if plan.kind == "lora" and lora_output == "adapter":
            out_files = _write_adapter(plan, weights, tmp, log)
        else:
            out_files = _write_full(plan, weights, tmp, log)
        log("hashing inputs and outputs")
        recipe = {
            "salsa_lightning_version": _version(),
            "kind": plan.kind,
            "lora_output": lora_output if plan.kind == "lora" else None,
            "weights": weights,
            "normalize": normalize,
            "sources": [
                {
                    "path": given,
                    "resolved": str(src.root.resolve()),
                    "weight": w,
                    "sha256": _hashes(src),
                }
                for given, src, w in zip(plan.given, plan.sources, weights, strict=True)
            ],
            "base": (
                {"resolved": str(plan.base.root), "sha256": _hashes(plan.base)}
                if plan.base
                else None
            ),
            "output_sha256": {f: _sha256(tmp / f) for f in out_files},
        }
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        if output.is_symlink() or output.is_file():
            output.unlink()
        elif output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"written to {output}")
    return output


def _version() -> str:
    from salsa_lightning import __version__

    return __version__


# --------------------------------------------------------------------------- in memory


def load_soup(
    checkpoints: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    model_class: Any = None,
    dtype: torch.dtype | None = None,
):
    """Build the soup as a model, without writing it to disk.

    The first checkpoint (LoRA: the base) is loaded by ``from_pretrained``, memory-mapped,
    with its config, buffers and tied weights; each weight is then overwritten in place by the
    soup's, one tensor at a time. Memory stays at one model (no random initialisation, no
    second copy of the weights).

    Args:
        checkpoints: Full checkpoint or LoRA adapter directories (see :func:`write_soup`).
        weights: One weight per checkpoint summing to 1, or None for uniform.
        model_class: A transformers auto class or model class with ``from_pretrained``
            (default ``AutoModelForCausalLM``; e.g. ``AutoModelForSequenceClassification``).
        dtype: Model dtype; default the checkpoints' dtype.

    Returns:
        The model in eval mode with tied weights tied. With one checkpoint and weight 1 it
        equals that checkpoint exactly.

    Raises:
        SalsaError: Bad inputs, or soup tensors that do not fit ``model_class``.
    """
    from transformers import AutoModelForCausalLM

    weights = check_weights(weights, len(checkpoints))
    plan = _plan(checkpoints)
    layout = _layout(plan)
    cls = model_class or AutoModelForCausalLM
    _check_fits(cls, plan, layout)
    if dtype is None:
        dtype = next(
            (_ST_DTYPES[d] for _, d in layout.meta.values() if _ST_DTYPES[d].is_floating_point),
            torch.float32,
        )
    model = cls.from_pretrained(str(layout.root), dtype=dtype)
    if plan.kind == "full" and len(plan.sources) == 1:
        return model.eval()  # a soup of one is that checkpoint
    params = model.state_dict()
    with torch.no_grad():
        for name in layout.meta:
            params[name].copy_(_merged_tensor(plan, name, weights))
    return model.eval()


def _check_fits(cls: Any, plan: _Plan, layout: _Tensors) -> None:
    """The soup's tensors are exactly ``cls``'s weights (tied copies aside), checked on a model
    built on the meta device, before any weight is read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(plan.config_dir))
    # Auto classes have from_config; concrete model classes only the private _from_config.
    build = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        model = build(config)
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(k for k in expected - set(layout.meta) if k not in tied)
    unexpected = [k for k in layout.meta if k not in expected]
    if missing or unexpected:
        problems = [f"the soup lacks its weight '{k}'" for k in missing[:1]]
        problems += [f"it has no place for soup tensor '{k}'" for k in unexpected[:1]]
        raise SalsaError(
            f"{plan.given[0]}: cannot load the soup into {type(model).__name__}: "
            f"{' and '.join(problems)}; pass the model_class the checkpoints were saved with"
        )


@dataclass
class SoupReference:
    """The PPO KL reference as a soup recipe (YAML: ``reference: {checkpoints, weights}``).

    Attributes:
        checkpoints: Full checkpoint or LoRA adapter directories.
        weights: One weight per checkpoint, or None for uniform.
        normalize: Rescale ``weights`` to sum to 1.
    """

    checkpoints: list[str]
    weights: list[float] | None = None
    normalize: bool = False

    def validate(self) -> None:
        """Run every input check of :func:`write_soup` (nothing is read but headers).

        Raises:
            SalsaError: The first problem found.
        """
        if not self.checkpoints:
            raise SalsaError(
                "reference.checkpoints is empty; list the SFT checkpoint directories to soup"
            )
        self.resolved_weights()
        _plan(self.checkpoints)

    def resolved_weights(self) -> list[float]:
        """The validated weights (uniform when ``weights`` is None)."""
        return check_weights(self.weights, len(self.checkpoints), self.normalize)

    def build(self, model_class: Any = None, dtype: torch.dtype | None = None):
        """The frozen soup model (eval mode, ``requires_grad=False``)."""
        self.validate()
        return _freeze(load_soup(self.checkpoints, self.resolved_weights(), model_class, dtype))

    def build_each(self, model_class: Any = None, dtype: torch.dtype | None = None) -> list:
        """Each checkpoint as its own frozen model (the Multiple-KL baseline)."""
        self.validate()
        return [_freeze(load_soup([c], [1.0], model_class, dtype)) for c in self.checkpoints]

    def fingerprint(self) -> dict:
        """Paths, weights and weight-file sha256s, to detect a changed reference on resume."""
        self.validate()
        plan = _plan(self.checkpoints)
        return {
            "kind": plan.kind,
            "checkpoints": [str(s.root.resolve()) for s in plan.sources],
            "weights": self.resolved_weights(),
            "sha256": [_hashes(s) for s in plan.sources],
            "base_sha256": _hashes(plan.base) if plan.base else None,
        }


def _freeze(model):
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- command line


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="salsa soup",
        description="Average SFT checkpoints (or LoRA adapters) into a model soup.",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    p.add_argument("--checkpoints", type=str, nargs="+", required=True, help="input dirs")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="default: uniform")
    p.add_argument("--output", type=str, required=True, help="output directory")
    p.add_argument("--normalize", action="store_true", help="rescale weights to sum to 1")
    p.add_argument("--lora_output", choices=["merged", "adapter"], default="merged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def soup_main(argv: list[str] | None = None) -> int:
    """Entry point of ``salsa soup``.

    Args:
        argv: Arguments after ``soup`` (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a bad input (the message is printed as ``error: ...``).
    """
    import argparse

    try:
        args = _parser().parse_args(argv)
        write_soup(
            args.checkpoints,
            args.weights,
            args.output,
            normalize=args.normalize,
            lora_output=args.lora_output,
            overwrite=args.overwrite,
            log=lambda s: print(s, flush=True),
        )
    except (SalsaError, argparse.ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
