"""Shared fixtures: offline, tiny, real. Models come from the shipped tiny base or from configs,
the tokenizer is the one trained locally, data files are written by the embedded task."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from salsa_lightning.embedded import ASSETS  # noqa: E402
from salsa_lightning.task import TaskConfig, write_task_files  # noqa: E402

datasets.disable_progress_bars()
torch.set_num_threads(1)  # tiny models: threads only add contention on 2-core machines

# What torch.multiprocessing says of a rank killed by a signal. Gloo aborted ranks as they
# exited, their work done ("terminate called without an active exception", SIGABRT), until the
# scripts freed their sharded models and ended the group (sharding.end_process_group): such a
# run still runs once more, with a warning, as test_fsdp.run does.
KILLED = "terminated with signal"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rerun_if_killed(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, once more (with a
    warning) when a rank of the multi-process script was killed by a signal (:data:`KILLED`)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if KILLED in proc.stderr:
        warnings.warn(
            f"a rank was killed by a signal; run again:\n{proc.stderr[-2000:]}", stacklevel=2
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE = ASSETS / "base"  # the shipped tiny base model and its tokenizer

SMALL_TASK = TaskConfig(
    seed=0,
    n_sft=256,
    n_sft_val=64,
    n_pairs=512,
    n_pairs_val=128,
    n_prompts=64,
    n_prompts_val=32,
    n_prompts_ood=32,
)


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded task's files, small, written once per session."""
    return write_task_files(tmp_path_factory.mktemp("task"), SMALL_TASK)


@pytest.fixture(scope="session")
def task_dir(task_files: dict[str, Path]) -> Path:
    return task_files["task"].parent


def adamw(lr: float):
    """An optimizer factory as the modules take it: AdamW at ``lr``, no weight decay."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def make_trainer(root: Path, **kwargs) -> L.Trainer:
    """A quiet single-process CPU Trainer that reports every step's metrics."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _fit(module: L.LightningModule, data: L.LightningDataModule, root: Path, steps: int) -> None:
    # One validation at the last step (the reward model exports its reward stats from it).
    trainer = make_trainer(root, max_steps=steps, val_check_interval=steps, limit_val_batches=2)
    trainer.fit(module, datamodule=data)


@pytest.fixture(scope="session")
def stage_outputs(tmp_path_factory: pytest.TempPathFactory, task_dir: Path) -> dict[str, Path]:
    """Two short SFT runs (seeds 1 and 2) from the shipped base and a reward model on the first:
    the inputs SALSA-PPO needs, made by the real stages, once per session."""
    from salsa_lightning import PreferenceDataModule, RewardModule, SFTDataModule, SFTModule

    root = tmp_path_factory.mktemp("stages")
    adam = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
    out = {}
    for seed in (1, 2):
        L.seed_everything(seed)
        out[f"sft-{seed}"] = root / f"sft-{seed}"
        module = SFTModule(model=str(BASE), optimizer=adam, export_dir=str(out[f"sft-{seed}"]))
        data = SFTDataModule(
            tokenizer=str(BASE), task_dir=str(task_dir), batch_size=16, max_length=64
        )
        _fit(module, data, root, steps=15)
    L.seed_everything(1)
    out["reward"] = root / "reward"
    module = RewardModule(model=str(out["sft-1"]), optimizer=adam, export_dir=str(out["reward"]))
    data = PreferenceDataModule(
        tokenizer=str(out["sft-1"]), task_dir=str(task_dir), batch_size=16, max_length=64
    )
    _fit(module, data, root, steps=15)
    return out
