"""Stage 4: SALSA-PPO, PPO whose KL reference is a frozen model soup.

One ``training_step`` is one PPO iteration, in the order of the algorithm box:

1. ``generate``: sample responses to a batch of prompts with the KV cache;
2. ``score``: one no-grad pass each for the policy's log-probs, the reference's log-probs, the
   critic's values and the reward;
3. ``advantages``: per-token KL-penalised rewards, GAE, whitening;
4. ``update``: K epochs of clipped policy and value losses over minibatches.

With one checkpoint in ``reference`` it is classic PPO (SALSA-1). ``reference_mode:
multiple_kl`` is the paper's baseline: a KL penalty to each SFT model, weighted, no averaging.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa_lightning import functional as F
from salsa_lightning.data import right_padded_chats
from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import GenerationSettings, position_ids, response_logits, sample
from salsa_lightning.models import (
    Frozen,
    LoraSettings,
    add_lora,
    check_export_dir,
    check_model_source,
    check_world_size,
    export_pretrained,
    full_state_dict,
    keep_frozen_out_of_state_dict,
    load_tokenizer,
    shard,
    torch_dtype,
)
from salsa_lightning.reward import REWARD_STATS
from salsa_lightning.soup import SoupReference, config_dir, load_soup

# (prompts, responses) -> Tensor[B]; typed loosely so YAML can name any callable class.
RewardFunction = Callable[..., Any]


# ----------------------------------------------------------------------------- settings


@dataclass
class KLSettings:
    """The KL penalty to the reference.

    Attributes:
        coef: Initial KL coefficient beta.
        estimator: ``k1``, ``k2`` or ``k3`` per-token estimator.
        in_reward: True: ``-beta * KL`` per token in the reward (TRL, InstructGPT); False: a
            ``beta * KL`` loss term (k3 at the current policy) next to the policy loss.
        target: Adaptive control (Ziegler et al.): the KL the coefficient steers to; None: fixed.
        horizon: Adaptive control horizon in samples.
    """

    coef: float = 0.05
    estimator: str = "k1"
    in_reward: bool = True
    target: float | None = None
    horizon: int = 10000


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


# The settings and the reference recipe are saved in checkpoints' hyper_parameters when the
# module is built in Python; Lightning resumes with torch.load(weights_only=True), which only
# unpickles allowlisted classes (plain dataclasses of numbers, strings and lists).
torch.serialization.add_safe_globals([GenerationSettings, KLSettings, PPOSettings, SoupReference])


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """One batch of sampled responses and what PPO computes about them.

    B prompts; P prompt length (left-padded); R response length (pad after the first EOS).
    """

    query: Tensor  # [B, P] prompt ids, left-padded
    query_mask: Tensor  # [B, P] 1 on prompt tokens
    response: Tensor  # [B, R] sampled ids, pad after the first EOS
    mask: Tensor  # [B, R] float, 1 up to and including EOS
    prompts: list[str]  # B prompt texts (what reward functions read)
    texts: list[str] = field(default_factory=list)  # B decoded responses
    logprobs: Tensor | None = None  # [B, R] policy log-probs when sampled
    ref_logprobs: list[Tensor] = field(default_factory=list)  # one [B, R] per reference model
    values: Tensor | None = None  # [B, R] critic values
    scores: Tensor | None = None  # [B] normalised, clipped reward (penalties included)
    raw_scores: Tensor | None = None  # [B] reward as the reward model / function gave it
    kl: Tensor | None = None  # [B, R] per-token KL estimate to the reference
    rewards: Tensor | None = None  # [B, R] per-token rewards
    advantages: Tensor | None = None  # [B, R]
    returns: Tensor | None = None  # [B, R]

    @property
    def sequence(self) -> Tensor:
        """[B, P + R] prompt and response ids."""
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + R] 1 on prompt and response tokens."""
        return torch.cat([self.query_mask, self.mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: Tensor) -> Rollout:
        """The rows ``index`` of every tensor field (lists of texts are not needed by updates)."""
        picked = {}
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                picked[name] = value[index]
            elif name == "ref_logprobs":
                picked[name] = [t[index] for t in value]
            else:
                picked[name] = value
        return Rollout(**picked)


class ValueModel(nn.Module):
    """A critic: a sequence classifier's backbone and score head applied at every position.

    A module of its own so that FSDP's hooks run when it is called.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        inner = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier
        self.classifier = classifier  # keeps a peft wrapper (and its adapters) registered
        self.backbone = getattr(inner, inner.base_model_prefix)
        self.score = inner.score

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n: int) -> Tensor:
        """[B, T] ids -> [B, n] values of the states before each of the last ``n`` tokens."""
        states = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
        ).last_hidden_state
        return self.score(states[:, -n - 1 : -1]).squeeze(-1).float()


# ----------------------------------------------------------------------------- module


def mean_stats(totals: dict[str, list[Tensor]]) -> dict[str, float]:
    """The mean of each stat's scalar tensors, read from the device in one transfer."""
    means = [torch.stack(v).mean() for v in totals.values()]
    return dict(zip(totals, torch.stack(means).tolist(), strict=True)) if means else {}


def default_ppo_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at 1e-5, no weight decay: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class SALSAModule(L.LightningModule):
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
        value_head: Use a value head on the policy instead of a separate critic.
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
        super().__init__()
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
        F.kl_estimate(torch.zeros(1), torch.zeros(1), self.kl_settings.estimator)  # validates
        self.kl_ctl = F.AdaptiveKLController(
            self.kl_settings.coef, self.kl_settings.target, self.kl_settings.horizon
        )
        self.optimizer_factory = optimizer
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
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
        keep_frozen_out_of_state_dict(self)  # frozen weights are rebuilt from their recipe
        self.strict_loading = False

    # ------------------------------------------------------------------ building

    @property
    def tokenizer(self) -> Any:
        return self.trainer.datamodule.tokenizer

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.hparams.frozen_dtype or self.hparams.dtype)

    @property
    def shares_reference(self) -> bool:
        """LoRA on the soup: the reference is the policy with its adapter disabled."""
        return (
            self.lora is not None
            and self.hparams.policy is None
            and self.hparams.reference_mode == "soup"
        )

    def setup(self, stage: str) -> None:
        # Every check that can fail runs before any model is built or trained.
        self.reference.validate()
        hp = self.hparams
        for path, what in (
            (hp.policy, "model.policy"),
            (hp.reward_model, "model.reward_model"),
            (hp.critic, "model.critic"),
        ):
            if path is not None:
                check_model_source(path, what)
        policy_config = AutoConfig.from_pretrained(hp.policy or self._first_model_dir())
        ref_config = AutoConfig.from_pretrained(self._first_model_dir())
        if (policy_config.model_type, policy_config.vocab_size) != (
            ref_config.model_type,
            ref_config.vocab_size,
        ):
            raise SalsaError(
                f"model.reference ({self.reference.checkpoints[0]}: {ref_config.model_type}, vocabulary "
                f"{ref_config.vocab_size}) does not match the policy ({hp.policy}: "
                f"{policy_config.model_type}, vocabulary {policy_config.vocab_size})."
            )
        if hp.reward_model is not None:
            self._check_reward_model(hp.reward_model)
        data = self.trainer.datamodule
        context = getattr(policy_config, "max_position_embeddings", None)
        needed = data.hparams.max_length + self.generation.max_new_tokens
        if context is not None and needed > context:
            raise SalsaError(
                f"data.max_length ({data.hparams.max_length}) + generation.max_new_tokens "
                f"({self.generation.max_new_tokens}) = {needed} exceeds the policy's context window "
                f"({context}); lower one of them (longer prompts are dropped by data.max_length)."
            )
        if stage == "fit":
            check_export_dir(hp.export_dir, hp.overwrite)
            self._check_batch_sizes(data.hparams.batch_size)

    def _first_model_dir(self) -> str:
        return str(config_dir(self.reference.checkpoints[0]))

    def _check_batch_sizes(self, rows: int) -> None:
        """Each rank rolls out ``data.batch_size`` prompts (the global batch is world size times
        that): it must split into whole minibatches, and those into whole micro-batches."""
        ppo = self.ppo
        if rows % ppo.minibatch_size or ppo.minibatch_size % ppo.micro_batch_size:
            raise SalsaError(
                f"data.batch_size ({rows} prompts per rank and PPO iteration, "
                f"{rows * self.trainer.world_size} over {self.trainer.world_size} rank(s)) must be "
                f"a multiple of model.ppo.minibatch_size ({ppo.minibatch_size}), and that a "
                f"multiple of model.ppo.micro_batch_size ({ppo.micro_batch_size})."
            )

    @staticmethod
    def _check_reward_model(path: str) -> None:
        config = AutoConfig.from_pretrained(path)
        archs = config.architectures or []
        if (
            not any(a.endswith("ForSequenceClassification") for a in archs)
            or config.num_labels != 1
        ):
            raise SalsaError(
                f"model.reward_model {path!r} has no one-label score head (architectures {archs}, "
                f"num_labels {config.num_labels}); train one with `salsa fit --config configs/reward.yaml`."
            )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        dtype = torch_dtype(hp.dtype)
        frozen = self.frozen_dtype
        self.policy = self._build_policy(dtype)
        if not self.shares_reference:
            if hp.reference_mode == "soup":
                refs = [self.reference.build(dtype=frozen)]
            else:
                refs = self.reference.build_each(dtype=frozen)
            self.ref_models = nn.ModuleList(Frozen(m) for m in refs)
        if hp.reward_model is not None:
            reward = AutoModelForSequenceClassification.from_pretrained(
                hp.reward_model, dtype=frozen
            )
            self.reward = Frozen(reward)
            self.reward_stats = self._read_reward_stats(hp.reward_model)
            self.reward_tokenizer = self._reward_tokenizer(hp.reward_model)
        # The critic reads the policy's token ids: a reward model with another vocabulary
        # cannot be its starting point, so that case falls back to a value head.
        critic_source = hp.critic or (hp.reward_model if self.reward_tokenizer is None else None)
        if hp.value_head or critic_source is None:
            hidden = self.policy.config.hidden_size
            self.value_head_layer = nn.Linear(hidden, 1, dtype=dtype or torch.float32)
            nn.init.zeros_(self.value_head_layer.weight)
            nn.init.zeros_(self.value_head_layer.bias)
        else:
            critic = AutoModelForSequenceClassification.from_pretrained(critic_source, dtype=dtype)
            if self.lora is not None:
                critic = add_lora(critic, self.lora, "SEQ_CLS")
            self.critic = ValueModel(self._trainable(critic))
        if self.device_mesh is not None:  # FSDP2: shard every model, frozen ones included
            layer_class = hp.fsdp_layer_class
            for model in (self.policy, self.critic, self.reward, *(self.ref_models or [])):
                if model is not None:
                    shard(model, self.device_mesh, layer_class)
            if self.value_head_layer is not None:
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.value_head_layer, mesh=self.device_mesh["data_parallel"])

    def _build_policy(self, dtype: torch.dtype | None) -> nn.Module:
        hp = self.hparams
        if hp.policy is None:
            policy = load_soup(
                self.reference.checkpoints, self.reference.resolved_weights(), dtype=dtype
            )
        else:
            policy = AutoModelForCausalLM.from_pretrained(hp.policy, dtype=dtype)
        policy.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.lora is not None:
            policy = add_lora(policy, self.lora, "CAUSAL_LM")
        return self._trainable(policy)

    def _trainable(self, model: nn.Module) -> nn.Module:
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model.train()

    @staticmethod
    def _read_reward_stats(path: str) -> dict[str, float] | None:
        stats = Path(path) / REWARD_STATS
        return json.loads(stats.read_text()) if stats.exists() else None

    def _reward_tokenizer(self, path: str) -> Any:
        """None when the reward model shares the policy's vocabulary, else its own tokenizer."""
        tokenizer = load_tokenizer(path)
        return None if tokenizer.get_vocab() == self.tokenizer.get_vocab() else tokenizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ forward passes

    def policy_forward(
        self, sequence: Tensor, attention_mask: Tensor, n: int, with_hidden: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Logits for the last ``n`` tokens of ``sequence`` ([B, n, V]) and, with a value head,
        the hidden states that predict them ([B, n, H])."""
        out = response_logits(
            self.policy, sequence, attention_mask, n, output_hidden_states=with_hidden
        )
        hidden = out.hidden_states[-1][:, -n - 1 : -1] if with_hidden else None
        return out.logits, hidden

    def reference_logprobs(self, rollout: Rollout) -> list[Tensor]:
        """[B, R] log-probs of the responses under each reference model."""
        seq, mask, n = rollout.sequence, rollout.attention_mask, rollout.response.shape[1]
        temperature = self.generation.temperature
        if self.shares_reference:
            with self.policy.disable_adapter():
                logits, _ = self.policy_forward(seq, mask, n)
            return [F.logprobs_from_logits(logits, rollout.response, temperature)]
        return [
            F.logprobs_from_logits(
                response_logits(ref, seq, mask, n).logits, rollout.response, temperature
            )
            for ref in self.ref_models
        ]

    def values(self, rollout: Rollout, hidden: Tensor | None = None) -> Tensor:
        """[B, R] critic values of the states before each response token."""
        if self.value_head_layer is not None:
            return self.value_head_layer(hidden).squeeze(-1).float()
        return self.critic(rollout.sequence, rollout.attention_mask, rollout.response.shape[1])

    # ------------------------------------------------------------------ the four steps

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> Rollout:
        """Sample one response per prompt with the KV cache; truncate after EOS."""
        tok = self.tokenizer
        query, query_mask = batch["input_ids"], batch["attention_mask"]
        synced = self.trainer.world_size > 1
        sharded = not isinstance(self.trainer.strategy, SingleDeviceStrategy)
        response, mask = sample(
            self.policy, tok, query, query_mask, self.generation, synced, sharded
        )
        texts = tok.batch_decode(response, skip_special_tokens=True)
        return Rollout(query, query_mask, response, mask, list(batch["prompt"]), texts)

    def policy_pass(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """Response logits [B, R, V], log-probs [B, R] and values [B, R] of a rollout's rows.

        A separate critic runs first, so that backward (newest nodes first) finishes the
        policy's gradients before it allocates the critic's: the peak then holds one model's
        gradients and the tied-embedding gradient's temporaries, not both."""
        n, critic = rollout.response.shape[1], self.value_head_layer is None
        values = self.values(rollout) if critic else None
        logits, hidden = self.policy_forward(
            rollout.sequence, rollout.attention_mask, n, with_hidden=not critic
        )
        logprobs = F.logprobs_from_logits(logits, rollout.response, self.generation.temperature)
        return logits, logprobs, values if critic else self.values(rollout, hidden)

    def scores_in_first_pass(self, rollout: Rollout) -> bool:
        """Whether the first update pass is also the policy's and critic's scoring pass: only
        when it runs on the whole rollout (one micro-batch), before any weight changes."""
        return self.ppo.score_in_first_pass and self.ppo.micro_batch_size >= len(rollout.query)

    @torch.no_grad()
    def score(self, rollout: Rollout, policy: bool = True) -> None:
        """Reference log-probs and rewards of a rollout, and (``policy``) its old log-probs and
        values; no grad."""
        if policy:
            _, rollout.logprobs, values = self.policy_pass(rollout)
            rollout.values = values * rollout.mask
        rollout.ref_logprobs = self.reference_logprobs(rollout)
        rollout.raw_scores = self.raw_scores(rollout)
        rollout.scores = self.shape_scores(rollout)

    def raw_scores(self, rollout: Rollout) -> Tensor:
        """[B] reward-model scores (re-tokenised when its vocabulary differs), else the reward function's."""
        if self.reward is None:
            return self.reward_fn(rollout.prompts, rollout.texts).to(self.device).float()
        if self.reward_tokenizer is None:
            ids, mask = rollout.sequence, rollout.attention_mask
        else:
            ids, mask = right_padded_chats(self.reward_tokenizer, rollout.prompts, rollout.texts)
            ids, mask = ids.to(self.device), mask.to(self.device)
        return self.reward(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()

    def shape_scores(self, rollout: Rollout) -> Tensor:
        """Normalise with the reward model's stats, penalise a missing EOS, clip."""
        scores = rollout.raw_scores
        stats = self.reward_stats
        if self.reward is not None and self.hparams.normalize_rewards and stats:
            scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
        eos = self.tokenizer.eos_token_id
        has_eos = (rollout.response == eos).any(dim=1)
        scores = scores - self.generation.missing_eos_penalty * (~has_eos).float()
        if self.hparams.reward_clip is not None:
            scores = scores.clamp(-self.hparams.reward_clip, self.hparams.reward_clip)
        return scores

    def kl(self, logprobs: Tensor, ref_logprobs: list[Tensor], estimator: str) -> Tensor:
        """[B, R] per-token KL estimate to the reference (weighted over models in multiple_kl)."""
        if len(ref_logprobs) == 1:
            return F.kl_estimate(logprobs, ref_logprobs[0], estimator)
        return F.weighted_kl_estimate(
            logprobs, ref_logprobs, self.reference.resolved_weights(), estimator
        )

    @torch.no_grad()
    def advantages(self, rollout: Rollout) -> None:
        """KL-penalised per-token rewards, then GAE and whitening."""
        kl_cfg, ppo = self.kl_settings, self.ppo
        rollout.kl = (
            self.kl(rollout.logprobs, rollout.ref_logprobs, kl_cfg.estimator) * rollout.mask
        )
        coef = self.kl_ctl.value if kl_cfg.in_reward else 0.0
        rollout.rewards = F.token_rewards(rollout.scores, rollout.kl, coef, rollout.mask)
        advantages, rollout.returns = F.gae(
            rollout.rewards, rollout.values, rollout.mask, ppo.gamma, ppo.lam
        )
        if ppo.whiten_advantages:
            advantages = F.masked_whiten(advantages, rollout.mask)
        rollout.advantages = advantages

    def update(self, rollout: Rollout) -> dict[str, float]:
        """K epochs of clipped PPO over minibatches with gradient accumulation.

        The GPU is synchronised once per optimizer step (is every micro-batch's loss finite?)
        and once at the end (the stats), so the host queues the next passes while it computes.
        """
        ppo = self.ppo
        optimizer = self.optimizers()
        rows = rollout.query.shape[0]
        accumulate = max(1, ppo.minibatch_size // ppo.micro_batch_size)
        policy_first = self.steps_policy_first()
        totals: dict[str, list[Tensor]] = {}
        for _ in range(ppo.epochs):
            order = torch.randperm(rows, device=self.device)
            for start in range(0, rows, ppo.minibatch_size):
                minibatch = order[start : start + ppo.minibatch_size]
                finite = torch.ones((), device=self.device)
                for micro in minibatch.split(ppo.micro_batch_size):
                    mb = rollout.select(micro)
                    outputs = self.policy_pass(mb)
                    if rollout.advantages is None:  # the first pass scores the rollout
                        mb = self.score_from_pass(rollout, micro, outputs)
                    policy_loss, value_loss, stats = self.ppo_loss(mb, outputs)
                    finite = finite * torch.isfinite(policy_loss + value_loss)
                    if policy_first:
                        self.manual_backward(policy_loss)
                    else:
                        self.manual_backward((policy_loss + value_loss) / accumulate)
                    for k, v in stats.items():
                        totals.setdefault(k, []).append(v.detach().float())
                if self.trainer.world_size > 1:  # every rank skips, or none does
                    finite = self.trainer.strategy.reduce(finite, reduce_op="min")
                if not finite:  # the non-finite gradients are dropped with the update
                    optimizer.zero_grad()
                    return self._skip("loss", totals)
                if policy_first:  # the critic's parameters have no gradient yet: not stepped
                    self.trainer.strategy.optimizer_step(optimizer.optimizer, lambda: None)
                    optimizer.zero_grad()
                    self.manual_backward(value_loss)
                if ppo.max_grad_norm is not None:
                    self.clip_gradients(
                        optimizer,
                        gradient_clip_val=ppo.max_grad_norm,
                        gradient_clip_algorithm="norm",
                    )
                optimizer.step()
                optimizer.zero_grad()
        self.skips = 0
        return mean_stats(totals)

    def steps_policy_first(self) -> bool:
        """Whether each optimizer step applies (and frees) the policy's gradients before the
        critic's backward allocates its own, so the peak holds one model's gradients, not both.

        Only when nothing couples the two models' updates, so the weights are the same as with
        one joint step: a separate critic, one micro-batch per minibatch, no global-norm
        clipping, no gradient scaler, one unsharded device. Callbacks' ``on_before_optimizer_step``
        then runs twice per step, seeing the policy's gradients, then the critic's."""
        ppo = self.ppo
        return (
            self.value_head_layer is None
            and ppo.micro_batch_size >= ppo.minibatch_size
            and ppo.max_grad_norm is None
            and getattr(self.trainer.precision_plugin, "scaler", None) is None
            and isinstance(self.trainer.strategy, SingleDeviceStrategy)
        )

    @torch.no_grad()
    def score_from_pass(
        self, rollout: Rollout, rows: Tensor, outputs: tuple[Tensor, Tensor, Tensor]
    ) -> Rollout:
        """Old log-probs and values from the first update pass over all ``rows`` (the rollout
        in a shuffled order), then the advantages; returns those rows of the scored rollout."""
        _, logprobs, values = outputs
        unshuffle = torch.argsort(rows)
        rollout.logprobs = logprobs[unshuffle]
        rollout.values = values[unshuffle] * rollout.mask
        self.advantages(rollout)
        return rollout.select(rows)

    def ppo_loss(
        self, mb: Rollout, outputs: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The policy's terms (clipped policy loss, - entropy bonus, + KL term) and the critic's
        (vf_coef * clipped value loss) of ``mb`` given its :meth:`policy_pass` ``outputs``; the
        PPO loss is their sum."""
        ppo = self.ppo
        logits, logprobs, values = outputs
        pg_loss, clipfrac, approxkl = F.ppo_policy_loss(
            logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range, ppo.max_log_ratio
        )
        vf_loss, vf_clipfrac = F.ppo_value_loss(
            values, mb.values, mb.returns, mb.mask, ppo.value_clip_range
        )
        policy_loss = pg_loss
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "policy/clipfrac": clipfrac,
            "policy/approxkl": approxkl,
            "val/clipfrac": vf_clipfrac,
        }
        if ppo.entropy_coef:
            entropy = F.masked_mean(
                F.entropy_from_logits(logits / self.generation.temperature), mb.mask
            )
            policy_loss = policy_loss - ppo.entropy_coef * entropy
            stats["policy/entropy"] = entropy.detach()
        if not self.kl_settings.in_reward:
            kl_loss = F.masked_mean(self.kl(logprobs, mb.ref_logprobs, "k3"), mb.mask)
            policy_loss = policy_loss + self.kl_ctl.value * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        return policy_loss, ppo.vf_coef * vf_loss, stats

    def _skip(self, what: str, totals: dict[str, list[Tensor]]) -> dict[str, float]:
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
        rollout = self.generate(batch)
        t1 = time.perf_counter()
        in_first_pass = self.scores_in_first_pass(rollout)
        self.score(rollout, policy=not in_first_pass)
        if not torch.isfinite(rollout.scores).all():
            self._skip("reward", {})
            return
        if not in_first_pass:
            self.advantages(rollout)
        t2 = time.perf_counter()
        stats = self.update(rollout)  # scores the rollout in its first pass when in_first_pass
        t3 = time.perf_counter()
        self.log_rollout(rollout, stats, (t0, t1, t2, t3))
        self.kl_ctl.update(
            float(F.masked_sum(rollout.kl, rollout.mask) / rollout.mask.shape[0]),
            rollout.mask.shape[0],
        )

    def log_rollout(self, r: Rollout, stats: dict[str, float], times: tuple[float, ...]) -> None:
        """TRL-named metrics of one PPO iteration."""
        t0, t1, t2, t3 = times
        kl_sum = (r.kl * r.mask).sum(1)
        n_tokens = float(r.mask.sum())
        metrics = {
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (-r.logprobs * r.mask).sum(1).mean(),
            "objective/scores": r.scores.mean(),
            "objective/raw_scores": r.raw_scores.mean(),
            "objective/rlhf_reward": (r.scores - self.kl_ctl.value * kl_sum).mean(),
            "value/explained_var": F.explained_variance(r.values, r.returns, r.mask),
            "rollout/response_length": r.mask.sum(1).mean(),
            "rollout/eos_rate": (r.response == self.tokenizer.eos_token_id).any(1).float().mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
            "time/update": t3 - t2,
            "throughput/generated_tokens_per_s": r.response.numel() / max(t1 - t0, 1e-9),
            "throughput/tokens_per_s": n_tokens / max(t3 - t0, 1e-9),
            **stats,
        }
        # Synced means across ranks, so a sharded run logs the same numbers as a single device.
        sync = self.trainer.world_size > 1
        self.log_dict({k: float(v) for k, v in metrics.items()}, prog_bar=False, sync_dist=sync)
        self.log("reward", float(r.scores.mean()), prog_bar=True, logger=False)
        self.log("kl", float(kl_sum.mean()), prog_bar=True, logger=False)

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._eval: dict[str, list[Tensor]] = {}
        self._samples: list[dict[str, Any]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A fixed seed per batch: every validation samples the same way, and training's RNG
        # stream is untouched (resuming reproduces an uninterrupted run).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(10_000 + batch_idx)
            rollout = self.generate(batch)
        n = rollout.response.shape[1]
        logits, _ = self.policy_forward(rollout.sequence, rollout.attention_mask, n)
        rollout.logprobs = F.logprobs_from_logits(
            logits, rollout.response, self.generation.temperature
        )
        rollout.ref_logprobs = self.reference_logprobs(rollout)
        rollout.raw_scores = self.raw_scores(rollout)
        rows = {
            "eval/score": rollout.raw_scores,
            "eval/kl": (self.kl(rollout.logprobs, rollout.ref_logprobs, "k1") * rollout.mask).sum(
                1
            ),
            "eval/response_length": rollout.mask.sum(1),
        }
        gold = self.gold_scores(rollout)
        if gold is not None:
            rows["eval/gold"] = gold
        for name, ref_lp in self.kl_to_each(rollout).items():
            rows[name] = (F.kl_estimate(rollout.logprobs, ref_lp, "k1") * rollout.mask).sum(1)
        for k, v in rows.items():
            self._eval.setdefault(k, []).append(v.detach().float().cpu())
        if batch_idx == 0:
            for i in range(min(4, len(rollout.texts))):
                self._samples.append(
                    {
                        "prompt": rollout.prompts[i],
                        "response": rollout.texts[i],
                        "score": float(rollout.raw_scores[i]),
                    }
                )

    def gold_scores(self, rollout: Rollout) -> Tensor | None:
        """The reward function's scores when there is one beside a reward model, or the
        embedded task's gold reward when the prompts come from it."""
        if self.reward is not None and self.reward_fn is not None:
            return self.reward_fn(rollout.prompts, rollout.texts).float()
        if self.reward_fn is not None:
            return None  # already the score
        from salsa_lightning.task import GoldReward

        try:
            return GoldReward()(rollout.prompts, rollout.texts).float()
        except ValueError:
            return None

    def kl_to_each(self, rollout: Rollout) -> dict[str, Tensor]:
        """Reference log-probs under each soup ingredient, keyed ``eval/kl_<name>``."""
        if not self.hparams.eval_kl_to_each or len(self.reference.checkpoints) < 2:
            return {}
        if self.hparams.reference_mode == "multiple_kl":
            models = list(self.ref_models)
        else:
            if self._ingredients is None:
                # Built on first use, sharded like the other frozen models under FSDP.
                self._ingredients = []
                for model in self.reference.build_each(dtype=self.frozen_dtype):
                    model = Frozen(model).to(self.device)
                    if self.device_mesh is not None:
                        shard(model, self.device_mesh, self.hparams.fsdp_layer_class)
                    self._ingredients.append(model)
            models = self._ingredients
        out = {}
        n = rollout.response.shape[1]
        seq, mask = rollout.sequence, rollout.attention_mask
        for path, model in zip(self.reference.checkpoints, models, strict=True):
            logits = response_logits(model, seq, mask, n).logits
            out[f"eval/kl_{Path(path).name}"] = F.logprobs_from_logits(
                logits, rollout.response, self.generation.temperature
            )
        return out

    def on_validation_epoch_end(self) -> None:
        # On the module's device: NCCL cannot reduce CPU tensors (sync_dist on GPUs).
        means = {k: torch.cat(v).mean().to(self.device) for k, v in self._eval.items()}
        self.log_dict(means, prog_bar=False, sync_dist=True)
        self.last_eval = {k: float(v) for k, v in means.items()}
        log_dir = self.trainer.log_dir  # a collective under FSDP: read it on every rank
        if self._samples and self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for s in self._samples:
                    f.write(json.dumps({"step": self.global_step, **s}) + "\n")

    # ------------------------------------------------------------------ checkpoints and export

    def recipe(self) -> dict[str, Any]:
        """What the frozen weights are made of: enough to rebuild and verify them."""
        return {
            "reference": self.reference.fingerprint(),
            "reference_mode": self.hparams.reference_mode,
            "reward_model": self.hparams.reward_model,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["salsa"] = {
            "recipe": self.recipe(),
            "kl_controller": self.kl_ctl.state_dict(),
            "skips": self.skips,
            "world_size": self.trainer.world_size,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("salsa")
        if saved is None:
            return
        check_world_size(saved.get("world_size"), self._trainer)
        current = self.recipe()
        # What defines the reference: the weights' contents (paths may move), the soup weights
        # and the mode. Older checkpoints without a key are not checked on it.
        was, now = saved["recipe"]["reference"], current["reference"]
        keys = ("sha256", "base_sha256", "weights")
        if (
            any(was.get(k, now[k]) != now[k] for k in keys)
            or saved["recipe"].get("reference_mode", current["reference_mode"])
            != current["reference_mode"]
        ):
            raise SalsaError(
                "the reference changed since this checkpoint was written (was "
                f"{saved['recipe'].get('reference_mode')} of {was['checkpoints']} with weights "
                f"{was.get('weights')}, now {current['reference_mode']} of {now['checkpoints']} "
                f"with weights {now['weights']}); resume with the same reference."
            )
        self.kl_ctl.load_state_dict(saved["kl_controller"])
        self.skips = saved["skips"]
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def on_fit_start(self) -> None:
        rank_zero_info(
            f"SALSA: reference {self.hparams.reference_mode} of {len(self.reference.checkpoints)} "
            f"checkpoint(s) with weights {self.reference.resolved_weights()}; policy from "
            f"{self.hparams.policy or 'the soup'}; PPO settings {asdict(self.ppo)}; KL {asdict(self.kl_settings)}"
        )

    def on_fit_end(self) -> None:
        export_dir = self.hparams.export_dir
        if export_dir is None or self.trainer.interrupted:
            return
        state_dict = full_state_dict(self.policy)  # gathered on every rank under FSDP2
        if self.trainer.is_global_zero:
            extras = {"salsa_training.json": {"stage": "SALSAModule", "recipe": self.recipe()}}
            policy = self.policy
            if self.lora is not None and state_dict is None:
                # The adapter's base may be a soup that exists only in memory: export the
                # merged model, which plain transformers loads on its own.
                policy = copy.deepcopy(self.policy).merge_and_unload()
            elif self.lora is not None:
                rank_zero_warn(
                    "SALSAModule: a sharded LoRA policy is exported as its adapter; its base is "
                    "the reference recipe in salsa_training.json."
                )
            export_pretrained(policy, self.tokenizer, export_dir, extras, state_dict)
            rank_zero_info(f"SALSAModule: policy exported to {export_dir}")
        self.trainer.strategy.barrier("export")
