"""Stage 2: the reward model, a one-label sequence classifier trained on preference pairs, and
``salsa pairs``: preference pairs of a model's own sampled answers, ordered by a judge (the pairs
a reward model meets during RL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from salsa_lightning.errors import SalsaError, require
from salsa_lightning.finetune import FineTuneModule
from salsa_lightning.functional import bradley_terry_loss, reward_centering_loss
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.pretrained import load_pretrained
from salsa_lightning.scoring import REWARD_STATS, sequence_scores


class RewardModule(FineTuneModule):
    """Bradley-Terry reward model: ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Takes every argument of ``FineTuneModule`` (``model`` defaults to the first SFT export),
    plus:

    Args:
        margin: Constant margin subtracted from the score difference (0: plain Bradley-Terry).
        center_coef: Weight of the reward-centering term ``(r_chosen + r_rejected)^2``, which
            keeps scores near zero (Eisenstein et al. 2023); 0 turns it off.

    Logs ``train/loss``, ``train/accuracy`` and, on validation, ``val/accuracy`` (pairwise
    accuracy), ``val/margin`` (mean r_chosen - r_rejected), ``val/reward_mean`` and
    ``val/reward_std`` over all scored responses. The export holds ``reward_stats.json``: the
    final weights' mean, std and accuracy on the validation set, so PPO can normalise rewards.
    """

    auto_class = AutoModelForSequenceClassification
    task_type = "SEQ_CLS"

    def __init__(
        self,
        *args: Any,
        model: str | None = "artifacts/sft-1",
        margin: float = 0.0,
        center_coef: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, model=model, **kwargs)
        self.val_accuracy = MeanMetric()
        self.val_margin = MeanMetric()
        self.val_reward = MeanMetric()
        self.val_reward_sq = MeanMetric()
        self.reward_stats: dict[str, float] | None = None

    def load_pretrained(self, source: str, **kwargs: Any) -> PreTrainedModel:
        model = load_pretrained(self.auto_class, source, num_labels=1, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen [B] and rejected [B] halves of a [2B, T] preference batch, or
        of the B pairs a batch of answers grouped by prompt indexes (``chosen_index``,
        ``rejected_index``: ``PreferenceDataModule(group_by_prompt=True)``)."""
        rewards = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
        if "chosen_index" in batch:
            return rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]
        return rewards.chunk(2)

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        loss = bradley_terry_loss(chosen, rejected, self.hparams.margin)
        if self.hparams.center_coef:
            loss = loss + self.hparams.center_coef * reward_centering_loss(chosen, rejected)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_scores(batch)
        loss = self.loss(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (chosen > rejected).float().mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_accuracy, self.val_margin, self.val_reward, self.val_reward_sq):
            metric.reset()  # here, not after compute (see SFTModule)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self.pair_scores(batch)
        keep = self.held_out(batch_idx, len(chosen))  # without the sampler's copies
        chosen, rejected = chosen[keep], rejected[keep]
        self.val_accuracy.update((chosen > rejected).float())
        self.val_margin.update(chosen - rejected)
        both = torch.cat([chosen, rejected])
        self.val_reward.update(both)
        self.val_reward_sq.update(both.square())

    def on_validation_epoch_end(self) -> None:
        mean = self.val_reward.compute()
        std = (self.val_reward_sq.compute() - mean.square()).clamp(min=0).sqrt()
        metrics = {
            "val/accuracy": self.val_accuracy.compute(),
            "val/margin": self.val_margin.compute(),
            "val/reward_mean": mean,
            "val/reward_std": std,
        }
        self.log_dict(metrics, prog_bar=True)
        self.reward_stats = {
            "mean": float(mean),
            "std": float(std),
            "accuracy": float(metrics["val/accuracy"]),
        }

    @torch.no_grad()
    def measure_reward_stats(self) -> dict[str, float] | None:
        """Mean, std and pairwise accuracy of the final model's scores on the validation set."""
        loader = self.trainer.datamodule.val_dataloader()
        if not loader:
            return None
        was_training = self.model.training
        self.model.eval()
        scores, correct = [], []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            chosen, rejected = self.pair_scores(batch)
            scores.append(torch.cat([chosen, rejected]))
            correct.append((chosen > rejected).float())
        self.model.train(was_training)
        all_scores = torch.cat(scores)
        return {
            "mean": float(all_scores.mean()),
            "std": float(all_scores.std(unbiased=False)),
            "accuracy": float(torch.cat(correct).mean()),
        }

    def export_extras(self) -> dict[str, Any]:
        # Measured again at the end: the last validation may predate the final weights.
        stats = self.measure_reward_stats()
        return {**super().export_extras(), **({REWARD_STATS: stats} if stats else {})}


