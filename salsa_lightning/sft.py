"""Stage 1: supervised fine-tuning of a causal language model on response tokens."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM

from salsa_lightning.data import IGNORE_INDEX
from salsa_lightning.finetune import FineTuneModule
from salsa_lightning.functional import logprobs_and_hits_from_hidden
from salsa_lightning.generation import labelled_states, output_layer
from salsa_lightning.pretrained import check_causal_lm_dir


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss and accuracy on labelled positions.

    Args:
        logits: [B, T, V] model outputs.
        labels: [B, T] target ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(mean loss, accuracy, number of labelled tokens)``, scalars.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    n = mask.sum()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    accuracy = ((logits.argmax(-1) == targets) & mask).sum() / n.clamp(min=1)
    return loss, accuracy, n


def model_token_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_stats` of ``model`` on a batch: from the labelled positions' last hidden
    states, in tiles, when the model's output layer allows it
    (:func:`~salsa_lightning.generation.output_layer`), so that neither the ``[B, T, V]``
    logits nor their float32 copy and gradient are built; else from the model's logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    layer = output_layer(model)
    if layer is None:
        return token_stats(model(**inputs).logits, labels)
    at, head = labelled_states(model, layer, **inputs, labels=labels), layer[1]
    logprobs, hits = logprobs_and_hits_from_hidden(
        at.states, head.weight, head.bias, at.targets, tied=at.tied
    )
    n = labels.new_tensor(len(at.targets))
    return -logprobs.sum() / n, hits.sum() / n.clamp(min=1), n


class SFTModule(FineTuneModule):
    """Supervised fine-tuning: next-token cross-entropy on the response tokens.

    Takes every argument of ``FineTuneModule``. Logs ``train/loss`` and, on validation,
    ``val/loss``, ``val/perplexity`` and ``val/token_accuracy`` (token-weighted over the
    whole validation set).
    """

    auto_class = AutoModelForCausalLM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the model source exists
        if self.model_name is not None:
            check_causal_lm_dir(self.model_name, "model.model")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, accuracy, n = model_token_stats(self.model, batch, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/token_accuracy", accuracy)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Reset here, not after compute: a reset under validate()'s inference mode would leave
        # inference tensors that a later fit cannot update.
        self.val_loss.reset()
        self.val_accuracy.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # The sampler's copies (several ranks) take no part: their labels are ignored.
        keep = self.held_out(batch_idx, len(batch["labels"]))
        labels = batch["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)
        loss, accuracy, n = model_token_stats(self.model, batch, labels)
        if n > 0:
            self.val_loss.update(loss, weight=n)
            self.val_accuracy.update(accuracy, weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {
                "val/loss": loss,
                "val/perplexity": loss.exp(),
                "val/token_accuracy": self.val_accuracy.compute(),
            },
            prog_bar=True,
        )
