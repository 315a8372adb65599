"""Advantage estimators, picked by name (``SALSAModule(estimator={name: ...})``).

Each is a short function from a rollout's scores, KL and (for ``gae``) old values to its
per-token rewards, advantages and value targets, with the defaults it comes with; a new
estimator is a new function and an entry in :data:`ESTIMATORS`, not a branch in the update
loop. The math is in :mod:`salsa_lightning.functional`. Every estimator works with every KL
reference (one checkpoint, a soup, Multiple KLs, a LoRA policy's disabled adapter): the
reference only enters through the per-token KL.

The group estimators read ``k`` consecutive rows per prompt (rows ``[g k, (g + 1) k)`` are
prompt ``g``'s samples) and need no critic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from salsa_lightning.functional import (
    LossAggregation,
    gae,
    group_advantages,
    group_centred,
    leave_one_out_advantages,
    masked_whiten,
    per_token,
    returns_to_go,
    token_rewards,
)

if TYPE_CHECKING:  # the settings name their choices from here
    from salsa_lightning.ppo.settings import EstimatorSettings, PPOSettings

# The keys of ESTIMATORS, as the type of ``EstimatorSettings.name``.
EstimatorName = Literal["gae", "grpo", "rloo", "reinforce_baseline"]


@dataclass(frozen=True)
class EstimatorInputs:
    """What an estimator reads about a rollout (N = prompts x k rows)."""

    scores: Tensor  # [N] shaped sequence scores
    kl: Tensor  # [N, R] per-token KL estimate to the reference, 0 after the response
    values: Tensor | None  # [N, R] old values (None without a critic)
    mask: Tensor  # [N, R] response mask
    kl_coef: float  # the KL penalty's weight in the reward (0 when the KL is a loss term)
    # Sums a tensor over every rank's part of the batch (None: one process): batch statistics
    # (whitening) are the whole batch's, so results do not depend on the world size.
    all_sum: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Advantages:
    """An estimator's output."""

    rewards: Tensor  # [N, R] per-token rewards (KL penalty and the score at the last token)
    advantages: Tensor  # [N, R], 0 after the response
    returns: Tensor | None  # [N, R] value targets (None without a critic)


def sequence_rewards(inputs: EstimatorInputs) -> Tensor:
    """[N] each response's score minus the KL penalty summed over its tokens."""
    return inputs.scores - inputs.kl_coef * (inputs.kl * inputs.mask).sum(-1)


def gae_advantages(inputs: EstimatorInputs, ppo: PPOSettings, est: EstimatorSettings) -> Advantages:
    """PPO: the KL-penalised per-token reward with the score at the last token, GAE against
    the critic's values, then (``ppo.whiten_advantages``) whitening over the batch."""
    rewards = token_rewards(inputs.scores, inputs.kl, inputs.kl_coef, inputs.mask)
    advantages, returns = gae(rewards, inputs.values, inputs.mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, inputs.mask, all_sum=inputs.all_sum)
    return Advantages(rewards, advantages, returns)


def grpo_advantages(
    inputs: EstimatorInputs, ppo: PPOSettings, est: EstimatorSettings
) -> Advantages:
    """GRPO: each response's reward against its group's mean, over its group's standard
    deviation (Dr. GRPO: no division), the same advantage on every token."""
    k = est.samples_per_prompt
    adv = group_advantages(sequence_rewards(inputs), k, est.scale_by_std, est.std_eps)
    rewards = token_rewards(inputs.scores, inputs.kl, inputs.kl_coef, inputs.mask)
    return Advantages(rewards, per_token(adv, inputs.mask), None)


def rloo_advantages(
    inputs: EstimatorInputs, ppo: PPOSettings, est: EstimatorSettings
) -> Advantages:
    """RLOO: each response's KL-penalised reward minus the mean of the other k - 1 responses
    to its prompt, the same advantage on every token."""
    adv = leave_one_out_advantages(sequence_rewards(inputs), est.samples_per_prompt)
    rewards = token_rewards(inputs.scores, inputs.kl, inputs.kl_coef, inputs.mask)
    return Advantages(rewards, per_token(adv, inputs.mask), None)


def reinforce_baseline_advantages(
    inputs: EstimatorInputs, ppo: PPOSettings, est: EstimatorSettings
) -> Advantages:
    """REINFORCE++-baseline: the score minus its group's mean, the per-token KL penalty,
    returns-to-go (``ppo.gamma``), then whitening over the batch."""
    centred = group_centred(inputs.scores, est.samples_per_prompt)
    rewards = token_rewards(centred, inputs.kl, inputs.kl_coef, inputs.mask)
    returns = returns_to_go(rewards, inputs.mask, ppo.gamma)
    return Advantages(rewards, masked_whiten(returns, inputs.mask, all_sum=inputs.all_sum), None)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and the defaults it comes with."""

    estimate: Callable[[EstimatorInputs, PPOSettings, EstimatorSettings], Advantages]
    critic: bool  # needs a value model
    group: bool  # needs k >= 2 samples per prompt (its baseline)
    kl_in_reward: bool  # where the KL penalty goes unless kl.in_reward says
    aggregation: LossAggregation  # the loss aggregation unless estimator.loss_aggregation says


ESTIMATORS: dict[EstimatorName, Estimator] = {
    "gae": Estimator(gae_advantages, True, False, True, "token_mean"),
    "grpo": Estimator(grpo_advantages, False, True, False, "sequence_mean"),
    "rloo": Estimator(rloo_advantages, False, True, True, "token_mean"),
    "reinforce_baseline": Estimator(reinforce_baseline_advantages, False, True, True, "token_mean"),
}
