"""Two "nodes" on this machine against two processes on one node, under ``configs/fsdp.yaml``.

The two-node run is launched the way Lightning's own multi-node launch expects it outside a
cluster manager: one ``salsa fit`` per node with ``--trainer.num_nodes 2 --trainer.devices 1``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT`` and ``NODE_RANK`` 0 and 1 (Lightning's
``LightningEnvironment``: global rank = NODE_RANK x devices + local rank), both started side
by side. Both runs are one world of 2 ranks (gloo), so they must agree; the tolerances are
``tests/test_fsdp.py``'s: SFT's export within 0.3 of the distance training moved the weights
(``check_exports``), SALSA's first rollout within 1e-4, its evaluation within 0.05 and its
policy within 1e-2 element by element (seen: identical, 0.0, in both stages).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, free_port, run_rerun_if_killed
from test_fsdp import FSDP2, check_exports, first, metrics, run, salsa_args, stage_args

pytestmark = pytest.mark.scale  # .ci/run's scale step (deselected by default)

TWO_NODES = [
    "--config", str(CONFIGS / "fsdp.yaml"),
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.num_nodes", "2",
]  # fmt: skip
# What a launcher (torchrun, SLURM, an earlier Lightning run) may leave behind: each node's
# process must read its place from NODE_RANK alone.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def run_two_nodes(args: list[str], cwd: Path, node_args: list[str] = TWO_NODES) -> list[str]:
    """``salsa <args> <node_args>`` as node 0 and node 1 of a two-node world, side by side;
    each node's stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "salsa_lightning.cli", *args, *node_args],
            cwd=cwd,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=900) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}: {err[-4000:]}"
    return [out + err for out, err in outputs]


def test_sft_on_two_nodes_is_sft_on_two_processes(task_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from salsa_lightning.embedded import ASSETS

    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    run(stage_args("sft.yaml", one_node, task_dir, 16, []) + FSDP2, tmp_path)
    run_two_nodes(stage_args("sft.yaml", two_nodes, task_dir, 16, []), tmp_path)
    for key in ("train/loss", "val/loss", "val/token_accuracy"):
        assert first(metrics(two_nodes), key) == pytest.approx(
            first(metrics(one_node), key), rel=2e-2
        ), key
    check_exports(one_node, two_nodes, AutoModelForCausalLM, ASSETS / "base", rel=0.3)
    wa, wb = (load_file(d / "model" / "model.safetensors") for d in (one_node, two_nodes))
    print(
        f"SFT, two nodes against one: max |diff| {max(float((wa[k] - wb[k]).abs().max()) for k in wa)}"
    )


def test_salsa_on_two_nodes_is_salsa_on_two_processes(stage_outputs, task_dir, tmp_path):
    from safetensors.torch import load_file

    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    run(salsa_args(stage_outputs, task_dir, one_node, batch=8) + FSDP2, tmp_path)
    run_two_nodes(salsa_args(stage_outputs, task_dir, two_nodes, batch=8), tmp_path)
    one, two = metrics(one_node), metrics(two_nodes)
    for key in ("objective/scores", "objective/kl", "rollout/response_length"):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    for key in ("eval/score", "eval/kl", "eval/gold"):
        assert first(two, key) == pytest.approx(first(one, key), abs=0.05), key
    wa = load_file(one_node / "policy" / "model.safetensors")
    wb = load_file(two_nodes / "policy" / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"SALSA policy, two nodes against one: max |diff| {diff}")
    assert diff < 1e-2


def soup_pipeline(tmp_path: Path) -> Path:
    """Two SFT fits, their soup, an SFT fit from the soup: a pipeline YAML in ``tmp_path``."""
    import yaml

    sft = str(CONFIGS / "sft.yaml")

    def sft_stage(name: str, extra: list[str], inputs: list[str]) -> dict:
        args = ["--model.init_args.export_dir", f"artifacts/{name}"]
        args += ["--trainer.logger.init_args.name", name, *extra]
        return dict(name=name, command="fit", configs=[sft], args=args, inputs=inputs,
                    outputs=[f"artifacts/{name}"])  # fmt: skip

    stages = [
        sft_stage("sft-1", ["--seed_everything", "1"], []),
        sft_stage("sft-2", ["--seed_everything", "2"], []),
        dict(name="soup", command="soup", configs=[str(CONFIGS / "soup.yaml")],
             inputs=["artifacts/sft-1", "artifacts/sft-2"], outputs=["artifacts/soup"]),
        sft_stage("sft-3", ["--model.init_args.model", "artifacts/soup"], ["artifacts/soup"]),
    ]  # fmt: skip
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"stages": stages}))
    return config


# Every fit stage of soup_pipeline: short, on the CPU (the world's shape comes with each launcher).
SHORT_FIT = (
    "--trainer.accelerator cpu --trainer.max_steps 2 --trainer.limit_val_batches 1 "
    "--trainer.num_sanity_val_steps 0 --data.init_args.max_samples 64 --data.init_args.batch_size 8"
)


def check_soup_pipeline(text: str, root: Path) -> None:
    """Both ranks ran every fit; the soup ran on rank 0 alone while rank 1 waited for it."""
    assert text.count("written to artifacts/soup") == 1
    assert "[rank: 0] [3/4] soup: salsa soup ..." in text
    assert (
        "[rank: 1] [3/4] soup: salsa soup runs on rank 0 alone; waiting for artifacts/soup" in text
    )
    assert "[rank: 1] [3/4] soup: salsa soup ..." not in text
    for rank in (0, 1):
        assert f"[rank: {rank}] [4/4] sft-3: finished in" in text
    assert (root / "artifacts" / "sft-3" / "model.safetensors").is_file()
    assert not (root / ".salsa-pipeline-stopped").exists()


def test_torchrun_runs_a_pipeline_with_its_soup_on_rank_0_alone(tmp_path):
    """``torchrun -m salsa_lightning.cli pipeline --fit-args '--trainer.devices 2 ...'``: both
    ranks run each fit stage as one world of 2; the soup runs on rank 0 while rank 1 waits for
    it (before, both built it and wrote the same directory), and the fit stage that reads it
    trains on both."""
    config = soup_pipeline(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    proc = run_rerun_if_killed(
        [*torchrun, "-m", "salsa_lightning.cli", "pipeline", "--config", str(config),
         "--output", str(tmp_path / "run"), "--fit-args", f"--trainer.devices 2 {SHORT_FIT}"],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=900,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    check_soup_pipeline(text, tmp_path / "run")


def test_a_pipeline_on_two_nodes_runs_its_soup_on_node_0_alone(tmp_path):
    """The same pipeline run once per node (Lightning's own launch: ``NODE_RANK`` 0 and 1,
    ``--trainer.num_nodes 2``), side by side on this machine."""
    config = soup_pipeline(tmp_path)
    fit_args = f"--trainer.devices 1 --trainer.num_nodes 2 {SHORT_FIT}"
    pipeline = ["pipeline", "--config", str(config), "--output", str(tmp_path / "run")]
    texts = run_two_nodes([*pipeline, "--fit-args", fit_args], tmp_path, node_args=[])
    check_soup_pipeline("\n".join(texts), tmp_path / "run")
