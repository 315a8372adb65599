"""The SALSA-PPO stage's settings, as YAML sections of ``SALSAModule``: ``estimator:``, ``kl:``
and ``ppo:``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.soup import SoupReference


def check_ranges(settings: object, section: str, rules: dict[str, str]) -> None:
    """Refuse a setting outside its range, naming it: ``rules`` maps a field to ``"positive"``,
    ``"non-negative"``, ``"at least 1"`` or ``"in [0, 1]"`` (None always passes)."""
    tests = {
        "positive": lambda v: v > 0,
        "non-negative": lambda v: v >= 0,
        "at least 1": lambda v: v >= 1,
        "in [0, 1]": lambda v: 0 <= v <= 1,
    }
    for f in fields(settings):
        value, rule = getattr(settings, f.name), rules.get(f.name)
        if rule is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SalsaError(f"{section}.{f.name} must be a number, got {value!r}.")
        if not (math.isfinite(value) and tests[rule](value)):
            raise SalsaError(f"{section}.{f.name} must be {rule}, got {value}.")


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
    estimator: str = "k1"
    in_reward: bool | None = None
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self) -> None:
        rules = {"coef": "non-negative", "target": "positive", "horizon": "at least 1"}
        check_ranges(self, "model.kl", rules)


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

    name: str = "gae"
    samples_per_prompt: int = 1
    scale_by_std: bool = True
    std_eps: float = 1e-4
    loss_aggregation: str | None = None

    def __post_init__(self) -> None:
        check_ranges(
            self, "model.estimator", {"samples_per_prompt": "at least 1", "std_eps": "non-negative"}
        )


@dataclass
class PPOSettings:
    """The PPO update (defaults: the field's usual values, see the README).

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
        rules = dict.fromkeys(("epochs", "minibatch_size", "micro_batch_size"), "at least 1")
        rules.update(dict.fromkeys(("clip_range", "value_clip_range", "max_grad_norm"), "positive"))
        rules.update(max_log_ratio="positive", vf_coef="non-negative", entropy_coef="non-negative")
        rules.update(gamma="in [0, 1]", lam="in [0, 1]")
        check_ranges(self, "model.ppo", rules)


# The settings and the reference recipe are saved in checkpoints' hyper_parameters when the
# module is built in Python; Lightning resumes with torch.load(weights_only=True), which only
# unpickles allowlisted classes (plain dataclasses of numbers, strings and lists).
torch.serialization.add_safe_globals(
    [EstimatorSettings, GenerationSettings, KLSettings, PPOSettings, SoupReference]
)
