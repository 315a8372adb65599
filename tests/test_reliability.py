"""Reliability as documented (issue 13): resuming with ``--ckpt_path last``, settings that
conflict with a checkpoint, outputs that cannot be written, work written aside, and every bad
input (data, settings, reward functions, weights, tokenizers, reward models) refused before any
model is built or any step runs, with a message that names the culprit."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import BASE, make_trainer
from safetensors.torch import load_file, save_file
from test_fsdp import salsa_args
from test_salsa import build, fit, prompts, snapshot
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from salsa_lightning import (
    PreferenceDataModule,
    PromptDataModule,
    SalsaError,
    SALSAModule,
    SFTDataModule,
)
from salsa_lightning.cli import main
from salsa_lightning.evaluate import evaluate, load_answers
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.landscape import landscape
from salsa_lightning.lora import LoraSettings
from salsa_lightning.outputs import PROBE_PREFIX, TMP_MARK, check_output_dir
from salsa_lightning.ppo import PPOSettings
from salsa_lightning.report import Method, ReportSpec, write_report
from salsa_lightning.reward import sampled_pairs
from salsa_lightning.scoring import sequence_scores
from salsa_lightning.soup import write_soup
from salsa_lightning.task import pretraining_rows, write_pretraining_files

TOK = str(BASE)
UNWRITABLE = "/proc/1"  # no user, root included, may create a directory here


def cli(args: list[str], cwd: Path, capsys) -> tuple[int, str]:
    """``salsa <args>`` in this process from ``cwd``: (exit status, what it printed on stderr)."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(args)
    finally:
        os.chdir(previous)
    return code, capsys.readouterr().err


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- resume (1, 2, 4)

