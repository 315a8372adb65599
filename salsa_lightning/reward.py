"""Stage 2: the reward model, a one-label sequence classifier trained on preference pairs."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from salsa_lightning.finetune import FineTuneModule
from salsa_lightning.functional import bradley_terry_loss, reward_centering_loss
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
        """Scores of the chosen [B] and rejected [B] halves of a [2B, T] preference batch."""
        rewards = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
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
