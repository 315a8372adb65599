"""LoRA settings and adapters (peft), shared by every trainable stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from salsa_lightning.errors import require


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

    def __post_init__(self) -> None:
        # Refused here, before any model is built; peft would refuse some only when it wraps one.
        require(self.r >= 1, "model.lora.r", "at least 1", self.r)
        require(self.alpha > 0, "model.lora.alpha", "positive", self.alpha)
        require(0 <= self.dropout < 1, "model.lora.dropout", "in [0, 1)", self.dropout)
        targets = self.target_modules
        require(bool(targets), "model.lora.target_modules", "non-empty", repr(targets))


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


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper; any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def as_lora(lora: LoraSettings | dict | None) -> LoraSettings | None:
    """LoRA settings as given in Python (a dataclass) or by a YAML parsed without types (a dict)."""
    return LoraSettings(**lora) if isinstance(lora, dict) else lora


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute activations in backward (non-reentrant, so frozen inputs work with LoRA)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # deprecated there, removed in 6
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    return model
