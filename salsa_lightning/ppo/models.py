"""The models of the SALSA-PPO stage, built in ``configure_model``: the policy (from the soup or a
checkpoint), the references (frozen, or moving: ``moving.py``), the frozen reward model (a
directory, a soup of reward models or their ensemble) and the critic (a
``scoring.ValueModel``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa_lightning.frozen import freeze
from salsa_lightning.lora import LoraSettings, add_lora
from salsa_lightning.ppo.settings import ReferenceMode
from salsa_lightning.pretrained import load_pretrained, load_tokenizer
from salsa_lightning.scoring import (
    RewardMode,
    RewardSource,
    load_reward_model,
    reward_tokenizer_dir,
)
from salsa_lightning.sharding import shard
from salsa_lightning.soup import SoupReference, load_soup


def build_policy(
    reference: SoupReference,
    start: str | None,
    dtype: torch.dtype | None,
    pad_token_id: int,
    lora: LoraSettings | None,
) -> nn.Module:
    """The policy: the soup of ``reference`` (``start`` None) or the checkpoint ``start``, with a
    LoRA adapter when ``lora`` is set."""
    if start is None:
        policy = load_soup(reference.checkpoints, reference.resolved_weights(), dtype=dtype)
    else:
        policy = load_pretrained(AutoModelForCausalLM, start, dtype=dtype)
    policy.generation_config.pad_token_id = pad_token_id
    return add_lora(policy, lora, "CAUSAL_LM") if lora is not None else policy


def build_references(
    reference: SoupReference, mode: ReferenceMode, dtype: torch.dtype | None
) -> nn.ModuleList:
    """The frozen KL references: the soup (``mode`` soup) or each checkpoint (multiple_kl)."""
    models = [reference.build(dtype=dtype)] if mode == "soup" else reference.build_each(dtype=dtype)
    return nn.ModuleList(models).eval()  # frozen: the summary shows them in eval mode too


def build_reward(
    source: RewardSource, dtype: torch.dtype | None, policy_tokenizer: Any, mode: RewardMode
) -> tuple[nn.Module, Any]:
    """The frozen reward model (a soup of reward models: their weight average, or their
    ensemble) and, when its vocabulary differs from the policy's, its own tokenizer (None when
    it reads the policy's token ids)."""
    reward = freeze(load_reward_model(source, mode, dtype))
    tokenizer = load_tokenizer(reward_tokenizer_dir(source))
    same = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
    return reward, None if same else tokenizer


def build_critic(
    source: RewardSource, dtype: torch.dtype | None, lora: LoraSettings | None
) -> nn.Module:
    """A critic from a sequence classifier checkpoint (by default the reward model; a soup of
    reward models gives its weight average)."""
    if isinstance(source, SoupReference):
        critic = load_soup(
            source.checkpoints, source.resolved_weights(), AutoModelForSequenceClassification, dtype
        )
    else:
        critic = load_pretrained(AutoModelForSequenceClassification, source, dtype=dtype)
    return add_lora(critic, lora, "SEQ_CLS") if lora is not None else critic


def value_head(hidden_size: int, dtype: torch.dtype | None) -> nn.Linear:
    """A value head on the policy's last hidden states, zero-initialised (values start at 0)."""
    head = nn.Linear(hidden_size, 1, dtype=dtype or torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def placed(
    models: list[nn.Module], device: torch.device, mesh: Any = None, layer_class: str | None = None
) -> list[nn.Module]:
    """Frozen models built after ``configure_model`` (to measure a KL to in validation) on
    ``device``, sharded like the other frozen models under FSDP2."""
    out = []
    for model in models:
        model = model.to(device)
        if mesh is not None:
            shard(model, mesh, layer_class)
        out.append(model)
    return out


def shard_all(models: list[nn.Module | None], mesh: Any, layer_class: str | None) -> None:
    """FSDP2: shard every model of the stage, frozen ones included; a bare head as one unit."""
    from torch.distributed.fsdp import fully_shard

    for model in models:
        if isinstance(model, nn.Linear):
            fully_shard(model, mesh=mesh["data_parallel"])
        elif model is not None:
            shard(model, mesh, layer_class)
