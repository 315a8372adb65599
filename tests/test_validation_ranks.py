"""Validation metrics are means over every held-out row, whatever the number of ranks: 7 rows
over 2 FSDP2 processes (4 and 3, the sampler appending one copy so that both ranks run as many
batches) give the one-process values, for SALSA's prompts and for the SFT and reward stages'
held-out conversations and pairs (``StageModule.held_out``).

Greedy decoding, so both runs see the same answers. Stated tolerance: gold, score and response
length agree to 1e-5 (the same answers, scores summed in another order); the KL to 1e-4 (each
rank's sharded forward reduces in another order). A mean of the two ranks' means, or counting
the copy, would be off by far more: the answers' gold rewards differ by up to 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS
from test_fsdp import FSDP2, metrics, run

pytestmark = pytest.mark.slow


def seven_rows(source: Path, target: Path) -> Path:
    """The first 7 rows of a held-out file, written to ``target``: 4 and 3 over two ranks."""
    target.write_text("\n".join(source.read_text().splitlines()[:7]) + "\n")
    return target


def on_one_and_two_processes(args: list[str], tmp_path: Path, prefix: str) -> tuple[dict, dict]:
    """The validation row (its metrics start with ``prefix``) of ``salsa <args>`` on one
    process and on two FSDP2 processes."""
    rows = []
    for name, extra in (("one", []), ("two", FSDP2)):
        root = tmp_path / name
        run([*args, *extra, "--trainer.logger.init_args.save_dir", str(root / "logs")], tmp_path)
        (row,) = [r for r in metrics(root) if any(k.startswith(prefix) for k in r)]
        rows.append(row)
    return rows[0], rows[1]


@pytest.fixture(scope="module")
def one_and_two(stage_outputs, task_dir, tmp_path_factory):
    """The validation metrics of one process and of two FSDP2 processes."""
    tmp_path = tmp_path_factory.mktemp("validation-ranks")
    val = seven_rows(task_dir / "prompts_val.jsonl", tmp_path / "val.jsonl")
    out = stage_outputs
    args = [
        "validate",
        "--config", str(CONFIGS / "salsa.yaml"),
        "--model.init_args.reference.checkpoints", f"[{out['sft-1']}, {out['sft-2']}]",
        "--model.init_args.reward_model", str(out["reward"]),
        "--model.init_args.generation.do_sample", "false",
        "--model.init_args.generation.max_new_tokens", "8",
        "--data.init_args.tokenizer", str(out["sft-1"]),
        "--data.init_args.task_dir", str(task_dir),
        "--data.init_args.train_files", str(task_dir / "prompts_train.jsonl"),
        "--data.init_args.val_files", str(val),
        "--data.init_args.eval_batch_size", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.limit_val_batches", "1.0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return on_one_and_two_processes(args, tmp_path, "eval/")


def test_validation_means_over_unequal_ranks_equal_one_process(one_and_two):
    one, two = one_and_two
    keys = [k for k in one if k.startswith("eval/")]
    assert {"eval/gold", "eval/score", "eval/kl", "eval/kl_sft-1"} <= set(keys)
    assert keys == [k for k in two if k.startswith("eval/")]
    for key in keys:
        tolerance = 1e-4 if key.startswith("eval/kl") else 1e-5
        assert two[key] == pytest.approx(one[key], abs=tolerance), key


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_validation_over_unequal_ranks_equals_one_process(
    stage, stage_outputs, task_dir, tmp_path
):
    """7 held-out SFT conversations or preference pairs, one process against two: the same
    val/* means (with the copy counted, the 2-process loss would be off by its own weight)."""
    name = {"sft": "sft_val.jsonl", "reward": "pairs_val.jsonl"}[stage]
    val = seven_rows(task_dir / name, tmp_path / name)
    model = {"sft": "embedded", "reward": str(stage_outputs["reward"])}[stage]
    tokenizer = {"sft": "embedded", "reward": str(stage_outputs["sft-1"])}[stage]
    args = [
        "validate",
        "--config", str(CONFIGS / f"{stage}.yaml"),
        "--model.init_args.model", model,
        "--data.init_args.tokenizer", tokenizer,
        "--data.init_args.task_dir", str(task_dir),
        "--data.init_args.train_files", str(task_dir / name.replace("_val", "_train")),
        "--data.init_args.val_files", str(val),
        "--data.init_args.eval_batch_size", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    one, two = on_one_and_two_processes(args, tmp_path, "val/")
    keys = [k for k in one if k.startswith("val/")]
    assert keys and keys == [k for k in two if k.startswith("val/")]
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
