"""The world-size rule (``salsa_lightning/world_size.py``): batch counts over all ranks, so a run
is the same experiment on 1, 2 or 4 devices.

- The rule itself: each rank's share of step i, over all ranks, is the one-device run's step i
  (a seeded shuffle dealt out round-robin), and counts that do not split are refused, named.
- Every YAML that trains plans the same run at 1, 2 and 4 devices (parsed with
  ``configs/fsdp.yaml`` stacked, no model built): the same rows per step over all ranks, the
  same optimizer steps per RL iteration.
- Real runs (``salsa fit``, FSDP2, CPU processes, gloo) of the RL YAMLs, shortened to two
  iterations: each step's prompts over all ranks, the validation points, the optimizer steps
  and the rollouts counted are the one-process run's: every RL YAML at 1, 2 and 4 processes,
  marked ``scale`` (``.ci/run``'s extra step). SALSA's case is the issue's command
  (``salsa fit --config configs/salsa.yaml --config configs/fsdp.yaml --trainer.devices 2``,
  which stopped with "val_check_interval (16) must be less than or equal to the number of the
  training batches (8)").
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import CONFIGS
from test_fsdp import launch, run
from torch.utils.data import DataLoader

from salsa_lightning.data import ResumableSampler
from salsa_lightning.errors import SalsaError
from salsa_lightning.lightning_cli import SalsaCLI
from salsa_lightning.ppo import PPOSettings, SALSAModule
from salsa_lightning.ppo.checks import check_batch_sizes
from salsa_lightning.world_size import per_rank

TESTS = Path(__file__).resolve().parent
FSDP = CONFIGS / "fsdp.yaml"
WORLDS = (1, 2, 4)

# ----------------------------------------------------------------------------- the rule


def steps(rows: int, batch: int, world: int, rank: int) -> list[list[int]]:
    """The row indices of each training step of ``rank`` (seed 1, as the YAMLs)."""
    sampler = ResumableSampler(list(range(rows)), num_replicas=world, rank=rank, seed=1)
    loader = DataLoader(list(range(rows)), batch_size=per_rank(batch, world, "b"), sampler=sampler)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("rows", [64, 70])
def test_the_ranks_shares_of_a_step_are_the_one_device_step(rows):
    """64 rows split evenly; 70 leave a short last step, which several ranks fill up with the
    epoch's first rows (fewer than the world size), as DistributedSampler pads."""
    one = steps(rows, 16, 1, 0)
    assert len(one) == -(-rows // 16)
    for world in (2, 4, 8):
        ranks = [steps(rows, 16, world, rank) for rank in range(world)]
        assert all(len(r) == len(one) for r in ranks)  # the same number of steps
        for i, step in enumerate(one):
            union = sorted(x for r in ranks for x in r[i])
            if len(step) == 16:
                assert union == sorted(step)
            else:  # the epoch's last step
                assert set(union) == set(step) | set(one[0][: len(union) - len(step)])
                assert len(union) - len(step) < world


def test_a_count_that_does_not_split_is_refused_with_the_setting_named():
    assert per_rank(32, 4, "data.batch_size") == 8
    with pytest.raises(SalsaError, match=r"data.batch_size \(30\) counts rows over all ranks .* "
                       r"world size \(4 = trainer.devices x trainer.num_nodes\).* 28 or 32"):  # fmt: skip
        per_rank(30, 4, "data.batch_size")
    with pytest.raises(SalsaError, match=r"data.eval_batch_size \(2\) .* Use 4"):
        per_rank(2, 4, "data.eval_batch_size")


def test_ppo_batch_counts_split_over_ranks_or_are_refused():
    ppo = PPOSettings(minibatch_size=32, micro_batch_size=32)
    assert check_batch_sizes(32, 1, ppo, 1) == 32
    assert check_batch_sizes(32, 1, ppo, 4) == 8  # micro 32 >= 8 rows per rank: one micro-batch
    assert check_batch_sizes(8, 4, ppo, 4) == 8  # GRPO: 8 prompts x 4 samples
    small = PPOSettings(minibatch_size=32, micro_batch_size=4)
    assert check_batch_sizes(64, 1, small, 2) == 16
    with pytest.raises(SalsaError, match=r"data.batch_size \(30\)"):
        check_batch_sizes(30, 1, ppo, 4)
    with pytest.raises(SalsaError, match=r"model.ppo.minibatch_size \(6\) counts rows .* \(4 ="):
        check_batch_sizes(32, 1, PPOSettings(minibatch_size=6, micro_batch_size=6), 4)
    match = (
        r"data.batch_size \(8 prompts per PPO iteration, over all ranks\) x "
        r"model.estimator.samples_per_prompt \(3\) = 24 responses must be a multiple of "
        r"model.ppo.minibatch_size \(16"
    )
    with pytest.raises(SalsaError, match=match):
        check_batch_sizes(8, 3, PPOSettings(minibatch_size=16, micro_batch_size=16), 2)
    match = r"minibatch_size \(24\) over 2 rank\(s\) is 12 rows per rank .*micro_batch_size \(8"
    with pytest.raises(SalsaError, match=match):
        check_batch_sizes(48, 1, PPOSettings(minibatch_size=24, micro_batch_size=8), 2)


# ----------------------------------------------------------------------------- every YAML plans


def trains(path: Path) -> bool:
    """A LightningCLI YAML of a stage that trains on a data module."""
    doc = yaml.safe_load(path.read_text("utf-8")) or {}
    return isinstance(doc.get("model"), dict) and "class_path" in doc["model"] and "data" in doc


TRAINING = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if trains(p))


