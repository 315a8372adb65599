"""Resuming after an interruption reproduces the uninterrupted run.

SALSA-PPO: sampling is on, as in real training: the rollouts depend on the global RNG, the data
position, the KL controller (adaptive here, so its state matters), the optimizer state and the
weights, and a resumed run must restore every one of them. The SFT and reward stages: their
shipped YAMLs, stopped by SIGTERM mid-epoch and resumed with ``--ckpt_path last``, end with the
uninterrupted run's weights bit for bit (the data position and bit-identical weights through a
plain Trainer are also covered by ``tests/test_data.py::test_resume_continues_data_position``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIGS, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file

from salsa_lightning import PromptDataModule, SalsaError, SALSAModule
from salsa_lightning.cli import main
from salsa_lightning.ppo import GenerationSettings, KLSettings, PPOSettings
from salsa_lightning.soup import SoupReference

B = 8  # prompts per rollout; one PPO optimizer step per rollout (epochs 1, minibatch B)
NOISY = ("time/", "throughput/")  # wall-clock metrics, never equal between runs
CHECKED = (
    "objective/scores",
    "objective/raw_scores",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "loss/policy",
    "loss/value",
    "rollout/response_length",
)


class Recorder(L.Callback):
    """The metrics of every rollout (global step after it, wall-clock metrics left out)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith(NOISY)}
        self.rows.append({"step": float(trainer.global_step), **row})


def build(
    out: dict[str, Path], checkpoints: list[str] | None = None, weights=(0.5, 0.5)
) -> SALSAModule:
    checkpoints = checkpoints or [str(out["sft-1"]), str(out["sft-2"])]
    return SALSAModule(
        reference=SoupReference(checkpoints, list(weights)),
        reward_model=str(out["reward"]),
        generation=GenerationSettings(max_new_tokens=8),  # do_sample=True: the default
        kl=KLSettings(coef=0.05, target=0.5, horizon=64),  # adaptive: moves every rollout
        ppo=PPOSettings(epochs=1, minibatch_size=B, micro_batch_size=B),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        eval_kl_to_each=False,
    )


def prompts(out: dict[str, Path], task_dir: Path) -> PromptDataModule:
    # An explicit data seed: the resumed process below seeds the global RNG differently, to
    # show that the sampling RNG comes from the checkpoint, not from seed_everything.
    return PromptDataModule(
        tokenizer=str(out["sft-1"]), task_dir=str(task_dir), batch_size=B, max_length=48, seed=0
    )


def fit(module, data, root: Path, max_steps: int, ckpt_path=None, **kwargs) -> Recorder:
    recorder = Recorder()
    callbacks = [recorder, *kwargs.pop("callbacks", [])]
    trainer = make_trainer(
        root, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks, **kwargs
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder


def trainable(module: SALSAModule) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("policy", "critic")
        for k, v in getattr(module, name).state_dict().items()
    }


@pytest.fixture(scope="module")
def runs(stage_outputs, task_dir, tmp_path_factory):
    """4 rollouts uninterrupted; 2 rollouts with a checkpoint after each; resumed to 4."""
    root = tmp_path_factory.mktemp("resume")
    L.seed_everything(1)
    full_module = build(stage_outputs)
    full = fit(full_module, prompts(stage_outputs, task_dir), root / "full", max_steps=4)

    L.seed_everything(1)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
    first = fit(
        build(stage_outputs),
        prompts(stage_outputs, task_dir),
        root / "first",
        max_steps=2,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    last = root / "ckpt" / "last.ckpt"

    L.seed_everything(99)  # a new process; its seed must not matter
    resumed_module = build(stage_outputs)
    resumed = fit(
        resumed_module, prompts(stage_outputs, task_dir), root / "resumed", 4, ckpt_path=last
    )
    return {
        "full": full.rows,
        "first": first.rows,
        "resumed": resumed.rows,
        "full_weights": trainable(full_module),
        "resumed_weights": trainable(resumed_module),
        "last": last,
        "root": root,
    }


def test_resumed_run_logs_the_same_metrics_and_weights(runs):
    full, first, resumed = runs["full"], runs["first"], runs["resumed"]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert [r["step"] for r in first] == [1, 2]
    assert [r["step"] for r in resumed] == [3, 4]  # rollouts 3 and 4 only, no replay
    for key in CHECKED:
        assert key in full[0], key
    # The interrupted run is the uninterrupted one up to the interruption...
    for a, b in zip(first, full[:2], strict=True):
        assert a == pytest.approx(b, abs=1e-6, rel=0)
    # ...and the resumed run continues it: rollouts 3 and 4 log the same numbers.
    for a, b in zip(resumed, full[2:], strict=True):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, abs=1e-6, rel=0)
    # The rollouts differ from each other (sampling and training moved on), so agreeing is
    # not a coincidence of constant metrics.
    assert len({r["objective/kl_coef"] for r in full}) == 4  # the controller moved each time
    assert full[2]["objective/scores"] != full[3]["objective/scores"]

    a, b = runs["full_weights"], runs["resumed_weights"]
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst


