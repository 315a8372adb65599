"""Forward passes over rollout rows: the policy (and critic), the references and the reward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from salsa_lightning.functional import logprobs_from_logits
from salsa_lightning.generation import response_logits, response_logprobs
from salsa_lightning.ppo.rollout import PassOutputs, Rollout, Trajectory
from salsa_lightning.scoring import sequence_scores, text_scores


def policy_forward(
    policy: nn.Module, sequence: Tensor, attention_mask: Tensor, n: int, with_hidden: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Logits for the last ``n`` tokens of ``sequence`` ([B, n, V]) and, ``with_hidden``, the
    last hidden states that predict them ([B, n, H], for a value head)."""
    out = response_logits(policy, sequence, attention_mask, n, output_hidden_states=with_hidden)
    hidden = out.hidden_states[-1][:, -n - 1 : -1] if with_hidden else None
    return out.logits, hidden


def policy_pass(
    policy: nn.Module,
    critic: nn.Module | None,
    head: nn.Module | None,
    rows: Rollout | Trajectory,
    temperature: float,
) -> PassOutputs:
    """Response logits, log-probs and values of rollout rows, through a separate ``critic`` or
    a value ``head`` on the policy's hidden states (values None with neither).

    A separate critic runs first, so that backward (newest nodes first) finishes the policy's
    gradients before it allocates the critic's: the peak then holds one model's gradients and
    the tied-embedding gradient's temporaries, not both."""
    n = rows.response.shape[1]
    values = critic(rows.sequence, rows.attention_mask, n) if critic is not None else None
    logits, hidden = policy_forward(
        policy, rows.sequence, rows.attention_mask, n, with_hidden=head is not None
    )
    logprobs = logprobs_from_logits(logits, rows.response, temperature)
    if head is not None:
        values = head(hidden).squeeze(-1).float()
    return PassOutputs(logits, logprobs, values)


def reference_logprobs(
    references: list[nn.Module], rollout: Rollout, temperature: float
) -> list[Tensor]:
    """[B, R] log-probs of the responses under each reference model."""
    seq, mask = rollout.sequence, rollout.attention_mask
    return [response_logprobs(ref, seq, mask, rollout.response, temperature) for ref in references]


def disabled_adapter_logprobs(policy: nn.Module, rollout: Rollout, temperature: float) -> Tensor:
    """[B, R] log-probs under a LoRA policy with its adapter disabled (the soup it started from)."""
    with policy.disable_adapter():
        logits, _ = policy_forward(
            policy, rollout.sequence, rollout.attention_mask, rollout.response.shape[1]
        )
    return logprobs_from_logits(logits, rollout.response, temperature)


@torch.no_grad()
def reward_scores(reward: nn.Module, tokenizer: Any, rollout: Rollout) -> Tensor:
    """[B] reward-model scores: of the rollout's own ids, or re-tokenised with ``tokenizer``
    when the reward model has another vocabulary."""
    if tokenizer is None:
        return sequence_scores(reward, rollout.sequence, rollout.attention_mask)
    return text_scores(reward, tokenizer, rollout.prompts, rollout.texts)
