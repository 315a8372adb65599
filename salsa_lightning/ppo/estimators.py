"""Advantage estimators, picked by name (``SALSAModule(estimator=...)``).

Each is a short function from a rollout's scores, KL and old values to its per-token rewards,
advantages and value targets; a new estimator is a new function and an entry in
:data:`ESTIMATORS`, not a branch in the update loop. The math is in
:mod:`salsa_lightning.functional`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from salsa_lightning.functional import gae, masked_whiten, token_rewards
from salsa_lightning.ppo.settings import PPOSettings


@dataclass(frozen=True)
class EstimatorInputs:
    """What an estimator reads about a rollout."""

    scores: Tensor  # [B] shaped sequence scores
    kl: Tensor  # [B, R] per-token KL estimate to the reference, 0 after the response
    values: Tensor  # [B, R] old values
    mask: Tensor  # [B, R] response mask
    kl_coef: float  # the KL penalty's weight in the reward (0 when the KL is a loss term)


@dataclass(frozen=True)
class Advantages:
    """An estimator's output."""

    rewards: Tensor  # [B, R] per-token rewards
    advantages: Tensor  # [B, R]
    returns: Tensor  # [B, R] value targets


def gae_advantages(inputs: EstimatorInputs, ppo: PPOSettings) -> Advantages:
    """PPO's estimator: the KL-penalised per-token reward with the score at the last token,
    GAE against the critic's values, then (``ppo.whiten_advantages``) whitening."""
    rewards = token_rewards(inputs.scores, inputs.kl, inputs.kl_coef, inputs.mask)
    advantages, returns = gae(rewards, inputs.values, inputs.mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, inputs.mask)
    return Advantages(rewards, advantages, returns)


Estimator = Callable[[EstimatorInputs, PPOSettings], Advantages]
ESTIMATORS: dict[str, Estimator] = {"gae": gae_advantages}
