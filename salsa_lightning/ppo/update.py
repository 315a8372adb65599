"""The PPO update: K epochs of clipped losses over shuffled minibatches of a trajectory, with
gradient accumulation over micro-batches.

The loop is the algorithm; how a loss is backpropagated and an optimizer stepped (Lightning's
manual optimization, its strategy and precision plugins) is :class:`OptimizerSteps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from salsa_lightning.ppo.rollout import FirstPass, PassOutputs, Trajectory
from salsa_lightning.ppo.settings import PPOSettings

Forward = Callable[[Trajectory], PassOutputs]
Loss = Callable[[Trajectory, PassOutputs], tuple[Tensor, Tensor, dict[str, Tensor]]]


class OptimizerSteps:
    """Backward passes and optimizer steps of a LightningModule in manual optimization."""

    def __init__(self, module) -> None:
        self.module = module
        self.optimizer = module.optimizers()
        self.strategy = module.trainer.strategy

    def backward(self, loss: Tensor) -> None:
        self.module.manual_backward(loss)

    def all_ranks_finite(self, finite: Tensor) -> bool:
        """Whether every rank's losses were finite (so every rank skips, or none does)."""
        return self.module.all_ranks(finite)

    def drop(self) -> None:
        """Throw the accumulated gradients away."""
        self.optimizer.zero_grad()

    def step_policy(self) -> None:
        """Apply and free the gradients accumulated so far (the policy's: the critic's
        parameters have none yet, so the optimizer skips them)."""
        self.strategy.optimizer_step(self.optimizer.optimizer, lambda: None)
        self.optimizer.zero_grad()

    def step(self, max_grad_norm: float | None) -> None:
        """Clip by the global norm (when set), step, zero the gradients."""
        if max_grad_norm is not None:
            self.module.clip_gradients(self.optimizer, max_grad_norm, "norm")
        self.optimizer.step()
        self.optimizer.zero_grad()


def can_step_policy_first(
    ppo: PPOSettings, separate_critic: bool, precision_plugin: Any, strategy: Any
) -> bool:
    """Whether each optimizer step can apply (and free) the policy's gradients before the
    critic's backward allocates its own, so the peak holds one model's gradients, not both.

    Only when nothing couples the two models' updates, so the weights are the same as with
    one joint step: a separate critic (not a value head, not none), one micro-batch per minibatch, no
    global-norm clipping, no gradient scaler, one unsharded device. Callbacks'
    ``on_before_optimizer_step`` then runs twice per step, seeing the policy's gradients, then
    the critic's."""
    return (
        separate_critic
        and ppo.micro_batch_size >= ppo.minibatch_size
        and ppo.max_grad_norm is None
        and getattr(precision_plugin, "scaler", None) is None
        and isinstance(strategy, SingleDeviceStrategy)
    )


def ppo_update(
    trajectory: Trajectory,
    ppo: PPOSettings,
    forward: Forward,
    loss: Loss,
    steps: OptimizerSteps,
    first: FirstPass | None = None,
    policy_first: bool = False,
) -> tuple[dict[str, list[Tensor]], bool]:
    """Run the update; returns each stat's per-micro-batch values and whether it completed
    (False: a non-finite loss on some rank, the step's gradients dropped, the update stopped).

    Args:
        trajectory: The rollout's rows with their advantages.
        ppo: Epochs, minibatch and micro-batch sizes, clipping.
        forward: The policy (and critic) pass over trajectory rows, with grad.
        loss: ``(micro-batch, outputs) -> (policy loss, value loss, stats)``.
        steps: Backward passes and optimizer steps.
        first: The first epoch's row order and its first micro-batch's outputs, when that pass
            already ran (it scored the rollout).
        policy_first: Step the policy on its own loss before the critic's backward (see
            ``SALSAModule.steps_policy_first``); requires one micro-batch per minibatch.

    The device is synchronised once per optimizer step (is every micro-batch's loss finite?),
    so the host queues the next passes while the device computes.
    """
    rows, device = trajectory.query.shape[0], trajectory.query.device
    totals: dict[str, list[Tensor]] = {}
    for epoch in range(ppo.epochs):
        fresh = first is None or epoch > 0
        order = torch.randperm(rows, device=device) if fresh else first.order
        for minibatch in order.split(ppo.minibatch_size):
            finite = torch.ones((), device=device)
            for micro in minibatch.split(ppo.micro_batch_size):
                # Each micro-batch's loss weighs by its rows: a short minibatch (from an epoch's
                # last, smaller batch of prompts) is not scaled down by the nominal count.
                share = len(minibatch) / len(micro)
                mb = trajectory.select(micro)
                outputs = forward(mb) if fresh else first.outputs
                fresh = True  # the first pass serves one micro-batch
                policy_loss, value_loss, stats = loss(mb, outputs)
                finite = finite * torch.isfinite(policy_loss + value_loss)
                steps.backward(policy_loss if policy_first else (policy_loss + value_loss) / share)
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v.detach().float())
            if not steps.all_ranks_finite(finite):
                steps.drop()
                return totals, False
            if policy_first:  # the policy's gradients are applied before the critic's exist
                steps.step_policy()
                steps.backward(value_loss)
            steps.step(ppo.max_grad_norm)
    return totals, True
