"""Rewards and advantage estimators: GAE for PPO, and the group-relative baselines of GRPO,
RLOO and REINFORCE++-baseline, which need k samples per prompt and no critic."""

from __future__ import annotations

import torch
from torch import Tensor

from salsa_lightning.errors import SalsaError


def shaped_scores(
    raw: Tensor,
    has_eos: Tensor,
    stats: dict[str, float] | None = None,
    missing_eos_penalty: float = 0.0,
    clip: float | None = None,
) -> Tensor:
    """Sequence scores as PPO optimises them: normalised, penalised for a missing EOS, clipped.

    Args:
        raw: ``[B]`` scores as the reward model or function gave them.
        has_eos: ``[B]`` bool, whether each response ended with EOS.
        stats: The reward model's validation ``mean`` and ``std``; None: no normalisation.
        missing_eos_penalty: Subtracted from the score of a response without EOS.
        clip: Scores are clipped to ``[-clip, clip]`` (None: no clipping).

    Returns:
        ``[B]`` shaped scores.
    """
    scores = raw
    if stats:
        scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    scores = scores - missing_eos_penalty * (~has_eos.bool()).float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def token_rewards(scores: Tensor, kl: Tensor, kl_coef: float, mask: Tensor) -> Tensor:
    """Per-token rewards: a KL penalty on every token plus the score at the last one.

    Args:
        scores: ``[B]`` sequence-level rewards (e.g. from a reward model).
        kl: ``[B, T]`` per-token KL estimates.
        kl_coef: Weight of the KL penalty.
        mask: ``[B, T]`` response mask.

    Returns:
        ``[B, T]``: ``-kl_coef * kl`` on masked tokens, 0 elsewhere, with ``scores[b]`` added
        at the last masked position of row ``b`` (rows with an empty mask get no score).
    """
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    positions = torch.arange(kl.shape[-1], device=kl.device)
    last = torch.where(keep, positions, -1).amax(dim=-1)  # -1 for an empty row
    at_last = positions == last.unsqueeze(-1)  # all False for an empty row
    return rewards + at_last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(-1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed by a backwards loop over ``T``. Values and rewards outside the mask count as
    0, so the value after the last real token (EOS) is 0: the episode ends there.

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`token_rewards`).
        values: ``[B, T]`` value estimates from the rollout (normally detached).
        mask: ``[B, T]`` response mask.
        gamma: Discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, with ``returns = advantages + values``;
        both are 0 outside the mask.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(keep, values, zero)
    rewards = torch.where(keep, rewards, zero)
    T = rewards.shape[-1]
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    advantages = []
    for t in reversed(range(T)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[..., t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=-1)
    advantages = torch.where(keep, advantages, zero)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


# --------------------------------------------------------------------------- group estimators
# The k samples of one prompt are consecutive rows: rows [g * k, (g + 1) * k) are group g.


def _groups(x: Tensor, k: int) -> Tensor:
    """``[N]`` -> ``[N / k, k]``, one row per prompt's k samples."""
    if k < 1 or x.shape[0] % k:
        raise SalsaError(f"{x.shape[0]} samples do not split into groups of {k}.")
    return x.reshape(-1, k)


def group_advantages(
    scores: Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """GRPO's advantage of each sample: its score against the other samples of its prompt.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` (Shao et al. 2024, DeepSeekMath), the
    standard deviation with Bessel's correction as TRL computes it; ``scale_by_std=False`` is
    Dr. GRPO's ``A_i = r_i - mean_g(r)`` (Liu et al. 2025). A group whose scores are all equal
    (or a group of one) gets zero advantages.

    Args:
        scores: ``[N]`` sequence rewards, ``N = groups * k``, each group's rows consecutive.
        k: Samples per prompt.
        scale_by_std: Divide by the group's standard deviation.
        eps: Added to the standard deviation.

    Returns:
        ``[N]`` advantages.
    """
    g = _groups(scores, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = g.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + eps)
    # All-equal scores carry no signal: exactly 0, not a rounding error of the mean over a tiny std.
    tied = g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True)
    return centred.masked_fill(tied, 0.0).reshape(-1)


def leave_one_out_advantages(scores: Tensor, k: int) -> Tensor:
    """RLOO's advantage: each sample's reward minus the mean of the other k - 1 samples of its
    prompt, ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)`` (Kool et al. 2019; Ahmadian et al. 2024).

    Args:
        scores: ``[N]`` sequence rewards (the KL penalty already in them), ``N = groups * k``.
        k: Samples per prompt, at least 2.

    Returns:
        ``[N]`` advantages.
    """
    if k < 2:
        raise SalsaError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got {k}.")
    g = _groups(scores, k)
    others = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - others).reshape(-1)


def group_centred(scores: Tensor, k: int) -> Tensor:
    """Each sample's score minus the mean score of its prompt's k samples (``[N]`` -> ``[N]``);
    REINFORCE++-baseline's first step (Hu et al. 2025)."""
    g = _groups(scores, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE's per-token return ``G_t = r_t + gamma * G_{t+1}`` over the response.

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`token_rewards`).
        mask: ``[B, T]`` response mask; rewards outside it count as 0.
        gamma: Discount factor.

    Returns:
        ``[B, T]`` returns, 0 outside the mask.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(keep, rewards, zero)
    running = torch.zeros_like(rewards[..., 0])
    out = []
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        out.append(running)
    return torch.where(keep, torch.stack(out[::-1], dim=-1), zero)


def per_token(values: Tensor, mask: Tensor) -> Tensor:
    """A sequence-level value ``[B]`` on every response token: ``[B, T]``, 0 outside the mask."""
    spread = values.unsqueeze(-1).expand(*mask.shape)
    return torch.where(
        mask.bool(), spread, torch.zeros((), dtype=values.dtype, device=values.device)
    )
