"""Offline preference losses on sequence log-probabilities: DPO and its relatives.

Every loss reads one number per pair, the preference logit

    h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)),

the policy's log-likelihood ratio of the chosen answer ``y_c`` over the rejected ``y_r``, minus
the reference's. ``beta * (log pi(y|x) - log pi_ref(y|x))`` is an answer's implicit reward, so
``beta * h`` is the implicit reward margin. Where the policy equals the reference, ``h = 0``.

- ``sigmoid``: DPO (Rafailov et al. 2023), ``-log sigmoid(beta * h)``; with label smoothing
  ``eps`` (cDPO, Mitchell 2023) the labels are trusted with probability ``1 - eps``:
  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
- ``ipo``: IPO (Azar et al. 2023), ``(h - 1 / (2 beta))^2``: regresses the margin onto a fixed
  target instead of pushing it to infinity.
- ``hinge``: SLiC-HF's hinge (Zhao et al. 2023), ``max(0, 1 - beta * h)``.

Shapes: ``B`` is the number of pairs. Log-probabilities are sums over each answer's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch.nn.functional as F
from torch import Tensor

from salsa_lightning.errors import SalsaError
from salsa_lightning.functional.logits import logprobs_from_logits

PreferenceLoss = Literal["sigmoid", "ipo", "hinge"]


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Log-probability of each sequence's labelled tokens (its answer) under the model.

    Args:
        logits: ``[N, T, V]`` a causal LM's outputs on ``[N, T]`` token ids.
        labels: ``[N, T]`` those ids, ``ignore_index`` on the prompt and the padding.

    Returns:
        ``[N]`` float32 ``sum_t log p(labels[t] | ids[:t])`` over the labelled positions t
        (position t is predicted by the logits at t - 1).
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logprobs = logprobs_from_logits(logits[:, :-1], targets.masked_fill(~mask, 0))
    return (logprobs * mask).sum(-1)


def preference_logits(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """The preference logit ``h`` of each pair (see the module docstring).

    Args:
        policy_chosen: ``[B]`` log pi(y_c|x), summed over the chosen answer's tokens.
        policy_rejected: ``[B]`` log pi(y_r|x).
        ref_chosen: ``[B]`` log pi_ref(y_c|x).
        ref_rejected: ``[B]`` log pi_ref(y_r|x).

    Returns:
        ``[B]`` ``(policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``.
    """
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO's loss, with cDPO's label smoothing.

    Args:
        logits: ``[B]`` preference logits ``h``.
        beta: Strength of the implicit KL to the reference (> 0).
        label_smoothing: Probability ``eps`` that a pair's label is flipped, in ``[0, 0.5)``.

    Returns:
        ``[B]`` ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    """
    scaled = beta * logits
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(logits: Tensor, beta: float) -> Tensor:
    """IPO's loss.

    Args:
        logits: ``[B]`` preference logits ``h``.
        beta: Regularisation strength (> 0); the margin's target is ``1 / (2 beta)``.

    Returns:
        ``[B]`` ``(h - 1 / (2 beta))^2``.
    """
    return (logits - 1 / (2 * beta)) ** 2


def hinge_loss(logits: Tensor, beta: float) -> Tensor:
    """The hinge loss on the implicit reward margin.

    Args:
        logits: ``[B]`` preference logits ``h``.
        beta: Scale of the margin (> 0).

    Returns:
        ``[B]`` ``max(0, 1 - beta h)``.
    """
    return F.relu(1 - beta * logits)


PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}
assert tuple(PREFERENCE_LOSSES) == get_args(PreferenceLoss)  # one list of names


def check_preference_settings(loss: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Refuse settings no preference loss can use, naming them.

    Raises:
        SalsaError: an unknown loss, ``beta <= 0``, or label smoothing outside ``[0, 0.5)`` or
            with a loss other than ``sigmoid``.
    """
    if loss not in PREFERENCE_LOSSES:
        raise SalsaError(
            f"unknown preference loss {loss!r}; use one of {', '.join(PREFERENCE_LOSSES)}."
        )
    if not beta > 0:
        raise SalsaError(
            f"beta must be positive, got {beta}: it scales the implicit reward "
            "beta * log(pi / pi_ref) (DPO's usual values are 0.1 to 0.5)."
        )
    if not 0 <= label_smoothing < 0.5:
        raise SalsaError(
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}: it is the probability "
            "that a pair's label is flipped (at 0.5 the loss no longer prefers either answer)."
        )
    if label_smoothing and loss != "sigmoid":
        raise SalsaError(
            f"label_smoothing ({label_smoothing}) applies to the sigmoid loss only, not {loss!r}."
        )


class PreferenceLossOutput(NamedTuple):
    """Per-pair results of :func:`dpo_loss`, each ``[B]``.

    Attributes:
        losses: The loss of each pair (the training loss is their mean).
        chosen_rewards: ``beta * (log pi(y_c|x) - log pi_ref(y_c|x))``, detached.
        rejected_rewards: ``beta * (log pi(y_r|x) - log pi_ref(y_r|x))``, detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """A preference loss of each pair and the answers' implicit rewards.

    Args:
        policy_chosen: ``[B]`` log pi(y_c|x) (with grad).
        policy_rejected: ``[B]`` log pi(y_r|x) (with grad).
        ref_chosen: ``[B]`` log pi_ref(y_c|x).
        ref_rejected: ``[B]`` log pi_ref(y_r|x).
        beta: See the losses.
        loss: ``sigmoid``, ``ipo`` or ``hinge``.
        label_smoothing: cDPO's ``eps`` (``sigmoid`` only).

    Returns:
        :class:`PreferenceLossOutput` with ``[B]`` losses and rewards.
    """
    check_preference_settings(loss, beta, label_smoothing)
    logits = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    smoothing = {"label_smoothing": label_smoothing} if loss == "sigmoid" else {}
    losses = PREFERENCE_LOSSES[loss](logits, beta, **smoothing)
    return PreferenceLossOutput(
        losses,
        (beta * (policy_chosen - ref_chosen)).detach(),
        (beta * (policy_rejected - ref_rejected)).detach(),
    )


def preference_metrics(
    policy_chosen: Tensor, policy_rejected: Tensor, out: PreferenceLossOutput
) -> dict[str, Tensor]:
    """Per-pair values of TRL's DPO metrics (their means are what TRL logs).

    Args:
        policy_chosen: ``[B]`` log pi(y_c|x).
        policy_rejected: ``[B]`` log pi(y_r|x).
        out: The pairs' :func:`dpo_loss`.

    Returns:
        ``{name: [B]}`` detached: ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies`` (1 where the chosen answer's implicit reward is strictly higher),
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
