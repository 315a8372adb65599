"""``salsa pipeline`` and ``salsa quickstart``: the whole experiment as a list of stages.

A pipeline YAML lists stages, each one ``salsa`` command (``fit``, ``soup``, ``evaluate``,
``landscape``) with its YAML files and extra arguments, the paths it reads (``inputs``) and the
paths it writes (``outputs``). The driver checks, before anything runs, that every input exists
or is written by an earlier stage; it runs the stages in order from the output directory,
printing a line per stage, and skips a stage whose outputs all exist (so a rerun resumes); a fit
stage that was stopped (SIGTERM, a crash) resumes from its own ``last.ckpt``.
Started once per device (``torchrun``, ``srun``) or once per node (``NODE_RANK``), every process
runs the fit stages together and rank 0 alone runs the others (``pipeline_rank``).
Config paths are relative to the pipeline YAML (so a packaged pipeline runs the packaged
stages); stage paths are relative to the output directory.
``salsa quickstart [--output DIR]`` runs ``configs/quickstart.yaml`` and then writes the report.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from salsa_lightning.commands import run_command
from salsa_lightning.config_files import (
    SUFFIXES,
    config_flags,
    find_config,
    read_mapping,
    resolve_config_args,
)
from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import check_writable_dir


@dataclass
class Stage:
    """One step of a pipeline.

    Attributes:
        name: Shown in the progress lines.
        command: ``fit``, ``soup``, ``evaluate`` or ``landscape``.
        configs: YAML files, relative to the pipeline YAML (stacked in order).
        args: Extra command-line arguments, e.g. ``["--seed_everything", "2"]``.
        inputs: Paths the stage reads.
        outputs: Paths the stage writes; all present means done.
    """

    name: str
    command: str
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def check_plan(stages: list[Stage], root: Path, config_dir: Path) -> None:
    """Every config file exists and every input exists or comes from an earlier stage."""
    produced: set[str] = set()
    for stage in stages:
        for cfg in stage.configs:
            if not (config_dir / cfg).is_file():
                raise SalsaError(
                    f"stage {stage.name!r}: config file {str(config_dir / cfg)!r} does not exist."
                )
        for path in stage.inputs:
            if path not in produced and not (root / path).exists():
                raise SalsaError(
                    f"stage {stage.name!r} reads {path!r}, which neither exists under {root} nor is "
                    "an output of an earlier stage."
                )
        produced.update(stage.outputs)


def check_waitable(stages: list[Stage]) -> None:
    """With several processes, every stage that is not a fit names its outputs: rank 0 alone
    runs it, and the other ranks know it is done when they exist (without them they would go on
    at once, and wait for rank 0 in the next fit's rendezvous, which times out)."""
    for stage in stages:
        if stage.command != "fit" and not stage.outputs:
            raise SalsaError(
                f"stage {stage.name!r} (salsa {stage.command}) lists no outputs; with several "
                "processes rank 0 alone runs it and the others wait for its outputs: list what "
                "it writes under `outputs:`."
            )


def run_stage(stage: Stage, config_dir: Path, fit_args: list[str] | None = None) -> None:
    """Run one stage in this process; a fit stage's command line ends with ``fit_args``
    (:func:`fit_arguments`). A fit stage resumes from its own ``last.ckpt`` when an
    earlier run of it was stopped (``--ckpt_path last``; a new run when there is none). A stage
    that fails stops the pipeline, named: SIGTERM with :class:`Terminated` (status 143), any
    other failure with a :class:`SalsaError` or its own exception."""
    from salsa_lightning.sigterm import SIGTERM_STATUS, Terminated

    args = [stage.command]
    for cfg in stage.configs:
        args += ["--config", str(config_dir / cfg)]
    args += [str(a) for a in stage.args]
    if stage.command == "fit":
        args += fit_args or []
        args += [] if "--ckpt_path" in args else ["--ckpt_path", "last"]
    try:
        with stage_command_line(args):
            code = run_command(args)
    except Exception as err:
        err.add_note(f"(in stage {stage.name!r} of the pipeline)")
        raise
    if code == SIGTERM_STATUS:
        stop = Terminated()
        stop.add_note(
            f"the pipeline stopped in stage {stage.name!r}; run the same command again: finished "
            "stages are skipped and this one resumes from its last.ckpt"
        )
        raise stop
    if code:
        raise SalsaError(
            f"stage {stage.name!r} failed (exit status {code}); see the message above."
        )


# What Lightning's launcher of more processes sets in the process that starts them.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def stage_command_line(args: list[str]) -> Iterator[None]:
    """The stage's own command line in ``sys.argv`` while it runs, as if typed alone
    (``salsa fit ...``). The processes Lightning starts for more devices rerun ``sys.argv``:
    so they run this stage and exit, where they would rerun the whole pipeline and then every
    later stage beside this process. When this process launched them, the launcher's
    environment and process group end with the stage, so the next stage starts afresh."""
    argv, env = sys.argv[:], {k: os.environ.get(k) for k in LAUNCHER_ENV}
    sys.argv[1:] = args
    try:
        yield
    finally:
        sys.argv[:] = argv
        launched = env["LOCAL_RANK"] is None and "LOCAL_RANK" in os.environ
        if launched:
            from salsa_lightning.sharding import end_process_group

            end_process_group()
        for key, value in env.items():  # unchanged under torchrun or srun
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Written into the output directory by rank 0 of a pipeline several processes run, when a stage
# fails there: the processes waiting for that stage's outputs stop instead of waiting on.
STOPPED_MARKER = ".salsa-pipeline-stopped"
POLL_SECONDS = 2.0
# Rewritten by rank 0 every HEARTBEAT_SECONDS while its pipeline runs. A waiting rank that finds it
# unchanged for SILENT_SECONDS stops: rank 0's process is gone (the kernel's out-of-memory killer,
# a lost node) and will write neither the outputs nor STOPPED_MARKER, and srun (without
# --kill-on-bad-exit) or a per-node run would leave the others waiting until the job's time limit.
HEARTBEAT = ".salsa-pipeline-heartbeat"
HEARTBEAT_SECONDS = 10.0
SILENT_SECONDS = 300.0
STILL_WAITING_SECONDS = 600.0  # a waiting rank's line while rank 0 works (a 7B evaluation: hours)


def pipeline_rank() -> int | None:
    """This process's rank among processes that run one pipeline together, None when it runs
    alone: the global rank when ``torchrun`` or ``srun`` started one process per device (read
    as Lightning reads it, ``TorchElasticEnvironment`` and ``SLURMEnvironment``), ``NODE_RANK``
    when each node runs the pipeline and Lightning starts the node's devices. Every process
    runs the fit stages (one world); rank 0 alone runs the others (a soup of a 7B model built
    in every process would hold it once per device), and the other ranks wait for them."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for env in (TorchElasticEnvironment, SLURMEnvironment):
        if env.detect():
            launched = env()
            return launched.global_rank() if launched.world_size() > 1 else None
    node = os.environ.get("NODE_RANK")
    return int(node) if node else None


def wait_for_rank_zero(paths: list[str], head: str, why: str, since: float) -> None:
    """Wait until every one of ``paths`` (relative to the output directory, the working
    directory) exists: what rank 0 writes (a stage it runs alone, or an export, which rank 0
    writes after the fit's last step). Outputs are written aside and renamed into place, so a
    path that exists is whole. Stops with an error when rank 0's pipeline stopped after
    ``since`` (its :data:`STOPPED_MARKER`), or when rank 0's :data:`HEARTBEAT` has not changed
    for :data:`SILENT_SECONDS` (its process is gone)."""
    missing = [p for p in paths if not Path(p).exists()]
    if not missing:
        return
    print(f"{head}: {why}; waiting for {', '.join(missing)}", flush=True)
    start = heard = said = time.monotonic()
    beat = None
    while missing:
        marker = Path(STOPPED_MARKER)
        if marker.is_file() and marker.stat().st_mtime >= since:
            raise SalsaError(
                f"{head}: rank 0 stopped ({marker.read_text().strip()}), so this rank stops too; "
                "run the same command again once it is fixed."
            )
        if (latest := heartbeat()) != beat:
            beat, heard = latest, time.monotonic()
        elif time.monotonic() - heard > SILENT_SECONDS:
            raise SalsaError(
                f"{head}: rank 0 has given no sign of life for {SILENT_SECONDS:.0f} s (its "
                f"{HEARTBEAT} has not changed): its process is gone (killed, e.g. out of host "
                "memory, or its node lost), so this rank stops too; run the same command again."
            )
        if time.monotonic() - said >= STILL_WAITING_SECONDS:
            said = time.monotonic()
            print(
                f"{head}: still waiting for {', '.join(missing)} after "
                f"{time.monotonic() - start:.0f} s; rank 0's last heartbeat "
                f"{time.monotonic() - heard:.0f} s ago",
                flush=True,
            )
        time.sleep(POLL_SECONDS)
        missing = [p for p in missing if not Path(p).exists()]
    print(f"{head}: written by rank 0 after {time.monotonic() - start:.0f} s", flush=True)


def heartbeat() -> str | None:
    """What rank 0 last wrote to :data:`HEARTBEAT` (None: nothing yet)."""
    try:
        return Path(HEARTBEAT).read_text()
    except OSError:
        return None


@contextmanager
def beating(rank: int | None) -> Iterator[None]:
    """On rank 0 of a pipeline several processes run: rewrite :data:`HEARTBEAT` (a count) every
    :data:`HEARTBEAT_SECONDS`, from a thread, until the pipeline ends; then remove it."""
    if rank != 0:
        yield
        return
    path, done = Path(HEARTBEAT).resolve(), threading.Event()

    def beat(count: int) -> None:
        with contextlib.suppress(OSError):  # a full disk: the stages' own errors matter
            path.write_text(f"{count}\n")

    def beats() -> None:
        count = 1
        while not done.wait(HEARTBEAT_SECONDS):
            count += 1
            beat(count)

    beat(1)  # before the first stage
    thread = threading.Thread(target=beats, name="salsa-pipeline-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        path.unlink(missing_ok=True)


@contextmanager
def telling_waiting_ranks(stage: Stage, rank: int | None) -> Iterator[None]:
    """On rank 0 of a pipeline several processes run, a stage that fails writes
    :data:`STOPPED_MARKER` (the stage and the error's first line): the other ranks may be
    waiting for its outputs."""
    try:
        yield
    except BaseException as err:
        if rank == 0:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            with contextlib.suppress(OSError):  # a full disk: the stage's own error matters
                Path(STOPPED_MARKER).write_text(f"stage {stage.name!r}: {why}\n")
        raise


def fit_arguments(args: list[str]) -> list[str]:
    """``--fit-args`` as every fit stage takes them: each ``--config`` file found from where
    the command runs (else the packaged YAML of that name), as an absolute path, since the
    stages run from the output directory; a missing one is refused before any stage runs."""
    out = resolve_config_args(args)
    for at, value, prefix in config_flags(out):
        if value.endswith(SUFFIXES):
            out[at] = prefix + str(Path(value).resolve())
    return out


def select_stages(stages: list[Stage], patterns: list[str]) -> list[Stage]:
    """The stages whose names match one of ``patterns`` (shell patterns, e.g. ``ppo-*``), in
    pipeline order. A pattern that matches no stage is refused, naming the stages there are."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in stages):
            raise SalsaError(
                f"--stages {pattern!r} matches no stage of the pipeline; its stages are "
                f"{[s.name for s in stages]}."
            )
    return [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def run_pipeline(
    config: str | os.PathLike,
    output: str | os.PathLike = ".",
    stages: list[Stage] | None = None,
    only: list[str] | None = None,
    fit_args: list[str] | None = None,
) -> Path:
    """Run the stages of a pipeline YAML (or ``stages``) from ``output``; returns ``output``.
    ``only``: run just the stages these name patterns select (``select_stages``); the inputs
    they read from the other stages must exist already. So several processes can share out
    independent stages (e.g. one per seed) and a last plain run finishes the rest.
    ``fit_args``: added to every fit stage's command line, after its own arguments (e.g. the
    strategy and the devices: ``["--config", "fsdp.yaml", "--trainer.devices", "8"]``)."""
    config_path = Path(config).resolve()
    spec = {}
    if stages is None:
        spec = read_mapping(config_path)
        stages = [Stage(**s) for s in spec.get("stages", [])]
    if not stages:
        hint = ""
        if {"trainer", "model", "data"} & spec.keys():
            hint = f": it is a config of salsa fit, run it with `salsa fit --config {config}`"
        raise SalsaError(f"pipeline {str(config_path)!r} lists no stages{hint}.")
    if only:
        stages = select_stages(stages, only)
    what = "the pipeline's output directory (--output)"
    root = check_writable_dir(Path(output).resolve(), what)
    check_plan(stages, root, config_path.parent)
    rank = pipeline_rank()
    if rank is not None:
        check_waitable(stages)
    fit_args = fit_arguments(fit_args or [])
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what the permission bits do not tell: /proc, a full or failed disk
        raise SalsaError(f"{what} {str(root)!r} cannot be created: {err.strerror}.") from err
    previous = os.getcwd()
    os.chdir(root)
    try:
        run_stages(stages, config_path.parent, fit_args, rank)
    finally:
        os.chdir(previous)
    return root


def run_stages(
    stages: list[Stage], config_dir: Path, fit_args: list[str], rank: int | None
) -> None:
    """Run the stages in order from the output directory (the working directory), a line per
    stage, skipping those whose outputs exist; on a rank other than 0 (:func:`pipeline_rank`),
    wait for rank 0 instead of running a stage that is not a fit."""
    since = time.time()
    if rank == 0:
        Path(STOPPED_MARKER).unlink(missing_ok=True)
    with beating(rank):
        for i, stage in enumerate(stages, 1):
            head = f"{'' if rank is None else f'[rank: {rank}] '}[{i}/{len(stages)}] {stage.name}"
            run_or_wait(stage, head, config_dir, fit_args, rank, since)


def run_or_wait(
    stage: Stage, head: str, config_dir: Path, fit_args: list[str], rank: int | None, since: float
) -> None:
    """One stage, from the output directory: skipped when its outputs exist; on a rank other
    than 0, waited for when it is not a fit (rank 0 runs it alone), else run."""
    if stage.outputs and all(Path(p).exists() for p in stage.outputs):
        print(f"{head}: done already ({', '.join(stage.outputs)}), skipped", flush=True)
        return
    if rank and stage.command != "fit":
        why = f"salsa {stage.command} runs on rank 0 alone"
        wait_for_rank_zero(stage.outputs, head, why, since)
        return
    if rank:  # rank 0 may still be writing an earlier fit's export
        wait_for_rank_zero(stage.inputs, head, "rank 0 writes the inputs", since)
    print(f"{head}: salsa {stage.command} ...", flush=True)
    start = time.perf_counter()
    with telling_waiting_ranks(stage, rank):
        run_stage(stage, config_dir, fit_args)
    print(f"{head}: finished in {time.perf_counter() - start:.0f} s", flush=True)


def run_with_report(
    config: str | os.PathLike, output: str | os.PathLike = ".", fit_args: list[str] | None = None
) -> Path:
    """Run a pipeline YAML (a file, or a packaged name such as ``quickstart.yaml``), then write
    the report its ``report:`` section names (the quickstart); returns the output directory."""
    from salsa_lightning.report import ReportSpec, write_report

    config = find_config(config)
    start = time.perf_counter()
    report = read_mapping(config).get("report")
    spec = ReportSpec.from_yaml(report) if report else None  # a bad report section fails first
    root = run_pipeline(config, output, fit_args=fit_args)
    if spec is not None and not pipeline_rank():  # rank 0, or alone
        write_report(root, spec)
    print(f"finished in {time.perf_counter() - start:.0f} s", flush=True)
    return root
