"""The PPO loss of one micro-batch, split into the policy's terms and the critic's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from salsa_lightning.functional import (
    entropy_from_logits,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from salsa_lightning.ppo.rollout import PassOutputs, Trajectory
from salsa_lightning.ppo.settings import PPOSettings

# (log-probs [B, R], reference log-probs) -> [B, R] per-token KL
KLFunction = Callable[[Tensor, list[Tensor]], Tensor]


def ppo_loss(
    outputs: PassOutputs,
    mb: Trajectory,
    ppo: PPOSettings,
    temperature: float,
    kl_loss: KLFunction | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "token_mean",
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The policy's terms (clipped policy loss, - entropy bonus, + ``kl_coef`` x KL term) and
    the critic's (``vf_coef`` x clipped value loss; 0 without a critic) of a micro-batch; the
    PPO loss is their sum.

    Args:
        outputs: The micro-batch's forward pass (with grad).
        mb: The micro-batch's rows of the trajectory.
        ppo: Clip ranges and coefficients.
        temperature: The sampling temperature (the entropy is that of the sampling distribution).
        kl_loss: The per-token KL to the reference as a loss term (k3 at the current policy);
            None when the KL is in the reward.
        kl_coef: The KL term's weight.
        aggregation: How the policy loss is reduced over tokens (``functional.aggregate``).
        normalizer: The constant of the ``constant`` aggregation (the longest response).

    Returns:
        ``(policy loss, value loss, stats)``, the stats detached scalars named as TRL names them
        (``value/clipfrac`` is the value function's clip fraction).
    """
    pg_loss, clipfrac, approxkl = ppo_policy_loss(
        outputs.logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range,
        ppo.max_log_ratio, aggregation, normalizer,
    )  # fmt: skip
    policy_loss = pg_loss
    stats = {
        "loss/policy": pg_loss.detach(),
        "policy/clipfrac": clipfrac,
        "policy/approxkl": approxkl,
    }
    value_loss = torch.zeros((), device=pg_loss.device)
    if mb.returns is not None:
        vf_loss, vf_clipfrac = ppo_value_loss(
            outputs.values, mb.values, mb.returns, mb.mask, ppo.value_clip_range
        )
        value_loss = ppo.vf_coef * vf_loss
        stats.update({"loss/value": vf_loss.detach(), "value/clipfrac": vf_clipfrac})
    if ppo.entropy_coef:
        entropy = masked_mean(entropy_from_logits(outputs.logits / temperature), mb.mask)
        policy_loss = policy_loss - ppo.entropy_coef * entropy
        stats["policy/entropy"] = entropy.detach()
    if kl_loss is not None:
        kl = masked_mean(kl_loss(outputs.logprobs, mb.ref_logprobs), mb.mask)
        policy_loss = policy_loss + kl_coef * kl
        stats["loss/kl"] = kl.detach()
    return policy_loss, value_loss, stats