PAIRS_FILE = "pairs.jsonl"  # what ``salsa pairs`` writes into its output directory


def judged_pairs(answers: list[str], scores: list[float]) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` indices of every two of one prompt's answers whose judge scores
    differ, the higher-scored one chosen, in the order ``(0, 1), (0, 2), ..., (1, 2), ...``; an
    answer that repeats an earlier one is skipped (the same text makes the same pair again).

    Args:
        answers: n answers to one prompt.
        scores: their n judge scores (e.g. the gold reward).
    """
    first = [i for i, a in enumerate(answers) if a not in answers[:i]]
    return [
        (i, j) if scores[i] > scores[j] else (j, i)
        for k, i in enumerate(first)
        for j in first[k + 1 :]
        if scores[i] != scores[j]
    ]


def sampled_pairs(
    model: str,
    prompts: str,
    output: str = "artifacts/sampled-pairs",
    samples: int = 4,
    max_prompts: int | None = None,
    reward_fn: Callable[..., Any] | None = None,
    generation: GenerationSettings | None = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Preference pairs of a model's own sampled answers, ordered by a judge.

    ``samples`` answers per prompt, judged, every two with different judge scores a pair
    (``judged_pairs``), written to ``output/pairs.jsonl`` (``prompt``, ``chosen``,
    ``rejected``, their ``chosen_gold`` and ``rejected_gold``, and the prompt file's ``family``
    when it has one) for ``PreferenceDataModule`` (``data.train_files``), with ``pairs.json``
    (what was sampled, how).

    Args:
        model: The model to sample (e.g. the SFT model RL starts from).
        prompts: Prompt file (json, jsonl, csv or parquet with a prompt column).
        output: Output directory.
        samples: Answers per prompt (>= 2).
        max_prompts: Use at most this many prompts.
        reward_fn: The judge ``(prompts, answers) -> Tensor``; default the embedded task's gold
            reward when the prompts are its own.
        generation: Sampling settings (default: sampling at temperature 1, 16 new tokens).
        batch_size: Prompts per generation batch.
        seed: Seed of the sampling noise (sample j uses ``seed + 7919 * (j + 1)``, as
            ``salsa evaluate``'s ``best_of`` does).
        overwrite: Replace an existing output directory.

    Returns:
        The summary written to ``pairs.json``.
    """
    from salsa_lightning.evaluate import load_models, load_prompts, sample_answers
    from salsa_lightning.outputs import check_output_dir, written_aside
    from salsa_lightning.pretrained import check_causal_lm_dir, check_model_source
    from salsa_lightning.scoring import gold_scores

    if samples < 2:
        raise SalsaError(f"salsa pairs needs samples >= 2 answers per prompt, got {samples}.")
    require(batch_size >= 1, "batch_size", "at least 1", batch_size)
    check_output_dir(output, overwrite, "pairs output", "--overwrite true", "--output")
    check_model_source(model, "model")
    check_causal_lm_dir(model, "model")
    rows = load_prompts(prompts, limit=max_prompts)
    texts = [r["prompt"] for r in rows]
    if gold_scores(reward_fn, texts[:1], [""]) is None:
        raise SalsaError(
            f"salsa pairs: no judge for the prompts of {prompts!r}; name a reward_fn (the "
            "embedded task's gold reward judges only its own prompts)."
        )
    generation = generation or GenerationSettings()
    policy, tokenizer, _ = load_models(model, None, torch.device("cpu"))
    answers, golds = [], []
    for j in range(samples):
        drawn, _ = sample_answers(
            policy, tokenizer, texts, generation, batch_size, seed + 7919 * (j + 1)
        )
        answers.append(drawn)
        golds.append(gold_scores(reward_fn, texts, drawn).tolist())
        print(f"[pairs] sample {j + 1}/{samples} of {len(texts)} prompts", flush=True)
    pairs = []
    for i, row in enumerate(rows):
        mine = [a[i] for a in answers]
        scores = [g[i] for g in golds]
        for c, r in judged_pairs(mine, scores):
            pairs.append(
                {
                    "prompt": texts[i],
                    "chosen": mine[c],
                    "rejected": mine[r],
                    "chosen_gold": scores[c],
                    "rejected_gold": scores[r],
                    **({"family": row["family"]} if "family" in row else {}),
                }
            )
    summary = {
        "model": model,
        "prompts": prompts,
        "n_prompts": len(texts),
        "samples": samples,
        "seed": seed,
        "pairs": len(pairs),
        "mean_gold": sum(map(sum, golds)) / (len(texts) * samples),
    }
    with written_aside(output) as tmp:
        with (tmp / PAIRS_FILE).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        (tmp / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[pairs] {len(pairs)} pairs written to {Path(output) / PAIRS_FILE}", flush=True)
    return summary
