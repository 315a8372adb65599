"""Stage 4, offline: DPO whose reference is any ``SoupReference`` (SALSA-DPO).

DPO (Rafailov et al. 2023) needs no sampling, reward model or critic: it trains the policy on
preference pairs directly, through an implicit KL to a frozen reference model. SALSA's idea
carries over unchanged: the reference may be one SFT checkpoint (DPO), the soup of several
(SALSA-DPO), or, for a LoRA policy that starts from the reference, the policy with its adapter
disabled (no second copy in memory).

One training step, in the order of the algorithm:

1. the policy's log-probabilities of the chosen and rejected answers, summed over each answer's
   tokens (one forward pass over the 2B sequences of the batch);
2. the reference's, with no grad: a forward pass of the frozen reference, or a look-up in the
   table that ``precompute_ref_log_probs`` filled before training (as TRL's option of that name);
3. the preference loss of each pair (``functional.preference``: sigmoid = DPO, cDPO's label
   smoothing, IPO, hinge) and its mean;
4. TRL's metrics, averaged exactly over every rank's pairs.

The reference is a seam (:meth:`DPOModule.reference_logprobs`): a moving reference (TR-DPO's
periodic or soft updates) would change only what it returns.
"""

from __future__ import annotations

import hashlib
from typing import Any

import datasets
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM

from salsa_lightning.data import PreferenceDataModule
from salsa_lightning.errors import SalsaError
from salsa_lightning.frozen import without_dropout
from salsa_lightning.functional import (
    PreferenceLoss,
    PreferenceLossOutput,
    check_preference_settings,
    dpo_loss,
    logprobs_from_hidden,
    preference_metrics,
    sequence_logprobs,
)
from salsa_lightning.generation import labelled_states, output_layer
from salsa_lightning.lora import LoraSettings, add_lora
from salsa_lightning.ppo.checks import check_policy_matches_reference, check_tokenizer
from salsa_lightning.pretrained import (
    check_model_source,
    load_pretrained,
    torch_dtype,
)
from salsa_lightning.sharding import shard
from salsa_lightning.soup import SoupReference, load_soup
from salsa_lightning.stage_module import StageModule, check_warmup, checked_optimizer

# Checkpoints save the reference recipe in their hyper_parameters; resuming loads them with
# torch.load(weights_only=True), which unpickles allowlisted classes only.
torch.serialization.add_safe_globals([SoupReference])

# What is averaged over the pairs of a step (train) or of the validation set (``val/`` prefix):
# the loss and TRL's DPO metrics, under TRL's names.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def default_dpo_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at 1e-6 (TRL's DPO default), no weight decay: when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def answer_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``[2B]`` log-probabilities of the answers of a preference batch (chosen rows first)
    under ``model``, summed over each answer's tokens (``labels`` other than -100).

    When the model's output layer allows it (:func:`~salsa_lightning.generation.output_layer`),
    only the answer positions' last hidden states go through it, in tiles: neither the whole
    sequences' ``[2B, T, V]`` logits nor their gradient are built."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    layer = output_layer(model)
    if layer is None:
        return sequence_logprobs(model(**inputs, use_cache=False).logits, batch["labels"])
    at, head = labelled_states(model, layer, **inputs, labels=batch["labels"]), layer[1]
    logprobs = logprobs_from_hidden(at.states, head.weight, head.bias, at.targets, tied=at.tied)
    return logprobs.new_zeros(len(batch["labels"])).index_add(0, at.rows, logprobs)


# ----------------------------------------------------------------------------- checks


def first_identical_pair(data: datasets.Dataset) -> int | None:
    """The 1-based row of the first pair whose chosen and rejected answers are the same."""
    pairs = data.select_columns(["chosen", "rejected"])
    return next((i + 1 for i, r in enumerate(pairs) if r["chosen"] == r["rejected"]), None)


def check_distinct_pairs(data: PreferenceDataModule) -> None:
    """Refuse pairs whose chosen equals rejected, naming the file and the first such row.

    The data module drops them with a warning (a reward model loses nothing); DPO refuses them:
    a pair of one text twice is not a preference, so a file holding one is likely mislabelled.
    The data module counted them; the file is read again only to name the row."""
    for split in ("train", "val"):
        count = data.stats.get(f"{split}/identical", 0)
        if not count:
            continue
        train, val, source, val_source = data.load_raw()
        rows, where = (train, source) if split == "train" else (val, val_source)
        raise SalsaError(
            f"{where}: row {first_identical_pair(rows)} has chosen == rejected ({count} such "
            f"{split} pair(s)); DPO learns no preference from a pair of one answer twice: "
            "remove those rows or fix their labels."
        )


