"""Building soups: streamed into a checkpoint directory (:func:`write_soup`) or into a model in
memory (:func:`load_soup`, :func:`soup_state_dict`)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import check_free_space, check_writable_dir, written_aside
from salsa_lightning.pretrained import TOKENIZER_FILES, check_finite_weights
from salsa_lightning.soup.files import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    INDEX_FILE,
    RECIPE_FILE,
    ST_DTYPES,
    TensorFiles,
    copy_files,
    file_hashes,
    sha256,
    tensor_bytes,
    write_safetensors,
)
from salsa_lightning.soup.merge import (
    check_weights,
    concatenated_lora,
    lora_scale,
    merged_lora_weight,
    weighted_sum,
)
from salsa_lightning.soup.plan import (
    Plan,
    lora_modules,
    plain_tensors,
    plan_soup,
    warn_duplicates,
)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink: library calls print nothing."""


def merged_tensor(plan: Plan, name: str, weights: Sequence[float]) -> Tensor:
    """One output tensor of the soup (full average, or merged-LoRA average)."""
    if plan.kind == "full":
        return weighted_sum(name, (s.get(name) for s in plan.sources), weights)
    a0 = plan.adapters[0]
    plain = plain_tensors(a0)
    if name in plain:  # every merged model carries its own trained copy: average them
        return weighted_sum(name, (a.tensors.get(plain[name]) for a in plan.adapters), weights)
    base_t = plan.base.get(name)
    module = lora_modules(a0).get(name)
    if module is None:
        return base_t
    a_name, b_name, transposed = module
    factors = (
        (a.tensors.get(b_name), a.tensors.get(a_name), lora_scale(a.config)) for a in plan.adapters
    )
    return merged_lora_weight(base_t, factors, weights, transposed)


def soup_layout(plan: Plan) -> TensorFiles:
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
    plan = plan_soup(checkpoints)
    return {name: merged_tensor(plan, name, weights) for name in soup_layout(plan).meta}


def soup_bytes(plan: Plan, lora_output: str) -> int:
    """Bytes of weights the soup writes: the first input's tensors (LoRA merged: the base's), or
    for an adapter soup the adapters' factors side by side."""
    if plan.kind == "lora" and lora_output == "adapter":
        return sum(tensor_bytes(a.tensors.meta) for a in plan.adapters)
    return tensor_bytes(soup_layout(plan).meta)


def _write_full(plan: Plan, weights: Sequence[float], tmp: Path, log: Log) -> list[str]:
    layout = soup_layout(plan)
    total, done = len(layout.meta), 0
    log(f"averaging {total} tensors from {len(weights)} inputs into {len(layout.files)} file(s)")
    for fname in layout.files:
        names = [n for n, f in layout.where.items() if f == fname]
        write_safetensors(
            tmp / fname, names, layout.meta, lambda n: merged_tensor(plan, n, weights)
        )
        done += len(names)
        log(f"  {fname}: {done}/{total} tensors")
    if (layout.root / INDEX_FILE).exists():
        shutil.copy2(layout.root / INDEX_FILE, tmp / INDEX_FILE)
    copy_files(plan.config_dir, tmp, ["config.json", "generation_config.json"])
    copy_files(plan.tokenizer_dir, tmp, TOKENIZER_FILES)
    return layout.files


def _write_adapter(plan: Plan, weights: Sequence[float], tmp: Path, log: Log) -> list[str]:
    """Exact adapter of the soup by rank concatenation (:func:`concatenated_lora`)."""
    a0 = plan.adapters[0]
    r_new = sum(a.config["r"] for a in plan.adapters)
    out: dict[str, Tensor] = {}
    for a_name, b_name, _ in lora_modules(a0).values():
        factors = [
            (a.tensors.get(b_name), a.tensors.get(a_name), lora_scale(a.config))
            for a in plan.adapters
        ]
        out[b_name], out[a_name] = concatenated_lora(factors, weights)
    for a_name in plain_tensors(a0).values():
        out[a_name] = weighted_sum(a_name, (a.tensors.get(a_name) for a in plan.adapters), weights)
    log(f"concatenating {len(plan.adapters)} adapters into one of rank {r_new}")
    save_file(out, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = copy.deepcopy(a0.config)
    cfg.update(r=r_new, lora_alpha=r_new, use_rslora=False, rank_pattern={}, alpha_pattern={})
    cfg["base_model_name_or_path"] = str(a0.base)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    copy_files(plan.tokenizer_dir, tmp, TOKENIZER_FILES)
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
    plan = plan_soup(checkpoints)
    if lora_output == "adapter" and plan.kind != "lora":
        raise SalsaError("lora_output='adapter' needs LoRA adapter directories as checkpoints")
    output = Path(output)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise SalsaError(f"output {output} already exists; choose another or pass --overwrite")
        if any(output.resolve() == r.resolve() for r in plan.weight_roots()):
            raise SalsaError(f"output {output} is one of the soup's inputs; choose another")
    check_writable_dir(output.parent, "output's parent")
    log("hashing inputs")  # for the recipe, and to find an input listed twice under two names
    hashes = [file_hashes(src) for src in plan.sources]
    warn_duplicates(plan, hashes)
    check_free_space([(output, soup_bytes(plan, lora_output), "the soup")])
    with written_aside(output) as tmp:  # and the temporaries of killed runs removed
        if plan.kind == "lora" and lora_output == "adapter":
            out_files = _write_adapter(plan, weights, tmp, log)
        else:
            out_files = _write_full(plan, weights, tmp, log)
        log("hashing outputs")
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
                    "sha256": h,
                }
                for given, src, w, h in zip(plan.given, plan.sources, weights, hashes, strict=True)
            ],
            "base": (
                {"resolved": str(plan.base.root), "sha256": file_hashes(plan.base)}
                if plan.base
                else None
            ),
            "output_sha256": {f: sha256(tmp / f) for f in out_files},
        }
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    log(f"written to {output}")
    return output


def _version() -> str:
    from salsa_lightning import __version__

    return __version__


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
    plan = plan_soup(checkpoints)
    layout = soup_layout(plan)
    cls = model_class or AutoModelForCausalLM
    _check_fits(cls, plan, layout)
    if dtype is None:
        dtype = next(
            (ST_DTYPES[d] for _, d in layout.meta.values() if ST_DTYPES[d].is_floating_point),
            torch.float32,
        )
    model = cls.from_pretrained(str(layout.root), dtype=dtype)
    if plan.kind == "full" and len(plan.sources) == 1:  # a soup of one is that checkpoint
        return check_finite_weights(model, layout.root).eval()
    params = model.state_dict()
    with torch.no_grad():
        for name in layout.meta:
            params[name].copy_(merged_tensor(plan, name, weights))
    return model.eval()


def _check_fits(cls: Any, plan: Plan, layout: TensorFiles) -> None:
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