def csv_rows(root: Path) -> list[dict[str, float]]:
    """The rows a CSVLogger under ``root`` wrote, wall-clock metrics left out."""
    (path,) = root.rglob("metrics.csv")
    return [
        {k: float(v) for k, v in row.items() if v != "" and not k.startswith(NOISY)}
        for row in csv.DictReader(path.open())
    ]


def test_the_loggers_write_means_since_their_last_write_and_a_resumed_run_keeps_them(
    runs, stage_outputs, task_dir
):
    """``log_every_n_steps=2``: the rows after rollouts 2 and 4 hold the means of rollouts 1-2
    and 3-4 of the run that logs every rollout (the same run: logging changes no number). A
    run interrupted after rollout 3, whose value waits for the next write, resumes to the
    uninterrupted run's row."""
    root = runs["root"] / "every-2"

    def logged(name: str, max_steps: int, **kwargs) -> list[dict[str, float]]:
        logger = CSVLogger(root / name, name="", version="")
        module, data = build(stage_outputs), prompts(stage_outputs, task_dir)
        fit(module, data, root / name, max_steps, logger=logger, log_every_n_steps=2, **kwargs)
        return csv_rows(root / name)

    L.seed_everything(1)
    whole = logged("whole", 4)
    L.seed_everything(1)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
    first = logged("first", 3, callbacks=[ckpt], enable_checkpointing=True)
    L.seed_everything(99)
    resumed = logged("resumed", 4, ckpt_path=root / "ckpt" / "last.ckpt")

    full = runs["full"]  # every rollout's own numbers
    assert [r["train/rollouts"] for r in whole] == [2.0, 4.0]
    for row, pair in zip(whole, (full[0:2], full[2:4]), strict=True):
        means = {k: (pair[0][k] + pair[1][k]) / 2 for k in CHECKED}
        assert {k: row[k] for k in CHECKED} == pytest.approx(means, abs=1e-6, rel=0)
    assert full[2]["objective/scores"] != full[3]["objective/scores"]  # a mean of two values
    assert [r["train/rollouts"] for r in first] == [2.0]  # rollout 3 waits in the checkpoint
    assert [r["train/rollouts"] for r in resumed] == [4.0]
    assert resumed[0] == pytest.approx(whole[1], abs=1e-6, rel=0)


def test_checkpoint_holds_no_frozen_weights_and_the_reference_recipe(runs, stage_outputs):
    ckpt = torch.load(runs["last"], map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert any(k.startswith("policy.") for k in keys)
    assert any(k.startswith("critic.") for k in keys)  # trainable, even though from the RM
    assert not [k for k in keys if k.startswith(("ref_models.", "reward."))]
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 2

    saved = ckpt["salsa"]
    reference = saved["recipe"]["reference"]
    assert reference["checkpoints"] == [
        str(stage_outputs["sft-1"].resolve()),
        str(stage_outputs["sft-2"].resolve()),
    ]
    assert reference["weights"] == [0.5, 0.5]
    hashes = [h["model.safetensors"] for h in reference["sha256"]]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    assert saved["recipe"]["reward_model"] == str(stage_outputs["reward"])
    assert saved["kl_controller"]["value"] == pytest.approx(runs["full"][2]["objective/kl_coef"])
    assert ckpt["world_size"] == 1


def perturbed_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name] = weights[name] + 1e-3
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("change", ["modified", "swapped", "reweighted"])
def test_resume_with_a_changed_reference_is_refused(runs, stage_outputs, task_dir, change):
    sft1, sft2 = str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"])
    root = runs["root"] / f"changed-{change}"
    if change == "modified":
        copy = perturbed_copy(stage_outputs["sft-2"], root / "sft-2-modified")
        module = build(stage_outputs, [sft1, str(copy)])
    elif change == "swapped":
        module = build(stage_outputs, [sft2, sft1])
    else:
        module = build(stage_outputs, weights=(0.7, 0.3))
    with pytest.raises(SalsaError, match="reference .*changed"):
        fit(module, prompts(stage_outputs, task_dir), root, 3, ckpt_path=runs["last"])


def test_resume_with_a_moved_but_identical_reference_continues(runs, stage_outputs, task_dir):
    """The fingerprint is the weights' content: a copied checkpoint directory resumes, and
    continues exactly like the uninterrupted run."""
    root = runs["root"] / "moved"
    copy = shutil.copytree(stage_outputs["sft-2"], root / "sft-2-copy")
    module = build(stage_outputs, [str(stage_outputs["sft-1"]), str(copy)])
    rows = fit(module, prompts(stage_outputs, task_dir), root, 3, ckpt_path=runs["last"]).rows
    assert len(rows) == 1
    assert rows[0] == pytest.approx(runs["full"][2], abs=1e-6, rel=0)


