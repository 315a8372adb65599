"""SALSA's validation metrics are means over every held-out prompt, whatever the number of ranks:
7 prompts over 2 FSDP2 processes (4 and 3 prompts, the sampler appending one copy so that both
ranks run as many batches) give the one-process values.

Greedy decoding, so both runs see the same answers. Stated tolerance: gold, score and response
length agree to 1e-5 (the same answers, scores summed in another order); the KL to 1e-4 (each
rank's sharded forward reduces in another order). A mean of the two ranks' means, or counting
the copy, would be off by far more: the answers' gold rewards differ by up to 1.
"""

from __future__ import annotations

import pytest
from conftest import CONFIGS
from test_fsdp import FSDP2, metrics, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_and_two(stage_outputs, task_dir, tmp_path_factory):
    """The validation metrics of one process and of two FSDP2 processes."""
    tmp_path = tmp_path_factory.mktemp("validation-ranks")
    held_out = (task_dir / "prompts_val.jsonl").read_text().splitlines()[:7]
    (tmp_path / "val.jsonl").write_text("\n".join(held_out) + "\n")
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
        "--data.init_args.val_files", str(tmp_path / "val.jsonl"),
        "--data.init_args.eval_batch_size", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.limit_val_batches", "1.0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    results = {}
    for name, extra in (("one", []), ("two", FSDP2)):
        root = tmp_path / name
        run([*args, *extra, "--trainer.logger.init_args.save_dir", str(root / "logs")], tmp_path)
        (row,) = [r for r in metrics(root) if "eval/gold" in r]
        results[name] = row
    return results["one"], results["two"]


@pytest.mark.xfail(
    strict=True,
    reason="known bug, open (issue 21): on 2 FSDP2 processes eval/score is 1.233 against 1.289 "
    "on one and eval/kl_sft-1 0.677 against 0.701; the copy-weighting of held_out_rows is not "
    "enough to make the means exact over ranks",
)
def test_validation_means_over_unequal_ranks_equal_one_process(one_and_two):
    one, two = one_and_two
    keys = [k for k in one if k.startswith("eval/")]
    assert {"eval/gold", "eval/score", "eval/kl", "eval/kl_sft-1"} <= set(keys)
    assert keys == [k for k in two if k.startswith("eval/")]
    for key in keys:
        tolerance = 1e-4 if key.startswith("eval/kl") else 1e-5
        assert two[key] == pytest.approx(one[key], abs=tolerance), key
