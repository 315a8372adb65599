"""Scoring responses with a sequence classifier's score head: the reward model's scalar score,
read the same way when the reward model trains, when PPO scores a rollout and when a model is
evaluated; the critic's value before every response token (``ValueModel``); and the gold-reward
hook."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import position_ids
from salsa_lightning.pretrained import check_model_source, load_pretrained, load_tokenizer

REWARD_STATS = "reward_stats.json"  # written beside an exported reward model; read by PPO


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar rewards [B] of a one-label sequence classifier for [B, T] token ids, left- or
    right-padded: the positions skip the padding, as the policy's do (an absolute-position
    model such as GPT-2 would otherwise read a left-padded rollout at shifted positions)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
    )
    return out.logits.squeeze(-1).float()


class ValueModel(nn.Module):
    """A critic: a sequence classifier's backbone and score head applied at every position.

    A module of its own so that FSDP's hooks run when it is called. The backbone and head are
    looked up through the classifier at each call, never registered a second time, so each
    weight has one name in the state dict (and an FSDP wrapper put in their place is used).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier  # a peft wrapper keeps its adapters registered

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n: int) -> Tensor:
        """[B, T] ids -> [B, n] values of the states before each of the last ``n`` tokens."""
        c = self.classifier
        inner = c.get_base_model() if hasattr(c, "get_base_model") else c
        states = getattr(inner, inner.base_model_prefix)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
        ).last_hidden_state
        return inner.score(states[:, -n - 1 : -1]).squeeze(-1).float()


def check_scores(scores: Any, n: int, what: str) -> Tensor:
    """A reward function's output as [n] float scores, or an error that says what it returned
    and what it must return."""
    if not isinstance(scores, Tensor):
        raise SalsaError(
            f"{what} returned a {type(scores).__name__}; it must return a torch.Tensor of shape "
            f"[{n}], one score per response."
        )
    if tuple(scores.shape) != (n,):
        raise SalsaError(
            f"{what} returned a tensor of shape {list(scores.shape)} for {n} responses; it must "
            f"return shape [{n}], one score per response."
        )
    if scores.is_complex():
        raise SalsaError(f"{what} returned {scores.dtype} scores; return real numbers.")
    return scores.float()


@torch.no_grad()
def text_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    batch_size: int | None = None,
) -> Tensor:
    """[B] scores of (prompt, response) texts, tokenised in ``tokenizer``'s chat format, in
    batches of ``batch_size`` (all at once when None), on the model's device."""
    from salsa_lightning.data import right_padded_chats

    device = next(model.parameters()).device
    step = batch_size or max(1, len(prompts))
    out = []
    for i in range(0, len(prompts), step):
        ids, mask = right_padded_chats(tokenizer, prompts[i : i + step], responses[i : i + step])
        out.append(sequence_scores(model, ids.to(device), mask.to(device)))
    return torch.cat(out)


def check_reward_model(path: str, what: str = "reward_model") -> None:
    """Refuse a directory that is not a one-label sequence classifier (a causal LM would be
    scored by a randomly initialised head), before any weight is loaded."""
    check_model_source(path, what)
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise SalsaError(
            f"{what} {path!r} has no one-label score head (architectures {archs}, num_labels "
            f"{config.num_labels}); train one with `salsa fit --config configs/reward.yaml`."
        )


def read_reward_stats(path: str) -> dict[str, float] | None:
    """The validation mean, std and accuracy an exported reward model was written with."""
    stats = Path(path) / REWARD_STATS
    return json.loads(stats.read_text()) if stats.exists() else None


class Scorer:
    """A reward model with its own tokenizer, scoring (prompt, answer) texts in its chat format."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 64) -> None:
        check_reward_model(path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_pretrained(AutoModelForSequenceClassification, path).to(device).eval()
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], answers: list[str]) -> Tensor:
        return text_scores(self.model, self.tokenizer, prompts, answers, self.batch_size).cpu()


def gold_scores(
    reward_fn: Callable[..., Any] | None, prompts: list[str], responses: list[str]
) -> Tensor | None:
    """The judge's scores [B] on the CPU: ``reward_fn``'s when given, else the embedded task's
    gold reward when the prompts are the task's own, else None."""
    if reward_fn is not None:
        what = f"reward_fn {type(reward_fn).__name__}"
        return check_scores(reward_fn(prompts, responses), len(responses), what).cpu()
    from salsa_lightning.task import GoldReward

    try:
        return GoldReward()(prompts, responses).float()
    except ValueError:
        return None