def test_resume_with_another_world_size_is_refused(runs, stage_outputs, task_dir):
    """The data position and the RNG state are per process: a checkpoint written by 2
    processes cannot continue in 1 (FSDP would reshard the weights silently)."""
    ckpt = torch.load(runs["last"], map_location="cpu", weights_only=False)
    ckpt["world_size"] = 2
    path = runs["root"] / "two-ranks.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(SalsaError, match="world size 2, this run has 1"):
        fit(build(stage_outputs), prompts(stage_outputs, task_dir), runs["root"], 3, path)


# ----------------------------------------------------------------------------- SFT and reward stages

STEPS = 6  # optimizer steps of the small runs (16 rows a batch: less than an epoch)
SIGTERM_AFTER_3 = ["--trainer.callbacks+=cli_plugins.SigtermAt", "--trainer.callbacks.step", "3"]


def stage_args(stage: str, out: dict[str, Path], task_dir: Path, root: Path) -> list[str]:
    """``salsa fit`` of the shipped ``configs/<stage>.yaml`` (its checkpoint callback included),
    small, with everything it writes under ``root``."""
    args = [
        "fit", "--config", str(CONFIGS / f"{stage}.yaml"),
        "--data.init_args.task_dir", str(task_dir), "--data.init_args.batch_size", "16",
        "--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        "--model.init_args.export_dir", str(root / "export"),
    ]  # fmt: skip
    if stage == "reward":
        sft = str(out["sft-1"])
        args += ["--model.init_args.model", sft, "--data.init_args.tokenizer", sft]
    return args


def salsa(args: list[str]) -> tuple[int, str]:
    """``salsa <args>`` in this process: (exit status, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


@pytest.fixture(scope="module", params=["sft", "reward"])
def stopped(request, stage_outputs, task_dir, tmp_path_factory):
    """A stage run uninterrupted; the same run stopped by SIGTERM after step 3, then resumed
    with ``--ckpt_path last``."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"sigterm-{stage}")
    full = stage_args(stage, stage_outputs, task_dir, root / "full")
    assert main(full) == 0
    args = stage_args(stage, stage_outputs, task_dir, root / "stopped")
    code, err = salsa(args + SIGTERM_AFTER_3)
    (last,) = (root / "stopped").rglob("last.ckpt")
    at_stop = torch.load(last, weights_only=False)
    exported_on_stop = (root / "stopped" / "export").exists()
    assert main([*args, "--ckpt_path", "last"]) == 0
    return dict(
        stage=stage, out=stage_outputs, task_dir=task_dir, root=root, args=args, code=code,
        err=err, last=last, at_stop=at_stop, exported_on_stop=exported_on_stop,
    )  # fmt: skip


def test_sigterm_mid_fit_exits_143_with_a_resumable_last_ckpt_and_no_export(stopped):
    assert stopped["code"] == 143
    assert not stopped["exported_on_stop"]
    assert stopped["at_stop"]["global_step"] == 3
    (line,) = [x for x in stopped["err"].splitlines() if "SIGTERM" in x]
    assert line == (
        f"stopped by SIGTERM: {stopped['last']} written after step 3; resume with the same "
        "command and --ckpt_path last"
    )


def test_sft_and_reward_resume_from_last_to_the_uninterrupted_weights(stopped):
    full = load_file(stopped["root"] / "full" / "export" / "model.safetensors")
    resumed = load_file(stopped["root"] / "stopped" / "export" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # The runs moved: the stop's weights are not the end's.
    (name, first), *_ = stopped["at_stop"]["state_dict"].items()
    assert not torch.equal(first, full[name.removeprefix("model.")])
    # The resumed run kept last.ckpt current (the final weights, before the export) in place.
    assert torch.load(stopped["last"], weights_only=False)["global_step"] == STEPS
    assert [p.name for p in stopped["last"].parent.iterdir()] == ["last.ckpt"]


def test_the_yaml_checkpoint_callback_leaves_the_training_unchanged(stopped):
    """The quickstart's numbers do not move: without the callback, the same export."""
    root = stopped["root"] / "unchecked"
    args = stage_args(stopped["stage"], stopped["out"], stopped["task_dir"], root)
    assert main([*args, "--trainer.enable_checkpointing", "false"]) == 0
    assert not list(root.rglob("*.ckpt"))
    full = (stopped["root"] / "full" / "export" / "model.safetensors").read_bytes()
    assert (root / "export" / "model.safetensors").read_bytes() == full


def test_resume_refuses_a_checkpoint_written_with_another_seed(stopped):
    code, err = salsa([*stopped["args"], "--seed_everything", "2", "--ckpt_path", "last"])
    assert code == 2
    assert "seed_everything: 1 in the checkpoint, 2 here" in err