def check_same_reference(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume with another reference than the checkpoint's: the weights' contents
    and the soup weights define it (its paths may move)."""
    if any(saved.get(k) != now.get(k) for k in ("sha256", "base_sha256", "weights")):
        raise SalsaError(
            f"the reference changed since this checkpoint was written (was {saved['checkpoints']} "
            f"with weights {saved['weights']}, now {now['checkpoints']} with weights "
            f"{now['weights']}); resume with the same reference."
        )


# ----------------------------------------------------------------------------- precomputed reference


def pair_key(chosen: Tensor, rejected: Tensor) -> bytes:
    """A digest of a pair's token ids (each ``[T]``, unpadded): rows of the table are found by
    their contents, whatever order, shard or batch they come in."""
    digest = hashlib.blake2b(digest_size=16)
    for ids in (chosen, rejected):
        data = ids.to("cpu", torch.int64).numpy().tobytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


def batch_keys(batch: dict[str, Tensor]) -> list[bytes]:
    """The :func:`pair_key` of each pair of a right-padded [2B, T] preference batch."""
    ids, lengths = batch["input_ids"].cpu(), batch["attention_mask"].sum(1).tolist()
    b = ids.shape[0] // 2
    return [pair_key(ids[i, : lengths[i]], ids[b + i, : lengths[b + i]]) for i in range(b)]


@torch.no_grad()
def reference_table(
    model: nn.Module,
    data: datasets.Dataset,
    collate: Any,
    batch_size: int,
    rank: int,
    world: int,
    all_gather: Any,
    device: torch.device,
) -> dict[bytes, tuple[float, float]]:
    """The reference's log-probabilities of the chosen and rejected answer of every pair of
    ``data``, by :func:`pair_key`. Each of the ``world`` ranks scores one contiguous block of
    rows (the last block padded with the last row, so every rank runs as many batches) and
    ``all_gather`` gives every rank every block."""
    n = len(data)
    per_rank = -(-n // world)
    rows = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    scored = []
    for start in range(0, per_rank, batch_size):
        batch = collate([data[i] for i in rows[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        scored.append(answer_logprobs(model, batch).view(2, -1).T)  # [b, 2]: chosen, rejected
    values = all_gather(torch.cat(scored)).reshape(-1, 2)[:n].cpu()  # block order = row order
    keys = (
        pair_key(torch.tensor(r["chosen_ids"]), torch.tensor(r["rejected_ids"]))
        for r in data.select_columns(["chosen_ids", "rejected_ids"])
    )
    return {key: (float(c), float(r)) for key, (c, r) in zip(keys, values, strict=True)}


def lookup(table: dict[bytes, tuple[float, float]], batch: dict[str, Tensor]) -> Tensor:
    """``[2B]`` precomputed reference log-probs of a batch (chosen rows first)."""
    try:
        pairs = torch.tensor([table[key] for key in batch_keys(batch)])
    except KeyError:
        raise SalsaError(
            "precompute_ref_log_probs: a batch holds a pair that was not precomputed (the data "
            "changed after fit started?)"
        ) from None
    return pairs.T.reshape(-1).to(batch["input_ids"].device)


# ----------------------------------------------------------------------------- the module


class DPOModule(StageModule):
    """DPO, IPO or hinge preference optimisation against a frozen ``SoupReference``.

    Args:
        reference: The reference as a soup recipe, ``{checkpoints: [...], weights: [...]}``: one
            checkpoint is DPO, several are SALSA-DPO (their weight average).
        policy: Checkpoint the policy starts from; None starts it from the reference (from the
            soup's weights for a soup), so the first step's loss is log 2 for ``sigmoid``.
        loss: ``sigmoid`` (DPO), ``ipo`` or ``hinge`` (``functional.preference``).
        beta: Strength of the implicit KL to the reference (> 0); DPO's usual 0.1.
        label_smoothing: cDPO's probability that a label is flipped, in [0, 0.5) (``sigmoid``).
        precompute_ref_log_probs: Score every pair (train and validation) under the reference
            once when fit starts, then free the reference: no reference in memory during
            training (the reference is built once on each rank, unsharded, while it scores).
        lora: LoRA for the policy. With the policy starting from the reference, the reference is
            the policy with its adapter disabled: no second copy in memory.
        dtype: Weights dtype of the policy (``float32``, ``bfloat16``, ``float16``); for bf16
            training keep float32 here and set ``trainer.precision: bf16-mixed``.
        frozen_dtype: Weights dtype of the reference (default: ``dtype``).
        gradient_checkpointing: Recompute activations of the policy in backward.
        compile: Compile the policy's and the reference's transformer stacks
            (``torch.compile``, dynamic shapes: one graph for every sequence length) for their
            forwards (``salsa_lightning.compiling``); the first steps pay the compiles. One
            device only; on the CPU Inductor needs a C++ compiler.
        optimizer: Optimizer factory (``class_path`` + ``init_args`` in YAML).
        warmup: Linear warmup of the cosine schedule, as a fraction of all steps (< 1) or a
            step count (>= 1).
        export_dir: When set, fit ends by writing the policy as a Hugging Face directory (a LoRA
            policy merged into its base, which may exist only in memory).
        overwrite: Replace an existing ``export_dir``.
        fsdp_layer_class: Under FSDP, the class of the blocks sharded one by one (default: the
            model's ``_no_split_modules``).

    Logs per step ``train/loss`` and TRL's ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; on
    validation the same under ``val/`` (``val/loss``, ``val/rewards/accuracies``, ...). Each
    is a mean over the pairs of every rank (``MeanMetric``), not a mean of the ranks' means.
    """

    def __init__(
        self,
        reference: SoupReference,
        policy: str | None = None,
        loss: PreferenceLoss = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        precompute_ref_log_probs: bool = False,
        lora: LoraSettings | None = None,
        dtype: str | None = None,
        frozen_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = default_dpo_optimizer,
        warmup: float = 0.1,
        export_dir: str | None = None,
        overwrite: bool = False,
        fsdp_layer_class: str | None = None,
    ) -> None:
        super().__init__(lora)
        check_preference_settings(loss, beta, label_smoothing)
        check_warmup(warmup)
        self.save_hyperparameters(ignore=["optimizer"])
        self.reference = reference
        self.optimizer_factory = checked_optimizer(optimizer)
        self.policy: nn.Module | None = None
        self.reference_model: nn.Module | None = None
        self.ref_table: dict[bytes, tuple[float, float]] | None = None
        self._fingerprint: dict[str, Any] | None = None
        self.train_metrics = nn.ModuleDict({self._slot(n): MeanMetric() for n in PAIR_METRICS})
        self.val_metrics = nn.ModuleDict({self._slot(n): MeanMetric() for n in PAIR_METRICS})

    @staticmethod
    def _slot(name: str) -> str:
        return name.replace("/", "_")  # a module name holds no '/' in checkpoints' eyes

    @property
    def shares_reference(self) -> bool:
        """LoRA on the reference: the reference is the policy with its adapter disabled."""
        return self.lora is not None and self.hparams.policy is None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The reference's paths, weights and weight-file hashes (hashed once per run)."""
        if self._fingerprint is None:
            self._fingerprint = self.reference.fingerprint()
        return self._fingerprint

    # ------------------------------------------------------------------ building

    def setup(self, stage: str) -> None:
        # Every check that can fail runs before any model is built.
        self.reference.validate()
        hp, data = self.hparams, self.trainer.datamodule
        if hp.policy is not None:
            check_model_source(hp.policy, "model.policy")
        check_policy_matches_reference(self.reference, hp.policy)
        if not isinstance(data, PreferenceDataModule):
            raise SalsaError(
                f"DPOModule trains on preference pairs; data is {type(data).__name__}: set "
                "data.class_path to salsa_lightning.PreferenceDataModule."
            )
        if data.hparams.group_by_prompt:
            raise SalsaError(
                "data.group_by_prompt batches a prompt's answers for the reward model; DPO "
                "trains pair by pair: set data.group_by_prompt false."
            )
        check_tokenizer(data.tokenizer, self.reference, hp.policy)
        check_distinct_pairs(data)
        super().setup(stage)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        dtype, frozen_dtype = torch_dtype(hp.dtype), torch_dtype(hp.frozen_dtype or hp.dtype)
        if hp.policy is None:
            policy = load_soup(
                self.reference.checkpoints, self.reference.resolved_weights(), dtype=dtype
            )
        else:
            policy = load_pretrained(AutoModelForCausalLM, hp.policy, dtype=dtype)
        policy.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.lora is not None:
            policy = add_lora(policy, self.lora, "CAUSAL_LM")
        # Dropout off (as TRL's DPO): policy and reference are one function at the first step.
        self.policy = without_dropout(self.trainable(policy))
        if not (self.shares_reference or hp.precompute_ref_log_probs):
            self.reference_model = self.reference.build(dtype=frozen_dtype)  # frozen, eval mode
        if self.device_mesh is not None:  # FSDP2: the frozen reference is sharded too
            for model in (self.policy, self.reference_model):
                if model is not None:
                    shard(model, self.device_mesh, hp.fsdp_layer_class)
        self.compile_models(self.policy, self.reference_model)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.warmup_cosine_optimizers()

    # ------------------------------------------------------------------ the reference

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """``[2B]`` the reference's log-probs of the batch's answers, with no grad: looked up
        when precomputed, else a forward pass of the frozen reference (of the policy with its
        adapter disabled when they share weights)."""
        if self.ref_table is not None:
            return lookup(self.ref_table, batch)
        if self.reference_model is not None:
            return answer_logprobs(self.reference_model, batch)
        with self.policy.disable_adapter():
            return answer_logprobs(self.policy, batch)

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """Fill the table of reference log-probs of every train and validation pair; the
        reference is built for it and freed after."""
        data = self.trainer.datamodule
        hp = self.hparams
        model = self.reference.build(dtype=torch_dtype(hp.frozen_dtype or hp.dtype))
        model = model.to(self.device)
        batch_size = data.hparams.eval_batch_size or data.hparams.batch_size
        table: dict[bytes, tuple[float, float]] = {}
        for split in (data.train_data, data.val_data):
            if split is not None and len(split):
                table.update(
                    reference_table(
                        model,
                        split,
                        data.collate,
                        batch_size,
                        self.global_rank,
                        self.trainer.world_size,
                        self.all_gather,
                        self.device,
                    )  # fmt: skip
                )
        del model
        self.ref_table = table
        rank_zero_info(f"DPO: reference log-probs of {len(table)} pairs precomputed")

    def on_fit_start(self) -> None:
        # configure_optimizers' estimated_stepping_batches built the train loader before the
        # checkpoint was read, and Lightning (2.6) restores a loader's data position only into
        # one it builds after that: drop this one, so a run resumed mid-epoch continues with the
        # next batch instead of starting the epoch over (measured: it did, through the CLI).
        self.trainer.fit_loop._combined_loader = None
        if self.hparams.precompute_ref_log_probs and self.ref_table is None:
            self.precompute_reference()
        hp = self.hparams
        start = hp.policy or (
            "the reference" if len(self.reference.checkpoints) == 1 else "the soup"
        )
        rank_zero_info(
            f"DPO: loss {hp.loss}, beta {hp.beta}, label smoothing {hp.label_smoothing}; "
            f"reference {self.reference.checkpoints} with weights "
            f"{self.reference.resolved_weights()}"
            + (" (the policy with its adapter disabled)" if self.shares_reference else "")
            + f"; policy from {start}"
        )

    def on_validation_start(self) -> None:
        if self.hparams.precompute_ref_log_probs and self.ref_table is None:  # salsa validate
            self.precompute_reference()

    # ------------------------------------------------------------------ steps

    def pair_loss(self, batch: dict[str, Tensor]) -> tuple[PreferenceLossOutput, dict[str, Tensor]]:
        """The preference loss of each pair of a [2B, T] batch, and ``{metric: [B]}`` values."""
        policy_chosen, policy_rejected = answer_logprobs(self.policy, batch).chunk(2)
        ref_chosen, ref_rejected = self.reference_logprobs(batch).chunk(2)
        hp = self.hparams
        out = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            hp.beta, hp.loss, hp.label_smoothing,
        )  # fmt: skip
        values = preference_metrics(policy_chosen, policy_rejected, out)
        return out, {"loss": out.losses.detach(), **values}

    def update_metrics(self, metrics: nn.ModuleDict, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            metrics[self._slot(name)].update(value)

    def computed(self, metrics: nn.ModuleDict, prefix: str) -> dict[str, Tensor]:
        """``{prefix + name: mean over every rank's pairs}`` (a collective under FSDP)."""
        return {prefix + name: metrics[self._slot(name)].compute() for name in PAIR_METRICS}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out, values = self.pair_loss(batch)
        self.update_metrics(self.train_metrics, values)
        logged = self.computed(self.train_metrics, "")
        for metric in self.train_metrics.values():
            metric.reset()
        logged["train/loss"] = logged.pop("loss")
        self.log_dict(logged)
        self.log("margin", logged["rewards/margins"], prog_bar=True, logger=False)
        return out.losses.mean()

    def on_validation_epoch_start(self) -> None:
        for metric in self.val_metrics.values():
            metric.reset()  # here, not after compute (see SFTModule)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        values = self.pair_loss(batch)[1]
        keep = self.held_out(batch_idx, len(values["loss"]))  # without the sampler's copies
        self.update_metrics(self.val_metrics, {k: v[keep] for k, v in values.items()})

    def on_validation_epoch_end(self) -> None:
        logged = self.computed(self.val_metrics, "val/")
        self.log_dict(logged)
        self.log("val_accuracy", logged["val/rewards/accuracies"], prog_bar=True, logger=False)

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo"] = {"reference": self.fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("dpo")
        if saved is not None:
            check_same_reference(saved["reference"], self.fingerprint)

    def training_record(self) -> dict[str, Any]:
        return {**super().training_record(), "reference": self.fingerprint}

    def export_model(self) -> nn.Module:
        return self.policy

    write_export = StageModule.write_policy_export
