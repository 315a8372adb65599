"""The part the SFT and reward stages share: build a Hugging Face model in ``configure_model``,
optionally with LoRA, optimise it with AdamW and a cosine schedule, and export it when fit ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from salsa_lightning import embedded
from salsa_lightning.errors import SalsaError
from salsa_lightning.lora import LoraSettings, add_lora
from salsa_lightning.pretrained import (
    check_model_source,
    export_pretrained,
    load_pretrained,
    torch_dtype,
)
from salsa_lightning.sharding import shard
from salsa_lightning.stage_module import StageModule, check_warmup, checked_optimizer


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at 1e-4 with no weight decay: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class FineTuneModule(StageModule):
    """Base of the SFT and reward modules.

    Args:
        model: Hub id or local Hugging Face directory to start from; ``embedded`` is the shipped
            tiny base model. Ignored when ``model_config`` is given.
        model_config: Build a randomly initialised model from this config instead, e.g.
            ``{model_type: llama, hidden_size: 64, ...}``; vocabulary size and special token
            ids are taken from the data module's tokenizer.
        lora: LoRA settings; None trains every weight.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        compile: Compile the model's transformer stack (``torch.compile``, dynamic shapes: one
            graph for every sequence length) for its forwards (``salsa_lightning.compiling``);
            the first steps pay the compiles. One device only; on the CPU Inductor needs a C++
            compiler.
        dtype: Weights dtype (``float32``, ``bfloat16``, ``float16``); None keeps the checkpoint's.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; None is the default.
        optimizer: Optimizer factory (``class_path`` + ``init_args`` in YAML).
        warmup: Linear warmup steps for the cosine schedule, as a fraction of all steps (< 1)
            or a step count (>= 1).
        export_dir: When set, fit ends by writing a Hugging Face model directory here.
        export_merged: With LoRA, also write the merged model to ``export_dir/merged``.
        overwrite: Replace an existing ``export_dir``.
        fsdp_layer_class: Under FSDP, the class of the blocks sharded one by one (default: the
            model's ``_no_split_modules``, e.g. ``LlamaDecoderLayer``).
    """

    auto_class: Any = None  # transformers Auto class of the stage
    task_type = "CAUSAL_LM"  # peft task type

    def __init__(
        self,
        model: str | None = embedded.EMBEDDED,
        model_config: dict[str, Any] | None = None,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        warmup: float = 0.1,
        export_dir: str | None = None,
        export_merged: bool = False,
        overwrite: bool = False,
        fsdp_layer_class: str | None = None,
    ) -> None:
        super().__init__(lora)
        if model is None and model_config is None:
            raise SalsaError("set model.model (a path or hub id) or model.model_config.")
        check_warmup(warmup)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_name = embedded.resolve(model) if model_config is None else None
        self.optimizer_factory = checked_optimizer(optimizer)
        self.model: nn.Module | None = None

    # -- building

    def setup(self, stage: str) -> None:
        # Fail before any training on inputs that cannot work.
        if self.model_name is not None:
            check_model_source(self.model_name, "model.model")
        super().setup(stage)

    def build_backbone(self) -> PreTrainedModel:
        """The Hugging Face model, from a checkpoint or from ``model_config``."""
        hp = self.hparams
        kwargs: dict[str, Any] = {"dtype": torch_dtype(hp.dtype)} if hp.dtype else {}
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        if hp.model_config is not None:
            tok = self.tokenizer
            spec = dict(hp.model_config)
            model_type = spec.pop("model_type", "llama")
            for key, value in (
                ("vocab_size", len(tok)),
                ("pad_token_id", tok.pad_token_id),
                ("bos_token_id", tok.bos_token_id),
                ("eos_token_id", tok.eos_token_id),
            ):
                spec.setdefault(key, value)
            config = AutoConfig.for_model(model_type, **spec)
            return self.auto_class.from_config(config, **kwargs)
        return self.load_pretrained(self.model_name, **kwargs)

    def load_pretrained(self, source: str, **kwargs: Any) -> PreTrainedModel:
        return load_pretrained(self.auto_class, source, **kwargs)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_backbone()
        if self.lora is not None:
            model = add_lora(model, self.lora, self.task_type)
        model = self.trainable(model)
        if self.device_mesh is not None:  # FSDP2 (ModelParallelStrategy)
            shard(model, self.device_mesh, self.hparams.fsdp_layer_class)
        self.model = model
        self.compile_models(model)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        rank_zero_info(f"{type(self).__name__}: {n_train:,} trainable of {n_all:,} parameters")

    # -- optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        return self.warmup_cosine_optimizers()

    # -- export

    def export_model(self) -> nn.Module:
        return self.model

    def write_export(
        self, model: nn.Module, state_dict: dict | None, extras: dict[str, Any]
    ) -> None:
        super().write_export(model, state_dict, extras)
        if self.lora is not None and self.hparams.export_merged:
            merged = copy.deepcopy(model).merge_and_unload()
            export_pretrained(merged, self.tokenizer, Path(self.hparams.export_dir) / "merged")
