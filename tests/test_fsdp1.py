"""FSDP1 (``configs/fsdp1.yaml``, ``salsa_lightning.strategies.FSDP1Strategy``) against one process.

The CPU tests run 2 processes with gloo through the ``salsa`` command, with the settings and
the stated tolerances of ``test_fsdp.py`` (whose helpers they reuse; SALSA under FSDP1 is
tested there, beside FSDP2): the reward stage's validation metrics and reward stats agree to
1e-4, the exported weights lie within 1e-3 of the update.

The GPU test runs every stage on one GPU in bf16 under FSDP1 and FSDP2 and reports the peak
memory of a PPO step; it is skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIGS
from test_fsdp import FSDP1, check_reward_runs, first, metrics, run, salsa_args, stage_args

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


def test_reward_fsdp1_two_processes_agrees_with_one(stage_outputs, task_dir, tmp_path):
    extra = [
        "--model.init_args.model",
        str(stage_outputs["reward"]),
        "--data.init_args.tokenizer",
        str(stage_outputs["sft-1"]),
    ]
    single, sharded = tmp_path / "single", tmp_path / "fsdp1"
    run(stage_args("reward.yaml", single, task_dir, 16, extra), tmp_path)
    run(stage_args("reward.yaml", sharded, task_dir, 16, extra) + FSDP1, tmp_path)
    assert first(metrics(single), "val/accuracy") > 0.5
    check_reward_runs(single, sharded, stage_outputs["reward"])


def test_unknown_layer_class_fails_before_training(task_dir, tmp_path):
    args = stage_args("sft.yaml", tmp_path, task_dir, 8, [])
    args += [
        "--config",
        str(CONFIGS / "fsdp1.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--model.init_args.fsdp_layer_class",
        "NoSuchDecoderLayer",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "salsa_lightning.cli", *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no known decoder-layer class" in proc.stderr
    assert "fsdp_layer_class" in proc.stderr
    assert not (tmp_path / "model").exists()  # nothing trained, nothing exported


# ----------------------------------------------------------------------------- one GPU, bf16


class PeakMemory(L.Callback):
    """The peak CUDA memory allocated during a training step (the largest over the run),
    reported when fit ends: printed, and appended as a JSON line to the file that the
    environment variable ``SALSA_GPU_REPORT`` names. Built in the ``salsa`` subprocess through
    ``--trainer.callbacks+=test_fsdp1.PeakMemory``."""

    def __init__(self, stage: str = "", strategy: str = "") -> None:
        self.stage, self.strategy, self.peak = stage, strategy, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def on_fit_end(self, trainer, module) -> None:
        row = {
            "stage": self.stage,
            "strategy": self.strategy,
            "rank": trainer.global_rank,
            "device": torch.cuda.get_device_name(),
            "peak_step_mib": round(self.peak / 2**20, 1),
            "torch": torch.__version__,
        }
        print("SALSA_GPU_REPORT " + json.dumps(row), flush=True)
        report = os.environ.get("SALSA_GPU_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps(row) + "\n")


def gpu_run(args: list[str], cwd: Path) -> str:
    """``run`` with this folder importable, for the ``PeakMemory`` callback named in ``args``."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return run(args, cwd, {"PYTHONPATH": path})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp"])
def test_every_stage_on_one_gpu_bf16(strategy, stage_outputs, task_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    gpu = [
        "--config",
        str(CONFIGS / f"{strategy}.yaml"),
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "bf16-mixed",
    ]
    tokenizer = ["--data.init_args.tokenizer", str(stage_outputs["sft-1"])]
    sft = tmp_path / "sft"
    gpu_run(stage_args("sft.yaml", sft, task_dir, 8, []) + gpu, tmp_path)
    AutoModelForCausalLM.from_pretrained(sft / "model")
    reward = tmp_path / "reward"
    extra = ["--model.init_args.model", str(stage_outputs["sft-1"]), *tokenizer]
    gpu_run(stage_args("reward.yaml", reward, task_dir, 8, extra) + gpu, tmp_path)
    AutoModelForSequenceClassification.from_pretrained(reward / "model")
    assert (reward / "model" / "reward_stats.json").exists()

    for stage in ("salsa", "ppo"):
        root = tmp_path / stage
        args = salsa_args(stage_outputs, task_dir, root, batch=8)
        args[args.index(str(CONFIGS / "salsa.yaml"))] = str(CONFIGS / f"{stage}.yaml")
        if stage == "ppo":
            i = args.index("--model.init_args.reference.checkpoints")
            args[i + 1] = f"[{stage_outputs['sft-1']}]"
        args += gpu[:2] + ["--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
        args[args.index("cpu")] = "gpu"  # salsa_args names the CPU accelerator
        args += [
            "--trainer.callbacks+=test_fsdp1.PeakMemory",
            "--trainer.callbacks.stage",
            stage,
            "--trainer.callbacks.strategy",
            strategy,
        ]
        out = gpu_run(args, tmp_path)
        AutoModelForCausalLM.from_pretrained(root / "policy")
        rows = [
            json.loads(line.split(" ", 1)[1])
            for line in out.splitlines()
            if line.startswith("SALSA_GPU_REPORT ")
        ]
        assert rows and rows[0]["peak_step_mib"] > 0, out[-2000:]
        print(rows)
