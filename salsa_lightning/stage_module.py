"""What every stage's LightningModule shares (SFT, reward model, SALSA-PPO).

- the data module's tokenizer, exported with the model;
- LoRA settings and gradient checkpointing of the trained models;
- checks before fit that would otherwise fail after training (the export directory);
- frozen weights kept out of training checkpoints (they are rebuilt from their recipe), and
  the world size a checkpoint was written with, checked on resume;
- the export when fit ends: a Hugging Face directory written atomically by rank 0, from a full
  state dict gathered on every rank under FSDP.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from salsa_lightning.errors import SalsaError
from salsa_lightning.frozen import keep_frozen_out_of_state_dict
from salsa_lightning.lora import LoraSettings, as_lora, enable_gradient_checkpointing
from salsa_lightning.pretrained import check_export_dir, export_pretrained
from salsa_lightning.sharding import full_state_dict


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


class StageModule(L.LightningModule):
    """Base of the stage modules. Subclasses call ``save_hyperparameters`` (with ``export_dir``,
    ``overwrite`` and ``gradient_checkpointing`` among them) and implement
    :meth:`export_model`."""

    def __init__(self, lora: LoraSettings | None = None) -> None:
        super().__init__()
        self.lora = as_lora(lora)
        keep_frozen_out_of_state_dict(self)  # frozen weights are rebuilt from their recipe
        self.strict_loading = False
        self.tokenizer: Any = None  # the data module's (exported with the model), from setup

    def trainable(self, model: nn.Module) -> nn.Module:
        """A model about to be trained: gradient checkpointing as configured, train mode
        (``from_pretrained`` returns eval mode)."""
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model.train()

    def setup(self, stage: str) -> None:
        self.tokenizer = self.trainer.datamodule.tokenizer
        if stage == "fit":  # before any training, not after it
            check_export_dir(self.hparams.export_dir, self.hparams.overwrite)

    # -- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["world_size"] = self.trainer.world_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_world_size(checkpoint.get("world_size"), self._trainer)

    # -- export

    def export_model(self) -> nn.Module:
        """The trained model that fit exports."""
        raise NotImplementedError

    def training_record(self) -> dict[str, Any]:
        """What made the exported model (``salsa_training.json``)."""
        return {"stage": type(self).__name__, "hparams": dict(self.hparams)}

    def export_extras(self) -> dict[str, Any]:
        """JSON files written beside the exported model, ``{file name: object}``; called on
        every rank (it may run forward passes)."""
        return {"salsa_training.json": self.training_record()}

    def write_export(
        self, model: nn.Module, state_dict: dict | None, extras: dict[str, Any]
    ) -> None:
        """Rank 0 writes the export directory (subclasses add or change files)."""
        export_pretrained(model, self.tokenizer, self.hparams.export_dir, extras, state_dict)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir is None or self.trainer.interrupted:
            return
        model = self.export_model()
        state_dict = full_state_dict(model)  # gathered on every rank under FSDP
        extras = self.export_extras()
        if self.trainer.is_global_zero:
            self.write_export(model, state_dict, extras)
            rank_zero_info(f"{type(self).__name__}: exported to {self.hparams.export_dir}")
        self.trainer.strategy.barrier("export")
