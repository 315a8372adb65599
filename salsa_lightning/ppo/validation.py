"""What the SALSA-PPO stage's validation records about held-out prompts (the hooks are
``SALSAModule``'s).

Per sampled answer: ``eval/score`` (the reward), ``eval/gold`` (the judge, see
``scoring.gold_scores``), ``eval/kl`` (k1 KL to the training reference, summed over the answer),
``eval/kl_<checkpoint>`` (to each soup ingredient as it is on disk), with a moving reference
``eval/kl_initial`` (to the reference as it started; ``eval/kl`` is then to where it moved), and
``eval/response_length``; a few answers
go to ``samples.jsonl`` in the log directory. Each metric is the mean over every held-out
prompt, whatever the number of ranks (``StageModule.held_out``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from salsa_lightning.functional import kl_estimate
from salsa_lightning.ppo.rollout import Rollout

SAMPLES_FILE = "samples.jsonl"


def eval_rows(
    rollout: Rollout,
    kl: Tensor,
    raw_scores: Tensor,
    gold: Tensor | None,
    logprobs: Tensor,
    ingredient_logprobs: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Per-answer validation values, ``{metric: [B]}``.

    Args:
        rollout: The sampled answers.
        kl: [B, R] per-token KL to the training reference.
        raw_scores: [B] rewards.
        gold: [B] judge scores, or None.
        logprobs: [B, R] the policy's log-probs of the answers.
        ingredient_logprobs: ``{name: [B, R]}`` log-probs under each soup ingredient.
    """
    mask = rollout.mask
    rows = {
        "eval/score": raw_scores,
        "eval/kl": (kl * mask).sum(1),
        "eval/response_length": mask.sum(1),
    }
    if gold is not None:
        rows["eval/gold"] = gold
    for name, ref_lp in ingredient_logprobs.items():
        rows[f"eval/kl_{name}"] = (kl_estimate(logprobs, ref_lp, "k1") * mask).sum(1)
    return rows


def sample_records(rollout: Rollout, scores: Tensor, n: int = 4) -> list[dict[str, Any]]:
    """The first ``n`` answers of a rollout with their scores, for ``samples.jsonl``."""
    return [
        {"prompt": p, "response": t, "score": float(s)}
        for p, t, s in zip(rollout.prompts[:n], rollout.texts[:n], scores[:n], strict=True)
    ]


def append_samples(log_dir: str, step: int, samples: list[dict[str, Any]]) -> None:
    """Append sample answers, tagged with the global step, to the run's ``samples.jsonl``."""
    path = Path(log_dir) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
