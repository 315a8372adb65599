"""Checks of the SALSA-PPO stage's inputs, run in ``setup`` before any model is built."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from salsa_lightning.errors import SalsaError
from salsa_lightning.ppo.settings import PPOSettings
from salsa_lightning.soup import SoupReference, config_dir


def reference_config(reference: SoupReference) -> PretrainedConfig:
    """The config of the reference's models (of a LoRA adapter's base)."""
    return AutoConfig.from_pretrained(str(config_dir(reference.checkpoints[0])))


def check_policy_matches_reference(
    reference: SoupReference, policy: str | None
) -> PretrainedConfig:
    """The policy (a checkpoint, or the soup) is a model of the reference's kind and vocabulary;
    returns the policy's config."""
    ref_config = reference_config(reference)
    if policy is None:
        return ref_config
    policy_config = AutoConfig.from_pretrained(policy)
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


def check_batch_sizes(rows: int, ppo: PPOSettings, world_size: int) -> None:
    """Each rank rolls out ``rows`` prompts (the global batch is world size times that): they
    must split into whole minibatches, and those into whole micro-batches."""
    if rows % ppo.minibatch_size or ppo.minibatch_size % ppo.micro_batch_size:
        raise SalsaError(
            f"data.batch_size ({rows} prompts per rank and PPO iteration, {rows * world_size} "
            f"over {world_size} rank(s)) must be a multiple of model.ppo.minibatch_size "
            f"({ppo.minibatch_size}), and that a multiple of model.ppo.micro_batch_size "
            f"({ppo.micro_batch_size})."
        )
