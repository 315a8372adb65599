"""What one PPO iteration computes about a batch of prompts, as immutable records built once
and handed on (torchtune's ``Trajectory``):

``Rollout`` (sampled) -> ``FrozenScores`` (reference log-probs, reward) and ``PolicyScores`` (old
log-probs, values) -> ``Trajectory`` (everything the update reads, with the advantages); and the
metrics a trajectory is logged with, named as TRL names them.

Shapes: B prompts; P prompt length (left-padded); R response length (pad after the first EOS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional import explained_variance


@dataclass(frozen=True)
class Rollout:
    """Sampled responses to a batch of prompts."""

    query: Tensor  # [B, P] prompt ids, left-padded
    query_mask: Tensor  # [B, P] 1 on prompt tokens
    response: Tensor  # [B, R] sampled ids, pad after the first EOS
    mask: Tensor  # [B, R] float, 1 up to and including EOS
    prompts: list[str]  # B prompt texts (what reward functions read)
    texts: list[str]  # B decoded responses

    @property
    def sequence(self) -> Tensor:
        """[B, P + R] prompt and response ids."""
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + R] 1 on prompt and response tokens."""
        return torch.cat([self.query_mask, self.mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: Tensor) -> Rollout:
        """The rows ``index`` (a [N] long tensor), texts included."""
        rows = index.tolist()
        return Rollout(
            self.query[index], self.query_mask[index], self.response[index], self.mask[index],
            [self.prompts[i] for i in rows], [self.texts[i] for i in rows],
        )  # fmt: skip


@dataclass(frozen=True)
class FrozenScores:
    """What the frozen models and the reward say about a rollout."""

    ref_logprobs: list[Tensor]  # one [B, R] per reference model
    raw_scores: Tensor  # [B] reward as the reward model / function gave it
    scores: Tensor  # [B] normalised, clipped reward (penalties included)


@dataclass(frozen=True)
class PolicyScores:
    """The rollout under the policy and critic that sampled it (the update's old values)."""

    logprobs: Tensor  # [B, R] policy log-probs
    values: Tensor | None  # [B, R] critic values, 0 after the response; None: no critic


@dataclass(frozen=True)
class PassOutputs:
    """One forward pass of the policy (and critic) over rollout rows, with grad."""

    logits: Tensor | None  # [B, R, V] response logits; None: log-probs taken in tiles
    logprobs: Tensor  # [B, R]
    values: Tensor | None  # [B, R]; None: no critic


@dataclass(frozen=True)
class Trajectory:
    """Everything the PPO update reads about a rollout's rows."""

    query: Tensor  # [B, P]
    query_mask: Tensor  # [B, P]
    response: Tensor  # [B, R]
    mask: Tensor  # [B, R]
    logprobs: Tensor  # [B, R] old policy log-probs
    ref_logprobs: list[Tensor]  # one [B, R] per reference model
    values: Tensor | None  # [B, R] old values; None: no critic
    scores: Tensor  # [B] shaped scores
    kl: Tensor  # [B, R] per-token KL estimate to the reference, 0 after the response
    rewards: Tensor  # [B, R] per-token rewards
    advantages: Tensor  # [B, R]
    returns: Tensor | None  # [B, R] value targets; None: no critic

    sequence = Rollout.sequence
    attention_mask = Rollout.attention_mask

    def select(self, index: Tensor) -> Trajectory:
        """The rows ``index`` of every field."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                picked[f.name] = [t[index] for t in value]
            else:
                picked[f.name] = None if value is None else value[index]
        return Trajectory(**picked)


@dataclass(frozen=True)
class FirstPass:
    """The first update pass, run before the advantages exist because it also scores the rollout
    (one micro-batch holds it all): the first epoch's row ``order`` and its ``outputs``."""

    order: Tensor  # [B] permutation of the rows
    outputs: PassOutputs  # of the rows in ``order``, with grad

    def old_scores(self, mask: Tensor) -> PolicyScores:
        """The same numbers a separate no-grad scoring pass gives, in the rollout's row order."""
        unshuffle = torch.argsort(self.order)
        logprobs = self.outputs.logprobs.detach()[unshuffle]
        values = self.outputs.values
        return PolicyScores(logprobs, None if values is None else values.detach()[unshuffle] * mask)


def trajectory_metrics(
    t: Trajectory, raw_scores: Tensor, kl_coef: float, eos_token_id: int
) -> dict[str, Tensor | float]:
    """``objective/*``, ``value/explained_var`` and ``rollout/*`` of one trajectory."""
    kl_sum = (t.kl * t.mask).sum(1)
    metrics = {
        "objective/kl": kl_sum.mean(),
        "objective/entropy": (-t.logprobs * t.mask).sum(1).mean(),
        "objective/scores": t.scores.mean(),
        "objective/raw_scores": raw_scores.mean(),
        "objective/rlhf_reward": (t.scores - kl_coef * kl_sum).mean(),
        "rollout/response_length": t.mask.sum(1).mean(),
        "rollout/eos_rate": (t.response == eos_token_id).any(1).float().mean(),
        "objective/kl_coef": kl_coef,
    }
    if t.returns is not None:
        on = t.mask.bool()  # the response tokens
        metrics["value/explained_var"] = explained_variance(t.values[on], t.returns[on])
    return metrics


def timing_metrics(t: Trajectory, times: tuple[float, float, float, float]) -> dict[str, float]:
    """``time/*`` of each phase and ``throughput/*`` from the phases' start and end times."""
    t0, t1, t2, t3 = times
    return {
        "time/generation": t1 - t0,
        "time/scoring": t2 - t1,
        "time/update": t3 - t2,
        "throughput/generated_tokens_per_s": t.response.numel() / max(t1 - t0, 1e-9),
        "throughput/tokens_per_s": float(t.mask.sum()) / max(t3 - t0, 1e-9),
    }


class MetricWindow:
    """The metrics of the rollouts since the loggers last wrote, summed by name: each one's mean
    over the rollouts that reported it is what the loggers write (TRL's ``logging_steps``
    reports the same means), and ``last`` holds the latest rollout's values."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Tensor | float]) -> None:
        for name, value in metrics.items():
            value = float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
            self.last[name] = value

    def pop_means(self) -> dict[str, float]:
        """Each metric's mean over the window; the window starts again empty."""
        means = {name: total / self.counts[name] for name, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
