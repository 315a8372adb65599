"""The SALSA-PPO stage's settings, as YAML sections of ``SALSAModule``: ``estimator:``, ``kl:``,
``ppo:``, ``reward:`` and ``reference_update:``.

Choices are ``Literal`` types, so ``salsa fit --help`` lists them and the parser refuses a bad
one; ranges are checked in each ``__post_init__``, so a Python caller gets the same refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from salsa_lightning.errors import check_choices, require
from salsa_lightning.functional import KLEstimator, LossAggregation
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.ppo.estimators import EstimatorName
from salsa_lightning.soup import SoupReference

ReferenceMode = Literal["soup", "multiple_kl"]


@dataclass
class KLSettings:
    """The KL penalty to the reference.

    Attributes:
        coef: Initial KL coefficient beta.
        estimator: ``k1``, ``k2`` or ``k3`` per-token estimator.
        in_reward: True: ``-beta * KL`` per token in the reward (TRL, InstructGPT); False: a
            ``beta * KL`` loss term (k3 at the current policy) next to the policy loss (GRPO);
            None: the estimator's default (in the reward for gae, rloo and
            reinforce_baseline, a loss term for grpo).
        target: Adaptive control (Ziegler et al.): the KL the coefficient steers to; None: fixed.
        horizon: Adaptive control horizon in samples.
    """

    coef: float = 0.05
    estimator: KLEstimator = "k1"
    in_reward: bool | None = None
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self) -> None:
        check_choices("model.kl", type(self), self)
        require(
            math.isfinite(self.coef) and self.coef >= 0, "model.kl.coef", "non-negative", self.coef
        )
        if self.target is not None:
            require(self.target > 0, "model.kl.target", "positive", self.target)
        require(self.horizon >= 1, "model.kl.horizon", "at least 1", self.horizon)


@dataclass
class EstimatorSettings:
    """How the policy gradient's advantages are estimated (see ``ppo/estimators.py``).

    Attributes:
        name: ``gae`` (PPO with a critic), or a critic-free group estimator: ``grpo``
            (Shao et al. 2024), ``rloo`` (Ahmadian et al. 2024) or ``reinforce_baseline``
            (REINFORCE++-baseline, Hu et al. 2025).
        samples_per_prompt: Responses sampled per prompt (k): 1 for ``gae``, at least 2 for
            the group estimators, whose baseline is the other samples of the same prompt.
        scale_by_std: ``grpo``: divide by the group's standard deviation (False: Dr. GRPO,
            Liu et al. 2025, usually with ``loss_aggregation: constant``).
        std_eps: ``grpo``: added to the group's standard deviation.
        loss_aggregation: How the policy loss is reduced over tokens: ``token_mean``,
            ``sequence_mean`` or ``constant`` (sum over tokens / (rows x max_new_tokens));
            None: the estimator's default (``sequence_mean`` for grpo, ``token_mean`` else).
    """

    name: EstimatorName = "gae"
    samples_per_prompt: int = 1
    scale_by_std: bool = True
    std_eps: float = 1e-4
    loss_aggregation: LossAggregation | None = None

    def __post_init__(self) -> None:
        check_choices("model.estimator", type(self), self)
        k = self.samples_per_prompt
        require(k >= 1, "model.estimator.samples_per_prompt", "at least 1", k)
        require(self.std_eps >= 0, "model.estimator.std_eps", "non-negative", self.std_eps)


@dataclass
class PPOSettings:
    """The PPO update (defaults: the field's usual values, see docs/algorithm.md).

    Attributes:
        epochs: PPO epochs over each rollout.
        minibatch_size: Rollout rows per optimizer step.
        micro_batch_size: Rows per forward/backward (gradient accumulation up to the minibatch).
        clip_range: Policy ratio clip epsilon.
        value_clip_range: Value clip epsilon around the rollout's values.
        vf_coef: Weight of the value loss.
        entropy_coef: Weight of the entropy bonus (0: off).
        gamma: GAE discount.
        lam: GAE lambda.
        whiten_advantages: Whiten advantages over the rollout's response tokens.
        max_grad_norm: Gradient clipping norm over the policy and critic together (None: off;
            with a separate critic and one micro-batch per minibatch, the policy then steps
            before the critic's backward, which lowers peak memory: ``steps_policy_first``).
        max_log_ratio: Clamp of the log-ratio before ``exp``.
        score_in_first_pass: When one micro-batch holds the whole rollout, take the old
            log-probs and values from the first update pass instead of a scoring pass of their
            own: the same weights on the same rows give the same numbers, one policy and one
            critic forward fewer per iteration.
    """

    epochs: int = 4
    minibatch_size: int = 8
    micro_batch_size: int = 8
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float | None = 1.0
    max_log_ratio: float = 20.0
    score_in_first_pass: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatch_size", "micro_batch_size"):
            value = getattr(self, name)
            require(value >= 1, f"model.ppo.{name}", "at least 1", value)
        for name in ("clip_range", "value_clip_range", "max_grad_norm", "max_log_ratio"):
            value = getattr(self, name)
            if value is not None:
                require(math.isfinite(value) and value > 0, f"model.ppo.{name}", "positive", value)
        for name in ("vf_coef", "entropy_coef"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"model.ppo.{name}", "non-negative", value)
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"model.ppo.{name}", "in [0, 1]", value)


@dataclass
class RewardSettings:
    """How a response's raw reward becomes the score PPO optimises (``functional.shaped_scores``).

    Attributes:
        normalize: Normalise reward-model scores with the mean/std in its
            ``reward_stats.json`` (a reward function's scores are used as they are).
        clip: Clip the normalised scores to [-clip, clip] (None: off).
        missing_eos_penalty: Subtracted from the score of a response that never emits EOS.
    """

    normalize: bool = True
    clip: float | None = 5.0
    missing_eos_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.clip is not None:
            require(self.clip > 0, "model.reward.clip", "positive", self.clip)
        penalty = self.missing_eos_penalty
        require(math.isfinite(penalty), "model.reward.missing_eos_penalty", "finite", penalty)


@dataclass
class ReferenceUpdate:
    """A moving KL reference: every ``every`` rollouts, ``ref <- (1 - alpha) ref + alpha policy``
    (``functional.ema_``). ``alpha`` 1 is a hard sync (TR-DPO, TRL's ``sync_ref_model``),
    ``alpha`` 0 keeps the reference where it started.

    Under ``multiple_kl`` every reference model moves toward the policy; with a LoRA policy whose
    reference is its disabled adapter, the reference becomes an adapter of its own (see
    ``ppo/moving.py``).

    Attributes:
        every: Rollouts between two updates (skipped rollouts count).
        alpha: The policy's weight in each update, in [0, 1].
    """

    every: int = 1
    alpha: float = 0.1

    def __post_init__(self) -> None:
        require(self.every >= 1, "model.reference_update.every", "at least 1", self.every)
        alpha = self.alpha
        require(
            math.isfinite(alpha) and 0 <= alpha <= 1,
            "model.reference_update.alpha",
            "in [0, 1]",
            alpha,
        )


# The settings and the reference recipe are saved in checkpoints' hyper_parameters when the
# module is built in Python; Lightning resumes with torch.load(weights_only=True), which only
# unpickles allowlisted classes (plain dataclasses of numbers, strings and lists).
torch.serialization.add_safe_globals(
    [
        EstimatorSettings,
        GenerationSettings,
        KLSettings,
        PPOSettings,
        ReferenceUpdate,
        RewardSettings,
        SoupReference,
    ]
)
