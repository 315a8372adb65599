"""Checks of the SALSA-PPO stage's inputs, run in ``setup`` before any model is built."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from salsa_lightning.errors import SalsaError
from salsa_lightning.ppo.estimators import ESTIMATORS, Estimator
from salsa_lightning.ppo.settings import EstimatorSettings, PPOSettings
from salsa_lightning.pretrained import check_causal_lm, load_tokenizer
from salsa_lightning.soup import SoupReference, config_dir
from salsa_lightning.soup.plan import plan_soup
from salsa_lightning.world_size import per_rank


def reference_config(reference: SoupReference) -> PretrainedConfig:
    """The config of the reference's models (of a LoRA adapter's base)."""
    return AutoConfig.from_pretrained(str(config_dir(reference.checkpoints[0])))


def check_policy_matches_reference(
    reference: SoupReference, policy: str | None
) -> PretrainedConfig:
    """The policy (a checkpoint, or the soup) is a model of the reference's kind and vocabulary;
    returns the policy's config."""
    ref_config = reference_config(reference)
    check_causal_lm(ref_config, reference.checkpoints[0], "model.reference")
    if policy is None:
        return ref_config
    policy_config = AutoConfig.from_pretrained(policy)
    check_causal_lm(policy_config, policy, "model.policy")
    if (policy_config.model_type, policy_config.vocab_size) != (
        ref_config.model_type,
        ref_config.vocab_size,
    ):
        raise SalsaError(
            f"model.reference ({reference.checkpoints[0]}: {ref_config.model_type}, vocabulary "
            f"{ref_config.vocab_size}) does not match the policy ({policy}: "
            f"{policy_config.model_type}, vocabulary {policy_config.vocab_size})."
        )
    return policy_config


def check_reference_can_move(
    reference: SoupReference, policy: str | None, fsdp1: bool, sharded_merge: bool
) -> None:
    """A moving reference (``reference_update``) can move toward this policy: the same tensors
    (a policy from a checkpoint must have the reference's architecture exactly), and a strategy
    under which each rank can update its shard of the reference from its shard of the policy.

    Args:
        reference: The reference recipe.
        policy: The checkpoint the policy starts from (None: the soup, which fits by design).
        fsdp1: The run is under FSDP1 (``configs/fsdp1.yaml``).
        sharded_merge: A LoRA policy moves full reference models under FSDP2.
    """
    if fsdp1:
        raise SalsaError(
            "model.reference_update is not supported under FSDP1 (configs/fsdp1.yaml): FSDP1 "
            "flattens the policy and the reference into units of different layouts, so moving "
            "one toward the other would need a gather of both. Use FSDP2 (configs/fsdp.yaml), "
            "where each rank moves its own shard, or remove model.reference_update."
        )
    if sharded_merge:
        raise SalsaError(
            "model.reference_update with a LoRA policy and full reference models (multiple_kl, "
            "or model.policy set) moves each reference toward the merged weights W + s B A, "
            "which needs whole LoRA factors: not supported under FSDP2. Run it on one device "
            "or DDP, or use LoRA on the soup (the reference is then an adapter of its own)."
        )
    if policy is not None:
        try:
            plan_soup([str(config_dir(reference.checkpoints[0])), policy])
        except SalsaError as e:
            raise SalsaError(
                f"model.reference_update: the reference moves toward the policy, so the policy "
                f"({policy}) needs the reference's tensors: {e}"
            ) from e


def check_tokenizer(tokenizer: Any, reference: SoupReference, policy: str | None) -> None:
    """The data module's tokenizer, which turns the data into the ids the policy reads, has the
    vocabulary of the reference's checkpoints and of the policy's (a tokenizer of the same size
    but other tokens would pass every shape check and train on scrambled text). Shared by the
    RL and DPO stages."""
    vocab = tokenizer.get_vocab()
    sources = [(str(plan_soup(reference.checkpoints).tokenizer_dir), "model.reference")]
    if policy is not None:
        sources.append((policy, "model.policy"))
    for source, what in sources:
        theirs = load_tokenizer(source).get_vocab()
        if theirs != vocab:
            token = sorted(set(theirs.items()) ^ set(vocab.items()))[0][0]
            raise SalsaError(
                f"data.tokenizer's vocabulary differs from the tokenizer of {what} ({source}; "
                f"first difference: token {token!r}); tokenize the data with the model's own "
                f"tokenizer: set data.tokenizer to {source}."
            )


