"""Shared fixtures: offline, tiny, real. Models come from the shipped tiny base or from configs,
the tokenizer is the one trained locally, data files are written by the embedded task."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from salsa_lightning.embedded import ASSETS  # noqa: E402
from salsa_lightning.task import TaskConfig, write_task_files  # noqa: E402

datasets.disable_progress_bars()
torch.set_num_threads(1)  # tiny models: threads only add contention on 2-core machines

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


def make_trainer(root: Path, **kwargs) -> L.Trainer:
    """A quiet single-process CPU Trainer."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
