"""Tests for salsa_lightning.salsa (SALSA-PPO) on real tiny checkpoints, data and Trainers."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_trainer

from salsa_lightning import PromptDataModule, SALSAModule
from salsa_lightning.salsa import GenerationSettings, PPOSettings
from salsa_lightning.soup import SoupReference
from salsa_lightning.task import TaskConfig, write_task_files

NOISY = ("time/", "throughput/")  # wall-clock metrics, never equal between runs


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WORKAROUND (overrides conftest's ``task_dir``): the DataModules' ``prepare_data`` calls
    ``write_task_files(task_dir)`` with the default ``TaskConfig`` and refuses a directory written
    with another one (conftest writes ``SMALL_TASK``), so the task here is the default one."""
    return write_task_files(tmp_path_factory.mktemp("task_default"), TaskConfig())["task"].parent


class Recorder(L.Callback):
    """The training metrics after every rollout, and the trainable weights at train start."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def build(out: dict[str, Path], checkpoints=("sft-1", "sft-2"), weights=(0.5, 0.5), lr=1e-4, **kwargs) -> SALSAModule:
    kwargs.setdefault("reward_model", str(out["reward"]))
    kwargs.setdefault("generation", GenerationSettings(max_new_tokens=8))
    kwargs.setdefault("ppo", PPOSettings(epochs=2, minibatch_size=8, micro_batch_size=8))
    reference = SoupReference([str(out[c]) for c in checkpoints], None if weights is None else list(weights))
    return SALSAModule(reference=reference, optimizer=lambda p: torch.optim.AdamW(p, lr=lr), **kwargs)


def prompts(out: dict[str, Path], task_dir: Path, **kwargs) -> PromptDataModule:
    kwargs = {"batch_size": 8, "max_length": 48, **kwargs}
    return PromptDataModule(tokenizer=str(out["sft-1"]), task_dir=str(task_dir), **kwargs)


def fit(module: SALSAModule, data: PromptDataModule, root: Path, rollouts: int, **kwargs) -> tuple[L.Trainer, Recorder]:
    """``rollouts`` PPO iterations, no validation inside fit."""
    recorder = Recorder()
    trainer = make_trainer(
        root, limit_train_batches=rollouts, max_epochs=1, limit_val_batches=0, callbacks=[recorder], **kwargs
    )
    trainer.fit(module, datamodule=data)
    return trainer, recorder


def validate(module: SALSAModule, data: PromptDataModule, root: Path, batches: int = 1) -> dict[str, float]:
    make_trainer(root, limit_val_batches=batches).validate(module, datamodule=data, verbose=False)
    return dict(module.last_eval)


def snapshot(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def training_metrics(recorder: Recorder) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if not k.startswith(NOISY)} for m in recorder.metrics]


# ----------------------------------------------------------------------------- soup run


@pytest.fixture(scope="module")
def soup_run(stage_outputs, task_dir, tmp_path_factory):
    """Policy from the soup of sft-1 and sft-2: validate, 2 rollouts, validate again."""
    root = tmp_path_factory.mktemp("soup_run")
    L.seed_everything(0)
    module = build(stage_outputs)
    data = prompts(stage_outputs, task_dir)
    before = validate(module, data, root)
    frozen = {"ref": snapshot(module.ref_models), "reward": snapshot(module.reward)}
    trainable = {"policy": snapshot(module.policy), "critic": snapshot(module.critic)}
    trainer, recorder = fit(module, data, root, rollouts=2)
    after = validate(module, data, root)
    return dict(
        module=module, trainer=trainer, recorder=recorder, before=before, after=after, frozen=frozen, trainable=trainable
    )


def test_kl_is_zero_when_the_policy_is_the_soup(soup_run):
    before, first = soup_run["before"], soup_run["recorder"].metrics[0]
    assert before["eval/kl"] == 0.0
    assert first["objective/kl"] == 0.0
    # the ingredients differ from their soup, so the KL to each of them is not zero
    assert before["eval/kl_sft-1"] != 0.0 and before["eval/kl_sft-2"] != 0.0
    assert math.isfinite(before["eval/score"]) and math.isfinite(before["eval/gold"])


def test_frozen_models_stay_frozen_and_trainable_ones_train(soup_run):
    module = soup_run["module"]
    assert same(snapshot(module.ref_models), soup_run["frozen"]["ref"])
    assert same(snapshot(module.reward), soup_run["frozen"]["reward"])
    assert not same(snapshot(module.policy), soup_run["trainable"]["policy"])
    assert not same(snapshot(module.critic), soup_run["trainable"]["critic"])
    # validation ran last and Lightning put the module back in train mode: frozen ones ignore it
    assert module.reward.training is False and not any(m.training for m in module.reward.modules())
    assert not any(m.training for ref in module.ref_models for m in ref.modules())
    assert module.policy.training is True
    frozen = {id(p) for p in [*module.ref_models.parameters(), *module.reward.parameters()]}
    in_optimizer = [p for group in soup_run["trainer"].optimizers[0].param_groups for p in group["params"]]
    assert in_optimizer and not frozen & {id(p) for p in in_optimizer}
    assert all(p.requires_grad for p in in_optimizer)
    trainable = {id(p) for p in [*module.policy.parameters(), *module.critic.parameters()]}
    assert {id(p) for p in in_optimizer} == trainable
    assert soup_run["after"]["eval/kl"] > 0.0