def check_context(config: PretrainedConfig, max_length: int, max_new_tokens: int) -> None:
    """Prompts plus responses fit the policy's context window."""
    context = getattr(config, "max_position_embeddings", None)
    needed = max_length + max_new_tokens
    if context is not None and needed > context:
        raise SalsaError(
            f"data.max_length ({max_length}) + generation.max_new_tokens ({max_new_tokens}) = "
            f"{needed} exceeds the policy's context window ({context}); lower one of them "
            "(longer prompts are dropped by data.max_length)."
        )


def check_estimator(est: EstimatorSettings, critic: str | None, value_head: bool) -> Estimator:
    """The estimator's settings fit it (its name is a choice of ``EstimatorSettings.name``);
    returns it."""
    estimator, k = ESTIMATORS[est.name], est.samples_per_prompt
    if estimator.group and k < 2:
        raise SalsaError(
            f"model.estimator.name {est.name} compares the responses to one prompt with each "
            f"other: set model.estimator.samples_per_prompt to 2 or more (it is {k})."
        )
    if not estimator.group and k != 1:
        raise SalsaError(
            f"model.estimator.name {est.name} takes one response per prompt: set "
            f"model.estimator.samples_per_prompt to 1 (it is {k}), or use a group estimator "
            f"({', '.join(n for n, e in ESTIMATORS.items() if e.group)})."
        )
    if not estimator.critic and (critic is not None or value_head):
        setting = "model.critic" if critic is not None else "model.value_head"
        raise SalsaError(
            f"{setting} is set, but model.estimator.name {est.name} uses no critic; remove "
            "it, or use the gae estimator."
        )
    return estimator


def check_batch_sizes(prompts: int, k: int, ppo: PPOSettings, world_size: int) -> int:
    """The PPO batch counts under the world-size rule (``salsa_lightning.world_size``):
    ``prompts`` (``data.batch_size``) and ``ppo.minibatch_size`` count over all ranks, so a
    rollout's ``prompts`` x ``k`` rows split into whole minibatches, each split evenly over the
    ranks; a rank's share of a minibatch splits into micro-batches of ``ppo.micro_batch_size``
    rows (or is one, when it is no larger). Returns the minibatch rows per rank."""
    per_rank(prompts, world_size, "data.batch_size")
    minibatch = per_rank(ppo.minibatch_size, world_size, "model.ppo.minibatch_size")
    if ppo.micro_batch_size < 1:
        raise SalsaError(
            f"model.ppo.micro_batch_size must be at least 1, got {ppo.micro_batch_size}."
        )
    rows = prompts * k
    if rows % ppo.minibatch_size:
        what = f"data.batch_size ({prompts} prompts per PPO iteration, over all ranks)"
        if k > 1:
            what += f" x model.estimator.samples_per_prompt ({k}) = {rows} responses"
        raise SalsaError(
            f"{what} must be a multiple of model.ppo.minibatch_size ({ppo.minibatch_size}, "
            "rollout rows per optimizer step over all ranks)."
        )
    if ppo.micro_batch_size < minibatch and minibatch % ppo.micro_batch_size:
        raise SalsaError(
            f"model.ppo.minibatch_size ({ppo.minibatch_size}) over {world_size} rank(s) is "
            f"{minibatch} rows per rank and optimizer step: a multiple of "
            f"model.ppo.micro_batch_size ({ppo.micro_batch_size}, rows per forward on one "
            "rank) or at most it."
        )
    return minibatch


def check_trainer(trainer: Any, ppo: PPOSettings) -> None:
    """Refuse the trainer's gradient clipping and accumulation: the PPO update steps its
    optimizer itself (Lightning's manual optimization) and has its own. Lightning refuses them
    too, but tells the user to switch to automatic optimization, which is not theirs to switch."""
    clip = trainer.gradient_clip_val
    if clip:
        raise SalsaError(
            f"trainer.gradient_clip_val ({clip}): the PPO update clips its own gradients, at "
            f"model.ppo.max_grad_norm (now {ppo.max_grad_norm}); set that instead and remove "
            "trainer.gradient_clip_val."
        )
    if trainer.accumulate_grad_batches != 1:
        raise SalsaError(
            f"trainer.accumulate_grad_batches ({trainer.accumulate_grad_batches}): the PPO "
            "update accumulates gradients itself, over the micro-batches of each minibatch "
            f"(model.ppo.micro_batch_size {ppo.micro_batch_size} rows of "
            f"model.ppo.minibatch_size {ppo.minibatch_size}); set those instead and remove "
            "trainer.accumulate_grad_batches."
        )
