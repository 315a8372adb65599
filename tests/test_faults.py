"""Failures that come with long runs end in a clear state (issue 28): SIGTERM (pre-emption) in a
pipeline stage, under FSDP and during a soup; too little disk space, found before training and
during a write; non-finite weights; a soup input listed twice. Stages run as shipped (their YAMLs),
small; full disks are real (a tmpfs of a few MiB, mounted as root).

The SFT and reward stages' own SIGTERM stop and bit-identical resume are in ``test_resume.py``,
the RL stage's in ``test_reliability.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS
from safetensors.torch import load_file, save_file

from salsa_lightning import outputs
from salsa_lightning.cli import main
from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import TMP_MARK, written_aside
from salsa_lightning.pipeline import run_pipeline
from salsa_lightning.soup import write_soup
from salsa_lightning.stage_module import AsideCheckpointIO

TESTS = Path(__file__).parent
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),  # cli_plugins
}


def sft_args(task_dir: Path, root: str | Path, steps: int = 6) -> list[str]:
    """Flags for a small ``salsa fit --config configs/sft.yaml`` that writes under ``root``
    (16 rows a batch, ``steps`` steps, one metrics row per step)."""
    return [
        "--data.init_args.task_dir", str(task_dir), "--data.init_args.batch_size", "16",
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", f"{root}/logs",
        "--model.init_args.export_dir", f"{root}/export",
    ]  # fmt: skip


def sigterm_after(step: int, rank: int = 0) -> list[str]:
    return [
        "--trainer.callbacks+=cli_plugins.SigtermAt",
        "--trainer.callbacks.step", str(step), "--trainer.callbacks.rank", str(rank),
    ]  # fmt: skip


def salsa(args: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """``salsa <args>`` in this process: (exit status, what it printed on stderr)."""
    err, previous = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or previous)
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(previous)
    return code, err.getvalue()


def stop_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_the_pipeline_in_its_stage_and_a_rerun_resumes_the_stage(task_dir, tmp_path):
    """``salsa pipeline`` gets SIGTERM in a fit stage: exit 143, a line naming the stage, no
    export; run again, the stage continues from its last.ckpt (one log, each step once)."""
    root = tmp_path / "run"

    def pipeline(extra: list[str]) -> Path:
        stage = {"name": "sft", "command": "fit", "configs": [str(CONFIGS / "sft.yaml")],
                 "args": sft_args(task_dir, "sft") + extra, "outputs": ["sft/export"]}  # fmt: skip
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({"stages": [stage]}))
        return path

    proc = subprocess.run(
        [sys.executable, "-m", "salsa_lightning.cli", "pipeline", "--config",
         str(pipeline(sigterm_after(3))), "--output", str(root)],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = Path("sft/logs/sft/version_0/checkpoints/last.ckpt")
    assert stop_lines(proc.stderr) == [
        f"stopped by SIGTERM: {last} written after step 3; resume with the same command and "
        "--ckpt_path last",
        "stopped by SIGTERM: the pipeline stopped in stage 'sft'; run the same command again: "
        "finished stages are skipped and this one resumes from its last.ckpt",
    ]
    assert not (root / "sft/export").exists()

    run_pipeline(pipeline([]), root)
    assert (root / "sft/export/model.safetensors").is_file()
    assert torch.load(root / last, weights_only=False)["global_step"] == 6
    assert [p.name for p in (root / "sft/logs/sft").iterdir()] == ["version_0"]
    rows = list(csv.DictReader((root / "sft/logs/sft/version_0/metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2, 3, 4, 5]


def test_sigterm_in_a_run_without_checkpointing_exits_143_and_says_nothing_was_kept(
    task_dir, tmp_path
):
    args = ["fit", "--config", CONFIGS / "sft.yaml", *sft_args(task_dir, tmp_path),
            "--trainer.enable_checkpointing", "false", *sigterm_after(3)]  # fmt: skip
    code, err = salsa(args)
    assert code == 143
    assert stop_lines(err) == [
        "stopped by SIGTERM: no checkpoint written after step 3 (this run has no checkpoint "
        "callback: trainer.enable_checkpointing is false); a rerun starts over"
    ]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "export").exists()


@pytest.mark.slow
def test_sigterm_on_one_fsdp_rank_stops_every_rank_after_the_same_step(task_dir, tmp_path):
    """SIGTERM reaches rank 1 only (rank 0 never sees it): both ranks stop after step 2, write
    the sharded last.ckpt together and exit 143 (no rank waits in a collective); the run resumes
    from it to the end."""
    args = [
        "fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "fsdp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        *sft_args(task_dir, tmp_path), "--data.init_args.batch_size", "8",
    ]  # fmt: skip

    def run(extra: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "salsa_lightning.cli", *args, *extra], cwd=tmp_path,
            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=540,
        )  # fmt: skip

    stopped = run(sigterm_after(2, rank=1))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "logs/sft/version_0/checkpoints/last.ckpt"
    assert stop_lines(stopped.stderr) == [
        f"stopped by SIGTERM: {last} written after step 2; resume with the same command and "
        "--ckpt_path last"
    ]  # one line, from rank 0, though rank 1 got the signal
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 2 and meta["world_size"] == 2
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "export").exists()

    resumed = run(["--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 6
    assert (tmp_path / "export/model.safetensors").is_file()


def test_the_process_group_ends_after_the_sharded_model_it_served_is_freed(tmp_path):
    """``end_process_group`` (the end of every ``salsa`` command, on every rank) frees what the
    run left before it destroys the group. An FSDP2 model is freed only by the collector (its
    state and hooks hold each other) and holds gloo's last collective works: left to the
    interpreter's exit, gloo aborted one 2-process ``salsa fit`` in ten, its work done."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from salsa_lightning.sharding import end_process_group

    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    gc.disable()  # the collector runs only when end_process_group runs it
    try:
        model = fully_shard(torch.nn.Linear(4, 4))
        model(torch.ones(2, 4)).sum().backward()
        alive = weakref.ref(model)
        del model
        assert alive() is not None  # a cycle: only the collector frees it
        end_process_group()
        assert alive() is None and not dist.is_initialized()
        end_process_group()  # no group: nothing to do
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sigterm_during_a_soup_removes_its_temporary_and_says_so(tmp_path):
    """A soup big enough to be caught writing (2 x 128 MB); SIGTERM as soon as its hidden
    temporary appears: exit 143, one line naming the temporary it removed, nothing left."""
    inputs = []
    for seed in (1, 2):
        d = tmp_path / f"in{seed}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        g = torch.Generator().manual_seed(seed)
        tensors = {f"w{i}": torch.randn(1_000_000, generator=g) for i in range(32)}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        inputs.append(str(d))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "salsa_lightning.cli", "soup", "--checkpoints", *inputs,
         "--output", str(out / "soup")],
        env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (temporaries := list(out.glob(f".soup{TMP_MARK}*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no temporary was seen"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (tmp,) = temporaries
    assert stop_lines(err) == [
        f"stopped by SIGTERM: removed the unfinished {tmp}; {out / 'soup'} is as it was"
    ]
    assert list(out.iterdir()) == []


def test_an_interrupt_while_an_output_is_replaced_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """Overwriting an output renames the old one aside before the new one takes its place: a
    Ctrl-C between the two renames puts the old one back (before, it had been deleted first)."""
    target = tmp_path / "soup"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    rename = os.replace

    def interrupted_when_the_new_one_moves_in(src, dst):
        if Path(src).name.endswith(TMP_MARK + str(os.getpid())):
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupted_when_the_new_one_moves_in)
    with pytest.raises(KeyboardInterrupt) as caught, written_aside(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert caught.value.__notes__ == [f"removed the unfinished {tmp}; {target} is as it was"]
    assert [p.name for p in tmp_path.iterdir()] == ["soup"]
    assert (target / "model.safetensors").read_text() == "old"


def test_a_replaced_output_leaves_nothing_aside_and_a_dead_runs_aside_is_removed(tmp_path):
    target = tmp_path / "soup"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".soup{TMP_MARK}{dead}.old"  # a run killed while removing the old one
    stale.mkdir()
    with written_aside(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["soup"]
    assert (target / "model.safetensors").read_text() == "new"


# ----------------------------------------------------------------------------- full disks


@pytest.fixture
def disk(tmp_path):
    """``disk(size)``: a real file system of ``size`` (tmpfs), unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs root (mount -t tmpfs)")
        path = tmp_path / f"disk-{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # even with a file open


@pytest.mark.parametrize("what", ["export", "checkpoint", "soup"])
def test_too_little_space_is_refused_with_the_figures_before_anything_trains(
    what, disk, stage_outputs, task_dir, tmp_path
):
    full = disk("1m")
    args = ["fit", "--config", CONFIGS / "sft.yaml", *sft_args(task_dir, tmp_path)]
    if what == "export":
        args += ["--model.init_args.export_dir", full / "sft"]
        size, where = "3.8 MB", f"the export '{full / 'sft'}'"
    elif what == "checkpoint":
        args += ["--trainer.callbacks.dirpath", full / "ckpt"]
        size, where = "11.3 MB", f"a checkpoint '{full / 'ckpt'}'"  # weights + Adam's moments
    else:
        args = ["soup", "--checkpoints", stage_outputs["sft-1"], stage_outputs["sft-2"],
                "--output", full / "soup"]  # fmt: skip
        size, where = "3.8 MB", f"the soup '{full / 'soup'}'"
    code, err = salsa(args)
    assert code == 2
    assert (
        f"error: not enough disk space for {where} ({size}): {size} needed, 1.0 MB free in " in err
    )
    assert list(full.iterdir()) == []
    assert not list(tmp_path.rglob("metrics.csv"))  # no step ran


def test_a_disk_filled_during_training_fails_the_export_in_one_line_and_keeps_the_weights(
    disk, task_dir, tmp_path
):
    """The export's disk had room when training started and is full when the export is
    written (another job filled it): one line names the directory, the temporary is gone, and
    the trained weights are in the last.ckpt written before the export."""
    full = disk("6m")
    args = [
        "fit", "--config", CONFIGS / "sft.yaml", *sft_args(task_dir, tmp_path),
        "--model.init_args.export_dir", full / "sft",
        "--trainer.callbacks+=cli_plugins.FillDiskWhenTrainingEnds",
        "--trainer.callbacks.path", full / "other-job", "--trainer.callbacks.leave", "100000",
    ]  # fmt: skip
    code, err = salsa(args)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    last = tmp_path / "logs/sft/version_0/checkpoints/last.ckpt"
    assert line.startswith(f"error: no space left on the device of '{full}' while writing sft")
    assert f"The trained weights are in {last} (written before the export)" in line
    assert [p.name for p in full.iterdir()] == ["other-job"]  # no temporary, no export
    kept = torch.load(last, weights_only=False)
    assert kept["global_step"] == 6
    assert all(bool(torch.isfinite(t).all()) for t in kept["state_dict"].values())


def test_a_checkpoint_write_that_finds_the_disk_full_keeps_the_previous_one(disk):
    """Lightning's own writer replaced a good last.ckpt with a truncated one on a full disk."""
    path = disk("1m") / "last.ckpt"
    io_ = AsideCheckpointIO()
    io_.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(SalsaError, match=rf"no space left on the device of '{path.parent}'"):
        io_.save_checkpoint({"step": 2, "w": torch.ones(1_000_000)}, path)  # 4 MB
    assert torch.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("what", ["a checkpoint", "the export"])
def test_non_finite_weights_are_never_checkpointed_or_exported(what, task_dir, tmp_path):
    """A learning rate of 1e30 makes the weights NaN at step 3: the step-3 checkpoint (or, with
    checkpointing off, the export) is refused naming the tensor; what was kept is finite."""
    args = ["fit", "--config", CONFIGS / "sft.yaml", *sft_args(task_dir, tmp_path, steps=3),
            "--model.init_args.optimizer.init_args.lr", "1e30"]  # fmt: skip
    if what == "a checkpoint":
        args += ["--trainer.callbacks.every_n_train_steps", "1"]
    else:
        args += ["--trainer.enable_checkpointing", "false"]
    code, err = salsa(args)
    assert code == 2
    name = "model.embed_tokens.weight"  # as the export names it; the module adds "model."
    name = f"model.{name}" if what == "a checkpoint" else name
    assert (
        f"error: not writing {what}: the trainable weight '{name}' holds NaN or inf after step 3. "
        "The run diverged: lower the learning rate" in err
    )
    assert not (tmp_path / "export").exists()
    for kept in tmp_path.rglob("*.ckpt"):  # the last good one, step 2
        state = torch.load(kept, weights_only=False)
        assert state["global_step"] == 2
        assert all(bool(torch.isfinite(t).all()) for t in state["state_dict"].values())
    assert bool(list(tmp_path.rglob("*.ckpt"))) == (what == "a checkpoint")


# ----------------------------------------------------------------------------- soups


@pytest.mark.parametrize("how", ["path", "copy"])
def test_a_soup_input_listed_twice_is_warned_about_by_name(how, stage_outputs, tmp_path):
    sft1 = stage_outputs["sft-1"]
    twice = sft1 if how == "path" else Path(shutil.copytree(sft1, tmp_path / "sft-1-copy"))
    why = "are the same directory" if how == "path" else "hold identical weight files"
    with pytest.warns(UserWarning, match=rf"soup inputs 1 \({sft1}\) and 3 \({twice}\) {why}"):
        write_soup([sft1, stage_outputs["sft-2"], twice], None, tmp_path / "soup")
    assert (tmp_path / "soup/model.safetensors").is_file()  # a valid soup: warned, not refused


def test_loading_refuses_nan_or_inf_but_not_a_finite_weight_whose_sum_overflows():
    """The load-time check (a float32 sum first): a weight with NaN and inf is refused with the
    file, the tensor and the count; a finite weight whose float32 sum overflows (8 x 3e38) and
    a bf16 weight are accepted; integer tensors are not checked."""
    from salsa_lightning.soup.files import check_finite

    bad = torch.ones(6)
    bad[1], bad[4] = float("nan"), float("inf")
    with pytest.raises(SalsaError, match=r"^ckpt/model.safetensors: tensor 'w' holds 2 non-finite"):
        check_finite(bad, "w", "ckpt/model.safetensors")
    check_finite(torch.full((8,), 3e38), "big", "ckpt/model.safetensors")
    check_finite(torch.randn(4, 4, dtype=torch.bfloat16), "bf16", "ckpt/model.safetensors")
    check_finite(torch.arange(3), "ids", "ckpt/model.safetensors")


def resident_mib(path: Path) -> float:
    """MiB of ``path``'s pages that this process maps and holds resident (Linux's smaps)."""
    kib, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            mapped = fields[-1] == str(path.resolve())
        elif mapped and fields[0] == "Rss:":
            kib += int(fields[1])
    return kib / 1024


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's smaps")
def test_loading_checks_the_weights_without_keeping_the_checkpoint_resident(tmp_path):
    """``load_pretrained`` reads the checkpoint tensor by tensor for its finite check, each file
    mapped only for its read: the model's own mapping keeps only what loading touched, so a
    reward model's 4 MiB embedding (its forward reads only its tokens' rows) stays out of the
    process's RSS, where summing the loaded weights made the whole file resident. A NaN is still
    refused by file and tensor, and so is a float32 weight that overflows the float16 the model
    is loaded in."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig
    from transformers import LlamaForSequenceClassification as Llama

    from salsa_lightning.pretrained import load_pretrained

    config = LlamaConfig(
        vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    Llama(config).save_pretrained(tmp_path / "rm")
    file = tmp_path / "rm/model.safetensors"
    model = load_pretrained(AutoModelForSequenceClassification, tmp_path / "rm")
    assert model.model.embed_tokens.weight.shape == (8192, 128)  # 4 MiB in float32
    assert resident_mib(file) < 1.0, f"{resident_mib(file):.2f} MiB of the file resident"

    name, weights = "model.embed_tokens.weight", load_file(file)
    for value, dtype in [(float("nan"), None), (1e5, torch.float16)]:
        weights[name][5, 7] = value
        save_file(weights, file, metadata={"format": "pt"})
        with pytest.raises(SalsaError, match=rf"rm/model.safetensors: tensor '{name}' holds 1 "):
            load_pretrained(AutoModelForSequenceClassification, tmp_path / "rm", dtype=dtype)
    weights[name][5, 7] = 1e5  # finite in float32: loaded as float32, it is accepted
    save_file(weights, file, metadata={"format": "pt"})
    load_pretrained(AutoModelForSequenceClassification, tmp_path / "rm")


def test_first_nonfinite_finds_the_first_weight_with_nan_or_inf():
    """Hand-built tensors: the index of the first one holding NaN or inf, integers skipped; a
    float16 weight whose values sum beyond float16's range (65504) is still finite, as the sum
    runs in float32."""
    from salsa_lightning.stage_module import first_nonfinite

    ok = torch.ones(3)
    nan = torch.tensor([1.0, float("nan")])
    inf = torch.tensor([float("-inf"), 2.0])
    big = torch.full((8,), 60000.0, dtype=torch.float16)
    assert first_nonfinite([ok, nan, inf]) == 1
    assert first_nonfinite([ok, torch.arange(3), inf]) == 2
    assert first_nonfinite([ok, big, torch.zeros(0)]) is None
    assert first_nonfinite([torch.arange(3)]) is None
