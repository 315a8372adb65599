"""LightningDataModules on top of ``datasets``: SFT conversations, preference pairs, PPO prompts.

Each reads local json/jsonl/parquet/csv files or a hub dataset (name, config, split), maps the
user's column names onto the canonical ones, formats conversations with the tokenizer's chat
template and tokenizes once with ``datasets.map``. With no files and no dataset named it writes
and reads the embedded default task (``salsa_lightning.task``).

Chat formatting: with a chat template, the prompt is ``apply_chat_template(prompt_messages,
add_generation_prompt=True)`` and the response is what the full conversation adds after it.
Without one, the documented fallback is::

    ### User:
    {content}

    ### Assistant:
    {response}<eos>

(earlier turns are written the same way), so prompt tokens are always a prefix of the full
sequence and are masked out of the SFT loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from salsa_lightning import embedded
from salsa_lightning.errors import SalsaError
from salsa_lightning.models import load_tokenizer

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------- formatting


def fallback_chat(messages: Messages, add_generation_prompt: bool, eos: str) -> str:
    """The documented chat format for tokenizers without a chat template."""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"### Assistant:\n{m['content']}{eos}\n\n")
        else:
            parts.append(f"### {m['role'].capitalize()}:\n{m['content']}\n\n")
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a prompt conversation, ending where the assistant's answer starts."""
    if tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    text = fallback_chat(messages, add_generation_prompt=True, eos=tokenizer.eos_token or "")
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, response: str
) -> tuple[list[int], list[int]]:
    """Tokenize a prompt conversation and the assistant's response to it.

    Returns:
        ``(prompt_ids, response_ids)``: concatenated they are the formatted conversation up to
        the response's EOS token, which ends ``response_ids``; what a template writes after
        it (ChatML's newline) is dropped.
    """
    prompt_ids = encode_prompt(tokenizer, messages)
    full_messages = [*messages, {"role": "assistant", "content": response}]
    if tokenizer.chat_template:
        full = list(tokenizer.apply_chat_template(full_messages, tokenize=True, return_dict=False))
    else:
        text = fallback_chat(full_messages, add_generation_prompt=False, eos=tokenizer.eos_token)
        full = tokenizer(text.rstrip("\n"), add_special_tokens=True)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        # Some templates re-tokenise across the boundary; keep the prompt exact, append the rest.
        full = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
        full.append(tokenizer.eos_token_id)
    response_ids = full[len(prompt_ids) :]
    # Sampling stops at EOS, so a rollout never holds what follows it. Cut there, SFT teaches,
    # the reward model learns on, and PPO scores the same token sequences; with pad == eos a
    # sequence classifier reads each of them at the same token (the last one before the EOS).
    if tokenizer.eos_token_id in response_ids:
        end = len(response_ids) - response_ids[::-1].index(tokenizer.eos_token_id)
        response_ids = response_ids[:end]
    return prompt_ids, response_ids


