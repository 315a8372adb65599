"""Reward functions for tests that run ``salsa`` in a subprocess (``reward_fn.class_path``)."""

from __future__ import annotations

import torch


class RankInGroupReward:
    """Scores each response by its position among the consecutive repeats of its prompt
    (0, 0.1, 0.2, ...): the k samples of a prompt score differently even when greedy decoding
    made them equal, so a group estimator has non-zero advantages to train on, the same in one
    process and in several."""

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores, previous, rank = [], None, 0
        for prompt in prompts:
            rank = rank + 1 if prompt == previous else 0
            previous = prompt
            scores.append(0.1 * rank)
        return torch.tensor(scores)
