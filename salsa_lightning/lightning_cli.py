"""``SalsaCLI``: LightningCLI with the project's defaults, for ``salsa fit|validate|test|predict``
(``commands.run_command``).

Importing it imports every LightningModule and LightningDataModule of the package, so that a
YAML or a command line may also name them by class name alone (``--model SALSAModule``), as
LightningCLI finds subclasses.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

import salsa_lightning
from salsa_lightning.errors import require

for _name in salsa_lightning.__all__:
    getattr(salsa_lightning, _name)  # the package's classes, loaded on first use


class SalsaCLI(LightningCLI):
    """LightningCLI with the project's defaults: errors in inputs end the run with a message,
    output directories are checked before anything is built, and ``--ckpt_path`` resumes as
    documented (``salsa_lightning.resume``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_checkpointing false` turns the YAML's checkpoint callback off too
        # (Lightning would refuse the pair).
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if (
            trainer is not None
            and trainer.get("enable_checkpointing") is False
            and trainer.get("callbacks")
        ):
            trainer.callbacks = [
                c for c in trainer.callbacks
                if not str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")
            ]  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        """Keep this run's settings: LightningCLI would replace them with the checkpoint's
        without a word; ``before_fit`` refuses the ones that differ instead."""

    def before_fit(self) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        from salsa_lightning.outputs import check_writable_dir
        from salsa_lightning.resume import (
            LAST,
            check_resume,
            checkpoint_dirs,
            keep_metrics,
            resolve_last,
        )

        trainer, config = self.trainer, self.config_init[self.subcommand]
        if config.get("ckpt_path") == LAST:
            found = resolve_last(trainer)
            if found is None:
                where = ", ".join(str(d) for d, _ in checkpoint_dirs(trainer)) or "nowhere yet"
                rank_zero_info(f"--ckpt_path last: no last.ckpt in {where}; starting a new run.")
            config["ckpt_path"] = None if found is None else str(found)
        if config.get("ckpt_path"):
            rank_zero_info(f"resuming from {config['ckpt_path']}")
            check_resume(Path(config["ckpt_path"]), self.model, self.datamodule)
            if trainer.logger is not None:
                keep_metrics(trainer.logger)
        logger, callback = trainer.logger, trainer.checkpoint_callback
        if logger is not None and getattr(logger, "save_dir", None):
            check_writable_dir(logger.save_dir, "trainer.logger save_dir")
        if callback is not None and callback.dirpath:
            check_writable_dir(callback.dirpath, "the checkpoint callback's dirpath")
        check_writable_dir(trainer.default_root_dir, "trainer.default_root_dir")
        # Lightning takes 0 and fails dividing by it when the schedule counts the steps.
        steps = trainer.accumulate_grad_batches
        require(steps >= 1, "trainer.accumulate_grad_batches", "at least 1", steps)
