"""The stages' data modules: SFT conversations, preference pairs, PPO prompts."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from salsa_lightning.data.base import ChatDataModule
from salsa_lightning.data.chat import (
    IGNORE_INDEX,
    as_messages,
    encode_chat,
    encode_prompt,
    fit_length,
    pad,
    padding_mask,
    split_conversation,
    value_problem,
)


class SFTDataModule(ChatDataModule):
    """Supervised fine-tuning data: ``messages`` (a chat ending in the assistant's answer) or
    ``prompt`` + ``response`` columns. Prompt tokens are masked out of the loss
    (``mask_prompt: false`` trains on every token, as the base model's pre-training does).

    Batches: ``input_ids``, ``attention_mask``, ``labels`` (all [B, T], right-padded; labels are
    -100 on prompt and padding).
    """

    required = (("messages",), ("prompt", "response"))
    text_columns = ("prompt", "response")

    def row_problem(self, row: dict[str, Any]) -> str | None:
        if row.get("messages") is not None:  # a conversation: the other columns are not read
            problem = value_problem(row["messages"])
            return f"column 'messages' {problem}" if problem else None
        if "messages" in row and "response" not in row:
            return "column 'messages' is empty (null or NaN)"
        return super().row_problem(row)

    embedded_files = ("sft_train.jsonl", "sft_val.jsonl")

    def __init__(self, *args: Any, mask_prompt: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hparams.mask_prompt = mask_prompt  # in the checkpoint: a resume keeps the loss

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("messages") is not None:
            messages, response = split_conversation(row["messages"], "messages")
        else:
            messages, response = as_messages(row["prompt"], "prompt"), row["response"]
        prompt, answer = encode_chat(self.tokenizer, messages, response)
        prompt, answer, keep, truncated = fit_length(
            prompt, answer, self.hparams.max_length, self.hparams.overflow
        )
        masked = [IGNORE_INDEX] * len(prompt) if self.hparams.mask_prompt else prompt
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


class PreferenceDataModule(ChatDataModule):
    """Preference pairs: ``prompt`` + ``chosen`` + ``rejected`` as text, or ``chosen`` and
    ``rejected`` as whole conversations (UltraFeedback-binarized), or ``chosen`` and ``rejected``
    as plain texts with no prompt. Pairs whose chosen and rejected are identical are counted and
    dropped, with a warning.

    Batches: ``input_ids`` and ``attention_mask`` [2B, T], the B chosen sequences first and the
    B rejected ones after, so the reward model scores a batch in one forward pass; ``labels``
    [2B, T], the ids with -100 on the prompt and the padding (the answer tokens DPO sums
    log-probs over).

    Args:
        group_by_prompt: Train on whole prompts instead of single pairs (the reward model's
            K-way comparisons, as InstructGPT trains it): a training row is one prompt with
            every pair of the training data that shares it, ``batch_size`` counts prompts, and
            a batch holds each distinct answer once (``input_ids`` [N, T]) with ``chosen_index``
            and ``rejected_index`` [P], each pair's two rows. K answers ranked in all K(K-1)/2
            pairs cost K sequences instead of K(K-1). Pairs without a prompt stay rows of their
            own; validation stays pair by pair.
        *args, **kwargs: ``ChatDataModule``'s.
    """

    required = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
    text_columns = ("chosen", "rejected")

    def row_problem(self, row: dict[str, Any]) -> str | None:
        if row.get("prompt") is not None and (problem := value_problem(row["prompt"])):
            return f"column 'prompt' {problem}"  # a missing prompt is allowed: plain texts
        return super().row_problem(row)

    embedded_files = ("pairs_train.jsonl", "pairs_val.jsonl")

    def __init__(self, *args: Any, group_by_prompt: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hparams.group_by_prompt = group_by_prompt  # in the checkpoint: a resume keeps it

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.hparams.group_by_prompt and "sequences" not in self.train_data.column_names:
            n = len(self.train_data)
            self.train_data = group_pairs(self.train_data)
            rank_zero_info(
                f"PreferenceDataModule train: {n} pairs grouped by prompt into "
                f"{len(self.train_data)} rows (data.group_by_prompt)"
            )

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
                "chosen_prompt_length": 0,
                "rejected_prompt_length": 0,
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
            out[f"{side}_prompt_length"] = len(prompt)
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
        if "sequences" in rows[0]:
            return self.collate_groups(rows)
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        prompts = [r["chosen_prompt_length"] for r in rows]
        prompts += [r["rejected_prompt_length"] for r in rows]
        return self.padded(seqs, prompts)

    def collate_groups(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows of ``group_pairs``: their answers stacked, their pairs' indices shifted to the
        answers' places in the stack."""
        seqs, prompts, chosen, rejected = [], [], [], []
        for row in rows:
            offset = len(seqs)
            seqs += row["sequences"]
            prompts += row["prompt_lengths"]
            chosen += [offset + i for i in row["chosen"]]
            rejected += [offset + i for i in row["rejected"]]
        return {
            **self.padded(seqs, prompts),
            "chosen_index": torch.tensor(chosen),
            "rejected_index": torch.tensor(rejected),
        }

    def padded(self, seqs: list[list[int]], prompts: list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding)
        of token sequences with their prompts' lengths, right-padded."""
        ids = pad(seqs, self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(s) for s in seqs])
        labels = [[IGNORE_INDEX] * n + s[n:] for s, n in zip(seqs, prompts, strict=True)]
        return {
            "input_ids": ids,
            "attention_mask": padding_mask(lengths, ids.shape[1]),
            "labels": pad(labels, IGNORE_INDEX),
        }


def group_pairs(pairs: datasets.Dataset) -> datasets.Dataset:
    """Tokenized preference pairs regrouped into one row per prompt: ``sequences`` (each
    distinct prompt + answer once, in order of appearance), their ``prompt_lengths``, and the
    prompt's pairs as indices into them, ``chosen`` and ``rejected``. Pairs are matched by the
    chosen side's prompt tokens; a pair with no prompt is a row of its own.

    Args:
        pairs: Rows of ``PreferenceDataModule.encode``: ``chosen_ids``, ``rejected_ids`` and
            their ``chosen_prompt_length``, ``rejected_prompt_length``.
    """
    groups: dict[Any, dict[str, Any]] = {}
    index: dict[Any, dict[tuple[int, ...], int]] = {}  # per prompt: a sequence's place
    for n, row in enumerate(pairs):
        prompt = tuple(row["chosen_ids"][: row["chosen_prompt_length"]]) or n
        if prompt not in groups:
            groups[prompt] = {"sequences": [], "prompt_lengths": [], "chosen": [], "rejected": []}
            index[prompt] = {}
        group, places = groups[prompt], index[prompt]
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            key = tuple(ids)
            if key not in places:
                places[key] = len(group["sequences"])
                group["sequences"].append(ids)
                group["prompt_lengths"].append(row[f"{side}_prompt_length"])
            group[side].append(places[key])
    return datasets.Dataset.from_list(list(groups.values()))


# ----------------------------------------------------------------------------- prompts


class PromptDataModule(ChatDataModule):
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

    def row_problem(self, row: dict[str, Any]) -> str | None:
        column = "prompt" if row.get("prompt") is not None or "messages" not in row else "messages"
        problem = value_problem(row.get(column))
        return f"column {column!r} {problem}" if problem else None

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
