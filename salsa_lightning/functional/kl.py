"""KL estimators to the reference and the adaptive KL coefficient controller."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from salsa_lightning.errors import SalsaError

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``r = ref_logprobs - logprobs`` (Schulman, "Approximating KL divergence"):
    ``k1 = -r`` (unbiased, can be negative), ``k2 = r**2 / 2`` (biased, low variance) and
    ``k3 = exp(r) - 1 - r`` (unbiased and always >= 0).

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` the same tokens under the reference model.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` per-token KL estimates.
    """
    r = ref_logprobs - logprobs
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r**2
    if estimator == "k3":
        return torch.expm1(r) - r
    raise SalsaError(f"Unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}.")


def weighted_kl_estimate(
    logprobs: Tensor,
    ref_logprobs_list: Sequence[Tensor],
    weights: Sequence[float],
    estimator: str = "k1",
) -> Tensor:
    """Weighted sum of KL estimates against several references (the "Multiple KLs" baseline).

    Args:
        logprobs: ``[B, T]`` policy log-probabilities of the sampled tokens.
        ref_logprobs_list: One ``[B, T]`` tensor per reference model.
        weights: One weight per reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`kl_estimate`.

    Returns:
        ``[B, T]``: ``sum_i weights[i] * kl_estimate(logprobs, ref_logprobs_list[i])``.
    """
    if len(ref_logprobs_list) == 0:
        raise SalsaError("weighted_kl_estimate needs at least one reference.")
    if len(weights) != len(ref_logprobs_list):
        raise SalsaError(
            f"weighted_kl_estimate got {len(weights)} weights for "
            f"{len(ref_logprobs_list)} references; give one weight per reference."
        )
    total = None
    for w, ref in zip(weights, ref_logprobs_list, strict=True):
        term = float(w) * kl_estimate(logprobs, ref, estimator)
        total = term if total is None else total + term
    return total


def reference_kl(
    logprobs: Tensor,
    ref_logprobs: Sequence[Tensor],
    weights: Sequence[float],
    estimator: str = "k1",
) -> Tensor:
    """Per-token KL estimate to the KL reference: to its one model (a single checkpoint or a
    soup), or the weighted sum over several models (Multiple KLs).

    Args:
        logprobs: ``[B, T]`` policy log-probabilities of the sampled tokens.
        ref_logprobs: One ``[B, T]`` tensor per reference model.
        weights: One weight per reference model (used when there are several).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`kl_estimate`.

    Returns:
        ``[B, T]`` per-token KL estimates.
    """
    if len(ref_logprobs) == 1:
        return kl_estimate(logprobs, ref_logprobs[0], estimator)
    return weighted_kl_estimate(logprobs, ref_logprobs, weights, estimator)


class AdaptiveKLController:
    """The KL coefficient controller of Ziegler et al. 2019.

    After each batch, ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``,
    so the coefficient grows while the measured KL is above ``target`` and shrinks while
    it is below. With ``target=None`` the coefficient stays fixed.

    Attributes:
        value: The current KL coefficient.
        target: The KL to steer towards, or None for a fixed coefficient.
        horizon: Number of steps over which a 20% error changes the coefficient by 20%.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        if init_kl_coef < 0:
            raise SalsaError(f"init_kl_coef must be >= 0, got {init_kl_coef}.")
        if target is not None and target <= 0:
            raise SalsaError(
                f"KL target must be positive (or None for a fixed coefficient), got {target}."
            )
        if horizon <= 0:
            raise SalsaError(f"KL horizon must be positive, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = None if target is None else float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Moves the coefficient towards the target.

        Args:
            current_kl: The measured KL of the last batch (float or scalar tensor).
            n_steps: Number of samples (or steps) the measurement covers.
        """
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """Returns the controller's state (the current coefficient)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restores the coefficient; target and horizon stay as constructed."""
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
