"""The soup's input checks: what to read and how to combine it, decided from config files and
safetensors headers before any tensor is read or anything is written."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.pretrained import TOKENIZER_FILES
from salsa_lightning.soup.files import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    TensorFiles,
    read_header,
    read_json,
    read_weights,
)

PEFT_PREFIX = "base_model.model."

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


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory."""

    path: Path
    config: dict
    tensors: TensorFiles
    base: Path


@dataclass
class Plan:
    """Validated inputs of a soup: what to read and how to combine it."""

    kind: str  # "full" or "lora"
    given: list[str]  # paths as given
    sources: list[TensorFiles]  # full: the checkpoints; lora: the adapters
    adapters: list[Adapter]
    base: TensorFiles | None  # lora only
    config_dir: Path  # where config.json comes from
    tokenizer_dir: Path

    def weight_roots(self) -> list[Path]:
        """Every directory the soup reads weights from (an output must not replace one)."""
        return [s.root for s in self.sources] + ([self.base.root] if self.base else [])


def warn_duplicates(plan: Plan, hashes: Sequence[dict[str, str]] | None = None) -> None:
    """Warn about an input listed twice: one directory under two entries (by resolved path;
    ``plan_soup`` checks this for every soup), or, given ``hashes`` (the sha256 of each input's
    weight files, which ``write_soup`` computes for its recipe anyway), two directories holding
    the same weights. A duplicate is a valid soup (that model counts twice): not refused."""
    roots = [s.root.resolve() for s in plan.sources]
    for j in range(len(roots)):
        for i in range(j):
            if hashes is None and roots[i] == roots[j]:
                why = f"are the same directory ({roots[i]})"
            elif hashes is not None and roots[i] != roots[j] and hashes[i] == hashes[j]:
                why = "hold identical weight files (same sha256)"
            else:
                continue
            warnings.warn(
                f"soup inputs {i + 1} ({plan.given[i]}) and {j + 1} ({plan.given[j]}) {why}: that "
                "model counts twice in the soup; list it once (with the sum of its weights) "
                "unless that is meant.",
                stacklevel=3,
            )
            break


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


def _check_tensors(sources: Sequence[TensorFiles], lora: bool = False) -> None:
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
        data = read_json(tj)
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
        return _resolve_base(checkpoint, read_json(checkpoint / ADAPTER_CONFIG))
    return checkpoint


def _read_adapter(d: Path) -> Adapter:
    cfg = read_json(d / ADAPTER_CONFIG)
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
    meta = read_header(d / ADAPTER_FILE)
    tensors = TensorFiles(d, [ADAPTER_FILE], dict.fromkeys(meta, ADAPTER_FILE), meta)
    for name, (shape, _) in meta.items():
        if not name.startswith(PEFT_PREFIX):
            raise SalsaError(f"{d / ADAPTER_FILE}: unexpected tensor '{name}'")
        is_a = "lora_A" in name or "lora_embedding_A" in name
        rank = shape[0] if is_a else shape[-1]
        if ".lora_" in name and (len(shape) != 2 or rank != cfg["r"]):
            raise SalsaError(
                f"{d / ADAPTER_FILE}: tensor '{name}' has shape {shape}, expected a 2-D "
                f"LoRA factor of rank r={cfg['r']}; only Linear/Embedding LoRA is supported"
            )
    return Adapter(d, cfg, tensors, _resolve_base(d, cfg))


def lora_modules(adapter: Adapter) -> dict[str, tuple[str, str, bool]]:
    """Base weight name -> (A name, B name, transposed) for each LoRA'd module."""
    out = {}
    for name in adapter.tensors.meta:
        for a, b, emb in (
            ("lora_A", "lora_B", False),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            if name.endswith(f".{a}.weight") or name.endswith(f".{a}"):
                module = name[len(PEFT_PREFIX) :].split(f".{a}")[0]
                b_name = name.replace(a, b)
                # Embedding LoRA stores A as [r, vocab] and B as [dim, r]; the delta is
                # (B @ A).T. fan_in_fan_out (GPT-2 Conv1D) stores weights transposed too.
                out[f"{module}.weight"] = (
                    name,
                    b_name,
                    emb or bool(adapter.config["fan_in_fan_out"]),
                )
    return out


def plain_tensors(adapter: Adapter) -> dict[str, str]:
    """Base weight name -> adapter tensor name, for tensors the adapter replaces outright
    (modules_to_save copies and trained biases)."""
    return {
        n[len(PEFT_PREFIX) :].replace(".modules_to_save", ""): n
        for n in adapter.tensors.meta
        if ".lora_" not in n
    }


def plan_soup(checkpoints: Sequence[str | Path]) -> Plan:
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
        configs = [read_json(d / "config.json") for d in dirs]
        _check_configs(dirs, configs)
        sources = [read_weights(d) for d in dirs]
        _check_tensors(sources)
        _check_vocabs(dirs)
        plan = Plan("full", given, sources, [], None, dirs[0], dirs[0])
        warn_duplicates(plan)
        return plan

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
    base = read_weights(a0.base)
    read_json(a0.base / "config.json")  # fail now, not after writing, if it is broken
    for name, (a_name, b_name, t) in lora_modules(a0).items():
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
    for name, a_name in plain_tensors(a0).items():
        if name not in base.meta or base.meta[name] != a0.tensors.meta[a_name]:
            raise SalsaError(
                f"{a0.path / ADAPTER_FILE}: tensor '{a_name}' does not match base weight "
                f"'{name}' in {a0.base}"
            )
    _check_vocabs(dirs)
    tok_dir = dirs[0] if any((dirs[0] / f).is_file() for f in TOKENIZER_FILES) else a0.base
    plan = Plan("lora", given, [a.tensors for a in adapters], adapters, base, a0.base, tok_dir)
    warn_duplicates(plan)
    return plan
