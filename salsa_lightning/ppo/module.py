"""``SALSAModule``: the LightningModule of the SALSA-PPO stage, orchestration only.

One ``training_step`` is one PPO iteration, in the order of the algorithm box:

1. ``generate``: sample responses to a batch of prompts with the KV cache;
2. ``score``: the reference log-probs and the reward (frozen models), and the policy's old
   log-probs and the critic's values;
3. ``estimate``: the advantage estimator, by name (``gae``: KL-penalised per-token rewards,
   GAE against the critic, whitening; ``grpo``, ``rloo``, ``reinforce_baseline``: k samples per
   prompt, a baseline from the other samples of the same prompt, no critic);
4. ``update``: K epochs of clipped policy and value losses over minibatches.

With one checkpoint in ``reference`` it is classic PPO (SALSA-1). ``reference_mode:
multiple_kl`` is the paper's baseline: a KL penalty to each SFT model, weighted, no averaging.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from salsa_lightning.errors import SalsaError
from salsa_lightning.frozen import without_dropout
from salsa_lightning.functional import (
    AdaptiveKLController,
    kl_estimate,
    masked_sum,
)
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.lora import LoraSettings
from salsa_lightning.ppo import checks, models
from salsa_lightning.ppo.losses import ppo_loss
from salsa_lightning.ppo.metrics import mean_stats, rollout_metrics, timing_metrics
from salsa_lightning.ppo.recipe import check_same_reference, reference_recipe
from salsa_lightning.ppo.rollout import (
    FirstPass,
    FrozenScores,
    PassOutputs,
    Trajectory,
)
from salsa_lightning.ppo.settings import EstimatorSettings, KLSettings, PPOSettings
from salsa_lightning.ppo.steps import RolloutSteps
from salsa_lightning.ppo.update import OptimizerSteps, can_step_policy_first, ppo_update
from salsa_lightning.ppo.validation import ValidationHooks
from salsa_lightning.pretrained import check_model_source, export_pretrained, torch_dtype
from salsa_lightning.scoring import check_reward_model, read_reward_stats
from salsa_lightning.soup import SoupReference
from salsa_lightning.stage_module import StageModule

# (prompts, responses) -> Tensor[B]; typed loosely so YAML can name any callable class.
RewardFunction = Callable[..., Any]


def default_ppo_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at 1e-5, no weight decay: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class SALSAModule(RolloutSteps, ValidationHooks, StageModule):
    """SALSA-PPO with a frozen soup reference.

    Args:
        reference: The KL reference as a soup recipe: ``{checkpoints: [...], weights: [...]}``.
            One checkpoint makes it classic PPO.
        reference_mode: ``soup`` (KL to the weight average) or ``multiple_kl`` (weighted mean
            of the KLs to each checkpoint, the paper's baseline).
        policy: Checkpoint the policy starts from; None starts it from the soup (initial KL 0).
        reward_model: Reward model directory (an export of ``configs/reward.yaml``).
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
        normalize_rewards: Normalise reward-model scores with the mean/std in its
            ``reward_stats.json``.
        reward_clip: Clip normalised scores to [-reward_clip, reward_clip] (None: off).
        max_skips: Stop after this many consecutive updates skipped for a non-finite reward or
            loss.
        dtype: Weights dtype of the trained models (``float32``, ``bfloat16``, ``float16``);
            for bf16 training keep float32 here and set ``trainer.precision: bf16-mixed``.
        frozen_dtype: Weights dtype of the frozen reference and reward models (default:
            ``dtype``); ``bfloat16`` halves their memory.
        gradient_checkpointing: Recompute activations of the trainable models in backward.
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
        reference_mode: str = "soup",
        policy: str | None = None,
        reward_model: str | None = "artifacts/reward",
        reward_fn: RewardFunction | None = None,
        critic: str | None = None,
        value_head: bool = False,
        estimator: EstimatorSettings | None = None,
        lora: LoraSettings | None = None,
        generation: GenerationSettings | None = None,
        kl: KLSettings | None = None,
        ppo: PPOSettings | None = None,
        normalize_rewards: bool = True,
        reward_clip: float | None = 5.0,
        max_skips: int = 3,
        dtype: str | None = None,
        frozen_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = default_ppo_optimizer,
        export_dir: str | None = None,
        overwrite: bool = False,
        eval_kl_to_each: bool = True,
        fsdp_layer_class: str | None = None,
    ) -> None:
        super().__init__(lora)
        if reference_mode not in ("soup", "multiple_kl"):
            raise SalsaError(
                f"reference_mode must be 'soup' or 'multiple_kl', got {reference_mode!r}."
            )
        if reward_model is None and reward_fn is None:
            raise SalsaError(
                "set model.reward_model (a reward model directory) or model.reward_fn."
            )
        self.save_hyperparameters(ignore=["optimizer", "reward_fn"])
        self.automatic_optimization = False
        self.reference = reference
        self.reward_fn = reward_fn
        self.generation = generation or GenerationSettings()
        self.kl_settings = kl or KLSettings()
        self.ppo = ppo or PPOSettings()
        self.estimator_settings = estimator or EstimatorSettings()
        self.estimator = checks.check_estimator(self.estimator_settings, critic, value_head)
        kl_estimate(torch.zeros(1), torch.zeros(1), self.kl_settings.estimator)  # validates
        in_reward = self.kl_settings.in_reward
        self.kl_in_reward = self.estimator.kl_in_reward if in_reward is None else in_reward
        self.loss_aggregation = (
            self.estimator_settings.loss_aggregation or self.estimator.aggregation
        )
        self.kl_ctl = AdaptiveKLController(
            self.kl_settings.coef, self.kl_settings.target, self.kl_settings.horizon
        )
        self.optimizer_factory = optimizer
        self.policy: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.ref_models: nn.ModuleList | None = None
        self.reward: nn.Module | None = None
        self.value_head_layer: nn.Module | None = None
        self.reward_stats: dict[str, float] | None = None
        self.reward_tokenizer: Any = None
        # Each soup ingredient, built on the first validation that measures the KL to it; a
        # plain list, so never registered, checkpointed or optimised.
        self._ingredients: list[nn.Module] | None = None
        self.skips = 0
        self.warned_ties = False

    # ------------------------------------------------------------------ building

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.hparams.frozen_dtype or self.hparams.dtype)

    @property
    def shares_reference(self) -> bool:
        """LoRA on the soup: the reference is the policy with its adapter disabled."""
        hp = self.hparams
        return self.lora is not None and hp.policy is None and hp.reference_mode == "soup"

    def setup(self, stage: str) -> None:
        # Every check that can fail runs before any model is built or trained.
        self.reference.validate()
        hp = self.hparams
        for path, what in ((hp.policy, "model.policy"), (hp.critic, "model.critic")):
            if path is not None:
                check_model_source(path, what)
        if hp.reward_model is not None:
            check_reward_model(hp.reward_model, "model.reward_model")
        config = checks.check_policy_matches_reference(self.reference, hp.policy)
        checks.check_tokenizer(self.tokenizer, self.reference, hp.policy)
        data = self.trainer.datamodule.hparams
        checks.check_context(config, data.max_length, self.generation.max_new_tokens)
        if stage == "fit":
            k, world = self.estimator_settings.samples_per_prompt, self.trainer.world_size
            checks.check_batch_sizes(data.batch_size, k, self.ppo, world)
        super().setup(stage)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp, dtype, frozen = self.hparams, torch_dtype(self.hparams.dtype), self.frozen_dtype
        pad_id = self.tokenizer.pad_token_id
        policy = models.build_policy(self.reference, hp.policy, dtype, pad_id, self.lora)
        self.policy = without_dropout(self.trainable(policy))  # sample, score, update alike
        if not self.shares_reference:
            self.ref_models = models.build_references(self.reference, hp.reference_mode, frozen)
        if hp.reward_model is not None:
            self.reward, self.reward_tokenizer = models.build_reward(
                hp.reward_model, frozen, self.tokenizer
            )
            self.reward_stats = read_reward_stats(hp.reward_model)
        if self.estimator.critic:  # critic-free estimators build, shard and checkpoint none
            self.build_critic(dtype)
        if self.device_mesh is not None:
            trained = [self.policy, self.critic, self.reward, *(self.ref_models or [])]
            models.shard_all(
                [*trained, self.value_head_layer], self.device_mesh, hp.fsdp_layer_class
            )

    def build_critic(self, dtype: torch.dtype | None) -> None:
        """A critic from ``critic`` (default: the reward model), or a value head on the policy.

        The critic reads the policy's token ids: a reward model with another vocabulary cannot
        be its starting point, so that case falls back to a value head."""
        hp = self.hparams
        source = hp.critic or (hp.reward_model if self.reward_tokenizer is None else None)
        if hp.value_head or source is None:
            self.value_head_layer = models.value_head(self.policy.config.hidden_size, dtype)
        else:
            critic = models.build_critic(source, dtype, self.lora)
            self.critic = models.ValueModel(without_dropout(self.trainable(critic)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ the update

    def ppo_loss(
        self, mb: Trajectory, outputs: PassOutputs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The policy's and the critic's loss terms of a micro-batch (see ``losses.ppo_loss``)."""
        kl_loss = None if self.kl_in_reward else (lambda lp, refs: self.kl(lp, refs, "k3"))
        return ppo_loss(
            outputs, mb, self.ppo, self.generation.temperature, kl_loss, self.kl_ctl.value,
            self.loss_aggregation, self.generation.max_new_tokens,
        )  # fmt: skip

    def update(self, trajectory: Trajectory, first: FirstPass | None = None) -> dict[str, float]:
        """K epochs of clipped PPO over minibatches (``update.ppo_update``); ``first`` holds the
        first epoch's order and first pass when that pass scored the rollout. Each rank steps
        on its share of a minibatch (``ppo.minibatch_size`` counts over all ranks)."""
        ppo = replace(self.ppo, minibatch_size=self.ppo.minibatch_size // self.trainer.world_size)
        totals, done = ppo_update(
            trajectory, ppo, self.policy_pass, self.ppo_loss, OptimizerSteps(self),
            first, self.steps_policy_first(),
        )  # fmt: skip
        if not done:
            return self.skip("loss", totals)
        self.skips = 0
        return mean_stats(totals)

    def steps_policy_first(self) -> bool:
        """Whether each optimizer step applies (and frees) the policy's gradients before the
        critic's backward (``update.can_step_policy_first``)."""
        return can_step_policy_first(
            self.ppo, self.critic is not None, self.trainer.precision_plugin,
            self.trainer.strategy,
        )  # fmt: skip

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

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout = self.generate(batch, self.estimator_settings.samples_per_prompt)
        t1 = time.perf_counter()
        frozen = self.score_frozen(rollout)
        # Before clipping hides an inf; every rank skips, or none does (a rank alone would wait
        # for the others in the next collective).
        finite = torch.isfinite(frozen.raw_scores).all() & torch.isfinite(frozen.scores).all()
        if not self.all_ranks(finite):
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
        t3 = time.perf_counter()
        self.log_rollout(frozen, trajectory, stats, (t0, t1, t2, t3))
        # The controller steps on the whole batch's KL, so every rank's coefficient is the same.
        rows = torch.tensor(float(trajectory.mask.shape[0]), device=self.device)
        kl_sum, rows = self.all_sum(torch.stack([masked_sum(trajectory.kl, trajectory.mask), rows]))
        self.kl_ctl.update(float(kl_sum / rows), int(rows))

    def log_rollout(
        self, frozen: FrozenScores, t: Trajectory, stats: dict[str, float], times: tuple
    ) -> None:
        """TRL-named metrics of one PPO iteration, synced across ranks (a sharded run logs the
        same numbers as a single device)."""
        metrics = rollout_metrics(t, frozen, self.kl_ctl.value, self.tokenizer.eos_token_id)
        metrics = {**metrics, **timing_metrics(t, times), **stats}
        # Lightning's step counts optimizer steps; this counts rollouts (restored on resume).
        metrics["train/rollouts"] = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        sync = self.trainer.world_size > 1
        self.log_dict({k: float(v) for k, v in metrics.items()}, prog_bar=False, sync_dist=sync)
        self.log("reward", float(metrics["objective/scores"]), prog_bar=True, logger=False)
        self.log("kl", float(metrics["objective/kl"]), prog_bar=True, logger=False)

    # ------------------------------------------------------------------ checkpoints and export

    def training_record(self) -> dict[str, Any]:
        return {"stage": "SALSAModule", "recipe": self.recipe()}

    def recipe(self) -> dict[str, Any]:
        """What the frozen weights are made of: enough to rebuild and verify them."""
        return reference_recipe(
            self.reference, self.hparams.reference_mode, self.hparams.reward_model
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["salsa"] = {
            "recipe": self.recipe(),
            "kl_controller": self.kl_ctl.state_dict(),
            "skips": self.skips,
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
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule.hparams
        rows = data.batch_size * self.estimator_settings.samples_per_prompt
        steps = self.ppo.epochs * -(-rows // self.ppo.minibatch_size)
        rank_zero_info(
            f"SALSA: one rollout of {rows} responses = {steps} optimizer steps (ppo.epochs "
            f"{self.ppo.epochs} x minibatches): trainer.max_steps and checkpoint step= count those."
        )
        rank_zero_info(
            f"SALSA: reference {self.hparams.reference_mode} of {len(self.reference.checkpoints)} "
            f"checkpoint(s) with weights {self.reference.resolved_weights()}; policy from "
            f"{self.hparams.policy or 'the soup'}; estimator {asdict(self.estimator_settings)} "
            f"(KL {'in the reward' if self.kl_in_reward else 'as a loss term'}, loss "
            f"{self.loss_aggregation}); PPO settings {asdict(self.ppo)}; KL {asdict(self.kl_settings)}"
        )

    def export_model(self) -> nn.Module:
        return self.policy

    def write_export(
        self, model: nn.Module, state_dict: dict | None, extras: dict[str, Any]
    ) -> None:
        if self.lora is not None and state_dict is None:
            # The adapter's base may be a soup that exists only in memory: export the merged
            # model, which plain transformers loads on its own.
            model = copy.deepcopy(model).merge_and_unload()
        elif self.lora is not None:
            rank_zero_warn(
                "SALSAModule: a sharded LoRA policy is exported as its adapter; its base is "
                "the reference recipe in salsa_training.json."
            )
        export_pretrained(model, self.tokenizer, self.hparams.export_dir, extras, state_dict)
