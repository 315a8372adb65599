"""Every stage logs to TensorBoard when ``--trainer.logger TensorBoardLogger`` replaces the
stage YAML's CSV logger (docs/loggers.md): a short real run of each stage through ``salsa fit``,
then its event files are read back. TensorBoard comes with the ``tensorboard`` and ``dev``
extras."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import CONFIGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from salsa_lightning.cli import main

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TENSORBOARD = ["--trainer.logger", "TensorBoardLogger"]  # keeps the YAML's save_dir and name


def scalars(log_root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``log_root``: tag -> (step, value)."""
    events = sorted(log_root.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {log_root}"
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def assert_logged(found: dict[str, list[tuple[int, float]]], tags: list[str]) -> None:
    missing = [t for t in tags if t not in found]
    assert not missing, f"not in the event files: {missing}; found {sorted(found)}"
    for tag in tags:
        assert all(math.isfinite(v) for _, v in found[tag]), tag


def test_sft_logs_to_tensorboard(task_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "fit", "--config", str(CONFIGS / "sft.yaml"), *TENSORBOARD, *QUIET,
            "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "1",
            "--data.init_args.task_dir", str(task_dir),
            "--model.init_args.export_dir", "sft",
        ]
    )  # fmt: skip
    assert code == 0
    assert not list(tmp_path.rglob("metrics.csv"))  # the CSV logger was replaced, not added
    found = scalars(tmp_path / "artifacts/logs/sft")  # the YAML's save_dir and name
    assert_logged(found, ["train/loss", "train/token_accuracy", "val/loss", "val/perplexity"])
    assert [step for step, _ in found["train/loss"]] == [0, 1, 2, 3]


def test_reward_logs_to_tensorboard(stage_outputs, task_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft = str(stage_outputs["sft-1"])
    code = main(
        [
            "fit", "--config", str(CONFIGS / "reward.yaml"), *TENSORBOARD, *QUIET,
            "--trainer.max_steps", "3",
            "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "1",
            "--model.init_args.model", sft,
            "--data.init_args.tokenizer", sft,
            "--data.init_args.task_dir", str(task_dir),
            "--model.init_args.export_dir", "reward",
        ]
    )  # fmt: skip
    assert code == 0
    found = scalars(tmp_path / "artifacts/logs/reward")
    assert_logged(found, ["train/loss", "train/accuracy", "val/accuracy", "val/reward_std"])


@pytest.mark.parametrize("stage", ["salsa.yaml", "ppo.yaml"])
def test_rl_stages_log_to_tensorboard(stage, stage_outputs, task_dir, tmp_path, monkeypatch):
    """SALSA (soup reference) and PPO (one reference): the rollout metrics, the losses and
    the held-out evaluation all reach the event files."""
    monkeypatch.chdir(tmp_path)
    sft_1, sft_2 = str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"])
    reference = f"[{sft_1}, {sft_2}]" if stage == "salsa.yaml" else f"[{sft_1}]"
    code = main(
        [
            "fit", "--config", str(CONFIGS / stage), *TENSORBOARD, *QUIET,
            "--model.init_args.reference.checkpoints", reference,
            "--model.init_args.reward_model", str(stage_outputs["reward"]),
            "--model.init_args.generation.max_new_tokens", "8",
            "--model.init_args.ppo.epochs", "1",
            "--model.init_args.ppo.minibatch_size", "8",
            "--model.init_args.ppo.micro_batch_size", "8",
            "--model.init_args.export_dir", "policy",
            "--data.init_args.tokenizer", sft_1,
            "--data.init_args.task_dir", str(task_dir),
            "--data.init_args.batch_size", "8",
            "--data.init_args.eval_batch_size", "8",
            "--trainer.limit_train_batches", "2",
            "--trainer.max_epochs", "1",
            "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_checkpointing", "false",
        ]
    )  # fmt: skip
    assert code == 0
    found = scalars(tmp_path / "artifacts/logs" / stage.removesuffix(".yaml"))
    assert_logged(
        found,
        ["objective/kl", "objective/scores", "loss/policy", "loss/value", "eval/score", "eval/kl"],
    )
    assert len(found["objective/kl"]) == 2  # one point per rollout


def test_csv_and_tensorboard_together_log_the_same_values(task_dir, tmp_path, monkeypatch):
    """The stackable two-logger YAML of docs/loggers.md: the CSV file the report reads and the
    TensorBoard events hold the same numbers."""
    monkeypatch.chdir(tmp_path)
    both = tmp_path / "loggers.yaml"
    both.write_text(
        "trainer:\n"
        "  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        "      init_args: {save_dir: artifacts/logs, name: sft}\n"
        "    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        "      init_args: {save_dir: artifacts/tensorboard, name: sft}\n"
    )
    code = main(
        [
            "fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(both), *QUIET,
            "--trainer.max_steps", "3",
            "--trainer.log_every_n_steps", "1",
            "--trainer.limit_val_batches", "0",
            "--data.init_args.task_dir", str(task_dir),
            "--model.init_args.export_dir", "sft",
        ]
    )  # fmt: skip
    assert code == 0
    (metrics,) = (tmp_path / "artifacts/logs/sft").rglob("metrics.csv")
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    from_csv = [(int(r["step"]), float(r["train/loss"])) for r in rows]
    from_tensorboard = scalars(tmp_path / "artifacts/tensorboard/sft")["train/loss"]
    assert len(from_csv) == 3
    assert [s for s, _ in from_tensorboard] == [s for s, _ in from_csv]
    assert [v for _, v in from_tensorboard] == pytest.approx([v for _, v in from_csv], rel=1e-6)