# A last.ckpt after every rollout (one optimizer step each: ppo.epochs 1, one minibatch).
EVERY_ROLLOUT = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0, every_n_train_steps: 1}
"""
SAMPLED = ["--model.init_args.generation.do_sample", "true"]


def rl_args(stage_outputs, task_dir, root: Path, steps: int, overlay: Path) -> list[str]:
    args = salsa_args(stage_outputs, task_dir, root, batch=8) + SAMPLED
    args[args.index("--trainer.limit_train_batches") + 1] = "4"
    args[args.index("--trainer.val_check_interval") + 1] = "4"
    return args + ["--config", str(overlay), "--trainer.max_steps", str(steps)]


def metric_rows(root: Path) -> list[dict[str, str]]:
    (path,) = (root / "logs").rglob("metrics.csv")
    return [r for r in csv.DictReader(path.open()) if r.get("train/rollouts")]


@pytest.fixture(scope="module")
def resumed(stage_outputs, task_dir, tmp_path_factory):
    """Two rollouts uninterrupted; one rollout, then ``--ckpt_path last`` to two."""
    root = tmp_path_factory.mktemp("ckpt-last")
    overlay = write_yaml(root / "every-rollout.yaml", EVERY_ROLLOUT)
    full, part = root / "full", root / "part"
    assert main(rl_args(stage_outputs, task_dir, full, 2, overlay)) == 0
    assert main(rl_args(stage_outputs, task_dir, part, 1, overlay)) == 0  # "killed" after 1
    resume = rl_args(stage_outputs, task_dir, part, 2, overlay) + ["--ckpt_path", "last"]
    resume[resume.index("--model.init_args.export_dir") + 1] = str(part / "resumed-policy")
    assert main(resume) == 0
    return {"root": root, "full": full, "part": part, "overlay": overlay, "resume": resume}


def test_ckpt_path_last_resumes_in_the_same_log_directory(resumed):
    full, part = resumed["full"], resumed["part"]
    assert [p.name for p in (part / "logs" / "salsa").iterdir()] == ["version_0"]
    a, b = metric_rows(full), metric_rows(part)
    # The resumed run continued at rollout 2 (no replay of rollout 1, no fresh start), logged
    # in the interrupted run's metrics file, and rollout 2 is the uninterrupted run's.
    assert [r["train/rollouts"] for r in b] == ["1.0", "2.0"] == [r["train/rollouts"] for r in a]
    for key in ("objective/scores", "objective/kl", "loss/policy", "objective/entropy"):
        assert float(b[1][key]) == pytest.approx(float(a[1][key]), abs=1e-6), key
    assert float(a[0]["objective/kl"]) != float(a[1]["objective/kl"])  # the runs moved
    # The export honours the resumed run's own export_dir.
    assert (part / "resumed-policy" / "config.json").is_file()


def test_global_step_counts_optimizer_steps_and_train_rollouts_counts_rollouts(
    resumed, stage_outputs, task_dir, capsys
):
    """Two optimizer steps per rollout (2 PPO epochs): trainer.max_steps 4 is 2 rollouts."""
    root = resumed["root"] / "two-epochs"
    args = rl_args(stage_outputs, task_dir, root, 4, resumed["overlay"])
    args[args.index("--model.init_args.ppo.epochs") + 1] = "2"
    code, _ = cli(args, resumed["root"], capsys)
    assert code == 0
    rows = metric_rows(root)
    assert [r["train/rollouts"] for r in rows] == ["1.0", "2.0"]
    assert (
        next(root.rglob("last.ckpt"))
        and torch.load(next(root.rglob("last.ckpt")), weights_only=False)["global_step"] == 4
    )


def test_resume_refuses_a_changed_setting_by_name(resumed, capsys):
    args = list(resumed["resume"])
    args[args.index("--model.init_args.ppo.epochs") + 1] = "2"
    args += ["--model.init_args.kl", "{coef: 0.2}"]
    code, err = cli(args, resumed["root"], capsys)
    assert code == 2
    assert "model.ppo.epochs: 1 in the checkpoint, 2 here" in err
    assert "model.kl.coef: 0.05 in the checkpoint, 0.2 here" in err
    assert "A resumed run may change only" in err and "model.export_dir" in err


def test_sigterm_mid_rl_fit_exits_143_and_its_last_ckpt_resumes_like_the_uninterrupted_run(
    resumed, stage_outputs, task_dir, capsys
):
    """SIGTERM after rollout 1 of 2: exit 143, one line, no export; --ckpt_path last runs
    rollout 2 as the uninterrupted run did."""
    root = resumed["root"] / "sigterm"
    args = rl_args(stage_outputs, task_dir, root, 2, resumed["overlay"])
    sigterm = ["--trainer.callbacks+=cli_plugins.SigtermAt", "--trainer.callbacks.step", "1"]
    code, err = cli([*args, *sigterm], resumed["root"], capsys)
    assert code == 143
    last = root / "logs/salsa/version_0/checkpoints/last.ckpt"
    assert [x for x in err.splitlines() if "SIGTERM" in x] == [
        f"stopped by SIGTERM: {last} written after step 1; resume with the same command and "
        "--ckpt_path last"
    ]
    assert not (root / "policy").exists()
    assert main([*args, "--ckpt_path", "last"]) == 0
    a, b = metric_rows(resumed["full"]), metric_rows(root)
    assert [r["train/rollouts"] for r in b] == ["1.0", "2.0"]
    for key in ("objective/scores", "objective/kl", "loss/policy", "objective/entropy"):
        assert [float(r[key]) for r in b] == pytest.approx([float(r[key]) for r in a], abs=1e-6)
    assert (root / "policy" / "config.json").is_file()


def test_ckpt_path_last_without_a_checkpoint_says_so_and_starts_fresh(
    stage_outputs, task_dir, tmp_path, caplog
):
    overlay = write_yaml(tmp_path / "every-rollout.yaml", EVERY_ROLLOUT)
    args = rl_args(stage_outputs, task_dir, tmp_path / "run", 1, overlay)
    # Lightning's logger stops propagating to the root, where caplog listens, when it is
    # imported before the root has a handler; whether pytest then listens on it as well
    # depends on pytest's version. Listen on it here.
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="lightning.pytorch"):
            assert main([*args, "--ckpt_path", "last"]) == 0
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert "--ckpt_path last: no last.ckpt in" in caplog.text
    assert len(metric_rows(tmp_path / "run")) == 1


def test_a_truncated_checkpoint_is_refused_by_name(resumed, tmp_path, capsys):
    last = next(resumed["part"].rglob("last.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    args = [a for a in resumed["resume"] if a != "last"][:-1] + ["--ckpt_path", str(broken)]
    code, err = cli(args, tmp_path, capsys)
    assert code == 2
    assert f"--ckpt_path '{broken}' cannot be read as a Lightning checkpoint" in err
    assert "truncated or corrupt" in err


# ----------------------------------------------------------------------------- outputs (5, 6, 7)


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_export_dir_that_cannot_be_written_is_refused_before_training(
    where, stage_outputs, task_dir, tmp_path
):
    (tmp_path / "a-file").write_text("")
    export = tmp_path / "a-file" / "out" if where == "under-a-file" else Path(UNWRITABLE) / "out"
    module = build(stage_outputs, export_dir=str(export))
    match = "is a file" if where == "under-a-file" else "is not writable"
    with pytest.raises(SalsaError, match=rf"export_dir '{export}' cannot be .*{match}"):
        fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1)
    assert module.policy is None  # nothing was built, let alone trained


def test_a_logger_directory_under_a_file_is_refused_before_anything_is_built(
    stage_outputs, task_dir, tmp_path, capsys
):
    (tmp_path / "a-file").write_text("")
    args = salsa_args(stage_outputs, task_dir, tmp_path / "run", batch=8)
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = str(tmp_path / "a-file/logs")
    code, err = cli(args, tmp_path, capsys)
    assert code == 2 and "trainer.logger save_dir" in err and "is a file" in err
    assert not (tmp_path / "run" / "policy").exists()


def test_a_logger_directory_its_folder_refuses_is_refused_before_anything_is_built(
    stage_outputs, task_dir, tmp_path, capsys
):
    """``/proc`` passes ``os.access`` for root but refuses a new folder: the run ended in a
    traceback from the CSV logger's makedirs, after the models were built."""
    args = salsa_args(stage_outputs, task_dir, tmp_path / "run", batch=8)
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = "/proc/salsa-logs"
    code, err = cli(args, tmp_path, capsys)
    assert code == 2
    assert "trainer.logger save_dir '/proc/salsa-logs' cannot be created: '/proc' refused" in err
    assert not (tmp_path / "run" / "policy").exists()
    assert not list(Path("/proc").glob(f"{PROBE_PREFIX}*"))


