"""Sampling responses and reading their log-probabilities: shared by SALSA-PPO and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from salsa_lightning import functional as F


@dataclass
class GenerationSettings:
    """How responses are sampled.

    Attributes:
        max_new_tokens: Longest response.
        temperature: Sampling temperature (log-probs are computed at the same temperature).
        top_p: Nucleus sampling threshold (1.0: off).
        missing_eos_penalty: Subtracted from the score of a response that never emits EOS.
        stop_at_eos: Stop decoding once every response has emitted EOS and mask what follows.
            Off (benchmarks, so every system generates the same number of tokens), every
            response is ``max_new_tokens`` long and EOS is an ordinary token.
        do_sample: Sample (PPO's default); False decodes greedily (deterministic evaluation).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 1.0
    stop_at_eos: bool = True
    do_sample: bool = True


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generation used them: [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    query: Tensor,
    query_mask: Tensor,
    settings: GenerationSettings,
    synced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample one response per left-padded prompt with the KV cache.

    Args:
        model: A causal LM (or peft model) with ``generate``.
        tokenizer: Gives the EOS and pad ids.
        query: [B, P] prompt ids, left-padded.
        query_mask: [B, P] attention mask of the prompts.
        settings: Sampling settings.
        synced: Keep every rank decoding until all are done (required under FSDP).

    Returns:
        ``(response, mask)``: [B, R] ids with pad after the first EOS, and the [B, R] float mask
        that is 1 up to and including that EOS.
    """
    s = settings
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.do_sample else {}
    out = model.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=s.do_sample,
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=0 if s.stop_at_eos else s.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        synced_gpus=synced,
        **sampling,
    )
    return F.truncate_after_eos(
        out[:, query.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )


def response_logits(
    model: nn.Module, sequence: Tensor, attention_mask: Tensor, n: int, **kwargs: Any
) -> Any:
    """Run ``model`` on [B, P + n] ids keeping only the logits that predict the last ``n``
    tokens: the output's ``logits`` are [B, n, V] (never the whole sequence's)."""
    out = model(
        input_ids=sequence,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=n + 1,
        use_cache=False,
        **kwargs,
    )
    out.logits = out.logits[:, :-1]
    return out


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    sequence: Tensor,
    attention_mask: Tensor,
    response: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """[B, R] log-probs of the response tokens (the last R of ``sequence``) under ``model``."""
    logits = response_logits(model, sequence, attention_mask, response.shape[1]).logits
    return F.logprobs_from_logits(logits, response, temperature)
