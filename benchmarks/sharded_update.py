"""The policy's update pass under FSDP2, side by side: response log-probs in tiles from the last
hidden states against the model's logits (``generation.score_response``).

``--world`` processes (gloo on CPU, NCCL on CUDA) build the same random-weight causal LM as
``sharded_generation.py`` (``--preset gpt2-small``: 124M parameters, vocabulary 50257; ``1b``
for a GPU; ``tiny`` for tests) and shard it as ``configs/fsdp.yaml`` does (``sharding.shard``).
Each rank runs ``--passes`` forward and backward passes of ``--batch`` rows of
``--prompt-length`` + ``--response`` random tokens (the PPO update's policy pass: the mean
response log-prob as the loss, the gradients reduced over the ranks and cleared after each
pass, as an optimizer step would). Each mode runs in fresh processes (the modes alternate over
``--repeats``), so that a process's peak memory is its mode's: the peak RSS above the RSS with
the model built on CPU, ``torch.cuda.max_memory_allocated`` above the same on CUDA, the largest
rank's. The logits path holds the ``[batch, response, vocab]`` logits and their gradient; the
tiles two float32 ``[256, vocab]`` at a time.

The LAST line is JSON: per mode the median seconds per pass (the slowest rank's) and peak
memory, then ``ratio_pass_s`` and ``ratio_peak_memory`` (tiles / logits). Usage::

    python benchmarks/sharded_update.py                          # gpt2-small, 2 CPU processes
    python benchmarks/sharded_update.py --device cuda --world 1 --preset 1b --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import peak_memory_mib  # noqa: E402
from sharded_generation import PRESETS, build_model, free_port, init_rank  # noqa: E402

MODES = ("tiles", "logits")


def worker(rank: int, world: int, args: argparse.Namespace, port: int, mode: str, out: str):
    """One rank: the measurements, then the process group ends, after the sharded model is
    freed (``end_process_group``: gloo aborts now and then at exit otherwise)."""
    from salsa_lightning.sharding import end_process_group

    measure(rank, world, args, port, mode, out)
    end_process_group()


def measure(rank: int, world: int, args: argparse.Namespace, port: int, mode: str, out: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_lightning.generation import output_layer, score_response
    from salsa_lightning.sharding import shard

    device, dtype = init_rank(rank, world, args, port)
    cuda = device.type == "cuda"
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("data_parallel",))
    policy = shard(build_model(args.preset, args.lora, dtype).to(device), mesh)
    assert output_layer(policy) is not None, "the policy's head is not whole after forward"
    g = torch.Generator().manual_seed(100 + rank)
    length = args.prompt_length + args.response
    vocab = PRESETS[args.preset]["vocab_size"]
    seq = torch.randint(3, vocab, (args.batch, length), generator=g).to(device)
    mask, response = torch.ones_like(seq), seq[:, -args.response :]
    built = peak_memory_mib(device.type)
    seconds = []
    for _ in range(args.passes + 1):  # the first pass is a warm-up
        dist.barrier()
        start = time.perf_counter()
        scores = score_response(policy, seq, mask, response, logits=mode == "logits")
        (-scores.logprobs.mean()).backward()
        for p in policy.parameters():
            p.grad = None
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    row = {
        "pass_s": statistics.median(seconds[1:]),
        "peak_memory_mib": peak_memory_mib(device.type) - built,
    }
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        slowest = max(r["pass_s"] for r in rows)
        peak = max(r["peak_memory_mib"] for r in rows)
        Path(out).write_text(json.dumps({"pass_s": slowest, "peak_memory_mib": peak}))
    dist.barrier()  # no rank ends the group while another still uses it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt2-small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--response", type=int, default=128, help="response tokens")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in MODES:
                out = str(Path(tmp) / f"{mode}-{repeat}.json")
                mp.start_processes(
                    worker,
                    args=(args.world, args, free_port(), mode, out),
                    nprocs=args.world,
                    start_method="spawn",
                )
                run = json.loads(Path(out).read_text())
                runs[mode].append(run)
                print(json.dumps({"mode": mode, "repeat": repeat, **run}), flush=True)
    summary: dict[str, Any] = {"settings": vars(args)}
    for mode, rows in runs.items():
        summary[mode] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    tiles, logits = summary["tiles"], summary["logits"]
    summary["ratio_pass_s"] = round(tiles["pass_s"] / logits["pass_s"], 3)
    peaks = tiles["peak_memory_mib"], logits["peak_memory_mib"]
    summary["ratio_peak_memory"] = round(peaks[0] / peaks[1], 3) if peaks[1] else None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