def test_the_output_check_leaves_nothing_and_is_not_fooled_by_another_ranks_probe(tmp_path):
    """The check makes and removes a folder where a new output will go; an existing output
    that holds only another rank's probe of that moment still counts as empty."""
    check_output_dir(tmp_path / "new" / "deeper", overwrite=False, what="export_dir")
    assert not list(tmp_path.iterdir())
    (tmp_path / "out" / f"{PROBE_PREFIX}abc").mkdir(parents=True)
    check_output_dir(tmp_path / "out", overwrite=False, what="export_dir")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SalsaError, match=r"export_dir '.*out' already holds files"):
        check_output_dir(tmp_path / "out", overwrite=False, what="export_dir")


class FailsOnSecondModel:
    """A judge that scores the first model's answers, then fails (as a crash mid-run would)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, answers):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("judge crashed")
        return torch.zeros(len(answers))


def small_evaluation(stage_outputs, task_files, output: Path) -> dict:
    """``evaluate`` arguments: sft-1 as ``a`` and sft-2 as ``b`` on 8 validation prompts
    (``val``), 4 new tokens, into ``output``."""
    return dict(
        models={"a": str(stage_outputs["sft-1"]), "b": str(stage_outputs["sft-2"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(output),
        max_prompts=8,
        generation=GenerationSettings(max_new_tokens=4),
        batch_size=8,
    )


def test_a_failing_evaluation_leaves_the_previous_output_untouched(
    stage_outputs, task_files, tmp_path
):
    """The run fails after the first model was evaluated: the previous output (results,
    report, answers) stays byte for byte, and no temporary directory is left."""
    kw = {**small_evaluation(stage_outputs, task_files, tmp_path / "eval"), "overwrite": True}
    evaluate(**kw)
    before = {p: p.read_bytes() for p in (tmp_path / "eval").rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="judge crashed"):
        evaluate(**{**kw, "max_prompts": 4}, reward_fn=FailsOnSecondModel())
    after = {p: p.read_bytes() for p in (tmp_path / "eval").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_truncated_weights_are_refused_before_anything_is_generated(
    stage_outputs, task_files, tmp_path
):
    broken = shutil.copytree(stage_outputs["sft-2"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SalsaError, match=rf"{weights}: cannot read it as safetensors"):
        evaluate(
            models={"a": str(stage_outputs["sft-1"]), "b": str(broken)},
            prompts={"val": str(task_files["prompts_val"])},
            output=str(tmp_path / "eval"),
        )
    assert not (tmp_path / "eval").exists()


def test_a_killed_soup_leaves_nothing_that_a_later_run_keeps(stage_outputs, tmp_path):
    dead = tmp_path / f".soup{TMP_MARK}999999999"  # no such process
    alive = tmp_path / f".soup{TMP_MARK}{os.getppid()}"  # another run, still going
    for d in (dead, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
    write_soup([str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"])], None, tmp_path / "soup")
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    assert not dead.exists() and alive.exists()


def test_the_report_is_written_whole_and_a_crash_leaves_the_last_one(
    stage_outputs, task_files, tmp_path, monkeypatch
):
    evaluate(**small_evaluation(stage_outputs, task_files, tmp_path / "eval"))
    log = tmp_path / "logs" / "b" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("step,eval/kl,eval/gold\n3,0.1,0.5\n7,0.2,0.6\n")
    spec = ReportSpec(
        evaluation="eval",
        output="report",
        baselines={"sft": "a"},
        methods={"b": Method(models=["b"], logs=["logs/b"], reference="sft")},
        comparisons=[["b", "sft"]],
    )
    write_report(tmp_path, spec)
    report = tmp_path / "report"
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    assert set(before) == {"summary.json", "report.json", "report.md", "frontier.png"}
    gold = load_answers(tmp_path / "eval")["val"]["b"]["gold"]
    assert json.loads(before["summary.json"])["b_gold"] == pytest.approx(gold.mean().item())

    def crashes(curves, path):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr("salsa_lightning.report.plot_frontier", crashes)
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, spec)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # no temporaries


def test_interrupted_pretraining_text_leaves_the_last_file_and_no_temporary(tmp_path, monkeypatch):
    paths = write_pretraining_files(tmp_path, n_train=40, n_val=4)
    before = paths["train"].read_bytes()
    stale = tmp_path / f".train.jsonl{TMP_MARK}999999999"  # a killed run's, no such process
    stale.write_text("half")

    def rows_then_interrupt(n, seed):
        yield from pretraining_rows(3, seed)
        raise KeyboardInterrupt

    monkeypatch.setattr("salsa_lightning.task.pretraining_rows", rows_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_pretraining_files(tmp_path, n_train=40, n_val=4, seed=1)
    assert paths["train"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "val.jsonl"]


# ----------------------------------------------------------------------------- reward functions (8)


class Returns:
    """A reward function returning what a test gives it, whatever the batch."""

    def __init__(self, make) -> None:
        self.make = make

    def __call__(self, prompts, responses):
        return self.make(len(responses))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda n: [1.0] * n, r"returned a list; it must return a torch.Tensor of shape \[8\]"),
        (lambda n: np.ones(n), r"returned a ndarray; it must return a torch.Tensor"),
        (lambda n: torch.tensor(1.0), r"returned a tensor of shape \[\] for 8 responses"),
        (lambda n: torch.ones(n, 1), r"returned a tensor of shape \[8, 1\] for 8 responses"),
        (lambda n: torch.ones(n, 3), r"returned a tensor of shape \[8, 3\]"),
        (lambda n: torch.ones(n - 1), r"returned a tensor of shape \[7\] for 8 responses"),
    ],
    ids=["list", "numpy", "0-d", "B-by-1", "B-by-3", "B-minus-1"],
)
def test_a_reward_function_output_of_the_wrong_kind_is_refused(
    make, match, stage_outputs, task_dir, tmp_path
):
    module = build(stage_outputs, reward_model=None, reward_fn=Returns(make))
    with pytest.raises(SalsaError, match=rf"model.reward_fn Returns {match}"):
        fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1)


def test_an_infinite_reward_skips_the_update_instead_of_being_clipped(
    stage_outputs, task_dir, tmp_path
):
    inf_first = Returns(lambda n: torch.cat([torch.tensor([math.inf]), torch.zeros(n - 1)]))
    L.seed_everything(0)
    module = build(stage_outputs, reward_model=None, reward_fn=inf_first)
    with pytest.warns(UserWarning, match="non-finite reward"):
        _, recorder = fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1)
    assert module.skips == 1
    assert "loss/policy" not in recorder.metrics[-1]
    assert all(
        torch.equal(v, recorder.start[f"policy.{k}"]) for k, v in snapshot(module.policy).items()
    )


# ----------------------------------------------------------------------------- weights (9)


def with_nan(src: Path, dst: Path) -> tuple[Path, str]:
    """A copy of a checkpoint with one weight turned NaN in place (same file size)."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.up_proj.weight"))
    weights[name][0, 0] = float("nan")
    size = (dst / "model.safetensors").stat().st_size
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    assert (dst / "model.safetensors").stat().st_size == size
    return dst, name


