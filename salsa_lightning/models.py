"""Loading, freezing and exporting Hugging Face models: the helpers every stage shares."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from salsa_lightning.errors import SalsaError

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

_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """Map a YAML dtype name ("float32", "bfloat16", "float16" or None) to a torch dtype."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise SalsaError(f"dtype {name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def is_local(name_or_path: str | os.PathLike) -> bool:
    """Whether a model reference is meant as a local path rather than a hub id."""
    text = str(name_or_path)
    return (
        Path(text).exists()
        or text.startswith((".", "/", "~"))
        or text.rstrip("/") in STAGE_OUTPUTS
        or text.count("/") > 1
    )


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
        markers = _TOKENIZER_FILES if what == "tokenizer" else _MODEL_FILES
        if not any((path / name).exists() for name in markers):
            raise SalsaError(
                f"{what} directory {text!r} holds none of {list(markers)}: not a Hugging Face "
                f"{'tokenizer' if what == 'tokenizer' else 'model'} directory."
            )
        return str(path)
    if is_local(text):
        hint = STAGE_OUTPUTS.get(text.rstrip("/"))
        stage = f" It is made by an earlier stage: run `{hint}` first." if hint else ""
        raise SalsaError(f"{what} path {text!r} does not exist.{stage}")
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


@dataclass
class LoraSettings:
    """LoRA adapter settings, passed to ``peft.LoraConfig``.

    Attributes:
        r: Adapter rank.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt; "all-linear" adapts every linear layer.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


# Saved in checkpoints' hyper_parameters (Python API); resuming loads with weights_only=True.
torch.serialization.add_safe_globals([LoraSettings])


def add_lora(model: PreTrainedModel, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapter (and score head) stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


class Frozen(nn.Module):
    """A submodule that stays frozen: no gradients, always in eval mode (dropout off).

    Lightning calls ``.train()`` on the whole LightningModule after each validation loop;
    this wrapper ignores it, so a frozen reference or reward model can never drift into
    train mode.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def check_world_size(written: int | None, trainer: Any) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    The data position and the RNG state are per process, and FSDP would reshard the weights
    silently: the run would continue on other data and samples.
    """
    world = trainer.world_size if trainer is not None else None  # None under load_from_checkpoint
    if written is not None and world is not None and written != world:
        raise SalsaError(
            f"checkpoint written with world size {written}, this run has {world}; resume "
            f"with {written} process(es) (trainer.devices x trainer.num_nodes)."
        )


def check_export_dir(export_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse, before training, to overwrite an export directory that already holds files."""
    if export_dir is None:
        return
    path = Path(export_dir)
    if path.exists() and not path.is_dir():
        raise SalsaError(
            f"export_dir {str(path)!r} is a file, not a directory; choose another path."
        )
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SalsaError(
            f"export_dir {str(path)!r} already holds a model. Choose another --model.export_dir, "
            "delete it, or pass --model.overwrite true to replace it."
        )


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def dataclass_dict(obj: Any) -> Any:
    """``asdict`` for dataclasses, identity otherwise (for recipes written to JSON)."""
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj


def keep_frozen_out_of_state_dict(module: nn.Module) -> None:
    """Make ``module.state_dict()`` skip parameters that do not train.

    Frozen weights (the soup reference, the reward model, a LoRA policy's base) are rebuilt
    from their recipe, so training checkpoints hold only what training changes. Applied as a
    state-dict hook, it holds for Lightning's plain and sharded (FSDP2, FSDP1) checkpoints alike; pair
    it with ``strict_loading = False``.
    """

    def drop_frozen(
        mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        for name, param in mod.named_parameters():
            if not param.requires_grad:
                # FSDP1 and activation checkpointing name their wrappers in parameter names,
                # not in state-dict keys.
                for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                    name = name.replace(wrapper, "")
                state_dict.pop(prefix + name, None)

    module.register_state_dict_post_hook(drop_frozen)


def decoder_layers(model: nn.Module, layer_class: str | None = None) -> list[nn.Module]:
    """The transformer blocks to shard one by one: modules of class ``layer_class``, or of the
    classes the model names in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``)."""
    names = {layer_class} if layer_class else set()
    if not names:
        for sub in model.modules():
            names.update(getattr(sub, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SalsaError(
            f"{type(model).__name__} has no known decoder-layer class to shard; name it in the "
            "YAML, e.g. --model.fsdp_layer_class LlamaDecoderLayer."
        )
    return layers


def shard(
    model: nn.Module,
    mesh: Any,
    layer_class: str | None = None,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the whole model, over the data-parallel
    mesh dimension. Frozen models are sharded the same way (they just never reach an optimizer).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model, layer_class):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict of a model sharded by FSDP2 (DTensor parameters) or FSDP1
    (``FullyShardedDataParallel`` units inside it), offloaded to CPU; under FSDP1 only rank 0
    gets the tensors, other ranks an empty dict. A collective: call it on every rank. None for
    a model that is not sharded."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()) and not any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1 offloading tensors that already live on the CPU crashes (gloo runs in tests).
    offload = next(model.parameters()).device.type != "cpu"
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)
    )
