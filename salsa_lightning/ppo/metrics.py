"""The training metrics of one PPO iteration, named as TRL names them."""

from __future__ import annotations

import torch
from torch import Tensor

from salsa_lightning.functional import explained_variance
from salsa_lightning.ppo.rollout import FrozenScores, Trajectory


def rollout_metrics(
    t: Trajectory, frozen: FrozenScores, kl_coef: float, eos_token_id: int
) -> dict[str, Tensor | float]:
    """``objective/*``, ``value/explained_var`` and ``rollout/*`` of one trajectory."""
    kl_sum = (t.kl * t.mask).sum(1)
    metrics = {
        "objective/kl": kl_sum.mean(),
        "objective/entropy": (-t.logprobs * t.mask).sum(1).mean(),
        "objective/scores": t.scores.mean(),
        "objective/raw_scores": frozen.raw_scores.mean(),
        "objective/rlhf_reward": (t.scores - kl_coef * kl_sum).mean(),
        "rollout/response_length": t.mask.sum(1).mean(),
        "rollout/eos_rate": (t.response == eos_token_id).any(1).float().mean(),
        "objective/kl_coef": kl_coef,
    }
    if t.returns is not None:
        metrics["value/explained_var"] = explained_variance(t.values, t.returns, t.mask)
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


def mean_stats(totals: dict[str, list[Tensor]]) -> dict[str, float]:
    """The mean of each stat's scalar tensors, read from the device in one transfer."""

    means = [torch.stack(v).mean() for v in totals.values()]
    return dict(zip(totals, torch.stack(means).tolist(), strict=True)) if means else {}
