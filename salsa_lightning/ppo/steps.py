"""The first steps of one PPO iteration, in the order of the algorithm box: **generate** (sample
k responses per prompt), **score** (the frozen reference and reward, the policy's old log-probs
and the critic's values) and **estimate** (the per-token KL and the estimator's advantages).

``RolloutSteps`` holds them as methods of ``SALSAModule`` (whose models they read: ``policy``,
``critic``, ``value_head_layer``, ``ref_models``, ``reward``, ``reward_fn``); each takes the records
of ``rollout.py`` and returns a new one.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from salsa_lightning.functional import reference_kl, shaped_scores
from salsa_lightning.generation import sample
from salsa_lightning.ppo import passes
from salsa_lightning.ppo.estimators import EstimatorInputs
from salsa_lightning.ppo.rollout import (
    FirstPass,
    FrozenScores,
    PassOutputs,
    PolicyScores,
    Rollout,
    Trajectory,
)
from salsa_lightning.scoring import check_scores


class RolloutSteps:
    """Generate, score and estimate: the steps before the update (a mixin of SALSAModule)."""

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], k: int = 1) -> Rollout:
        """Sample ``k`` responses per prompt (consecutive rows) with the KV cache; truncate
        after EOS. Under FSDP the policy is gathered once for the rollout (``generation.gather``)."""
        tok = self.tokenizer
        query = batch["input_ids"].repeat_interleave(k, 0)
        query_mask = batch["attention_mask"].repeat_interleave(k, 0)
        response, mask = sample(self.policy, tok, query, query_mask, self.generation)
        texts = tok.batch_decode(response, skip_special_tokens=True)
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        return Rollout(query, query_mask, response, mask, prompts, texts)

    def policy_pass(self, rows: Rollout | Trajectory) -> PassOutputs:
        """Logits, log-probs and values of rollout rows under the policy and critic."""
        return passes.policy_pass(
            self.policy, self.critic, self.value_head_layer, rows, self.generation.temperature
        )

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> list[Tensor]:
        """[B, R] log-probs of the responses under each reference model."""
        temperature = self.generation.temperature
        if self.shares_reference:
            return [passes.disabled_adapter_logprobs(self.policy, rollout, temperature)]
        return passes.reference_logprobs(list(self.ref_models), rollout, temperature)

    @torch.no_grad()
    def raw_scores(self, rollout: Rollout) -> Tensor:
        """[B] reward-model scores, else the reward function's."""
        if self.reward is None:
            scores = self.reward_fn(rollout.prompts, rollout.texts)
            what = f"model.reward_fn {type(self.reward_fn).__name__}"
            return check_scores(scores, len(rollout.texts), what).to(self.device)
        return passes.reward_scores(self.reward, self.reward_tokenizer, rollout)

    @torch.no_grad()
    def score_frozen(self, rollout: Rollout) -> FrozenScores:
        """Reference log-probs and the shaped reward of a rollout."""
        ref_logprobs = self.reference_logprobs(rollout)
        raw = self.raw_scores(rollout)
        has_eos = (rollout.response == self.tokenizer.eos_token_id).any(dim=1)
        stats = (
            self.reward_stats
            if self.reward is not None and self.hparams.normalize_rewards
            else None
        )
        scores = shaped_scores(
            raw, has_eos, stats, self.generation.missing_eos_penalty, self.hparams.reward_clip
        )
        return FrozenScores(ref_logprobs, raw, scores)

    @torch.no_grad()
    def score_policy(self, rollout: Rollout) -> PolicyScores:
        """Old log-probs and values of a rollout, no grad."""
        outputs = self.policy_pass(rollout)
        values = None if outputs.values is None else outputs.values * rollout.mask
        return PolicyScores(outputs.logprobs, values)

    def scores_in_first_pass(self, rollout: Rollout) -> bool:
        """Whether the first update pass is also the policy's and critic's scoring pass: only
        when it runs on the whole rollout (one micro-batch), before any weight changes."""
        return self.ppo.score_in_first_pass and self.ppo.micro_batch_size >= len(rollout.query)

    def first_pass(self, rollout: Rollout) -> FirstPass:
        """The first update pass over the first epoch's shuffled rows, with grad: same weights,
        same rows, so the same old log-probs and values as a scoring pass, one forward fewer."""
        order = torch.randperm(len(rollout.query), device=self.device)
        return FirstPass(order, self.policy_pass(rollout.select(order)))

    def kl(self, logprobs: Tensor, ref_logprobs: list[Tensor], estimator: str) -> Tensor:
        """[B, R] per-token KL estimate to the reference (weighted over models in multiple_kl)."""
        return reference_kl(logprobs, ref_logprobs, self.reference.resolved_weights(), estimator)

    @torch.no_grad()
    def estimate(self, rollout: Rollout, frozen: FrozenScores, old: PolicyScores) -> Trajectory:
        """The per-token KL and the estimator's rewards, advantages and returns."""
        kl = self.kl(old.logprobs, frozen.ref_logprobs, self.kl_settings.estimator) * rollout.mask
        coef = self.kl_ctl.value if self.kl_in_reward else 0.0
        all_sum = self.all_sum if self.trainer.world_size > 1 else None
        inputs = EstimatorInputs(frozen.scores, kl, old.values, rollout.mask, coef, all_sum)
        out = self.estimator.estimate(inputs, self.ppo, self.estimator_settings)
        if self.estimator.group:
            self.warn_ties(frozen.scores)
        return Trajectory(
            rollout.query, rollout.query_mask, rollout.response, rollout.mask, old.logprobs,
            frozen.ref_logprobs, old.values, frozen.scores, kl, out.rewards, out.advantages,
            out.returns,
        )  # fmt: skip

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over every rank (itself on one device)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def all_ranks(self, flag: Tensor) -> bool:
        """Whether ``flag`` holds on every rank: one decision that every rank takes together."""
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag.float(), reduce_op="min")
        return bool(flag)

    def warn_ties(self, scores: Tensor) -> None:
        """Warn once per run when whole groups scored alike: their advantages are 0, so they
        teach nothing (more samples per prompt or a higher temperature help)."""
        groups = scores.reshape(-1, self.estimator_settings.samples_per_prompt)
        tied = int((groups.amax(1) == groups.amin(1)).sum())
        self.log("rollout/tied_groups", tied / groups.shape[0])
        if tied and not self.warned_ties:
            self.warned_ties = True
            rank_zero_warn(
                f"{tied} of {groups.shape[0]} prompts got the same reward for all their "
                f"{groups.shape[1]} samples: their advantages are 0 and they do not train "
                "(warned once; `rollout/tied_groups` logs the fraction every iteration)."
            )