def as_messages(value: Any, column: str) -> Messages:
    """A prompt given as plain text or as a list of chat messages, as a message list."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise SalsaError(
        f"column {column!r} must hold text or a list of chat messages, got {value!r:.80}"
    )


def split_conversation(value: Any, column: str) -> tuple[Messages, str]:
    """A conversation ending in an assistant turn -> (prompt messages, response text)."""
    messages = as_messages(value, column)
    if messages[-1]["role"] != "assistant":
        raise SalsaError(f"column {column!r}: the conversation must end with an assistant turn.")
    return messages[:-1], messages[-1]["content"]


# ----------------------------------------------------------------------------- base class


class _ChatDataModule(L.LightningDataModule):
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
        batch_size: Training batch size per device.
        eval_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: Seed of the shuffling order; None follows ``seed_everything``.
        task_dir: Where the embedded task's files go.
    """

    required: tuple[tuple[str, ...], ...] = ()  # alternatives of canonical column sets
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
        overflow: str = "truncate",
        max_samples: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        task_dir: str = embedded.TASK_DIR,
    ) -> None:
        super().__init__()
        if overflow not in ("truncate", "filter"):
            raise SalsaError(f"data.overflow must be 'truncate' or 'filter', got {overflow!r}.")
        if train_files is not None and dataset is not None:
            raise SalsaError("name either data.train_files or data.dataset, not both.")
        self.save_hyperparameters()
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

    def _read_files(self, files: list[str]) -> datasets.Dataset:
        for f in files:
            if not Path(f).is_file():
                raise SalsaError(f"data file {f!r} does not exist.")
        kinds = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise SalsaError(
                f"data files {files} must all be one of {sorted(_FORMATS)} (by their extension)."
            )
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")

    def _read_hub(self, split: str) -> datasets.Dataset:
        hp = self.hparams
        local = os.path.isdir(hp.dataset) or hp.dataset in set(_FORMATS.values())
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
            train, source = self._read_files(train_files), ", ".join(train_files)
            val = self._read_files(val_files) if val_files else None
            val_source = ", ".join(val_files or [])
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
        data = self.rename_columns(data, source)
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
            raise SalsaError(
                f"{source}: no {split} rows left after filtering to max_length="
                f"{self.hparams.max_length}; raise data.max_length or use overflow: truncate."
            )
        return data

    def setup(self, stage: str | None = None) -> None:
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
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(data, num_replicas=world, rank=rank, seed=self._seed())
        return ResumableLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(self.val_data, size, shuffle=False)


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


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ids into a [B, T] long tensor, on the right (or the left)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s) :] = torch.tensor(s)
            else:
                out[i, : len(s)] = torch.tensor(s)
    return out


def padding_mask(lengths: torch.Tensor, width: int, left: bool = False) -> torch.Tensor:
    """[B, width] attention mask for sequences of ``lengths`` padded on the right (or left)."""
    positions = torch.arange(width, device=lengths.device)
    mask = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    return mask.long()


def left_padded_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Format single-turn prompts with the chat template: [B, P] left-padded ids and mask."""
    rows = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids = pad(rows, tokenizer.pad_token_id, left=True)
    return ids, padding_mask(torch.tensor([len(r) for r in rows]), ids.shape[1], left=True)


def right_padded_chats(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-turn prompt + response conversations in ``tokenizer``'s chat format, as a
    right-padded [B, T] batch of ids and its mask (what a reward model scores)."""
    rows = [
        sum(encode_chat(tokenizer, [{"role": "user", "content": p}], r), [])
        for p, r in zip(prompts, responses, strict=True)
    ]
    ids = pad(rows, tokenizer.pad_token_id)
    return ids, padding_mask(torch.tensor([len(r) for r in rows]), ids.shape[1])


