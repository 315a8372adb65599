"""Rooflines of one PPO iteration's phases: how long each phase would take at the device's limit,
so the benchmark can print the fraction of that limit each system reaches.

The bounds count the work a PPO iteration needs, the same for every system (a system that runs a
pass more pays for it in its fraction):

* **generation**: ``R`` decoding steps each read every policy weight and the KV cache so far
  (memory bound at the batch sizes of RLHF), plus the prompt's prefill; the bound is the larger of
  bytes / bandwidth and FLOPs / peak;
* **scoring**: one forward of the frozen reference and reward model over the ``B x (P + R)``
  tokens (the policy's old log-probs and the critic's values come from the first update pass);
* **update**: ``epochs`` forward and backward passes (3x a forward's FLOPs) of the policy and the
  critic over the same tokens.

A forward costs ``2 x N_matmul`` FLOPs per token, ``N_matmul`` the parameters that multiply
activations: every weight but the embedding lookups, with the LM head counted once even when it
is tied to the embeddings (Kaplan et al. 2020; attention's own FLOPs, under 10 % at these lengths,
are left out). Pure arithmetic: ``device_limits`` is the one function that looks at hardware.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

# Dense (no sparsity) tensor-core peaks and HBM bandwidth from the vendors' spec sheets, SXM
# parts: {name fragment: {dtype: FLOP/s}, "bandwidth": B/s}.
GPU_SPECS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12, "bandwidth": 4.8e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12, "bandwidth": 3.35e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12, "bandwidth": 2.0e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 181e12, "bandwidth": 0.864e12},
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "embed_positions")


@dataclass(frozen=True)
class Limits:
    """What a device can do at most: FLOP/s at the run's dtype and memory bytes/s."""

    flops: float
    bandwidth: float
    source: str  # "spec sheet: <GPU>" or "measured: ..."


@dataclass(frozen=True)
class ModelSize:
    """The parameter counts a roofline needs, read from a checkpoint's safetensors header."""

    params: int  # every stored parameter
    matmul_params: int  # those that multiply activations (LM head counted even when tied)
    layers: int
    kv_width: int  # key + value width per token and layer (2 x kv_heads x head_dim)


@dataclass(frozen=True)
class Work:
    """One iteration's shape."""

    batch: int
    prompt: int
    new_tokens: int
    epochs: int
    bytes_per_param: int


def header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (its JSON header; no data is read)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))
    meta.pop("__metadata__", None)
    return meta


def model_size(checkpoint: str | Path) -> ModelSize:
    """Counts of a Hugging Face checkpoint directory (one ``model.safetensors``)."""
    root = Path(checkpoint)
    config = json.loads((root / "config.json").read_text())
    sizes = {k: math.prod(v["shape"]) for k, v in header(root / "model.safetensors").items()}
    params = sum(sizes.values())
    lookups = sum(n for k, n in sizes.items() if any(e in k for e in EMBEDDING_NAMES))
    hidden = config.get("hidden_size") or config["n_embd"]
    # A language model whose head is tied to the embeddings stores no head, yet multiplies by it.
    generates = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config["architectures"])
    tied_head = generates and not any(k.endswith("lm_head.weight") for k in sizes)
    matmul = params - lookups + (config["vocab_size"] * hidden if tied_head else 0)
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers") or config["n_layer"]
    return ModelSize(params, matmul, layers, 2 * kv_heads * (hidden // heads))


def generation_bound(policy: ModelSize, w: Work, limits: Limits) -> float:
    """Seconds to decode ``new_tokens`` for ``batch`` prompts at the device's limit."""
    weights = policy.params * w.bytes_per_param
    cache_per_token = policy.layers * policy.kv_width * w.bytes_per_param * w.batch
    # Step t reads every weight and the cache of prompt + t tokens.
    cache = sum((w.prompt + t) * cache_per_token for t in range(w.new_tokens))
    memory = (w.new_tokens * weights + cache) / limits.bandwidth
    flops = 2 * policy.matmul_params * w.batch * (w.prompt + w.new_tokens) / limits.flops
    return max(memory, flops)


def scoring_bound(reference: ModelSize, reward: ModelSize, w: Work, limits: Limits) -> float:
    """Seconds for one forward of the frozen reference and reward model over the rollout."""
    tokens = w.batch * (w.prompt + w.new_tokens)
    return 2 * (reference.matmul_params + reward.matmul_params) * tokens / limits.flops


def update_bound(policy: ModelSize, critic: ModelSize | None, w: Work, limits: Limits) -> float:
    """Seconds for ``epochs`` forward and backward passes of the policy and critic (none for a
    critic-free estimator) over the rollout."""
    tokens = w.batch * (w.prompt + w.new_tokens)
    matmul = policy.matmul_params + (critic.matmul_params if critic else 0)
    return w.epochs * 3 * 2 * matmul * tokens / limits.flops


def bounds(
    policy: ModelSize, reward: ModelSize, w: Work, limits: Limits, critic: bool = True
) -> dict[str, float]:
    """Every phase's bound in seconds (the reference is the policy's checkpoint, the critic
    the reward model's, as in the benchmark)."""
    return {
        "generation": generation_bound(policy, w, limits),
        "scoring": scoring_bound(policy, reward, w, limits),
        "update": update_bound(policy, reward if critic else None, w, limits),
    }


def fractions(bound: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """``bound / measured`` per phase: 1 is the device's limit."""
    return {k: bound[k] / measured[k] for k in bound if measured.get(k)}


def device_limits(device: str, dtype: str, threads: int = 0) -> Limits:
    """The limits of this process's device: a GPU's spec sheet, or, on CPU (no spec to look up),
    a matrix product's and a copy's measured rates, best of a few tries, on ``threads`` torch
    threads (0: torch's default), the threads the timed runs use (``--threads``).

    The copy goes into memory touched beforehand, as a model's weights and caches are: a copy
    into fresh memory (``clone``) measures the kernel's page faults, 6 GB/s on the 2-core VM
    against 40 for the copy itself, which made decoding's bound six times too long."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for part, spec in GPU_SPECS.items():
            if part in name:
                return Limits(spec[dtype], spec["bandwidth"], f"spec sheet: {name}")
        raise SystemExit(f"no spec sheet for {name!r}: add it to benchmarks/roofline.py GPU_SPECS")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    n = 1024
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    big, into = (torch.ones(64 * 2**20 // BYTES[dtype], dtype=dt) for _ in range(2))
    flops, copy = [], []
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            flops.append(2 * n**3 / (time.perf_counter() - start))
            start = time.perf_counter()
            into.copy_(big)
            copy.append(2 * big.numel() * BYTES[dtype] / (time.perf_counter() - start))  # r+w
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(default)
    return Limits(
        max(flops),
        max(copy),
        f"measured: {n}x{n} matmul, 64 MiB copy into touched memory, {used} threads",
    )
