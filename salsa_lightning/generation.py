"""Sampling responses and reading their log-probabilities: shared by SALSA-PPO and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from salsa_lightning import functional as F
from salsa_lightning.errors import SalsaError


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
        cache: KV cache for decoding. ``"static"``: a fixed-size cache, which ``generate``
            compiles on a GPU (CUDA graphs), so decoding is not bound by Python overhead;
            ``"dynamic"``: the default growing cache; ``"auto"``: static on one CUDA device,
            dynamic on CPU and under FSDP (synced decoding). Both give the same tokens; the
            log-probs used for training are always recomputed by a plain forward pass.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 1.0
    stop_at_eos: bool = True
    do_sample: bool = True
    cache: str = "auto"

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise SalsaError(
                f"generation.cache must be one of {', '.join(CACHES)}, got {self.cache!r}."
            )


CACHES = ("auto", "static", "dynamic")
# Prompts are left-padded to a multiple of this under the static cache, so that batches of
# slightly different prompt lengths reuse one compiled decoding graph.
STATIC_PROMPT_BUCKET = 32


def use_static_cache(cache: str, device: torch.device, sharded: bool) -> bool:
    """Whether ``sample`` decodes with the static (compiled on GPU) KV cache: under ``"auto"``,
    only for a model on one CUDA device that no FSDP wrapper shards."""
    if cache == "auto":
        return device.type == "cuda" and not sharded
    return cache == "static"


def pad_left(ids: Tensor, mask: Tensor, multiple: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad [B, P] ids and mask to a length that is a multiple of ``multiple``."""
    extra = -ids.shape[1] % multiple
    if not extra:
        return ids, mask
    return (
        torch.nn.functional.pad(ids, (extra, 0), value=pad_id),
        torch.nn.functional.pad(mask, (extra, 0), value=0),
    )


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
    sharded: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample one response per left-padded prompt with the KV cache.

    Args:
        model: A causal LM (or peft model) with ``generate``.
        tokenizer: Gives the EOS and pad ids.
        query: [B, P] prompt ids, left-padded.
        query_mask: [B, P] attention mask of the prompts.
        settings: Sampling settings.
        synced: Keep every rank decoding until all are done (required under FSDP).
        sharded: The model is wrapped by FSDP (even on one rank): ``cache="auto"`` then keeps
            the dynamic cache, as FSDP's hooks do not compile into CUDA graphs.

    Returns:
        ``(response, mask)``: [B, R] ids with pad after the first EOS, and the [B, R] float mask
        that is 1 up to and including that EOS.
    """
    s = settings
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.do_sample else {}
    if use_static_cache(s.cache, query.device, sharded or synced):
        sampling["cache_implementation"] = "static"
        query, query_mask = pad_left(
            query, query_mask, STATIC_PROMPT_BUCKET, tokenizer.pad_token_id
        )
    out = model.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=s.do_sample,
        max_new_tokens=s.max_new_tokens,
        # No stop: EOS is an ordinary token and every response is max_new_tokens long.
        eos_token_id=tokenizer.eos_token_id if s.stop_at_eos else None,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        synced_gpus=synced,
        **sampling,
    )
    response = out[:, query.shape[1] :]
    if not s.stop_at_eos:
        return response, torch.ones_like(response, dtype=torch.float32)
    return F.truncate_after_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)


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
