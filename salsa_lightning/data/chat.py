"""Chat formatting of prompts and answers, and padding them into batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from salsa_lightning.errors import SalsaError

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)

Messages = list[dict[str, str]]


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


def value_problem(value: Any) -> str | None:
    """Why ``value`` is not text or a chat-message list (None: it is one)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "is empty (null or NaN)"
    if isinstance(value, bool | int | float):
        return "holds a number, not text"
    if isinstance(value, list) and not all(isinstance(m, dict) and "role" in m for m in value):
        return "holds a list that is not chat messages ({role, content} dicts)"
    if not isinstance(value, str | list):
        return f"holds a {type(value).__name__}, not text"
    return None


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