def plans(configs: list[str], worlds: tuple[int, ...]) -> dict[int, dict[str, int]]:
    """What a run of ``configs`` does per step at each of ``worlds`` devices: the rows per step
    over all ranks and the RL optimizer steps per iteration, as the data module and
    ``check_batch_sizes`` share them out. The YAMLs are parsed once, with ``configs/fsdp.yaml``
    on the largest world's CPU devices (the Trainer is built; no model, nothing runs)."""
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    args += ["--config", str(FSDP), "--trainer.accelerator", "cpu"]
    cli = SalsaCLI(args=[*args, "--trainer.devices", str(max(worlds))], run=False)
    assert cli.trainer.world_size == max(worlds)
    data, module = cli.datamodule, cli.model
    out = {}
    for world in worlds:
        hp = data.hparams
        train = per_rank(hp.batch_size, world, "data.batch_size")
        val = per_rank(hp.eval_batch_size or hp.batch_size, world, "data.eval_batch_size")
        out[world] = {"train_rows": train * world, "val_rows": val * world}
        if isinstance(module, SALSAModule):
            k = module.estimator_settings.samples_per_prompt
            minibatch = check_batch_sizes(hp.batch_size, k, module.ppo_settings, world)
            steps = module.ppo_settings.epochs * hp.batch_size * k // (minibatch * world)
            out[world]["optimizer_steps_per_iteration"] = steps
    return out


@pytest.mark.parametrize("config", [*TRAINING, "ppo.yaml+oracle.yaml"])
def test_every_training_yaml_plans_the_same_run_on_1_2_and_4_devices(config, tmp_path, monkeypatch):
    """The paper's YAMLs, written for 8 GPUs, at 8 too."""
    monkeypatch.chdir(tmp_path)
    configs = config.split("+")
    out = plans(configs, (*WORLDS, 8) if config.startswith("paper/") else WORLDS)
    assert all(p == out[1] for p in out.values())
    assert out[1]["train_rows"] == yaml_batch(configs)


def yaml_batch(configs: list[str]) -> int:
    """The YAMLs' ``data.batch_size`` (the last one that names it)."""
    sizes = [
        (yaml.safe_load((CONFIGS / c).read_text()).get("data") or {}).get("init_args", {})
        for c in configs
    ]
    return [s["batch_size"] for s in sizes if "batch_size" in s][-1]


# ----------------------------------------------------------------------------- real runs


