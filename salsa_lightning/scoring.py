"""Scoring responses with a sequence classifier's score head: the reward model's scalar score,
read the same way when the reward model trains, when PPO scores a rollout and when a model is
evaluated; the critic's value before every response token (``ValueModel``); and the gold-reward
hook.

A reward model is a directory, or a soup recipe of reward models (``{checkpoints, weights}``:
WARM, Rame et al. 2024, reward models fine-tuned from one init with different seeds) that
scores as their weight average (``mode`` soup, built like an SFT soup with its checks) or as
the weighted mean of their scores (``mode`` ensemble, :class:`RewardEnsemble`, every member in
memory). The normalisation stats of a soup or an ensemble are its members' (``reward_stats``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import position_ids
from salsa_lightning.lora import unwrap_peft
from salsa_lightning.pretrained import (
    check_model_source,
    is_sequence_classifier,
    load_pretrained,
    load_tokenizer,
)
from salsa_lightning.soup import SoupReference, load_soup
from salsa_lightning.soup.plan import plan_soup

REWARD_STATS = "reward_stats.json"  # written beside an exported reward model; read by PPO

# A reward model: a directory, or a soup recipe of reward models.
RewardSource = str | SoupReference
# How a soup of reward models scores: its weight average, or the mean of its members' scores.
RewardMode = Literal["soup", "ensemble"]


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
        inner = unwrap_peft(self.classifier)
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
    if not is_sequence_classifier(config) or config.num_labels != 1:
        raise SalsaError(
            f"{what} {path!r} has no one-label score head (architectures {archs}, num_labels "
            f"{config.num_labels}); train one with `salsa fit --config configs/reward.yaml`."
        )


def read_reward_stats(path: str) -> dict[str, float] | None:
    """The validation mean, std and accuracy an exported reward model was written with."""
    stats = Path(path) / REWARD_STATS
    return json.loads(stats.read_text()) if stats.exists() else None


def check_reward_source(source: RewardSource, what: str = "reward_model") -> None:
    """A reward model directory, or a soup of them: every member a one-label sequence
    classifier, and (a soup's checks, from config files and headers) one architecture, one
    vocabulary, the same tensors; each refusal names the member at fault."""
    if isinstance(source, str):
        return check_reward_model(source, what)
    source.validate()
    for i, member in enumerate(source.checkpoints):
        check_reward_model(member, f"{what}.checkpoints[{i}]")
    stats = [read_reward_stats(m) is not None for m in source.checkpoints]
    if any(stats) and not all(stats):
        lacking = source.checkpoints[stats.index(False)]
        raise SalsaError(
            f"{what}.checkpoints: {lacking} has no {REWARD_STATS} but other members have one; "
            "export every member with configs/reward.yaml (or set model.reward.normalize false)."
        )


def reward_stats(source: RewardSource) -> dict[str, float] | None:
    """The normalisation stats of a reward model: its ``reward_stats.json``; for a soup or an
    ensemble, the weighted mean of its members' means, standard deviations and accuracies.

    The members' mean is the soup's choice (and the ensemble's): exact for the ensemble's mean
    score, and for its spread when the members agree; when they disagree the average varies
    less than its members, so the normalised scores spread a little less than a member's.
    ``salsa evaluate --reward_soup`` measures the soup's and the ensemble's own mean and std on
    held-out pairs beside the members' (``docs/references.md`` has the figures). Measuring them
    here would need preference data in the RL stage, and would make the normalisation depend on
    which rows were measured.
    """
    if isinstance(source, str):
        return read_reward_stats(source)
    members = [read_reward_stats(m) for m in source.checkpoints]
    if any(m is None for m in members):
        return None
    weights = source.resolved_weights()
    keys = set.intersection(*(set(m) for m in members))
    return {k: sum(w * m[k] for w, m in zip(weights, members, strict=True)) for k in sorted(keys)}


class RewardEnsemble(nn.Module):
    """Reward models scoring together: the weighted mean of their scores (the logits of one-label
    sequence classifiers), called like one of them.

    Args:
        members: The reward models.
        weights: One weight per member, summing to 1.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]

    def forward(self, **inputs: Any) -> SequenceClassifierOutput:
        """``inputs`` as a member takes them; ``.logits`` [B, 1] the weighted mean of theirs."""
        logits = sum(
            w * m(**inputs).logits.float() for w, m in zip(self.weights, self.members, strict=True)
        )
        return SequenceClassifierOutput(logits=logits)


def load_reward_model(
    source: RewardSource, mode: RewardMode = "soup", dtype: torch.dtype | None = None
) -> nn.Module:
    """A reward model in eval mode: a directory's, a soup's weight average (``mode`` soup, one
    model in memory) or an ensemble of the soup's members (``mode`` ensemble)."""
    cls = AutoModelForSequenceClassification
    if isinstance(source, str):
        return load_pretrained(cls, source, dtype=dtype).eval()
    weights = source.resolved_weights()
    if mode == "soup":
        return load_soup(source.checkpoints, weights, cls, dtype).eval()
    members = [load_pretrained(cls, m, dtype=dtype).eval() for m in source.checkpoints]
    return RewardEnsemble(members, weights).eval()


def reward_tokenizer_dir(source: RewardSource) -> str:
    """The directory whose tokenizer the reward model reads (a soup's: its members', one)."""
    return source if isinstance(source, str) else str(plan_soup(source.checkpoints).tokenizer_dir)


class Scorer:
    """A reward model (a directory, a soup or an ensemble) with its own tokenizer, scoring
    (prompt, answer) texts in its chat format."""

    def __init__(
        self,
        source: RewardSource,
        device: torch.device,
        batch_size: int = 64,
        mode: RewardMode = "soup",
    ) -> None:
        check_reward_source(source)
        self.tokenizer = load_tokenizer(reward_tokenizer_dir(source))
        self.model = load_reward_model(source, mode).to(device).eval()
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
