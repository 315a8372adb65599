"""The RLHF math as plain functions on tensors.

Nothing here knows about Lightning, models or tokenizers: every function takes and
returns tensors (or floats), so each can be tested against a hand-worked example.

Shapes use ``B`` for the batch, ``T`` for the response length (the tokens after the
prompt) and ``V`` for the vocabulary. A ``mask`` is a float or bool tensor ``[B, T]``
that is 1 on real response tokens (up to and including EOS) and 0 on the padding after.

The PPO pieces follow Ziegler et al. 2019 / Stiennon et al. 2020 as implemented in
TRL and torchtune: a per-token KL penalty, the sequence score added at the last real
token, GAE over the response, and the clipped policy and value objectives.

- ``masked``: masked sums, means, variances, whitening; response masks.
- ``logits``: chunked log-probabilities and entropies; inverse transform sampling.
- ``kl``: KL estimators and the adaptive KL controller.
- ``advantages``: per-token rewards and advantage estimators.
- ``losses``: PPO's policy and value losses, the reward model's losses.
- ``preference``: offline preference losses on sequence log-probs (DPO, IPO, hinge).
- ``evaluation``: bootstrap intervals and win rates.
- ``ema``: the moving reference's exponential moving average of the policy's weights.
"""

from salsa_lightning.functional.advantages import (
    gae,
    group_advantages,
    group_centred,
    leave_one_out_advantages,
    per_token,
    returns_to_go,
    shaped_scores,
    token_rewards,
)
from salsa_lightning.functional.ema import ema_, ema_weight_of_start
from salsa_lightning.functional.evaluation import (
    bootstrap_mean_ci,
    grouped_rate_ci,
    seeds_bootstrap_ci,
    win_rate,
)
from salsa_lightning.functional.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    KLEstimator,
    kl_estimate,
    reference_kl,
    weighted_kl_estimate,
)
from salsa_lightning.functional.logits import (
    TiedGradient,
    entropy_from_logits,
    inverse_cdf_sample,
    logprobs_and_hits_from_hidden,
    logprobs_from_hidden,
    logprobs_from_logits,
)
from salsa_lightning.functional.losses import (
    LOSS_AGGREGATIONS,
    LossAggregation,
    aggregate,
    bradley_terry_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_centering_loss,
)
from salsa_lightning.functional.masked import (
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
    truncate_after_eos,
)
from salsa_lightning.functional.preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    PreferenceLossOutput,
    check_preference_settings,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_logits,
    preference_metrics,
    sequence_logprobs,
    sigmoid_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "AdaptiveKLController",
    "KLEstimator",
    "LossAggregation",
    "aggregate",
    "bootstrap_mean_ci",
    "bradley_terry_loss",
    "check_preference_settings",
    "dpo_loss",
    "ema_",
    "ema_weight_of_start",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "group_centred",
    "grouped_rate_ci",
    "hinge_loss",
    "inverse_cdf_sample",
    "ipo_loss",
    "kl_estimate",
    "leave_one_out_advantages",
    "logprobs_from_hidden",
    "logprobs_and_hits_from_hidden",
    "TiedGradient",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token",
    "preference_logits",
    "preference_metrics",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_mask",
    "seeds_bootstrap_ci",
    "returns_to_go",
    "reference_kl",
    "reward_centering_loss",
    "sequence_logprobs",
    "shaped_scores",
    "sigmoid_loss",
    "token_rewards",
    "truncate_after_eos",
    "weighted_kl_estimate",
    "win_rate",
]