def test_a_nan_weight_is_refused_by_the_soup_naming_file_and_tensor(stage_outputs, tmp_path):
    bad, name = with_nan(stage_outputs["sft-2"], tmp_path / "sft-2-nan")
    with pytest.raises(
        SalsaError, match=rf"sft-2-nan/model.safetensors: tensor '{name}' holds 1 non-finite"
    ):
        write_soup([str(stage_outputs["sft-1"]), str(bad)], None, tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("role", ["reference", "reward_model"])
def test_a_nan_weight_in_any_input_model_is_refused(role, stage_outputs, task_dir, tmp_path):
    src = stage_outputs["sft-1" if role == "reference" else "reward"]
    bad, name = with_nan(src, tmp_path / "nan")
    if role == "reference":
        module = build(stage_outputs, checkpoints=("sft-1",), weights=(1.0,))
        module.reference.checkpoints = [str(bad)]
    else:
        module = build(stage_outputs, reward_model=str(bad))
    with pytest.raises(SalsaError, match=rf"nan/model.safetensors: tensor '.*{name}' holds"):
        fit(module, prompts(stage_outputs, task_dir), tmp_path / "run", rollouts=1)


# ----------------------------------------------------------------------------- data (10 and raw)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Reverse: a b", "response": "b a"}
PAIR = {"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b"}


@pytest.mark.parametrize(
    "cls, rows, match",
    [
        (
            SFTDataModule,
            [GOOD, {"prompt": "x", "response": None}],
            r"column 'response' is empty \(null or NaN\) in 1 row\(s\) \(first: row 2",
        ),
        (
            SFTDataModule,
            [GOOD, {"prompt": "x", "response": 5}],
            r"column 'response' holds a number, not text in 1 row",
        ),
        (
            PreferenceDataModule,
            [PAIR, '{"prompt": "x", "chosen": NaN, "rejected": "y"}'],
            r"column 'chosen' is empty \(null or NaN\) in 1 row\(s\) \(first: row 2",
        ),
        (SFTDataModule, [GOOD, '{"prompt": "x", "response": '], r"line 2 is not valid JSON"),
        (SFTDataModule, [], r"is empty: it holds no rows"),
        (
            PreferenceDataModule,
            [{**PAIR, "rejected": PAIR["chosen"]}] * 3,
            r"every train pair has chosen == rejected",
        ),
    ],
    ids=[
        "null-response",
        "number-response",
        "nan-chosen",
        "malformed-jsonl",
        "empty-file",
        "all-identical",
    ],
)
def test_bad_data_is_refused_naming_file_column_and_row(cls, rows, match, tmp_path):
    path = jsonl(tmp_path / "train.jsonl", rows)
    data = cls(tokenizer=TOK, train_files=str(path), val_fraction=0)
    with pytest.raises(SalsaError, match=match) as err:
        data.setup("fit")
    assert str(path.name) in str(err.value)


# ----------------------------------------------------------------------------- settings (raw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(generation=dict(max_new_tokens=0)),
            r"generation.max_new_tokens must be at least 1, got 0",
        ),
        (
            dict(generation=dict(temperature=0.0)),
            r"generation.temperature must be positive, got 0.0",
        ),
        (dict(ppo=dict(minibatch_size=0)), r"model.ppo.minibatch_size must be at least 1, got 0"),
    ],
    ids=["max_new_tokens-0", "temperature-0", "minibatch-0"],
)
def test_impossible_settings_are_refused_before_any_model_is_built(kwargs, match, stage_outputs):
    settings = {"generation": GenerationSettings, "ppo": PPOSettings}
    with pytest.raises(SalsaError, match=match):
        build(stage_outputs, **{k: settings[k](**v) for k, v in kwargs.items()})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), r"model.lora.r must be at least 1, got 0\."),
        (dict(alpha=-16), r"model.lora.alpha must be positive, got -16\."),
        (dict(dropout=1.0), r"model.lora.dropout must be in \[0, 1\), got 1.0\."),
        (dict(target_modules=[]), r"model.lora.target_modules must be non-empty, got \[\]\."),
    ],
    ids=["r-0", "alpha-negative", "dropout-1", "no-targets"],
)
def test_impossible_lora_settings_are_refused_by_name(kwargs, match):
    """Before any model is built (peft refuses r=0 only when it wraps the model, and a
    dropout of 1 not at all)."""
    with pytest.raises(SalsaError, match=match):
        LoraSettings(**kwargs)


