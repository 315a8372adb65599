"""Resuming a fit from the command line, as documented: ``--ckpt_path last`` finds the newest
``last.ckpt`` where the checkpoint callback writes it and the resumed run logs on in that run's
directory; a checkpoint is read (and a truncated one refused) before any model is built; and a
setting that differs from the checkpoint's is refused by name instead of being silently
replaced (LightningCLI's own behaviour) or silently honoured.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from salsa_lightning.errors import SalsaError

LAST = "last"
# Settings a resumed run may change: where and whether it exports, and what it measures on the
# side. Every other setting shapes the training itself and must be the checkpoint's.
RESUMABLE = {
    "model": {"export_dir", "overwrite", "export_merged", "eval_kl_to_each", "max_skips"},
    "data": {"num_workers", "eval_batch_size"},
}


def checkpoint_dirs(trainer: Any) -> list[tuple[Path, int | None]]:
    """Where this trainer's checkpoint callback writes ``last.ckpt``: its ``dirpath``, or
    ``<logger dir>/version_<n>/checkpoints`` for every version of the run (newest last)."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return [(Path(callback.dirpath), None)]
    logger = trainer.logger
    if logger is None or getattr(logger, "root_dir", None) is None:
        return [(Path(trainer.default_root_dir) / "checkpoints", None)]
    versions = []
    for path in Path(logger.root_dir).glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", path.name)
        if match:
            versions.append((path / "checkpoints", int(match.group(1))))
    return sorted(versions, key=lambda v: v[1])


def resolve_last(trainer: Any) -> Path | None:
    """The newest ``last.ckpt`` of this run; the logger is pointed at its version, so the
    resumed run appends to the same metrics. None when there is none."""
    for directory, version in reversed(checkpoint_dirs(trainer)):
        last = directory / f"{LAST}.ckpt"
        if last.exists():
            if version is not None and hasattr(trainer.logger, "_version"):
                trainer.logger._version = version
            return last
    return None


def keep_metrics(logger: Any) -> None:
    """Lightning's CSVLogger deletes the metrics file of the directory it starts logging in: put
    the rows of the run being resumed back first, so its history stays in one file (rows logged
    after the checkpoint are logged again by the resumed run; readers keep the last per step)."""
    from lightning.pytorch.loggers import CSVLogger

    path = Path(logger.log_dir) / "metrics.csv"
    if not isinstance(logger, CSVLogger) or not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with warnings.catch_warnings():  # "previous log files ... will be deleted": not these
        warnings.simplefilter("ignore")
        writer = logger.experiment  # made now: it deletes the file
    if rows and isinstance(getattr(writer, "metrics", None), list):  # rank 0 (others: a dummy)
        writer.metrics = rows + writer.metrics
        writer.save()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents other than its tensors' data (a sharded checkpoint's
    ``meta.pt``); a truncated or foreign file is refused with its name."""
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        raise SalsaError(f"--ckpt_path {str(path)!r}: no checkpoint there ({source} is missing).")
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    except Exception as err:  # zip, pickle and allow-list errors all mean: not resumable
        raise SalsaError(
            f"--ckpt_path {str(path)!r} cannot be read as a Lightning checkpoint ({err}); it is "
            "truncated or corrupt: resume from another checkpoint or start a new run."
        ) from err


def plain(value: Any) -> Any:
    """Settings as comparable plain values (dataclasses as dicts, tuples as lists)."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def differences(was: Any, now: Any, where: str) -> list[str]:
    """``where.key: <was> in the checkpoint, <now> here`` for every leaf that differs."""
    if isinstance(was, dict) and isinstance(now, dict):
        keys = sorted(set(was) | set(now))
        return [d for k in keys for d in differences(was.get(k), now.get(k), f"{where}.{k}")]
    return [] if was == now else [f"{where}: {was!r} in the checkpoint, {now!r} here"]


def conflicts(saved: dict[str, Any], current: dict[str, Any], section: str) -> list[str]:
    """The settings that differ from the checkpoint's and may not change on resume."""
    out = []
    for name in sorted(set(saved) & set(current)):
        if name not in RESUMABLE[section]:
            out += differences(plain(saved[name]), plain(current[name]), f"{section}.{name}")
    return out


def check_resume(path: Path, module: Any, datamodule: Any) -> None:
    """Refuse to resume from ``path`` with settings other than the ones it was written with
    (the seed among them: it orders the data)."""
    ckpt = read_checkpoint(path)
    seed, now = ckpt.get("seed"), os.environ.get("PL_GLOBAL_SEED")
    found = (
        [] if seed in (None, now) else [f"seed_everything: {seed} in the checkpoint, {now} here"]
    )
    found += conflicts(ckpt.get("hyper_parameters", {}), dict(module.hparams), "model")
    if datamodule is not None:
        saved = ckpt.get("datamodule_hyper_parameters", {})
        found += conflicts(saved, dict(datamodule.hparams), "data")
    if found:
        allowed = ", ".join(f"{s}.{n}" for s, names in RESUMABLE.items() for n in sorted(names))
        raise SalsaError(
            f"--ckpt_path {str(path)!r} was written with other settings:\n  "
            + "\n  ".join(found)
            + "\nResume with the checkpoint's settings (the same --config files and flags), or "
            f"start a new run without --ckpt_path. A resumed run may change only {allowed}."
        )


class ReloadTrainDataOnResume(L.Callback):
    """Make a resumed fit continue at the checkpoint's data position.

    A module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the
    SFT and reward stages size their learning-rate schedule with it) makes Lightning build the
    training dataloader, and draw its first batch, before the checkpoint's loop state is
    restored; Lightning then keeps that loader and never hands it the saved position, so a
    resumed ``max_epochs`` run replayed its epoch from the first batch (measured with lightning
    2.6.6: SFT resumed at step 3 of 6 trained on batches 0-2 again and ended with other weights;
    under FSDP too). Dropping that loader when fit starts, which is before any restore (under
    FSDP the checkpoint is only opened later), makes Lightning build it again after the restore,
    with the position; a fresh run gets the same loader again.
    """

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.fit_loop._combined_loader = None  # rebuilt, with any saved state, when fit runs
