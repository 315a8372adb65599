"""The shared base of the data modules: sources, column mapping, value checks, tokenization and
loaders that resume mid-epoch."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from salsa_lightning import embedded
from salsa_lightning.data.chat import value_problem
from salsa_lightning.data.files import DATA_FORMATS, read_data_files
from salsa_lightning.errors import SalsaError, check_choices
from salsa_lightning.pretrained import load_tokenizer
from salsa_lightning.world_size import per_rank


class ChatDataModule(L.LightningDataModule):
    """Shared loading, column mapping, tokenization, filtering and loaders.

    Args:
        tokenizer: Hugging Face tokenizer id or directory; ``embedded`` is the shipped one.
        train_files: Local training file(s) (json, jsonl, parquet or csv). With neither files
            nor ``dataset``, the embedded task's files are written under ``task_dir`` and used.
        val_files: Local validation file(s).
        dataset: A hub dataset name (or a loader name such as ``json``), read with
            ``datasets.load_dataset(dataset, dataset_config, split=...)``.
        dataset_config: The hub dataset's config name.
        train_split: Split to train on.
        val_split: Split to validate on; with no validation files or split, ``val_fraction``
            of the training rows is held out.
        val_fraction: Fraction held out for validation when no validation source is named.
        columns: ``{canonical name: your column name}``, e.g. ``{prompt: instruction}``.
        max_length: Maximum tokens per sequence (prompt + response).
        overflow: ``truncate`` cuts the response to fit; ``filter`` drops the row.
        max_samples: Keep at most this many training rows (after shuffling with the seed).
        batch_size: Training rows per step over all ranks (the global batch; each of the
            world size's ranks loads an equal share: ``salsa_lightning.world_size``).
        eval_batch_size: Validation rows per step over all ranks (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: Seed of the shuffling order; None follows ``seed_everything``.
        task_dir: Where the embedded task's files go.
    """

    required: tuple[tuple[str, ...], ...] = ()  # alternatives of canonical column sets
    text_columns: tuple[str, ...] = ()  # canonical columns that must hold text (or chat messages)
    embedded_files: tuple[str, str] = ("", "")

    def __init__(
        self,
        tokenizer: str = embedded.EMBEDDED,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        columns: dict[str, str] | None = None,
        max_length: int = 128,
        overflow: Literal["truncate", "filter"] = "truncate",
        max_samples: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        task_dir: str = embedded.TASK_DIR,
    ) -> None:
        super().__init__()
        if train_files is not None and dataset is not None:
            raise SalsaError("name either data.train_files or data.dataset, not both.")
        if val_files is not None and train_files is None:
            raise SalsaError(
                f"data.val_files ({val_files}) is set but data.train_files is not: without "
                "train_files the embedded task's (or data.dataset's) own validation split is "
                "read and val_files would be ignored; name data.train_files too."
            )
        self.save_hyperparameters()
        check_choices("data", ChatDataModule.__init__, self.hparams)
        self.tokenizer_name = embedded.resolve(tokenizer)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: datasets.Dataset | None = None
        self.val_data: datasets.Dataset | None = None
        self.stats: dict[str, int] = {}

    # -- sources

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def uses_embedded_task(self) -> bool:
        return self.hparams.train_files is None and self.hparams.dataset is None

    def prepare_data(self) -> None:
        # An existing task directory is used as it is (it may have been written with other
        # TaskConfig settings); otherwise the default task is written there.
        if self.uses_embedded_task and not (Path(self.hparams.task_dir) / "task.json").exists():
            from salsa_lightning.task import write_task_files

            write_task_files(self.hparams.task_dir)

    def _files(self) -> tuple[list[str] | None, list[str] | None]:
        hp = self.hparams
        if self.uses_embedded_task:
            task = Path(hp.task_dir)
            train, val = (str(task / name) for name in self.embedded_files)
            return [train], [val]
        as_list = lambda f: None if f is None else ([f] if isinstance(f, str) else list(f))  # noqa: E731
        return as_list(hp.train_files), as_list(hp.val_files)

    def _read_hub(self, split: str) -> datasets.Dataset:
        hp = self.hparams
        local = os.path.isdir(hp.dataset) or hp.dataset in set(DATA_FORMATS.values())
        try:
            return datasets.load_dataset(hp.dataset, hp.dataset_config, split=split)
        except (ConnectionError, FileNotFoundError, ValueError, OSError) as err:
            offline = (
                os.environ.get("HF_DATASETS_OFFLINE") == "1"
                or os.environ.get("HF_HUB_OFFLINE") == "1"
            )
            why = (
                " while offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1) and not cached"
                if offline and not local
                else ""
            )
            raise SalsaError(
                f"could not load dataset {hp.dataset!r} (config {hp.dataset_config!r}, split {split!r}){why}: {err}"
            ) from err

    def load_raw(self) -> tuple[datasets.Dataset, datasets.Dataset | None, str, str]:
        """The raw train and validation datasets, and their sources' names for messages."""
        hp = self.hparams
        if hp.dataset is not None:
            train, source = self._read_hub(hp.train_split), f"{hp.dataset}[{hp.train_split}]"
            val = self._read_hub(hp.val_split) if hp.val_split else None
            val_source = f"{hp.dataset}[{hp.val_split}]"
        else:
            train_files, val_files = self._files()
            train, source = read_data_files(train_files), ", ".join(train_files)
            val = read_data_files(val_files) if val_files else None
            val_source = ", ".join(val_files or [])
        train = self.check_values(self.rename_columns(train, source), source)
        if val is not None:
            val = self.check_values(self.rename_columns(val, val_source), val_source)
        if val is None and hp.val_fraction > 0:
            if math.ceil(len(train) * hp.val_fraction) >= len(
                train
            ):  # no training row would remain
                raise SalsaError(
                    f"{source}: {len(train)} row(s) cannot be split by data.val_fraction="
                    f"{hp.val_fraction}; add rows, name data.val_files, or set data.val_fraction 0."
                )
            parts = train.train_test_split(test_size=hp.val_fraction, seed=self._seed())
            train, val = parts["train"], parts["test"]
            val_source = f"{source} (held-out {hp.val_fraction:g})"
        return train, val, source, val_source

    def _seed(self) -> int:
        if self.hparams.seed is not None:
            return self.hparams.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # -- columns

    def rename_columns(self, data: datasets.Dataset, source: str) -> datasets.Dataset:
        """Map the user's column names to canonical ones and check the required ones exist."""
        mapping = {v: k for k, v in (self.hparams.columns or {}).items() if v != k}
        missing_mapped = [v for v in mapping if v not in data.column_names]
        if missing_mapped:
            raise SalsaError(
                f"{source}: data.columns names column(s) {missing_mapped} that do not exist; "
                f"found columns {data.column_names}."
            )
        data = data.rename_columns(mapping)
        if not any(set(alt) <= set(data.column_names) for alt in self.required):
            expected = " or ".join("+".join(alt) for alt in self.required)
            raise SalsaError(
                f"{source}: missing column(s): expected {expected}, found {data.column_names}. "
                "Map your names with data.columns, e.g. --data.columns '{prompt: instruction}'."
            )
        return data

    def row_problem(self, row: dict[str, Any]) -> str | None:
        """Which column of a canonical row holds no usable text, and why (None: the row is fine).
        Text is a string, or a list of chat messages."""
        for column in self.text_columns:
            if column in row:
                problem = value_problem(row[column])
                if problem:
                    return f"column {column!r} {problem}"
        return None

    def check_values(self, data: datasets.Dataset, source: str) -> datasets.Dataset:
        """Refuse rows whose text columns hold nothing usable (null, NaN, a number), naming the
        source, the column, the count and the first row, before anything is tokenized."""
        columns = [c for c in ("messages", "prompt", *self.text_columns) if c in data.column_names]
        columns = list(dict.fromkeys(columns))
        problems: dict[str, list[tuple[int, dict]]] = {}
        for i, row in enumerate(data.select_columns(columns)):
            problem = self.row_problem(row)
            if problem:
                problems.setdefault(problem, []).append((i + 1, row))
        if problems:
            problem, rows = next(iter(problems.items()))
            first, row = rows[0]
            raise SalsaError(
                f"{source}: {problem} in {len(rows)} row(s) (first: row {first}, "
                f"{json.dumps(row, default=str)[:120]}); fill in or remove those rows."
            )
        return data

    # -- tokenization (subclasses)

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """Tokenize one canonical row; return ``{"keep": False}`` to drop it."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    # -- pipeline

    def check_rows(self, data: datasets.Dataset, source: str, split: str) -> None:
        """Inspect canonical rows before tokenization (subclasses count problems here)."""

    def _tokenize(self, data: datasets.Dataset, source: str, split: str) -> datasets.Dataset:
        self.check_rows(data, source, split)
        n = len(data)
        data = data.map(self.encode, num_proc=None, desc=f"tokenizing {split}")
        truncated = sum(data["truncated"]) if "truncated" in data.column_names else 0
        data = data.filter(lambda keep: keep, input_columns="keep")
        self.stats.update(
            {f"{split}/rows": n, f"{split}/truncated": truncated, f"{split}/dropped": n - len(data)}
        )
        rank_zero_info(
            f"{type(self).__name__} {split}: {n} rows from {source}; {truncated} truncated, "
            f"{n - len(data)} dropped (max_length={self.hparams.max_length}, "
            f"overflow={self.hparams.overflow})"
        )
        if len(data) == 0:
            if self.stats.get(f"{split}/identical") == n:
                raise SalsaError(
                    f"{source}: every {split} pair has chosen == rejected, so no pair is left to "
                    "learn from; check the chosen and rejected columns."
                )
            # Truncation cuts responses only: a row whose prompt alone does not fit is dropped
            # under either setting.
            other = "" if self.hparams.overflow == "truncate" else " or use overflow: truncate"
            raise SalsaError(
                f"{source}: no {split} rows left after filtering to max_length="
                f"{self.hparams.max_length} (overflow: {self.hparams.overflow}); raise "
                f"data.max_length{other}."
            )
        return data

    @property
    def world_size(self) -> int:
        """The number of ranks that share each batch (1 without a Trainer)."""
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    def rank_batch_sizes(self) -> tuple[int, int]:
        """``(train, eval)`` rows per rank and step: ``batch_size`` and ``eval_batch_size``
        counted over all ranks, shared out (``salsa_lightning.world_size``), or refused."""
        hp, world = self.hparams, self.world_size
        train = per_rank(hp.batch_size, world, "data.batch_size")
        eval_size = hp.eval_batch_size or hp.batch_size
        setting = "data.eval_batch_size" if hp.eval_batch_size else "data.batch_size"
        return train, per_rank(eval_size, world, setting)

    def setup(self, stage: str | None = None) -> None:
        self.rank_batch_sizes()  # before any data is read or model built
        if self.train_data is not None:
            return
        if self.uses_embedded_task:
            self.prepare_data()  # idempotent; covers use without a Trainer
        train, val, source, val_source = self.load_raw()
        if self.hparams.max_samples is not None:
            train = train.shuffle(seed=self._seed()).select(
                range(min(len(train), self.hparams.max_samples))
            )
        self.train_data = self._tokenize(train, source, "train")
        self.val_data = self._tokenize(val, val_source, "val") if val is not None else None

    def _loader(self, data: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Each new iterator draws its workers' base seed from `generator`; by default that is
        # the global RNG, so a resumed run (which starts a fresh iterator mid-epoch, after the
        # RNG state was restored) would sample differently from an uninterrupted one.
        generator = torch.Generator().manual_seed(self._seed())
        if not shuffle:
            return DataLoader(
                data,
                batch_size=batch_size,
                collate_fn=self.collate,
                num_workers=self.hparams.num_workers,
                generator=generator,
            )
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = ResumableSampler(data, num_replicas=self.world_size, rank=rank, seed=self._seed())
        return ResumableLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.rank_batch_sizes()[0], shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # Lightning gives it a DistributedSampler under several ranks (each its share).
        if self.val_data is None:
            return []
        return self._loader(self.val_data, self.rank_batch_sizes()[1], shuffle=False)


def held_out_rows(sampler: Any, batch_idx: int, batch_size: int, rows: int) -> Tensor:
    """[rows] True for the held-out prompts of a validation batch, False for the copies a
    ``DistributedSampler`` appends so that every rank runs as many batches as the others.

    The metrics update on the selected rows only. Without that, a data set that does not split
    evenly over the ranks would count some prompts twice, and the metrics would differ from one
    process's. (Weighting the copies by 0 instead is not enough: torchmetrics 1.9's
    ``MeanMetric(nan_strategy="disable")`` replaces the weights with ones, its issue #3434.)

    Args:
        sampler: The validation loader's sampler (Lightning's ``DistributedSampler`` on several
            ranks; anything else adds no copies).
        batch_idx: The batch's index in this rank's loader.
        batch_size: The loader's batch size.
        rows: The batch's rows.
    """
    keep = torch.ones(rows, dtype=torch.bool)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        # Rank r serves positions r, r + world, ... of the padded index list; those from the
        # data set's length on are copies.
        own = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
        first = batch_idx * batch_size
        keep[max(own - first, 0) :] = False
    return keep


class ResumableSampler(DistributedSampler):
    """A seeded per-epoch shuffle, one shard per rank, that can start mid-epoch.

    Being a ``DistributedSampler``, Lightning keeps it under DDP/FSDP (and calls ``set_epoch``).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0  # indices of epoch `skip_epoch` already served before a resume
        self.skip_epoch = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip = self.skip if self.epoch == self.skip_epoch else 0
        self.skip = 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: it records how many batches of the current
    epoch it has served, and a resumed run continues with the next one (the data position)."""

    served = 0

    def __iter__(self) -> Iterator[Any]:
        resumed = self.sampler.epoch == self.sampler.skip_epoch
        self.served = self.sampler.skip // self.batch_size if resumed else 0
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning calls set_epoch itself; the skip applies only to the interrupted epoch.
        self.sampler.skip_epoch = state["epoch"]
        self.sampler.skip = state["batches"] * self.batch_size