class StepLog(L.Callback):
    """Each rank writes ``<path>.rank<N>.json`` when training ends: the prompts of each
    training step, the optimizer step at each validation and the prompts it saw, and the
    optimizer steps taken. Named in ``salsa fit`` runs by ``test_world_size.StepLog``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.train: list[list[str]] = []
        self.validations: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.train.append(list(batch["prompt"]))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validations.append({"global_step": trainer.global_step, "prompts": []})
        self.validations[-1]["prompts"] += list(batch["prompt"])

    def on_train_end(self, trainer, module) -> None:
        record = {
            "train": self.train,
            "validations": self.validations,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        }
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


RL = ["salsa.yaml", "ppo.yaml", "grpo.yaml", "salsa-grpo.yaml", "ppo.yaml+oracle.yaml"]


def rl_args(configs: list[str], out: dict[str, Path], task_dir: Path, root: Path) -> list[str]:
    """``salsa fit`` of the YAMLs as they are, with the session's SFT and reward models, for
    two iterations (a validation after the second) and 4 new tokens."""
    refs = [out["sft-1"], out["sft-2"]] if "salsa" in configs[0] else [out["sft-1"]]
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    oracle = "oracle.yaml" in configs
    return [
        "fit", *args,
        "--model.init_args.reference.checkpoints", f"[{', '.join(map(str, refs))}]",
        *(["--model.init_args.critic", str(out["reward"])] if oracle else
          ["--model.init_args.reward_model", str(out["reward"])]),
        "--model.init_args.generation.max_new_tokens", "4",
        "--model.init_args.export_dir", str(root / "policy"),
        "--data.init_args.tokenizer", str(out["sft-1"]),
        "--data.init_args.task_dir", str(task_dir),
        "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        "--trainer.callbacks+=test_world_size.StepLog",
        "--trainer.callbacks.path", str(root / "steps"),
    ]  # fmt: skip


# The subprocesses import this folder (``StepLog``); test_fsdp's helpers run them.
ON_PATH = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def salsa(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``salsa <args>`` in a subprocess, whatever its exit code."""
    return launch(args, cwd, ON_PATH, timeout=1200)


def fit(args: list[str], cwd: Path) -> None:
    """``salsa fit`` as test_fsdp runs it (a run killed by a signal runs again)."""
    run(args, cwd, ON_PATH, timeout=1200)


def run_at(config: str, world: int, out, task_dir: Path, tmp_path: Path) -> dict:
    """One short run at ``world`` processes (``--config configs/fsdp.yaml --trainer.devices
    world``, the README's command): its ranks' step logs merged, and its metrics."""
    root = tmp_path / f"world{world}"
    args = rl_args(config.split("+"), out, task_dir, root)
    fit(args + ["--config", str(FSDP), "--trainer.devices", str(world)], tmp_path)
    ranks = [json.loads((root / f"steps.rank{r}.json").read_text()) for r in range(world)]
    assert {r["world_size"] for r in ranks} == {world}
    (path,) = (root / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {
        "steps": [sorted(p for r in ranks for p in r["train"][i]) for i in range(2)],
        "train_steps": {len(r["train"]) for r in ranks},
        "validation_steps": [v["global_step"] for v in ranks[0]["validations"]],
        "validation_prompts": sorted(
            p for r in ranks for v in r["validations"] for p in v["prompts"]
        ),
        "global_step": {r["global_step"] for r in ranks},
        "rollouts": max(float(r["train/rollouts"]) for r in rows if r.get("train/rollouts")),
        "exported": (root / "policy" / "config.json").is_file(),
    }


def check_same_run(config: str, worlds: tuple[int, ...], stage_outputs, task_dir, tmp_path):
    runs = {w: run_at(config, w, stage_outputs, task_dir, tmp_path) for w in worlds}
    one = runs[1]
    assert one["train_steps"] == {2} and one["rollouts"] == 2.0 and one["exported"]
    assert len(one["steps"][0]) == yaml_batch(config.split("+"))  # the YAML's prompts per step
    assert one["validation_steps"] and one["global_step"] == {one["validation_steps"][0]}
    for world in worlds[1:]:
        assert runs[world] == one, world  # prompts per step, validation, steps, rollouts


@pytest.mark.scale
@pytest.mark.parametrize("config", RL)
def test_every_rl_yaml_is_the_same_run_on_1_2_and_4_processes(
    config, stage_outputs, task_dir, tmp_path
):
    check_same_run(config, WORLDS, stage_outputs, task_dir, tmp_path)


@pytest.mark.slow
def test_a_batch_that_does_not_split_is_refused_before_any_model_is_built(
    stage_outputs, task_dir, tmp_path
):
    args = rl_args(["salsa.yaml"], stage_outputs, task_dir, tmp_path / "run")
    args += ["--config", str(FSDP), "--trainer.devices", "2", "--data.init_args.batch_size", "31"]
    proc = salsa(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.batch_size (31) counts rows over all ranks" in proc.stderr
    assert "world size (2 = trainer.devices x trainer.num_nodes)" in proc.stderr
    assert "30 or 32" in proc.stderr
    assert "SALSA: one rollout" not in proc.stdout + proc.stderr  # fit never started
    assert not (tmp_path / "run" / "policy").exists()
