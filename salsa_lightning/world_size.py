"""The world-size rule: a run is the same experiment on 1, 2, 4 or 8 devices (or nodes).

Batch settings count rows over all ranks, the **global batch**, and each rank takes its share:

- ``data.batch_size``: rows per training step over all ranks (SFT conversations, preference
  pairs, RL prompts); each rank loads ``data.batch_size / world_size`` of them.
- ``data.eval_batch_size``: validation rows per step over all ranks, shared out the same way.
- ``model.ppo.minibatch_size``: rollout rows (prompts x ``estimator.samples_per_prompt``) per
  optimizer step over all ranks; each rank steps on ``minibatch_size / world_size`` of its own.
- ``model.ppo.micro_batch_size`` is the one count **per rank**: the rows of one forward and
  backward on one device (a memory setting), up to that rank's share of a minibatch.

``world_size`` is ``trainer.devices x trainer.num_nodes``. So a step (an RL iteration: one
rollout and its update) sees the same rows at any world size (the sampler deals one seeded
shuffle out round-robin, so the ranks' shares of step i together are the one-device run's
step i), an epoch has the same number of steps, and the Trainer's counts (``max_steps``,
``val_check_interval``, ``limit_train_batches``, ``limit_val_batches``,
``every_n_train_steps``, ``log_every_n_steps``) mean the same point of the run. RL optimizer
steps per rollout are ``ppo.epochs x batch_size x samples_per_prompt / minibatch_size`` at any
world size. Counts that do not split are refused before any model is built, naming the
setting. This is verl's and OpenRLHF's convention (global ``train_batch_size`` and
``ppo_mini_batch_size``, micro-batches per GPU); Lightning's own ``batch_size`` is per device.
"""

from __future__ import annotations

from salsa_lightning.errors import SalsaError


def per_rank(rows: int, world_size: int, setting: str) -> int:
    """The rows each of ``world_size`` ranks takes of ``rows`` counted over all ranks.

    Raises:
        SalsaError: ``rows`` is not positive or does not split evenly, naming ``setting``.
    """
    if rows < 1:
        raise SalsaError(f"{setting} must be at least 1, got {rows}.")
    if rows % world_size:
        raise SalsaError(
            f"{setting} ({rows}) counts rows over all ranks and must be a multiple of the "
            f"world size ({world_size} = trainer.devices x trainer.num_nodes); each rank takes "
            f"an equal share. Use {world_multiple(rows, world_size)}, or another world size "
            "(docs/fsdp.md, the world-size rule)."
        )
    return rows // world_size


def world_multiple(rows: int, world_size: int) -> str:
    """The nearest multiples of ``world_size`` around ``rows``, for messages."""
    low, high = rows // world_size * world_size, -(-rows // world_size) * world_size
    return f"{high}" if low == 0 else f"{low} or {high}"
