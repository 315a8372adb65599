"""Statistics of evaluation results: bootstrap intervals and win rates."""

from __future__ import annotations

import torch
from torch import Tensor

from salsa_lightning.errors import SalsaError


def bootstrap_mean_ci(
    values: Tensor, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of the mean.

    Args:
        values: 1-D tensor of per-item values ``[N]``.
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the ``torch.Generator`` drawing the resamples; same seed, same
            interval.

    Returns:
        ``(mean, low, high)`` as floats.
    """
    values = values.detach().reshape(-1).to("cpu", torch.float64)
    if values.numel() == 0:
        raise SalsaError("bootstrap_mean_ci needs at least one value.")
    _check_resampling(n_resamples, confidence)
    generator = torch.Generator().manual_seed(seed)
    n = values.numel()
    idx = torch.randint(0, n, (n_resamples, n), generator=generator)
    return _percentile_interval(float(values.mean()), values[idx].mean(dim=1), confidence)


def grouped_rate_ci(
    hits: Tensor, counts: Tensor, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap interval of a pooled rate ``sum(hits) / sum(counts)`` whose outcomes
    come in groups, resampling whole groups.

    The outcomes of one group (the pairs of answers to one prompt) are not independent of each
    other, so resampling them one by one gives too narrow an interval; each resample draws
    ``N`` groups with replacement and takes the rate over their outcomes.

    Args:
        hits: ``[N]`` successes in each group.
        counts: ``[N]`` outcomes in each group (groups of 0 count only in resampling).
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``(rate, low, high)`` as floats.
    """
    hits = hits.detach().reshape(-1).to("cpu", torch.float64)
    counts = counts.detach().reshape(-1).to("cpu", torch.float64)
    if hits.shape != counts.shape or counts.sum() <= 0:
        raise SalsaError(
            f"grouped_rate_ci needs [N] hits and counts with outcomes, got {list(hits.shape)} "
            f"and {list(counts.shape)} summing to {float(counts.sum()):g}."
        )
    _check_resampling(n_resamples, confidence)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, hits.numel(), (n_resamples, hits.numel()), generator=generator)
    rates = hits[idx].sum(1) / counts[idx].sum(1)
    rates = rates[~rates.isnan()]  # a resample of groups without outcomes has no rate
    return _percentile_interval(float(hits.sum() / counts.sum()), rates, confidence)


def _check_resampling(n_resamples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise SalsaError(f"confidence must be in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise SalsaError(f"n_resamples must be positive, got {n_resamples}.")


def _percentile_interval(
    estimate: float, resampled: Tensor, confidence: float
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the central ``confidence`` of the resampled estimates."""
    alpha = (1.0 - confidence) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.quantile(resampled, q)
    return estimate, float(low), float(high)


def win_rate(a: Tensor, b: Tensor) -> Tensor:
    """Per-item wins of ``a`` over ``b``.

    Args:
        a: ``[N]`` scores.
        b: ``[N]`` scores.

    Returns:
        ``[N]`` float32: 1 where ``a > b``, 0.5 where equal, 0 otherwise; its mean is the
        win rate with ties counted as half.
    """
    return (a > b).float() + 0.5 * (a == b).float()


def seeds_bootstrap_ci(
    values: Tensor, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap interval of a mean over training seeds and prompts.

    Each resample draws ``S`` seeds and ``N`` prompts with replacement (the same prompts for
    every seed: the seeds answered the same prompts), so the interval covers both the variation
    between training runs and the choice of prompts.

    Args:
        values: ``[S, N]`` per-prompt values of ``S`` runs (seeds) on the same ``N`` prompts.
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``(mean, low, high)`` as floats.
    """
    values = values.detach().to("cpu", torch.float64)
    if values.dim() != 2 or values.numel() == 0:
        raise SalsaError(
            f"seeds_bootstrap_ci needs [seeds, prompts] values, got {list(values.shape)}."
        )
    _check_resampling(n_resamples, confidence)
    generator = torch.Generator().manual_seed(seed)
    s, n = values.shape
    seeds = torch.randint(0, s, (n_resamples, s), generator=generator)
    prompts = torch.randint(0, n, (n_resamples, n), generator=generator)
    rows = values[seeds]  # [R, S, N]: each resample's seeds, then its prompts of each row
    means = rows.gather(2, prompts[:, None, :].expand(-1, s, -1)).mean(dim=(1, 2))
    return _percentile_interval(float(values.mean()), means, confidence)