@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [
        (
            dict(gradient_clip_val=0.5),
            r"trainer.gradient_clip_val \(0.5\): the PPO update clips its own gradients, at "
            r"model.ppo.max_grad_norm \(now 1.0\)",
        ),
        (
            dict(accumulate_grad_batches=2),
            r"trainer.accumulate_grad_batches \(2\): .* \(model.ppo.micro_batch_size 8 rows "
            r"of model.ppo.minibatch_size 8\)",
        ),
    ],
    ids=["gradient_clip_val", "accumulate_grad_batches"],
)
def test_the_trainers_clipping_and_accumulation_point_to_the_ppo_settings(
    trainer_kwargs, match, stage_outputs, task_dir, tmp_path
):
    """Lightning refuses both under manual optimization, telling the user to switch to
    automatic optimization; the message names the PPO settings that do the same instead."""
    module = build(stage_outputs)
    with pytest.raises(SalsaError, match=match):
        fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1, **trainer_kwargs)
    assert module.policy is None


# ----------------------------------------------------------------------------- tokenizer (11)


def test_a_policy_with_another_tokenizer_of_the_same_size_is_refused(
    stage_outputs, task_dir, tmp_path
):
    """Same vocabulary size, other tokens (two ids swapped): every shape check passes."""
    policy = shutil.copytree(stage_outputs["sft-1"], tmp_path / "policy")
    tok = json.loads((policy / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    (a, ia), (b, ib) = sorted(vocab.items(), key=lambda kv: kv[1])[-2:]
    vocab[a], vocab[b] = ib, ia
    (policy / "tokenizer.json").write_text(json.dumps(tok))
    assert len(AutoTokenizer.from_pretrained(policy)) == len(
        AutoTokenizer.from_pretrained(stage_outputs["sft-1"])
    )
    module = build(stage_outputs, policy=str(policy))
    with pytest.raises(SalsaError, match=rf"differs from the tokenizer of model.policy \({policy}"):
        fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1)
    assert module.policy is None


# ----------------------------------------------------------------------------- reward models (12)


def test_a_causal_lm_as_reward_model_is_refused_alike_by_fit_evaluate_and_landscape(
    stage_outputs, task_dir, task_files, tmp_path
):
    lm = str(stage_outputs["sft-1"])
    match = rf"reward_model '{lm}' has no one-label score head"
    with pytest.raises(SalsaError, match=match):
        fit(build(stage_outputs, reward_model=lm), prompts(stage_outputs, task_dir), tmp_path, 1)
    with pytest.raises(SalsaError, match=match):
        evaluate({"a": lm}, {"val": str(task_files["prompts_val"])}, str(tmp_path / "e"), lm)
    assert not (tmp_path / "e").exists()
    with pytest.raises(SalsaError, match=match):
        landscape([lm, str(stage_outputs["sft-2"])], str(task_files["prompts_val"]),
                  str(tmp_path / "l"), reward_model=lm)  # fmt: skip
    assert not (tmp_path / "l").exists()


def test_a_reward_model_as_a_causal_lm_is_refused_alike_by_evaluate_landscape_and_pairs(
    stage_outputs, task_files, tmp_path
):
    """transformers would load the classifier with a random LM head: evaluate and pairs ran on
    it (pairs wrote 0 pairs), landscape failed in its first soup."""
    rm, val = str(stage_outputs["reward"]), str(task_files["prompts_val"])
    match = rf"'{rm}' is a sequence classifier \(LlamaForSequenceClassification: a reward model\?\)"
    with pytest.raises(SalsaError, match=rf"model 'a' path {match}"):
        evaluate({"a": rm}, {"val": val}, str(tmp_path / "e"), rm)
    with pytest.raises(SalsaError, match=rf"checkpoint {match}"):
        landscape([rm, rm], val, str(tmp_path / "l"), reward_model=rm)
    with pytest.raises(SalsaError, match=rf"model {match}"):
        sampled_pairs(rm, val, str(tmp_path / "p"))
    assert not [p.name for p in tmp_path.iterdir()]  # nothing written


# ----------------------------------------------------------------------------- models (15, 16)


@pytest.fixture(scope="module")
def gpt2_outputs(stage_outputs, tmp_path_factory):
    """A GPT-2 (absolute positions, dropout 0.5 everywhere) SFT model and reward model on the
    embedded tokenizer."""
    root = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(TOK)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1,
    )  # fmt: skip
    out = {}
    for name, cls, seed in (
        ("sft", GPT2LMHeadModel, 0),
        ("reward", GPT2ForSequenceClassification, 1),
    ):
        torch.manual_seed(seed)
        cls(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_rl_samples_scores_and_updates_with_dropout_off(
    gpt2_outputs, stage_outputs, task_dir, tmp_path
):
    """A policy with dropout 0.5: the separate scoring pass and the first update pass see the
    same sub-network (none), so the first PPO ratio is exactly 1."""
    L.seed_everything(0)
    out = {**stage_outputs, "gpt2": gpt2_outputs["sft"]}
    ppo = PPOSettings(epochs=1, minibatch_size=8, micro_batch_size=8, score_in_first_pass=False)
    module = build(
        out,
        checkpoints=("gpt2",),
        weights=(1.0,),
        reward_model=str(gpt2_outputs["reward"]),
        ppo=ppo,
    )
    data = PromptDataModule(
        tokenizer=str(gpt2_outputs["sft"]), task_dir=str(task_dir), batch_size=8, max_length=48
    )
    _, recorder = fit(module, data, tmp_path, rollouts=1)
    assert recorder.metrics[0]["policy/approxkl"] == 0.0
    assert recorder.metrics[0]["policy/clipfrac"] == 0.0
    assert module.policy.training  # in train mode, and still no dropout


def test_the_reward_model_reads_a_left_padded_rollout_at_the_right_positions(gpt2_outputs):
    model = GPT2ForSequenceClassification.from_pretrained(gpt2_outputs["reward"]).eval()
    pad = model.config.pad_token_id
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    alone = torch.stack(
        [sequence_scores(model, torch.tensor([r]), torch.ones(1, len(r)))[0] for r in rows]
    )
    ids = torch.tensor([rows[0], [pad, pad, *rows[1]]])
    mask = (ids != pad).long()
    torch.testing.assert_close(sequence_scores(model, ids, mask), alone, rtol=1e-5, atol=1e-5)


def test_the_critic_registers_each_weight_once(stage_outputs, task_dir, tmp_path):
    module = build(stage_outputs)
    fit(module, prompts(stage_outputs, task_dir), tmp_path, rollouts=1)
    keys = list(module.critic.state_dict())
    assert keys and all(k.startswith("classifier.") for k in keys)
    params = list(module.critic.parameters())
    assert len(params) == len({id(p) for p in params}) == len(keys)


class RecordsBackward(SALSAModule):
    """Every micro-batch's loss is 1 (with the graph attached); records what the update
    backpropagates."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.backpropagated: list[float] = []

    def micro_batch_loss(self, mb, outputs):
        policy_loss, value_loss, stats = super().micro_batch_loss(mb, outputs)
        return policy_loss * 0 + 1, value_loss * 0, stats

    def manual_backward(self, loss, *args, **kwargs) -> None:
        self.backpropagated.append(float(loss.detach()))
        super().manual_backward(loss, *args, **kwargs)


def test_a_short_last_minibatch_weighs_its_micro_batches_by_rows(stage_outputs, task_dir, tmp_path):
    """12 prompts in batches of 16 (so one short rollout of 12 rows), minibatches of 16,
    micro-batches of 8: 8 and 4 rows, each loss 1: weighted 8/12 and 4/12, not both 1/2 (the
    nominal accumulation)."""
    rows = (task_dir / "prompts_train.jsonl").read_text().splitlines()[:12]
    (tmp_path / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    data = PromptDataModule(
        tokenizer=str(stage_outputs["sft-1"]), train_files=str(tmp_path / "prompts.jsonl"),
        val_fraction=0.0, batch_size=16, max_length=48, task_dir=str(task_dir),
    )  # fmt: skip
    ppo = PPOSettings(epochs=1, minibatch_size=16, micro_batch_size=8)
    module = build(stage_outputs, cls=RecordsBackward, ppo=ppo)
    trainer, _ = fit(module, data, tmp_path, rollouts=1)
    assert trainer.global_step == 1
    assert module.backpropagated == pytest.approx([8 / 12, 4 / 12])
    assert sum(module.backpropagated) == pytest.approx(1.0)  # the minibatch's mean loss


class ManualWithFrozenPart(L.LightningModule):
    """A plain Lightning module (not one of ours): manual optimization and a submodule in eval
    mode, the two things Lightning warns about."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer, self.frozen = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1).eval()

    def training_step(self, batch, batch_idx) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(batch).sum())
        opt.step()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def test_lightnings_false_alarms_are_silenced_during_our_fit_only(
    stage_outputs, task_dir, tmp_path
):
    """Lightning warns about the frozen models in eval mode and about a checkpoint written
    after the optimizer step under manual optimization: neither applies to SALSA-PPO, whose
    fit prints neither; the warning filters are as before once it ends, and a user's own module
    fitted next in the same process gets both warnings."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from salsa_lightning.false_alarms import FALSE_ALARMS

    def fit_recording(module, root: Path) -> list[str]:
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            if isinstance(module, SALSAModule):
                data = prompts(stage_outputs, task_dir)
                fit(module, data, root, rollouts=1, callbacks=[ckpt], enable_checkpointing=True)
            else:
                make_trainer(root, max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
                    module
                )
            assert warnings.filters == filters  # put back as they were
        return [str(w.message) for w in caught]

    def alarms(messages: list[str]) -> list[str]:
        return [m for m in messages for p, _ in FALSE_ALARMS if re.search(p, m)]

    ours = fit_recording(build(stage_outputs), tmp_path / "ours")
    # the checkpoint after the rollout (its 2 optimizer steps) was written where Lightning warns
    assert [p.name for p in (tmp_path / "ours" / "ckpt").glob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
    assert alarms(ours) == []
    theirs = alarms(fit_recording(ManualWithFrozenPart(), tmp_path / "theirs"))
    assert any(m.startswith("Found 1 module(s) in eval mode") for m in theirs), theirs
    assert any(m.startswith("Using ModelCheckpoint with manual optimization") for m in theirs)