def fit_length(
    prompt: list[int], response: list[int], max_length: int, overflow: str
) -> tuple[list[int], list[int], bool, bool]:
    """Apply the length limit: returns (prompt, response, keep, truncated)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, True, False
    if overflow == "filter" or len(prompt) >= max_length:
        return prompt, response, False, False
    return prompt, response[: max_length - len(prompt)], True, True


# ----------------------------------------------------------------------------- SFT


class SFTDataModule(_ChatDataModule):
    """Supervised fine-tuning data: ``messages`` (a chat ending in the assistant's answer) or
    ``prompt`` + ``response`` columns. Prompt tokens are masked out of the loss
    (``mask_prompt: false`` trains on every token, as the base model's pre-training does).

    Batches: ``input_ids``, ``attention_mask``, ``labels`` (all [B, T], right-padded; labels are
    -100 on prompt and padding).
    """

    required = (("messages",), ("prompt", "response"))
    embedded_files = ("sft_train.jsonl", "sft_val.jsonl")

    def __init__(self, *args: Any, mask_prompt: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_prompt = mask_prompt

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("messages") is not None:
            messages, response = split_conversation(row["messages"], "messages")
        else:
            messages, response = as_messages(row["prompt"], "prompt"), row["response"]
        prompt, answer = encode_chat(self.tokenizer, messages, response)
        prompt, answer, keep, truncated = fit_length(
            prompt, answer, self.hparams.max_length, self.hparams.overflow
        )
        masked = [IGNORE_INDEX] * len(prompt) if self.mask_prompt else prompt
        return {
            "input_ids": prompt + answer,
            "labels": masked + answer,
            "keep": keep,
            "truncated": truncated,
        }

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        return {
            "input_ids": ids,
            "attention_mask": padding_mask(lengths, ids.shape[1]),
            "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
        }


# ----------------------------------------------------------------------------- preferences


class PreferenceDataModule(_ChatDataModule):
    """Preference pairs: ``prompt`` + ``chosen`` + ``rejected`` as text, or ``chosen`` and
    ``rejected`` as whole conversations (UltraFeedback-binarized), or ``chosen`` and ``rejected``
    as plain texts with no prompt. Pairs whose chosen and rejected are identical are counted and
    dropped, with a warning.

    Batches: ``input_ids`` and ``attention_mask`` [2B, T], the B chosen sequences first and the
    B rejected ones after, so the reward model scores a batch in one forward pass.
    """

    required = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
    embedded_files = ("pairs_train.jsonl", "pairs_val.jsonl")

    def _side(self, row: dict[str, Any], side: str) -> tuple[list[int], list[int]]:
        value = row[side]
        if isinstance(value, list):
            messages, response = split_conversation(value, side)
            return encode_chat(self.tokenizer, messages, response)
        if row.get("prompt") is not None:
            return encode_chat(self.tokenizer, as_messages(row["prompt"], "prompt"), value)
        ids = self.tokenizer(value, add_special_tokens=True)["input_ids"]
        return [], [*ids, self.tokenizer.eos_token_id]

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["chosen"] == row["rejected"]:
            return {
                "chosen_ids": [],
                "rejected_ids": [],
                "keep": False,
                "truncated": False,
                "identical": True,
            }
        out: dict[str, Any] = {"keep": True, "truncated": False, "identical": False}
        for side in ("chosen", "rejected"):
            prompt, response = self._side(row, side)
            prompt, response, keep, truncated = fit_length(
                prompt, response, self.hparams.max_length, self.hparams.overflow
            )
            out[f"{side}_ids"] = prompt + response
            out["keep"] &= keep
            out["truncated"] |= truncated
        return out

    def check_rows(self, data: datasets.Dataset, source: str, split: str) -> None:
        pairs = data.select_columns(["chosen", "rejected"])
        n_identical = sum(row["chosen"] == row["rejected"] for row in pairs)
        if n_identical:
            rank_zero_warn(
                f"{source} ({split}): dropped {n_identical} pairs whose chosen and rejected are identical."
            )
        self.stats[f"{split}/identical"] = n_identical

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        ids = pad(seqs, self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(s) for s in seqs])
        return {
            "input_ids": ids,
            "attention_mask": padding_mask(lengths, ids.shape[1]),
        }


# ----------------------------------------------------------------------------- prompts


class PromptDataModule(_ChatDataModule):
    """Prompts for PPO rollouts: a ``prompt`` column (text or chat messages) or ``messages``
    (a trailing assistant turn is dropped). Other columns (for example the embedded task's
    ``answer``) travel with the batch for reward functions.

    Args:
        test_files: Extra prompt sets evaluated by ``salsa evaluate`` (for example the embedded
            task's out-of-distribution split).

    Batches: ``input_ids`` and ``attention_mask`` [B, P], LEFT-padded for generation, and
    ``prompt`` (list of B prompt texts as the reward function sees them).
    """

    required = (("prompt",), ("messages",))
    embedded_files = ("prompts_train.jsonl", "prompts_val.jsonl")

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        value = row.get("prompt") if row.get("prompt") is not None else row["messages"]
        messages = as_messages(value, "prompt")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids = encode_prompt(self.tokenizer, messages)
        keep = len(ids) <= self.hparams.max_length
        return {
            "prompt_ids": ids,
            "prompt_text": messages[-1]["content"],
            "keep": keep,
            "truncated": False,
        }

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = pad([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id, left=True)
        lengths = torch.tensor([len(r["prompt_ids"]) for r in rows])
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": padding_mask(lengths, ids.shape[1], left=True),
            "prompt": [r["prompt_text"] for r in rows],
        }
        extra = set(rows[0]) - {
            "prompt_ids",
            "prompt_text",
            "keep",
            "truncated",
            "prompt",
            "messages",
        }
        for key in sorted(extra):
            batch[key] = [r[key] for r in rows]
        return batch
