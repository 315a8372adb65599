"""Sharded decoding side by side: the policy gathered once per rollout against FSDP's per-layer
gathers at every token (``generation.gather: once`` against ``per_layer``).

``--world`` processes (gloo on CPU, NCCL on CUDA) build the same random-weight causal LM from
a config (``--preset gpt2-small``: 124M parameters, 12 blocks; ``1b``: a 1.1B Llama, for a GPU;
``tiny``: the shipped base's shape, for tests) and shard it as ``configs/fsdp.yaml`` does
(``--strategy fsdp2``: ``sharding.shard``, every decoder block and then the model) or as
``configs/fsdp1.yaml`` does (``fsdp1``: ``strategies.fsdp_units`` wrapped in
``FullyShardedDataParallel`` under a root that holds the policy, decoding inside the root's
forward as Lightning's ``training_step`` does). Each rank samples ``--batch`` responses to its own
random prompts with ``generation.sample`` (temperature 0.9, top-p 0.95; exactly ``--new-tokens``
tokens unless ``--stop-at-eos``), seeded the same way in every mode.

The modes alternate (per_layer, once, per_layer, once, ... after one untimed warm-up) so drift on
a shared machine hits both; ``--unsharded`` adds the same model unsharded on each rank (on one GPU:
world size 1 under FSDP against the plain policy). Around each rollout the script counts, on rank
0, the all-gathers (``torch.distributed.all_gather_single``, and ``all_gather``, which FSDP1 uses on
CPU) and the bytes they gather; on every rank the wall time, the CPU time of the process (all its
threads, gloo's included: what a loaded machine disturbs least) and the decoding steps (calls of
the first decoder block); checks the tokens against the warm-up's and that every parameter is
sharded again afterwards. ``--rank0-stops-first`` decodes greedily with EOS the first token rank
0's prompt decodes to, so rank 0 is done after one step: without lockstep it stops there.

One JSON line per rollout, then the summary as the LAST line: per mode the median tokens/s
(every rank's tokens over the slowest rank's time) and tokens per CPU second (over the busiest
rank's), the all-gathers and bytes per rollout, each rank's decoding steps; ``same_tokens``;
``ratio_tokens_per_s`` and ``ratio_tokens_per_cpu_s`` (once / per_layer), ``ratio_gathers`` and
``ratio_gathered_bytes`` (per_layer / once). Where gather-once decodes with the StaticDecoder
(``--cache static``, or ``auto`` on a GPU) both modes decode greedily: it samples other draws than
``generate``. Usage::

    python benchmarks/sharded_generation.py                        # gpt2-small, 2 CPU processes
    python benchmarks/sharded_generation.py --preset tiny --strategy fsdp1 --lora
    python benchmarks/sharded_generation.py --device cuda --world 1 --unsharded --preset 1b
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "gpt2-small": {"arch": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
    "1b": {  # a 1.1B Llama (TinyLlama's shape): for a GPU
        "arch": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    },
    "tiny": {
        "arch": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 359,
        "max_position_embeddings": 128,
    },
}  # fmt: skip
EOS = 2  # an ordinary token here unless --stop-at-eos


def build_model(preset: str, lora: bool, dtype: Any) -> Any:
    """The preset's causal LM with random weights (the same on every rank: seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from salsa_lightning.lora import LoraSettings, add_lora

    shape = dict(PRESETS[preset])
    config = AutoConfig.for_model(shape.pop("arch"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if lora:
        model = add_lora(model, LoraSettings(r=8, alpha=16))
        for name, p in model.named_parameters():  # a trained adapter: B is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


class Holder(torch.nn.Module):
    """FSDP1's root as Lightning builds it: a module that holds the policy and whose forward
    (here: decoding) runs inside the root FSDP wrapper's forward."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, fn: Any) -> Any:
        return fn()


def shard_model(model: Any, strategy: str, world: int, device: Any) -> tuple[Any, Any]:
    """``(policy, run)``: the sharded policy and ``run(fn)``, which calls ``fn`` where Lightning
    would call a training step (inside the FSDP1 root's forward; directly under FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_lightning.sharding import shard

    if strategy == "fsdp2":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("data_parallel",))
        return shard(model.to(device), mesh), lambda fn: fn()
    from torch.distributed.fsdp import FullyShardedDataParallel

    from salsa_lightning.strategies import fsdp_units, wrap_units

    def wrap(module: Any, **override: Any) -> Any:
        device_id = device if device.type == "cpu" else device.index
        return FullyShardedDataParallel(
            module, device_id=device_id, use_orig_params=True, **override
        )

    holder = Holder(model.to(device))
    wrap_units(holder, fsdp_units(holder), wrap)
    root = wrap(holder)
    return holder.policy, lambda fn: root(fn)


@contextmanager
def counted_gathers():
    """Count the all-gathers and the bytes they write while the context lasts: yields a dict
    that holds ``gathers`` and ``bytes`` when it ends."""
    import torch.distributed as dist

    counts = {"gathers": 0, "bytes": 0}
    single, listed = dist.all_gather_single, dist.all_gather

    def all_gather_single(output, input, *args, **kwargs):
        counts["gathers"] += 1
        counts["bytes"] += output.numel() * output.element_size()
        return single(output, input, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        counts["gathers"] += 1
        counts["bytes"] += sum(t.numel() * t.element_size() for t in tensor_list)
        return listed(tensor_list, tensor, *args, **kwargs)

    dist.all_gather_single, dist.all_gather = all_gather_single, all_gather
    try:
        yield counts
    finally:
        dist.all_gather_single, dist.all_gather = single, listed


def prompts(args: argparse.Namespace, rank: int) -> Any:
    """[batch, prompt_length] random prompt ids of ``rank`` (with ``--rank0-stops-first``,
    rank 0's rows are one prompt repeated)."""
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own prompts
    vocab = PRESETS[args.preset]["vocab_size"]
    rows = 1 if args.rank0_stops_first and rank == 0 else args.batch
    query = torch.randint(3, vocab, (rows, args.prompt_length), generator=g)
    return query.expand(args.batch, -1).contiguous()


def init_rank(rank: int, world: int, args: argparse.Namespace, port: int) -> tuple[Any, Any]:
    """Join the process group as ``rank`` (NCCL on CUDA, gloo on CPU) with ``args.threads``
    threads: ``(device, dtype)``, bf16 on CUDA, fp32 on CPU."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return device, torch.bfloat16 if cuda else torch.float32


def worker(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    """One rank: the measurements, then the process group ends, after the sharded models are
    freed (``end_process_group``: gloo aborts now and then at exit otherwise)."""
    from salsa_lightning.sharding import end_process_group

    measure(rank, world, args, port)
    end_process_group()


def measure(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist

    from salsa_lightning.generation import GenerationSettings, sample, use_static_cache
    from salsa_lightning.sharding import decoder_layers, is_resharded, sharded_units

    device, dtype = init_rank(rank, world, args, port)
    cuda = device.type == "cuda"
    query = prompts(args, rank).to(device)
    mask = torch.ones_like(query)
    # Greedy too where gather-once decodes with the StaticDecoder: it samples by inverse
    # transform, generate by multinomial (one distribution, other draws under one seed).
    static = use_static_cache(args.cache, device, lockstep=False)
    eos, greedy = EOS, args.rank0_stops_first or static
    if args.rank0_stops_first:  # EOS: the token rank 0's prompt decodes to first, greedily
        with torch.no_grad():
            model = build_model(args.preset, args.lora, dtype).to(device)
            eos = int(model(input_ids=prompts(args, 0)[:1].to(device)).logits[0, -1].argmax())
    tok = type("Tok", (), {"eos_token_id": eos, "pad_token_id": 0})
    forwards = {"n": 0}  # decoding steps on this rank: calls of the first decoder block

    def counted(model: Any) -> Any:
        def count(*_: Any) -> None:
            forwards["n"] += 1

        decoder_layers(model)[0].register_forward_pre_hook(count)
        return model

    models = {}
    if args.unsharded:
        models["unsharded"] = counted(build_model(args.preset, args.lora, dtype).to(device))
    model = counted(build_model(args.preset, args.lora, dtype))
    policy, run = shard_model(model, args.strategy, world, device)
    units = len(sharded_units(policy))
    order = [m for _ in range(args.repeats) for m in (*models, "per_layer", "once")]
    first: dict[str, Any] = {}
    rows = []
    for mode in ["warmup", *order]:
        name = "once" if mode == "warmup" else mode
        model = models.get(name, policy)
        settings = GenerationSettings(
            max_new_tokens=args.new_tokens, stop_at_eos=args.stop_at_eos or args.rank0_stops_first,
            do_sample=not greedy, temperature=0.9, top_p=0.95, cache=args.cache,
            gather="once" if name == "unsharded" else name,
        )  # fmt: skip
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        forwards["n"] = 0
        with counted_gathers() as counts:
            torch.manual_seed(1234 + rank)
            t0, c0 = time.perf_counter(), time.process_time()
            response, response_mask = run(
                lambda m=model, s=settings: sample(m, tok, query, mask, s)
            )
            if cuda:
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        response = response.cpu()
        same = first.setdefault("tokens", response).shape == response.shape and bool(
            torch.equal(first["tokens"], response)
        )
        # Over the ranks: the slowest time, all tokens, same tokens everywhere, each rank's steps.
        totals = [seconds, cpu_seconds, response_mask.sum().item(), float(same)]
        ops = (dist.ReduceOp.MAX, dist.ReduceOp.MAX, dist.ReduceOp.SUM, dist.ReduceOp.MIN)
        for i, op in enumerate(ops):
            part = torch.tensor([totals[i]], device=device, dtype=torch.float64)
            dist.all_reduce(part, op=op)
            totals[i] = float(part[0])
        steps = [None] * world
        dist.all_gather_object(steps, forwards["n"])
        slowest, cpu, tokens, same = totals[0], totals[1], int(totals[2]), bool(totals[3])
        row = {
            "mode": name, "warmup": mode == "warmup", "seconds": round(slowest, 4),
            "cpu_seconds": round(cpu, 4), "tokens": tokens,
            "tokens_per_s": round(tokens / slowest, 2),
            "tokens_per_cpu_s": round(tokens / cpu, 2),
            "gathers": counts["gathers"], "gathered_bytes": counts["bytes"],
            "forwards_per_rank": steps, "same_tokens": same,
            "resharded": is_resharded(policy), "units": units,
        }  # fmt: skip
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
    if rank == 0:
        print(json.dumps(summary(rows, args, world)), flush=True)
    dist.barrier()  # no rank ends the group while another still uses it


def summary(rows: list[dict[str, Any]], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Per mode the median tokens/s and the largest gather counts of the timed rollouts, and
    whether every rollout (warm-up included) decoded the same tokens and left the policy
    sharded."""
    timed = [r for r in rows if not r["warmup"]]
    out: dict[str, Any] = {"settings": {**vars(args), "world": world}, "units": rows[0]["units"]}
    for mode in dict.fromkeys(r["mode"] for r in timed):
        mine = [r for r in timed if r["mode"] == mode]
        out[mode] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in mine),
            "gathers_per_rollout": max(r["gathers"] for r in mine),
            "gathered_bytes_per_rollout": max(r["gathered_bytes"] for r in mine),
            "forwards_per_rank": mine[-1]["forwards_per_rank"],
            "resharded": all(r["resharded"] for r in rows if r["mode"] == mode),
            "rollouts": len(mine),
        }
    out["same_tokens"] = all(r["same_tokens"] for r in rows)
    once, per_layer = out["once"], out["per_layer"]
    out["ratio_tokens_per_s"] = round(once["tokens_per_s"] / per_layer["tokens_per_s"], 3)
    out["ratio_tokens_per_cpu_s"] = round(
        once["tokens_per_cpu_s"] / per_layer["tokens_per_cpu_s"], 3
    )
    out["ratio_gathers"] = round(
        per_layer["gathers_per_rollout"] / max(1, once["gathers_per_rollout"]), 3
    )
    out["ratio_gathered_bytes"] = round(
        per_layer["gathered_bytes_per_rollout"] / max(1, once["gathered_bytes_per_rollout"]), 3
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt2-small")
    parser.add_argument("--strategy", choices=["fsdp2", "fsdp1"], default="fsdp2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", choices=["auto", "static", "dynamic"], default="auto")
    parser.add_argument("--stop-at-eos", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--unsharded", action="store_true", help="also the unsharded model")
    parser.add_argument(
        "--rank0-stops-first",
        action="store_true",
        help="greedy, EOS the first token rank 0 decodes: rank 0 is done after one step",
    )
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    mp.start_processes(
        worker, args=(args.world, args, free_port()), nprocs=args.world, start_method="spawn"
    )


if __name__ == "__main__":
    main()
