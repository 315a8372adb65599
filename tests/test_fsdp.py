"""SALSA-PPO under FSDP2 in 2 processes on CPU (gloo), against the single-process run.

Both runs decode greedily so that they see the same responses: the single process takes the
global batch of 8 prompts, each FSDP rank a disjoint half of it (the sampler deals rows out
round-robin). Stated tolerance: the first rollout's scores and KL agree to 1e-4 (same weights,
same responses: only the reduction order differs); after two PPO updates the evaluation agrees
to 0.05, because each rank averages its losses over its own half before gradients are
averaged, which weights tokens slightly differently from one global mean.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS

pytestmark = pytest.mark.slow


def salsa_args(out: dict[str, Path], task_dir: Path, root: Path, per_rank_batch: int) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "salsa.yaml"),
        "--model.init_args.reference.checkpoints",
        f"[{out['sft-1']}, {out['sft-2']}]",
        "--model.init_args.reward_model",
        str(out["reward"]),
        "--model.init_args.generation.do_sample",
        "false",
        "--model.init_args.generation.max_new_tokens",
        "8",
        "--model.init_args.ppo.epochs",
        "1",
        "--model.init_args.ppo.minibatch_size",
        str(per_rank_batch),
        "--model.init_args.ppo.micro_batch_size",
        str(per_rank_batch),
        "--model.init_args.export_dir",
        str(root / "policy"),
        "--data.init_args.tokenizer",
        str(out["sft-1"]),
        "--data.init_args.task_dir",
        str(task_dir),
        "--data.init_args.batch_size",
        str(per_rank_batch),
        "--data.init_args.eval_batch_size",
        str(per_rank_batch),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root / "logs"),
    ]


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "salsa_lightning.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(root: Path) -> list[dict[str, float]]:
    (path,) = (root / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def first(rows: list[dict[str, float]], key: str) -> float:
    return next(r[key] for r in rows if key in r)


def test_salsa_fsdp2_two_processes_agrees_with_one(stage_outputs, task_dir, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(salsa_args(stage_outputs, task_dir, single, per_rank_batch=8), tmp_path)
    fsdp = [
        "--config",
        str(CONFIGS / "fsdp.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy.init_args.data_parallel_size",
        "2",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last",
        "true",
    ]
    args = salsa_args(stage_outputs, task_dir, sharded, per_rank_batch=4)
    run(args + fsdp, tmp_path)

    one, two = metrics(single), metrics(sharded)
    for key in (
        "objective/scores",
        "objective/raw_scores",
        "objective/kl",
        "rollout/response_length",
    ):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    assert first(one, "objective/kl") == 0.0  # the policy starts as the soup
    for key in ("eval/score", "eval/kl", "eval/gold"):
        assert first(two, key) == pytest.approx(first(one, key), abs=0.05), key

    # The export gathered from shards loads in plain transformers, like the single-process one.
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(single / "policy")
    b = AutoModelForCausalLM.from_pretrained(sharded / "policy")
    assert a.state_dict().keys() == b.state_dict().keys()

    # The sharded checkpoint is a directory of shards and resumes on the same world size.
    last = next(sharded.rglob("last.ckpt"))
    assert last.is_dir() and any(last.glob("*.distcp"))
    resume = args + fsdp + ["--trainer.limit_train_batches", "3", "--ckpt_path", str(last)]
    resume[resume.index("--model.init_args.export_dir") + 1] = str(sharded / "policy-resumed")
    run(resume, tmp_path)
    assert (sharded / "policy-resumed" / "model.safetensors").exists()
