"""The losses: PPO's clipped policy and value objectives, and the reward model's."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from salsa_lightning.errors import SalsaError
from salsa_lightning.functional.masked import masked_mean, masked_sum

LossAggregation = Literal["token_mean", "sequence_mean", "constant"]
LOSS_AGGREGATIONS = get_args(LossAggregation)


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str = "token_mean", normalizer: float | None = None
) -> Tensor:
    """Reduce a per-token loss over a batch of responses to a scalar.

    - ``token_mean``: mean over every response token of the batch (PPO, DAPO): long answers
      weigh in proportion to their length;
    - ``sequence_mean``: mean over each response's tokens, then over responses (GRPO's paper):
      every answer weighs the same;
    - ``constant``: sum over tokens divided by ``B x normalizer`` (Dr. GRPO, with the maximum
      response length as normalizer): no length bias in either direction.

    Args:
        per_token: ``[B, T]`` loss per token.
        mask: ``[B, T]`` response mask.
        mode: One of :data:`LOSS_AGGREGATIONS`.
        normalizer: The constant of ``constant`` (tokens per response).

    Returns:
        A scalar.
    """
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "sequence_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if mode == "constant":
        if not normalizer or normalizer <= 0:
            raise SalsaError("loss aggregation 'constant' needs a positive normalizer.")
        return masked_sum(per_token, mask) / (per_token.shape[0] * normalizer)
    raise SalsaError(
        f"unknown loss aggregation {mode!r}; use one of {', '.join(LOSS_AGGREGATIONS)}."
    )


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    max_log_ratio: float = 20.0,
    aggregation: str = "token_mean",
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate policy loss.

    Args:
        logprobs: ``[B, T]`` log-probabilities under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probabilities under the rollout policy.
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` response mask.
        clip_range: PPO's epsilon; the ratio is clipped to ``[1 - eps, 1 + eps]``.
        max_log_ratio: The log-ratio is clamped to ``[-max, max]`` before ``exp`` so a
            stale or broken batch cannot produce inf/nan.
        aggregation: How the per-token loss is reduced (see :func:`aggregate`).
        normalizer: The constant of the ``constant`` aggregation.

    Returns:
        ``(loss, clipfrac, approxkl)``, all scalars: ``loss`` is the aggregate (by default the
        masked mean) of
        ``max(-A * ratio, -A * clip(ratio))``; ``clipfrac`` the masked fraction of tokens
        where the clipped term was strictly larger; ``approxkl`` is
        ``0.5 * masked_mean(log_ratio**2)``. The last two are detached.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, normalizer)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()
    approxkl = (0.5 * masked_mean(log_ratio**2, mask)).detach()
    return loss, clipfrac, approxkl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss.

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` value predictions from the rollout.
        returns: ``[B, T]`` value targets (see :func:`gae`).
        mask: ``[B, T]`` response mask.
        clip_range: Values are clipped to ``old_values +- clip_range``.

    Returns:
        ``(loss, clipfrac)``, scalars: ``loss = 0.5 * masked_mean(max((v - R)^2,
        (clip(v, old - eps, old + eps) - R)^2))``; ``clipfrac`` (detached) is the masked
        fraction where the clipped term was strictly larger.
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()
    return loss, clipfrac


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise reward-model loss, ``-log sigmoid(chosen - rejected - margin)``.

    Args:
        chosen: ``[B]`` scores of the preferred responses.
        rejected: ``[B]`` scores of the other responses.
        margin: Optional ``[B]`` tensor or float subtracted inside the sigmoid (Llama 2's
            margin for strongly preferred pairs); None means 0.

    Returns:
        Scalar mean loss.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def reward_centering_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Auxiliary term that keeps reward scores centred on 0 (Eisenstein et al. 2023).

    Args:
        chosen: ``[B]`` scores of the preferred responses.
        rejected: ``[B]`` scores of the other responses.

    Returns:
        Scalar ``mean((chosen + rejected)**2)``; the caller multiplies it by a coefficient.
    """
    return ((chosen + rejected) ** 2).mean()
