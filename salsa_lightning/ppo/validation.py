"""Validation of the SALSA-PPO stage on held-out prompts.

Per sampled answer: ``eval/score`` (the reward), ``eval/gold`` (the judge, see
``scoring.gold_scores``), ``eval/kl`` (k1 KL to the training reference, summed over the answer),
``eval/kl_<checkpoint>`` (to each soup ingredient) and ``eval/response_length``; a few answers
go to ``samples.jsonl`` in the log directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from salsa_lightning.frozen import Frozen
from salsa_lightning.functional import kl_estimate
from salsa_lightning.generation import response_logprobs
from salsa_lightning.ppo.rollout import Rollout
from salsa_lightning.scoring import gold_scores
from salsa_lightning.sharding import shard
from salsa_lightning.soup import SoupReference

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


def build_ingredients(
    reference: SoupReference,
    dtype: torch.dtype | None,
    device: torch.device,
    mesh: Any = None,
    layer_class: str | None = None,
) -> list[nn.Module]:
    """Each soup ingredient as a frozen model on ``device`` (sharded like the other frozen
    models under FSDP2), to measure the KL to each."""
    out = []
    for model in reference.build_each(dtype=dtype):
        model = Frozen(model).to(device)
        if mesh is not None:
            shard(model, mesh, layer_class)
        out.append(model)
    return out


class ValidationHooks:
    """The validation hooks of ``SALSAModule``: per held-out batch, sample answers (seeded),
    score them, measure their KL to the reference and to each soup ingredient.

    Uses the module's ``generate``, ``reference_logprobs``, ``raw_scores`` and ``kl`` steps."""

    def on_validation_epoch_start(self) -> None:
        self._eval: dict[str, list[Tensor]] = {}
        self._samples: list[dict[str, Any]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A fixed seed per batch: every validation samples the same way, and training's RNG
        # stream is untouched (resuming reproduces an uninterrupted run).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(10_000 + batch_idx)
            rollout = self.generate(batch)
        temperature = self.generation.temperature
        seq, mask = rollout.sequence, rollout.attention_mask
        logprobs = response_logprobs(self.policy, seq, mask, rollout.response, temperature)
        kl = self.kl(logprobs, self.reference_logprobs(rollout), "k1")
        raw = self.raw_scores(rollout)
        # The reward function is the judge beside a reward model; else the task's gold reward.
        judge = self.reward_fn if self.reward is not None else None
        gold = gold_scores(judge, rollout.prompts, rollout.texts)
        rows = eval_rows(rollout, kl, raw, gold, logprobs, self.ingredient_logprobs(rollout))
        for k, v in rows.items():
            self._eval.setdefault(k, []).append(v.detach().float().cpu())
        if batch_idx == 0:
            self._samples += sample_records(rollout, raw)

    def ingredient_logprobs(self, rollout: Rollout) -> dict[str, Tensor]:
        """[B, R] log-probs of the answers under each soup ingredient, by checkpoint name."""
        if not self.hparams.eval_kl_to_each or len(self.reference.checkpoints) < 2:
            return {}
        if self.hparams.reference_mode == "multiple_kl":
            models_ = list(self.ref_models)
        else:
            if self._ingredients is None:
                self._ingredients = build_ingredients(
                    self.reference, self.frozen_dtype, self.device, self.device_mesh,
                    self.hparams.fsdp_layer_class,
                )  # fmt: skip
            models_ = self._ingredients
        seq, mask, temperature = (
            rollout.sequence,
            rollout.attention_mask,
            self.generation.temperature,
        )
        return {
            Path(path).name: response_logprobs(model, seq, mask, rollout.response, temperature)
            for path, model in zip(self.reference.checkpoints, models_, strict=True)
        }

    def on_validation_epoch_end(self) -> None:
        # On the module's device: NCCL cannot reduce CPU tensors (sync_dist on GPUs).
        means = {k: torch.cat(v).mean().to(self.device) for k, v in self._eval.items()}
        self.log_dict(means, prog_bar=False, sync_dist=True)
        self.last_eval = {k: float(v) for k, v in means.items()}
        log_dir = self.trainer.log_dir  # a collective under FSDP: read it on every rank
        if self._samples and self.trainer.is_global_zero and log_dir:
            append_samples(log_dir, self.global_step, self._samples)
