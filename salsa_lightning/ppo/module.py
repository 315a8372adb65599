"""``SALSAModule``: the LightningModule of the SALSA-PPO stage.

One ``training_step`` is one PPO iteration, in the order of the algorithm box, each step a
method of this class (which owns the models it runs):

0. ``move_reference``: with ``reference_update``, every N rollouts the reference moves toward
   the policy (an EMA, ``moving.py``); otherwise it stays frozen;
1. ``generate``: sample ``k`` responses per prompt with the KV cache;
2. ``score_frozen``: the reference log-probs and the reward (frozen models, no grad);
   ``score_policy``: the policy's old log-probs and the critic's values;
3. ``estimate``: the per-token KL and the advantage estimator, by name (``estimators.py``);
4. ``update``: K epochs of clipped policy and value losses over shuffled minibatches, with
   gradient accumulation over micro-batches (Lightning's manual optimisation).

The math is in ``salsa_lightning.functional``; the records the steps hand on are in
``rollout.py``. With one checkpoint in ``reference`` it is classic PPO (SALSA-1).
``reference_mode: multiple_kl`` is the paper's baseline: a KL penalty to each SFT model,
weighted, no averaging. ``reward_model`` may be a soup of reward models (WARM), scored as their
weight average or (``reward_mode: ensemble``) as the mean of their scores.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from salsa_lightning import functional as fn
from salsa_lightning.errors import SalsaError, check_choices
from salsa_lightning.frozen import mark_moving, without_dropout
from salsa_lightning.generation import (
    GenerationSettings,
    NonFiniteLogits,
    response_logprobs,
    sample,
    score_response,
)
from salsa_lightning.lora import LoraSettings
from salsa_lightning.ppo import checks, models, moving
from salsa_lightning.ppo.estimators import EstimatorInputs
from salsa_lightning.ppo.recipe import check_same_reference, reference_recipe
from salsa_lightning.ppo.rollout import (
    FirstPass,
    FrozenScores,
    MetricWindow,
    PassOutputs,
    PolicyScores,
    Rollout,
    Trajectory,
    timing_metrics,
    trajectory_metrics,
)
from salsa_lightning.ppo.settings import (
    EstimatorSettings,
    KLSettings,
    PPOSettings,
    ReferenceMode,
    ReferenceUpdate,
    RewardSettings,
)
from salsa_lightning.ppo.validation import (
    append_samples,
    eval_rows,
    sample_records,
)
from salsa_lightning.pretrained import check_model_source, torch_dtype
from salsa_lightning.scoring import (
    RewardMode,
    RewardSource,
    ValueModel,
    check_reward_model,
    check_reward_source,
    check_scores,
    gold_scores,
    reward_stats,
    sequence_scores,
    text_scores,
)
from salsa_lightning.soup import SoupReference
from salsa_lightning.stage_module import StageModule, checked_optimizer

# (prompts, responses) -> Tensor[B]; typed loosely so YAML can name any callable class.
RewardFunction = Callable[..., Any]

# The validation metrics, each a mean over held-out answers (``validation.eval_rows``).
EVAL_METRICS = ("score", "gold", "kl", "response_length")


def default_ppo_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at 1e-5, no weight decay: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class SALSAModule(StageModule):
    """SALSA-PPO with a soup reference, frozen or moving.

    Args:
        reference: The KL reference as a soup recipe: ``{checkpoints: [...], weights: [...]}``.
            One checkpoint makes it classic PPO.
        reference_mode: ``soup`` (KL to the weight average) or ``multiple_kl`` (weighted mean
            of the KLs to each checkpoint, the paper's baseline).
        reference_update: ``{every: N, alpha: A}``: every N rollouts the reference (each
            reference model under multiple_kl) moves toward the policy,
            ``ref <- (1 - A) ref + A policy`` (TR-DPO, WARP's EMA anchor); its weights are then
            in the checkpoints. None (the default): the reference stays frozen.
        policy: Checkpoint the policy starts from; None starts it from the soup (initial KL 0).
        reward_model: Reward model directory (an export of ``configs/reward.yaml``), or a soup
            recipe of reward models ``{checkpoints: [...], weights: [...]}`` (WARM: reward
            models trained from one init with different seeds).
        reward_mode: How a soup of reward models scores: ``soup`` (their weight average, one
            model in memory) or ``ensemble`` (the weighted mean of their scores).
        reward_fn: A Python reward function instead of, or scoring besides, the reward model:
            ``class_path`` of a callable ``(prompts, responses) -> Tensor[B]``.
        critic: Directory the critic (value model) starts from; default the reward model.
            Only the ``gae`` estimator has a critic.
        value_head: Use a value head on the policy instead of a separate critic.
        estimator: The advantage estimator and its settings (``name``, ``samples_per_prompt``,
            ...): ``gae`` (PPO) by default.
        lora: LoRA for the policy (and critic). With the policy starting from the soup, the
            reference is the policy with its adapter disabled: no second copy in memory.
        generation: Sampling settings.
        kl: KL penalty settings.
        ppo: PPO update settings.
        reward: How raw rewards become PPO's scores (normalisation, clipping, missing-EOS
            penalty).
        max_skips: Stop after this many consecutive updates skipped for a non-finite reward or
            loss.
        dtype: Weights dtype of the trained models (``float32``, ``bfloat16``, ``float16``);
            for bf16 training keep float32 here and set ``trainer.precision: bf16-mixed``.
        frozen_dtype: Weights dtype of the frozen reference and reward models (default:
            ``dtype``); ``bfloat16`` halves their memory.
        gradient_checkpointing: Recompute activations of the trainable models in backward.
        compile: Compile each model's transformer stack (``torch.compile``, dynamic shapes:
            one graph for every response length) for the forwards over whole sequences: the
            reference's and reward model's scoring, the policy's and critic's update passes
            (``salsa_lightning.compiling``). The first iteration pays the compiles (about
            20 s for the tiny models on the 2-core CPU); it speeds models whose time goes to
            many small operations. Decoding is compiled by ``generation.compile``. One device
            only; on the CPU Inductor needs a C++ compiler.
        optimizer: Optimizer factory for the policy and critic.
        export_dir: When set, fit ends by writing the policy as a Hugging Face directory.
        overwrite: Replace an existing ``export_dir``.
        eval_kl_to_each: In validation, also measure the KL to each reference checkpoint
            (loads each one; turn off for large models).
        fsdp_layer_class: Under FSDP, the class of the blocks sharded one by one (default: the
            model's ``_no_split_modules``).
    """

    def __init__(
        self,
        reference: SoupReference,
        reference_mode: ReferenceMode = "soup",
        reference_update: ReferenceUpdate | None = None,
        policy: str | None = None,
        reward_model: RewardSource | None = "artifacts/reward",
        reward_mode: RewardMode = "soup",
        reward_fn: RewardFunction | None = None,
        critic: str | None = None,
        value_head: bool = False,
        estimator: EstimatorSettings | None = None,
        lora: LoraSettings | None = None,
        generation: GenerationSettings | None = None,
        kl: KLSettings | None = None,
        ppo: PPOSettings | None = None,
        reward: RewardSettings | None = None,
        max_skips: int = 3,
        dtype: str | None = None,
        frozen_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = default_ppo_optimizer,
        export_dir: str | None = None,
        overwrite: bool = False,
        eval_kl_to_each: bool = True,
        fsdp_layer_class: str | None = None,
    ) -> None:
        super().__init__(lora)
        if reward_model is None and reward_fn is None:
            raise SalsaError(
                "set model.reward_model (a reward model directory) or model.reward_fn."
            )
        self.save_hyperparameters(ignore=["optimizer", "reward_fn"])
        check_choices("model", SALSAModule.__init__, self.hparams)
        self.automatic_optimization = False
        self.reference = reference
        self.reference_mode = reference_mode
        self.reference_weights: list[float] = []  # validated in setup
        self.reference_update = reference_update
        self.reward_source = reward_model  # a SoupReference here, a dict in hparams under the CLI
        self.reward_fn = reward_fn
        self.generation = generation or GenerationSettings()
        self.kl_settings = kl or KLSettings()
        self.ppo_settings = ppo or PPOSettings()
        self.reward_settings = reward or RewardSettings()
        self.estimator_settings = estimator or EstimatorSettings()
        self.estimator = checks.check_estimator(self.estimator_settings, critic, value_head)
        in_reward = self.kl_settings.in_reward
        self.kl_in_reward = self.estimator.kl_in_reward if in_reward is None else in_reward
        self.loss_aggregation = (
            self.estimator_settings.loss_aggregation or self.estimator.aggregation
        )
        self.kl_ctl = fn.AdaptiveKLController(
            self.kl_settings.coef, self.kl_settings.target, self.kl_settings.horizon
        )
        self.optimizer_factory = checked_optimizer(optimizer)
        # The models, built in configure_model.
        self.policy: nn.Module | None = None
        self.critic: ValueModel | None = None
        self.value_head_layer: nn.Module | None = None
        self.ref_models: nn.ModuleList | None = None
        self.reward: nn.Module | None = None
        self.reward_stats: dict[str, float] | None = None
        self.reward_tokenizer: Any = None
        # Each soup ingredient and (a moving reference) the reference as it started, built on
        # the first validation that measures the KL to them; plain lists, so never registered,
        # checkpointed or optimised.
        self.ingredients: list[nn.Module] | None = None
        self.initial: list[nn.Module] | None = None
        # Validation: a mean over every held-out answer (exact over ranks with unequal counts).
        names = [*EVAL_METRICS, *(["kl_initial"] if self.moving else [])]
        names += [f"kl_{name}" for name in self.ingredient_names()]
        self.eval_means = nn.ModuleDict(
            {n.replace(".", "_"): MeanMetric(nan_strategy="disable") for n in names}
        )
        self.last_eval: dict[str, float] = {}
        self.eval_samples: list[dict[str, Any]] = []
        self.skips = 0  # consecutive updates skipped for a non-finite reward or loss
        self.warned_ties = False
        self.rollout_metrics = MetricWindow()  # the rollouts' metrics since the loggers last wrote

    # ------------------------------------------------------------------ building

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.hparams.frozen_dtype or self.hparams.dtype)

    @property
    def moving(self) -> bool:
        """Whether the reference moves toward the policy (``reference_update``)."""
        return self.reference_update is not None

    @property
    def shares_reference(self) -> bool:
        """LoRA on the soup: the reference is the policy with its adapter disabled (a moving
        reference: with an adapter of its own, ``moving.REFERENCE_ADAPTER``)."""
        return (
            self.lora is not None and self.hparams.policy is None and self.reference_mode == "soup"
        )

    def ingredient_names(self) -> list[str]:
        """The soup ingredients validation measures the KL to, by checkpoint name."""
        if not self.hparams.eval_kl_to_each or len(self.reference.checkpoints) < 2:
            return []
        return [Path(path).name for path in self.reference.checkpoints]

    def configure_callbacks(self) -> list[L.Callback]:
        # The first hook of a fit, before Lightning validates the trainer's settings.
        if self.trainer.state.fn == TrainerFn.FITTING:
            checks.check_trainer(self.trainer, self.ppo_settings)
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Every check that can fail runs before any model is built or trained.
        self.reference.validate()
        self.reference_weights = self.reference.resolved_weights()
        hp = self.hparams
        if hp.policy is not None:
            check_model_source(hp.policy, "model.policy")
        if hp.critic is not None:  # its score head is the value head
            check_reward_model(hp.critic, "model.critic")
        if self.reward_source is not None:
            check_reward_source(self.reward_source, "model.reward_model")
        config = checks.check_policy_matches_reference(self.reference, hp.policy)
        if self.moving:
            strategy = self.trainer.strategy
            full_references = self.lora is not None and not self.shares_reference
            checks.check_reference_can_move(
                self.reference, hp.policy, isinstance(strategy, FSDPStrategy),
                full_references and isinstance(strategy, ModelParallelStrategy),
            )  # fmt: skip
        checks.check_tokenizer(self.tokenizer, self.reference, hp.policy)
        data = self.trainer.datamodule.hparams
        checks.check_context(config, data.max_length, self.generation.max_new_tokens)
        if stage == "fit":
            k, world = self.estimator_settings.samples_per_prompt, self.trainer.world_size
            checks.check_batch_sizes(data.batch_size, k, self.ppo_settings, world)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp, dtype, frozen = self.hparams, torch_dtype(self.hparams.dtype), self.frozen_dtype
        pad_id = self.tokenizer.pad_token_id
        policy = models.build_policy(self.reference, hp.policy, dtype, pad_id, self.lora)
        self.policy = without_dropout(self.trainable(policy))  # sample, score, update alike
        if self.shares_reference and self.moving:
            moving.add_reference_adapter(self.policy)
        elif not self.shares_reference:
            self.ref_models = models.build_references(self.reference, self.reference_mode, frozen)
            if self.moving:
                mark_moving(self.ref_models)  # no optimizer trains it, but it is in checkpoints
        if self.reward_source is not None:
            self.reward, self.reward_tokenizer = models.build_reward(
                self.reward_source, frozen, self.tokenizer, hp.reward_mode
            )
            self.reward_stats = reward_stats(self.reward_source)
        if self.estimator.critic:  # critic-free estimators build, shard and checkpoint none
            self.build_critic(dtype)
        every = [self.policy, self.critic, self.reward, *(self.ref_models or [])]
        if self.device_mesh is not None:
            models.shard_all([*every, self.value_head_layer], self.device_mesh, hp.fsdp_layer_class)
        self.compile_models(*every)

    def build_critic(self, dtype: torch.dtype | None) -> None:
        """A critic from ``critic`` (default: the reward model), or a value head on the policy.

        The critic reads the policy's token ids: a reward model with another vocabulary cannot
        be its starting point, so that case falls back to a value head."""
        hp = self.hparams
        source = hp.critic or (self.reward_source if self.reward_tokenizer is None else None)
        if hp.value_head or source is None:
            self.value_head_layer = models.value_head(self.policy.config.hidden_size, dtype)
        else:
            critic = models.build_critic(source, dtype, self.lora)
            self.critic = ValueModel(without_dropout(self.trainable(critic)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ one PPO iteration

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.move_reference()
        t0 = time.perf_counter()
        rollout = self.generate(batch, self.estimator_settings.samples_per_prompt)
        t1 = time.perf_counter()
        frozen = self.score_frozen(rollout)
        # Before clipping hides an inf; every rank skips, or none does (a rank alone would wait
        # for the others in the next collective).
        finite = torch.isfinite(frozen.raw_scores).all() & torch.isfinite(frozen.scores).all()
        if not self.trainer.strategy.reduce_boolean_decision(bool(finite)):
            self.skip("reward", {})
            return
        if self.scores_in_first_pass(rollout):  # timed as part of the update
            t2 = time.perf_counter()
            first = self.first_pass(rollout)
            old = first.old_scores(rollout.mask)
        else:
            first, old = None, self.score_policy(rollout)
            t2 = time.perf_counter()
        trajectory = self.estimate(rollout, frozen, old)
        stats = self.update(trajectory, first)
        self.stop_if_diverged()  # before a checkpoint or the next rollout reads them
        t3 = time.perf_counter()
        self.log_iteration(frozen, trajectory, stats, (t0, t1, t2, t3))
        # The controller steps on the whole batch's KL, so every rank's coefficient is the same.
        rows = torch.tensor(float(trajectory.mask.shape[0]), device=self.device)
        kl_rows = torch.stack([fn.masked_sum(trajectory.kl, trajectory.mask), rows])
        kl_sum, rows = self.all_sum(kl_rows)
        self.kl_ctl.update(float(kl_sum / rows), int(rows))

    def move_reference(self) -> None:
        """After every ``reference_update.every`` rollouts (skipped ones too), before the next
        one: the reference ``<- (1 - alpha) reference + alpha policy`` (``moving.py``). Done
        here, first in the next iteration, so that a checkpoint written after a rollout and the
        run resumed from it move the reference at the same point as an uninterrupted run."""
        update = self.reference_update
        done = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1  # before this one
        if update is None or done == 0 or done % update.every:
            return
        if self.shares_reference:
            moving.move_adapter(self.policy, update.alpha)
            return
        weights = moving.policy_weights(self.policy)  # LoRA: the merged weights, once
        for reference in self.ref_models:
            moving.move_toward(reference, weights, update.alpha)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], k: int = 1) -> Rollout:
        """Sample ``k`` responses per prompt (consecutive rows) with the KV cache; truncate
        after EOS. Under FSDP the policy is gathered once for the rollout (``generation.gather``)."""
        tok = self.tokenizer
        query = batch["input_ids"].repeat_interleave(k, 0)
        query_mask = batch["attention_mask"].repeat_interleave(k, 0)
        try:
            response, mask = sample(self.policy, tok, query, query_mask, self.generation)
        except NonFiniteLogits as err:
            raise self.diverged("the policy's next-token logits are non-finite") from err
        texts = tok.batch_decode(response, skip_special_tokens=True)
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        return Rollout(query, query_mask, response, mask, prompts, texts)

    @torch.no_grad()
    def score_frozen(self, rollout: Rollout) -> FrozenScores:
        """Reference log-probs and the shaped reward of a rollout."""
        ref_logprobs = self.reference_logprobs(rollout)
        raw = self.raw_scores(rollout)
        has_eos = (rollout.response == self.tokenizer.eos_token_id).any(dim=1)
        r = self.reward_settings
        stats = self.reward_stats if self.reward is not None and r.normalize else None
        scores = fn.shaped_scores(raw, has_eos, stats, r.missing_eos_penalty, r.clip)
        return FrozenScores(ref_logprobs, raw, scores)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> list[Tensor]:
        """[B, R] log-probs of the responses under each reference model (the policy with its
        adapter disabled when it shares the reference, or with its reference adapter when that
        reference moves)."""
        seq, mask, response = rollout.sequence, rollout.attention_mask, rollout.response
        temperature = self.generation.temperature
        if self.shares_reference:
            own = moving.reference_adapter(self.policy) if self.moving else None
            with own or self.policy.disable_adapter():
                return [response_logprobs(self.policy, seq, mask, response, temperature)]
        return [response_logprobs(m, seq, mask, response, temperature) for m in self.ref_models]

    @torch.no_grad()
    def initial_reference_logprobs(self, rollout: Rollout) -> list[Tensor]:
        """[B, R] log-probs of the responses under the reference as it started (the recipe's
        models: the soup, or each checkpoint under multiple_kl; a LoRA policy's disabled
        adapter), for ``eval/kl_initial`` of a moving reference."""
        seq, mask, response = rollout.sequence, rollout.attention_mask, rollout.response
        temperature = self.generation.temperature
        if self.shares_reference:
            with self.policy.disable_adapter():
                return [response_logprobs(self.policy, seq, mask, response, temperature)]
        if self.reference_mode == "multiple_kl":
            initial = self.ingredient_models()
        else:
            if self.initial is None:
                soup = [self.reference.build(dtype=self.frozen_dtype)]
                self.initial = self.placed(soup)
            initial = self.initial
        return [response_logprobs(m, seq, mask, response, temperature) for m in initial]

    @torch.no_grad()
    def raw_scores(self, rollout: Rollout) -> Tensor:
        """[B] reward-model scores (re-tokenised when the reward model has another vocabulary),
        else the reward function's."""
        if self.reward is None:
            what = f"model.reward_fn {type(self.reward_fn).__name__}"
            try:
                scores = self.reward_fn(rollout.prompts, rollout.texts)
            except Exception as err:  # the user's code: keep its traceback, frame it in one line
                user_frames = err.__traceback__.tb_next  # from the reward function's own call
                raise SalsaError(
                    f"{what} ({type(self.reward_fn).__module__}.{type(self.reward_fn).__qualname__}) "
                    f"raised {type(err).__name__} on rollout {self.rollout_index()} (its "
                    "traceback above); fix the reward function and resume with --ckpt_path last.",
                    details="".join(traceback.format_exception(type(err), err, user_frames)),
                ) from err
            return check_scores(scores, len(rollout.texts), what).to(self.device)
        if self.reward_tokenizer is not None:
            return text_scores(self.reward, self.reward_tokenizer, rollout.prompts, rollout.texts)
        return sequence_scores(self.reward, rollout.sequence, rollout.attention_mask)

    def policy_pass(self, rows: Rollout | Trajectory) -> PassOutputs:
        """Response logits, log-probs and values of rollout rows under the policy and its
        critic (a separate ``critic``, a value head on the policy, or none).

        A separate critic runs first, so that backward (newest nodes first) finishes the
        policy's gradients before it allocates the critic's: the peak then holds one model's
        gradients and the tied-embedding gradient's temporaries, not both."""
        head, seq, mask = self.value_head_layer, rows.sequence, rows.attention_mask
        n = rows.response.shape[1]
        values = self.critic(seq, mask, n) if self.critic is not None else None
        out = score_response(
            self.policy, seq, mask, rows.response, self.generation.temperature,
            hidden=head is not None, logits=bool(self.ppo_settings.entropy_coef),
        )  # fmt: skip
        if head is not None:  # the last hidden states that predict the response tokens
            values = head(out.hidden).squeeze(-1).float()
        return PassOutputs(out.logits, out.logprobs, values)

    @torch.no_grad()
    def score_policy(self, rollout: Rollout) -> PolicyScores:
        """Old log-probs and values of a rollout, no grad."""
        outputs = self.policy_pass(rollout)
        values = None if outputs.values is None else outputs.values * rollout.mask
        return PolicyScores(outputs.logprobs, values)

    def scores_in_first_pass(self, rollout: Rollout) -> bool:
        """Whether the first update pass is also the policy's and critic's scoring pass: only
        when it runs on the whole rollout (one minibatch, one micro-batch), before any weight
        changes."""
        ppo = self.ppo_settings
        one_pass = min(ppo.micro_batch_size, self.minibatch_rows()) >= len(rollout.query)
        return ppo.score_in_first_pass and one_pass

    def minibatch_rows(self) -> int:
        """This rank's rows of a minibatch: ``ppo.minibatch_size`` counts over all ranks
        (``salsa_lightning.world_size``)."""
        return self.ppo_settings.minibatch_size // self.trainer.world_size

    def first_pass(self, rollout: Rollout) -> FirstPass:
        """The first update pass over the first epoch's shuffled rows, with grad: same weights,
        same rows, so the same old log-probs and values as a scoring pass, one forward fewer."""
        order = torch.randperm(len(rollout.query), device=self.device)
        return FirstPass(order, self.policy_pass(rollout.select(order)))

    def kl(self, logprobs: Tensor, ref_logprobs: list[Tensor], estimator: str) -> Tensor:
        """[B, R] per-token KL estimate to the reference (weighted over models in multiple_kl)."""
        return fn.reference_kl(logprobs, ref_logprobs, self.reference_weights, estimator)

    @torch.no_grad()
    def estimate(self, rollout: Rollout, frozen: FrozenScores, old: PolicyScores) -> Trajectory:
        """The per-token KL and the estimator's rewards, advantages and returns."""
        kl = self.kl(old.logprobs, frozen.ref_logprobs, self.kl_settings.estimator) * rollout.mask
        coef = self.kl_ctl.value if self.kl_in_reward else 0.0
        all_sum = self.all_sum if self.trainer.world_size > 1 else None
        inputs = EstimatorInputs(frozen.scores, kl, old.values, rollout.mask, coef, all_sum)
        out = self.estimator.estimate(inputs, self.ppo_settings, self.estimator_settings)
        if self.estimator.group:
            self.warn_ties(frozen.scores)
        return Trajectory(
            rollout.query, rollout.query_mask, rollout.response, rollout.mask, old.logprobs,
            frozen.ref_logprobs, old.values, frozen.scores, kl, out.rewards, out.advantages,
            out.returns,
        )  # fmt: skip

    def update(self, trajectory: Trajectory, first: FirstPass | None = None) -> dict[str, float]:
        """K epochs of clipped PPO over shuffled minibatches, gradients accumulated over
        micro-batches; returns the mean of each loss statistic.

        ``first``, when the first update pass scored the rollout, holds the first epoch's row
        order and that pass's outputs: it is the one micro-batch of the first epoch. The
        device is synchronised once per optimizer step (is every micro-batch's loss finite on
        every rank?), so the host queues the next passes while the device computes."""
        ppo, opt = self.ppo_settings, self.optimizers()
        policy_first = self.steps_policy_first()
        rows, totals = len(trajectory.query), {}
        for epoch in range(ppo.epochs):
            reuse_first = first is not None and epoch == 0
            order = first.order if reuse_first else torch.randperm(rows, device=self.device)
            for minibatch in order.split(self.minibatch_rows()):  # this rank's share
                finite = torch.ones((), device=self.device)
                critic_losses = []  # policy first: backpropagated after the policy's step
                for micro in minibatch.split(ppo.micro_batch_size):
                    mb = trajectory.select(micro)
                    outputs = first.outputs if reuse_first else self.policy_pass(mb)
                    policy_loss, value_loss, stats = self.micro_batch_loss(mb, outputs)
                    finite = finite * torch.isfinite(policy_loss + value_loss)
                    if policy_first:
                        self.manual_backward(policy_loss)
                        critic_losses.append(value_loss)
                    else:
                        # Each micro-batch weighs by its rows: a short minibatch (an epoch's
                        # last, smaller batch of prompts) is not scaled down by the nominal count.
                        share = len(minibatch) / len(micro)
                        self.manual_backward((policy_loss + value_loss) / share)
                    for k, v in stats.items():
                        totals.setdefault(k, []).append(v.detach().float())
                if not self.trainer.strategy.reduce_boolean_decision(bool(finite)):
                    opt.zero_grad()  # throw the step's gradients away, stop the update
                    return self.skip("loss", totals)
                if policy_first:
                    (critic_loss,) = critic_losses  # one micro-batch per minibatch
                    self.step_policy_alone(opt)
                    self.manual_backward(critic_loss)
                if ppo.max_grad_norm is not None:
                    self.clip_gradients(opt, ppo.max_grad_norm, "norm")
                opt.step()
                opt.zero_grad()
        self.skips = 0
        return mean_stats(totals)

    def micro_batch_loss(
        self, mb: Trajectory, outputs: PassOutputs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The policy's terms (clipped policy loss, - entropy bonus, + the KL coefficient x the
        k3 KL when the KL is a loss term) and the critic's (``vf_coef`` x clipped value loss; 0
        without a critic) of a micro-batch; the PPO loss is their sum. The stats are detached
        scalars named as TRL names them (``value/clipfrac``: the value function's)."""
        ppo = self.ppo_settings
        policy_loss, clipfrac, approxkl = fn.ppo_policy_loss(
            outputs.logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range,
            ppo.max_log_ratio, self.loss_aggregation, self.generation.max_new_tokens,
        )  # fmt: skip
        stats = {
            "loss/policy": policy_loss.detach(),
            "policy/clipfrac": clipfrac,
            "policy/approxkl": approxkl,
        }
        value_loss = torch.zeros((), device=policy_loss.device)
        if mb.returns is not None:
            vf_loss, vf_clipfrac = fn.ppo_value_loss(
                outputs.values, mb.values, mb.returns, mb.mask, ppo.value_clip_range
            )
            value_loss = ppo.vf_coef * vf_loss
            stats.update({"loss/value": vf_loss.detach(), "value/clipfrac": vf_clipfrac})
        if ppo.entropy_coef:
            logits = outputs.logits / self.generation.temperature
            entropy = fn.masked_mean(fn.entropy_from_logits(logits), mb.mask)
            policy_loss = policy_loss - ppo.entropy_coef * entropy
            stats["policy/entropy"] = entropy.detach()
        if not self.kl_in_reward:
            kl = fn.masked_mean(self.kl(outputs.logprobs, mb.ref_logprobs, "k3"), mb.mask)
            policy_loss = policy_loss + self.kl_ctl.value * kl
            stats["loss/kl"] = kl.detach()
        return policy_loss, value_loss, stats

    def steps_policy_first(self) -> bool:
        """Whether each optimizer step applies (and frees) the policy's gradients before the
        critic's backward allocates its own, so the peak holds one model's gradients, not both.

        Only when nothing couples the two models' updates, so the weights are the same as with
        one joint step: a separate critic (not a value head, not none), one micro-batch per
        minibatch, no global-norm clipping, no gradient scaler, one unsharded device. Callbacks'
        ``on_before_optimizer_step`` then runs twice per step, seeing the policy's gradients,
        then the critic's."""
        ppo, trainer = self.ppo_settings, self.trainer
        return (
            self.critic is not None
            and ppo.micro_batch_size >= ppo.minibatch_size
            and ppo.max_grad_norm is None
            and getattr(trainer.precision_plugin, "scaler", None) is None
            and isinstance(trainer.strategy, SingleDeviceStrategy)
        )

    def step_policy_alone(self, opt: Any) -> None:
        """Apply and free the gradients accumulated so far: the policy's (the critic's
        parameters have none yet, so the optimizer skips them).

        Through the strategy and its precision plugin, as ``opt.step()`` goes, but not counted
        as a Lightning step: the critic's step that follows completes the one optimizer step
        that ``trainer.global_step`` counts, as it does when both step together."""
        self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)
        opt.zero_grad()

    def skip(self, what: str, totals: dict[str, list[Tensor]]) -> dict[str, float]:
        """Count an update skipped for a non-finite ``what``; stop after ``max_skips`` in a row."""
        self.skips += 1
        self.log("train/skipped_updates", float(self.skips))
        warnings.warn(
            f"non-finite {what}: PPO update skipped ({self.skips} in a row)", stacklevel=2
        )
        if self.skips >= self.hparams.max_skips:
            raise SalsaError(
                f"{self.skips} PPO updates in a row were skipped for a non-finite {what} "
                f"(model.max_skips={self.hparams.max_skips}); lower the learning rate or check the reward."
            )
        return mean_stats(totals)

    def stop_if_diverged(self) -> None:
        """Stop when an update made a trained weight non-finite (the run diverged), before this
        rollout's weights are checkpointed, exported or sampled from (one sum per weight over
        each rank's shards, :meth:`StageModule.nonfinite_weight`)."""
        name = self.nonfinite_weight(self)
        if name is not None:
            raise self.diverged(f"the PPO update made the trained weight '{name}' non-finite")

    def diverged(self, what: str) -> SalsaError:
        """The one-line stop of a diverged run: the rollout, the last checkpoint, the likely
        causes and how to go on."""
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        then = "resume with --ckpt_path last" if last else "rerun"
        lr = self.optimizers().param_groups[0]["lr"]
        return SalsaError(
            f"rollout {self.rollout_index()}: {what} (the run diverged); nothing of it is "
            f"checkpointed or exported. Last checkpoint: {last or 'none yet'}. Likely causes: "
            f"the learning rate ({lr:g}) or the KL coefficient (model.kl.coef "
            f"{self.kl_ctl.value:g}) is too high; lower it and {then}."
        )

    def rollout_index(self) -> int:
        """The current rollout's number in the run, from 1 (restored on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over every rank (itself on one device)."""
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def warn_ties(self, scores: Tensor) -> None:
        """Warn once per run when whole groups scored alike: their advantages are 0, so they
        teach nothing (more samples per prompt or a higher temperature help)."""
        groups = scores.reshape(-1, self.estimator_settings.samples_per_prompt)
        tied = int((groups.amax(1) == groups.amin(1)).sum())
        self.rollout_metrics.add({"rollout/tied_groups": tied / groups.shape[0]})
        if tied and not self.warned_ties:
            self.warned_ties = True
            rank_zero_warn(
                f"{tied} of {groups.shape[0]} prompts got the same reward for all their "
                f"{groups.shape[1]} samples: their advantages are 0 and they do not train "
                "(warned once; `rollout/tied_groups` logs the fraction)."
            )

    def log_iteration(
        self, frozen: FrozenScores, t: Trajectory, stats: dict[str, float], times: tuple
    ) -> None:
        """TRL-named metrics of one PPO iteration, into the window the loggers' next write
        reports; the progress bar shows this rollout's reward and KL."""
        eos = self.tokenizer.eos_token_id
        metrics = trajectory_metrics(t, frozen.raw_scores, self.kl_ctl.value, eos)
        self.rollout_metrics.add({**metrics, **timing_metrics(t, times), **stats})
        if self.trainer.progress_bar_callback is not None:
            last = self.rollout_metrics.last
            self.log("reward", last["objective/scores"], prog_bar=True, logger=False)
            self.log("kl", last["objective/kl"], prog_bar=True, logger=False)
        if self.loggers_write():
            self.log_window()

    def loggers_write(self) -> bool:
        """Whether Lightning writes this rollout's logged values: after every
        ``trainer.log_every_n_steps`` rollouts (it counts batches; one rollout is one batch).
        The same answer on every rank (``log_window`` is a collective)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and self.rollout_index() % every == 0)

    def log_window(self) -> None:
        """Log each metric's mean over the rollouts since the last write, and over the ranks (one
        reduction: a sharded run logs the same numbers as a single device). Lightning's
        ``self.log`` costs a fraction of a millisecond a value, and between writes it would keep
        only the last rollout's (``callback_metrics`` hold the window's means, after a write)."""
        means = self.rollout_metrics.pop_means()
        if self.trainer.world_size > 1:
            values = torch.tensor(list(means.values()), device=self.device, dtype=torch.float64)
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
            means = dict(zip(means, values.tolist(), strict=True))
        # Lightning's step counts optimizer steps; this counts rollouts (restored on resume).
        self.log_dict({**means, "train/rollouts": float(self.rollout_index())}, prog_bar=False)

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample answers to held-out prompts (seeded), score them, measure their KL to the
        reference and to each soup ingredient."""
        # A fixed seed per batch: every validation samples the same way, and training's RNG
        # stream is untouched (resuming reproduces an uninterrupted run).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(10_000 + batch_idx)
            rollout = self.generate(batch)
        temperature = self.generation.temperature
        seq, mask, response = rollout.sequence, rollout.attention_mask, rollout.response
        logprobs = response_logprobs(self.policy, seq, mask, response, temperature)
        kl = self.kl(logprobs, self.reference_logprobs(rollout), "k1")
        raw = self.raw_scores(rollout)
        # The reward function is the judge beside a reward model; else the task's gold reward.
        judge = self.reward_fn if self.reward is not None else None
        gold = gold_scores(judge, rollout.prompts, rollout.texts)
        rows = eval_rows(rollout, kl, raw, gold, logprobs, self.ingredient_logprobs(rollout))
        if self.moving:
            initial = self.kl(logprobs, self.initial_reference_logprobs(rollout), "k1")
            rows["eval/kl_initial"] = (initial * rollout.mask).sum(1)
        keep = self.held_out(batch_idx, len(raw))
        for name, values in rows.items():
            metric = self.eval_means[name.removeprefix("eval/").replace(".", "_")]
            metric.update(values.detach().float()[keep])
        if batch_idx == 0:
            self.eval_samples += sample_records(rollout, raw)

    @torch.no_grad()
    def ingredient_logprobs(self, rollout: Rollout) -> dict[str, Tensor]:
        """[B, R] log-probs of the answers under each soup ingredient, by checkpoint name."""
        names = self.ingredient_names()
        if not names:
            return {}
        seq, mask, response = rollout.sequence, rollout.attention_mask, rollout.response
        t = self.generation.temperature
        return {
            name: response_logprobs(model, seq, mask, response, t)
            for name, model in zip(names, self.ingredient_models(), strict=True)
        }

    def ingredient_models(self) -> list[nn.Module]:
        """Each reference checkpoint as a frozen model: the reference models themselves under a
        frozen multiple_kl, else built on first use (a moving multiple_kl reference has moved
        away from its checkpoints)."""
        if self.reference_mode == "multiple_kl" and not self.moving:
            return list(self.ref_models)
        if self.ingredients is None:
            self.ingredients = self.placed(self.reference.build_each(dtype=self.frozen_dtype))
        return self.ingredients

    def placed(self, frozen: list[nn.Module]) -> list[nn.Module]:
        """Frozen models built after ``configure_model``, on this device, sharded like the
        others under FSDP2."""
        return models.placed(frozen, self.device, self.device_mesh, self.hparams.fsdp_layer_class)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs each mean over the ranks; every rank updated the same metrics.
        means = {
            f"eval/{name}": metric.compute()
            for name, metric in self.eval_means.items()
            if metric.update_called
        }
        for metric in self.eval_means.values():
            metric.reset()
        self.log_dict(means, prog_bar=False)
        self.last_eval = {k: float(v) for k, v in means.items()}
        log_dir = self.trainer.log_dir  # a collective under FSDP: read it on every rank
        if self.eval_samples and self.trainer.is_global_zero and log_dir:
            append_samples(log_dir, self.global_step, self.eval_samples)
        self.eval_samples = []

    # ------------------------------------------------------------------ checkpoints and export

    def training_record(self) -> dict[str, Any]:
        return {"stage": "SALSAModule", "recipe": self.recipe()}

    def recipe(self) -> dict[str, Any]:
        """What the frozen weights are made of (where a moving reference started): enough to
        rebuild and verify them."""
        hp = self.hparams
        return reference_recipe(
            self.reference, self.reference_mode, self.reward_source, self.reference_update,
            hp.reward_mode,
        )  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["salsa"] = {
            "recipe": self.recipe(),
            "kl_controller": self.kl_ctl.state_dict(),
            "skips": self.skips,
            "metric_window": self.rollout_metrics.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("salsa")
        if saved is None:
            return
        check_same_reference(saved["recipe"], self.recipe())
        self.kl_ctl.load_state_dict(saved["kl_controller"])
        self.skips = saved["skips"]
        if "metric_window" in saved:  # absent from checkpoints written before it
            self.rollout_metrics.load_state_dict(saved["metric_window"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def on_fit_start(self) -> None:
        data, ppo = self.trainer.datamodule.hparams, self.ppo_settings
        rows = data.batch_size * self.estimator_settings.samples_per_prompt
        steps = ppo.epochs * -(-rows // ppo.minibatch_size)
        rank_zero_info(
            f"SALSA: one rollout of {rows} responses = {steps} optimizer steps (ppo.epochs "
            f"{ppo.epochs} x minibatches): trainer.max_steps and checkpoint step= count those."
        )
        rank_zero_info(
            f"SALSA: reference {self.reference_mode} of {len(self.reference.checkpoints)} "
            f"checkpoint(s) with weights {self.reference.resolved_weights()}, "
            f"{'moving ' + str(asdict(self.reference_update)) if self.moving else 'frozen'}; policy from "
            f"{self.hparams.policy or 'the soup'}; estimator {asdict(self.estimator_settings)} "
            f"(KL {'in the reward' if self.kl_in_reward else 'as a loss term'}, loss "
            f"{self.loss_aggregation}); PPO settings {asdict(ppo)}; KL {asdict(self.kl_settings)}; "
            f"reward {asdict(self.reward_settings)}"
        )

    def export_model(self) -> nn.Module:
        return self.policy

    write_export = StageModule.write_policy_export


def mean_stats(totals: dict[str, list[Tensor]]) -> dict[str, float]:
    """The mean of each stat's scalar tensors, read from the device in one transfer."""
    means = [torch.stack(v).mean() for v in totals.values()]
    return dict(zip(totals, torch.stack(means).tolist(), strict=True)) if means else {}
