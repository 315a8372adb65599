"""SALSA-PPO on one CUDA device: the static-cache (compiled) decoding path in the real training
loop, and bf16 training. Skipped without a GPU; run with ``pytest -m gpu -s``.

If ``SALSA_GPU_REPORT`` names a file, each test appends one JSON line of what it measured.
"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from test_salsa import build, fit, prompts

from salsa_lightning import generation
from salsa_lightning.ppo import GenerationSettings, PPOSettings
from salsa_lightning.ppo import module as salsa_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def report(**row) -> None:
    row["device"] = torch.cuda.get_device_name()
    print(json.dumps(row))
    if path := os.environ.get("SALSA_GPU_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class StepMemory(L.Callback):
    """Peak CUDA memory of each PPO iteration (rollout, scoring and update)."""

    def __init__(self) -> None:
        self.peaks: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.peaks.append(torch.cuda.max_memory_allocated() / 2**20)


def test_static_cache_rollout_equals_dynamic_in_training(
    stage_outputs, task_dir, tmp_path, monkeypatch
):
    """Greedy fp32 decoding: the rollouts' scores and KL are the same with the compiled static
    cache as with the dynamic one (the optimisation changes no number)."""
    used = []

    def spy(model, tokenizer, query, query_mask, settings):
        used.append(generation.use_static_cache(settings.cache, query.device, lockstep=False))
        return generation.sample(model, tokenizer, query, query_mask, settings)

    monkeypatch.setattr(salsa_module, "sample", spy)
    metrics = {}
    for cache in ("dynamic", "auto"):
        L.seed_everything(0)
        settings = GenerationSettings(max_new_tokens=8, do_sample=False, cache=cache)
        module = build(stage_outputs, generation=settings)
        _, rec = fit(
            module, prompts(stage_outputs, task_dir), tmp_path / cache, 2, accelerator="gpu"
        )
        metrics[cache] = rec.metrics
        assert generation.static_failed(module.policy) is None
    assert used == [False, False, True, True]  # "auto" picked the static cache on one GPU
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward"):
        for a, b in zip(metrics["auto"], metrics["dynamic"], strict=True):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    report(test="static_vs_dynamic", scores=[m["objective/scores"] for m in metrics["auto"]])


def test_bf16_salsa_trains_on_one_gpu(stage_outputs, task_dir, tmp_path):
    L.seed_everything(0)
    module = build(
        stage_outputs,
        dtype="bfloat16",
        generation=GenerationSettings(max_new_tokens=16),
        ppo=PPOSettings(epochs=2, minibatch_size=8, micro_batch_size=4),
    )
    memory = StepMemory()
    _, rec = fit(
        module, prompts(stage_outputs, task_dir), tmp_path, 3, accelerator="gpu", callbacks=[memory]
    )
    start = rec.start
    end = module.state_dict()
    changed = [k for k in start if not torch.equal(start[k], end[k].to(start[k].device))]
    assert changed, "no trainable weight changed"
    assert all(k.startswith(("policy.", "critic.", "value_head")) for k in changed)
    assert all(torch.isfinite(torch.tensor(m["loss/policy"])) for m in rec.metrics)
    report(
        test="bf16_single_gpu",
        peak_mib_per_ppo_step=memory.peaks,
        tokens_per_s=[m.get("throughput/tokens_per_s") for m in rec.metrics],
    )
