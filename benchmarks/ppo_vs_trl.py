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

Each run is a fresh subprocess, so its peak memory is its own: peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU. The
systems alternate (ours, trl, ours, trl, ...) so that drift on a shared machine hits both.
The first ``--warmup`` iteration(s) of each run are not timed. An iteration's wall time is the
time between the ends of two consecutive iterations (so it includes fetching the batch and each
trainer's per-step overhead). Generation time is ours' logged ``time/generation`` and, for
TRL, the time spent in ``trl.experimental.ppo.ppo_trainer.batch_generation`` (wrapped with a
timer in the TRL subprocess only). Each run also reports tokens per second of its own CPU
time (all threads), which other load on a shared machine disturbs less than wall time, and its
RSS after imports and with the models built, to tell import, loading and training memory apart.

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
    python benchmarks/ppo_vs_trl.py --preset smollm2 --checkpoint artifacts/smollm2

``ours-grpo`` is ours with the critic-free GRPO estimator on the same number of responses per
iteration (batch / 4 prompts x 4 samples): no critic is built, so its peak memory shows what the
critic costs in a PPO iteration.

The ``smollm2`` preset runs the real SmolLM2-135M-Instruct (converted with ``salsa convert``,
see docs/real-models.md) instead of random weights: policy and reference are the checkpoint, reward and
value models a one-label classifier of it with a fresh score head, and the prompts the embedded
task's, in the model's chat template, all of ``prompt_length`` tokens.

TRL 1.12.0 (the last release with a PPO trainer) is the ``bench`` extra:
``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import roofline

# Model shapes and default run sizes. ``arch`` is the transformers config class family.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "arch": "llama",
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 4,
        "intermediate": 256,
        "vocab": 384,
        "tie_embeddings": False,
        "prompt_length": 16,
        "batch_size": 16,
        "new_tokens": 32,
        "iterations": 4,
        "ppo_epochs": 4,
        "repeats": 2,
    },
    # GPT-2 small's shape (124M parameters, tied embeddings, vocabulary 50257), dropout off as
    # TRL turns it off in its models (ours would otherwise train the policy with dropout).
    "gpt2-small": {
        "arch": "gpt2",
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "kv_heads": 12,
        "intermediate": 3072,
        "vocab": 50257,
        "tie_embeddings": True,
        "prompt_length": 16,
        "batch_size": 4,
        "new_tokens": 16,
        "iterations": 3,
        "ppo_epochs": 1,
        "repeats": 2,
        # On a GPU: the run that ../shared/ENVIRONMENT.md reports for TRL on an H200.
        "cuda": {
            "prompt_length": 64,
            "batch_size": 32,
            "new_tokens": 128,
            "iterations": 3,
            "ppo_epochs": 4,
            "repeats": 1,
        },
    },
    # SmolLM2-135M-Instruct, the real model converted by `salsa convert` (see docs/real-models.md): the
    # same pretrained weights on both sides, the embedded task's prompts in its chat template.
    "smollm2": {
        "checkpoint": "artifacts/smollm2",
        "arch": "llama",
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "vocab": 49152,
        "prompt_length": 40,  # tokens, system prompt included; every prompt has this length
        "batch_size": 4,
        "new_tokens": 16,
        "iterations": 2,
        "ppo_epochs": 1,
        "repeats": 2,
    },
    # Llama 3.2 1B's shape. GPU only.
    "1b": {
        "arch": "llama",
        "hidden": 2048,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "intermediate": 8192,
        "vocab": 128256,
        "tie_embeddings": True,
        "prompt_length": 64,
        "batch_size": 16,
        "new_tokens": 128,
        "iterations": 2,
        "ppo_epochs": 4,
        "repeats": 1,
    },
}
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt, verbatim
LEARNING_RATE = 3e-6  # TRL's PPO default
KL_COEF = 0.05  # both systems' default
TEMPERATURE = 1.0


# ----------------------------------------------------------------------------- helpers


def rss_mib(field: str = "VmRSS") -> float:
    """This process's current (VmRSS) or peak (VmHWM) resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocations on GPU, peak RSS on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_report(device: str, import_rss: float, models_rss: tuple[float, float]) -> dict:
    """A run's memory figures: its peak, its RSS after imports and with the models built (and
    the peak by then), and its anonymous and file-backed RSS at the end."""
    return {
        "peak_memory_mib": peak_memory_mib(device),
        "rss_after_imports_mib": import_rss,
        "rss_models_built_mib": models_rss[0],
        "peak_rss_before_train_mib": models_rss[1],
        "rss_anon_end_mib": rss_mib("RssAnon"),
        "rss_file_end_mib": rss_mib("RssFile"),
    }


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ----------------------------------------------------------------------------- inputs


def make_tokenizer(vocab_size: int):
    """A WordLevel tokenizer with exactly ``vocab_size`` entries: 4 specials, then ``w<id>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def model_config(p: dict[str, Any], tokenizer, max_positions: int):
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if p["arch"] == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=p["vocab"],
            n_positions=max(1024, max_positions),
            n_embd=p["hidden"],
            n_layer=p["layers"],
            n_head=p["heads"],
            n_inner=p["intermediate"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=p["tie_embeddings"],
            **special,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=max(128, max_positions),
        tie_word_embeddings=p["tie_embeddings"],
        **special,
    )


def make_inputs(root: Path, p: dict[str, Any], s: dict[str, Any]) -> dict[str, str]:
    """Write the tokenizer, the policy and reward checkpoints and the prompts under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if s.get("checkpoint"):
        return checkpoint_inputs(root, s)
    tokenizer = make_tokenizer(p["vocab"])
    config = model_config(p, tokenizer, s["prompt_length"] + s["new_tokens"])
    dtype = torch_dtype(s["dtype"])
    paths = {"policy": root / "policy", "reward": root / "reward"}
    with torch.device(s["device"]):  # random init of a 1B model is slow on CPU
        torch.manual_seed(s["seed"])
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        policy.generation_config.pad_token_id = tokenizer.pad_token_id
        policy.save_pretrained(paths["policy"])
        del policy
        config.num_labels = 1
        torch.manual_seed(s["seed"] + 1)
        reward = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        reward.save_pretrained(paths["reward"])
        del reward
    if s["device"] == "cuda":
        torch.cuda.empty_cache()  # the children get the whole GPU
    for path in paths.values():
        tokenizer.save_pretrained(path)

    rng = random.Random(s["seed"])
    n_prompts = s["batch_size"] * (s["warmup"] + s["iterations"])
    first = len(SPECIALS)
    rows = [
        [rng.randrange(first, p["vocab"]) for _ in range(s["prompt_length"])]
        for _ in range(n_prompts)
    ]
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for ids in rows:
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids)}) + "\n")
    # The same rows as ids, for TRL (checked against the tokenizer so both see the same ids).
    assert tokenizer(" ".join(f"w{i}" for i in rows[0]))["input_ids"] == rows[0]
    ids_file = root / "prompt_ids.json"
    ids_file.write_text(json.dumps(rows))
    return {
        "policy": str(paths["policy"]),
        "reward": str(paths["reward"]),
        "prompts": str(prompts),
        "prompt_ids": str(ids_file),
    }


def checkpoint_inputs(root: Path, s: dict[str, Any]) -> dict[str, str]:
    """A pretrained checkpoint as the policy (and reference), a one-label classifier of it with a
    fresh score head as the reward (and value) model, and ``prompt_length``-token prompts: the
    embedded task's, formatted with the checkpoint's chat template as ours formats them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from salsa_lightning.data import encode_prompt
    from salsa_lightning.task import FAMILIES, sample_example

    source = Path(s["checkpoint"])
    if not (source / "config.json").is_file():
        raise SystemExit(
            f"--checkpoint {source}: no model there; convert it first (salsa convert --gguf "
            "FILE --output artifacts/smollm2, see docs/real-models.md)"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(s["seed"] + 1)
    reward = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch_dtype(s["dtype"])
    )
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    del reward
    rng, texts, rows = random.Random(s["seed"]), [], []
    n_prompts = s["batch_size"] * (s["warmup"] + s["iterations"])
    for _ in range(1000 * n_prompts):  # prompts of exactly prompt_length tokens: no padding
        text = sample_example(rng, rng.choice(FAMILIES)).prompt
        ids = encode_prompt(tokenizer, [{"role": "user", "content": text}])
        if len(ids) == s["prompt_length"]:
            texts.append(text)
            rows.append(ids)
        if len(rows) == n_prompts:
            break
    else:
        raise SystemExit(f"no {n_prompts} task prompts of {s['prompt_length']} tokens")
    prompts, ids_file = root / "prompts.jsonl", root / "prompt_ids.json"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    ids_file.write_text(json.dumps(rows))
    return {
        "policy": str(source.resolve()),
        "reward": str(root / "reward"),
        "prompts": str(prompts),
        "prompt_ids": str(ids_file),
    }


# ----------------------------------------------------------------------------- children


def summarize(system: str, records: list[dict[str, float]], s: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s and phase times over the timed iterations (after the warm-up)."""
    timed = records[s["warmup"] : s["warmup"] + s["iterations"]]
    if len(timed) != s["iterations"]:
        raise RuntimeError(f"{system}: {len(records)} iterations recorded, expected more")
    tokens = s["batch_size"] * s["new_tokens"] * len(timed)
    wall = sum(r["iteration"] for r in timed)
    gen = sum(r["generation"] for r in timed)
    out = {
        "system": system,
        "iterations_timed": len(timed),
        "generated_tokens": tokens,
        "iteration_s": wall / len(timed),
        "tokens_per_s": tokens / wall,
        # Tokens per second of this process's CPU time (all threads): less sensitive than wall
        # time to other processes on a shared machine (use with --threads 1).
        "tokens_per_cpu_s": tokens / sum(r["cpu"] for r in timed),
        "generation_tokens_per_s": tokens / gen,
        "generation_s": gen / len(timed),
        "scoring_s": sum(r["scoring"] for r in timed) / len(timed),
        "update_s": sum(r["update"] for r in timed) / len(timed),
        "per_iteration_s": [round(r["iteration"], 4) for r in timed],
    }
    return out


GRPO_SAMPLES = 4  # ours-grpo: samples per prompt (batch / 4 prompts, the same responses)


def child_ours(
    s: dict[str, Any], inputs: dict[str, str], work: Path, estimator: str = "gae"
) -> dict[str, Any]:
    import lightning as L
    import torch

    from salsa_lightning import PromptDataModule, SALSAModule
    from salsa_lightning.generation import static_failed, use_static_cache
    from salsa_lightning.ppo import GenerationSettings, KLSettings, PPOSettings
    from salsa_lightning.ppo.settings import EstimatorSettings, RewardSettings
    from salsa_lightning.soup import SoupReference

    k = GRPO_SAMPLES if estimator == "grpo" else 1

    import_rss = rss_mib()
    device = s["device"]

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.records: list[dict[str, float]] = []
            self.last = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            sync(device)
            self.models_rss = rss_mib("VmRSS"), rss_mib("VmHWM")
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            now = time.perf_counter()
            m = trainer.callback_metrics
            self.records.append(
                {
                    "iteration": now - self.last,
                    "cpu": time.process_time() - self.last_cpu,
                    "generation": float(m["time/generation"]),
                    "scoring": float(m["time/scoring"]),
                    "update": float(m["time/update"]),
                }
            )
            self.last, self.last_cpu = now, time.process_time()

    L.seed_everything(s["seed"], verbose=False)
    data = PromptDataModule(
        tokenizer=inputs["policy"],
        train_files=inputs["prompts"],
        val_fraction=0.0,
        max_length=s["prompt_length"],
        batch_size=s["batch_size"] // k,
        seed=s["seed"],
        task_dir=str(work / "task"),
    )
    fused = s["fused_adamw"]
    module = SALSAModule(
        reference=SoupReference(checkpoints=[inputs["policy"]]),
        reward_model=inputs["reward"],
        generation=GenerationSettings(
            max_new_tokens=s["new_tokens"],
            temperature=TEMPERATURE,
            top_p=1.0,
            stop_at_eos=False,
            do_sample=True,
        ),
        kl=KLSettings(coef=KL_COEF, estimator="k1", in_reward=True),
        reward=RewardSettings(missing_eos_penalty=0.0),  # TRL: missing_eos_penalty=None
        estimator=EstimatorSettings(estimator, samples_per_prompt=k),
        ppo=PPOSettings(
            epochs=s["ppo_epochs"],
            minibatch_size=s["batch_size"],
            micro_batch_size=s["micro_batch_size"],
            max_grad_norm=None,  # TRL's PPO loop does not clip gradients
        ),
        dtype=s["dtype"],
        optimizer=lambda params: torch.optim.AdamW(
            params, lr=LEARNING_RATE, weight_decay=0.0, fused=fused
        ),
        eval_kl_to_each=False,
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=s["warmup"] + s["iterations"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(work),
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    result = summarize("ours" if estimator == "gae" else f"ours-{estimator}", timer.records, s)
    result["decoding"] = (
        "static (compiled)" if use_static_cache("auto", torch.device(device), False) else "generate"
    )
    if failed := static_failed(module.policy):
        result["decoding"] = f"generate (static decoding failed: {failed})"
    result.update(memory_report(device, import_rss, timer.models_rss))
    return result


def child_trl(s: dict[str, Any], inputs: dict[str, str], work: Path) -> dict[str, Any]:
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import_rss = rss_mib()
    device = s["device"]
    probe = {"generation": 0.0, "generation_end": 0.0, "update_start": None}

    # Timers around TRL's own functions, looked up as module globals by PPOTrainer.train.
    batch_generation, forward = ppo_module.batch_generation, ppo_module.forward

    def timed_batch_generation(*args: Any, **kwargs: Any):
        sync(device)
        start = time.perf_counter()
        out = batch_generation(*args, **kwargs)
        sync(device)
        probe["generation_end"] = time.perf_counter()
        probe["generation"] += probe["generation_end"] - start
        return out

    def timed_forward(*args: Any, **kwargs: Any):
        if torch.is_grad_enabled() and probe["update_start"] is None:  # first training forward
            sync(device)
            probe["update_start"] = time.perf_counter()
        return forward(*args, **kwargs)

    ppo_module.batch_generation = timed_batch_generation
    ppo_module.forward = timed_forward

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict[str, float]] = []
            self.last = 0.0

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            sync(device)
            self.models_rss = rss_mib("VmRSS"), rss_mib("VmHWM")
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            sync(device)
            now = time.perf_counter()
            update_start = probe["update_start"] or now
            self.records.append(
                {
                    "iteration": now - self.last,
                    "cpu": time.process_time() - self.last_cpu,
                    "generation": probe["generation"],
                    "scoring": update_start - probe["generation_end"],
                    "update": now - update_start,
                }
            )
            probe.update(generation=0.0, update_start=None)
            self.last, self.last_cpu = now, time.process_time()

    dtype = torch_dtype(s["dtype"])
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
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        optim="adamw_torch_fused" if s["fused_adamw"] else "adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        num_sample_generations=0,
        disable_tqdm=True,
        seed=s["seed"],
    )
    timer = Timer()
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
    result = summarize("trl", timer.records, s)
    result.update(memory_report(device, import_rss, timer.models_rss))
    return result


def child_main(system: str, settings_file: str) -> None:
    payload = json.loads(Path(settings_file).read_text())
    s, inputs, work = payload["settings"], payload["inputs"], Path(payload["work"])
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    if system == "trl":
        result = child_trl(s, inputs, work)
    else:
        result = child_ours(s, inputs, work, "grpo" if system == "ours-grpo" else "gae")
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--systems",
        default="ours,ours-grpo,trl",
        help="any of ours, ours-grpo, trl, comma-separated (default: all three)",
    )
    parser.add_argument("--iterations", type=int, help="timed PPO iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (>= 1)")
    parser.add_argument("--batch-size", type=int, help="prompts per PPO iteration")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward/backward")
    parser.add_argument("--new-tokens", type=int, help="response length (no early stop)")
    parser.add_argument("--prompt-length", type=int, help="prompt tokens (fixed)")
    parser.add_argument("--ppo-epochs", type=int, help="PPO epochs over each rollout")
    parser.add_argument("--repeats", type=int, help="runs per system, alternating")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-fused-adamw", action="store_true", help="plain AdamW in both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="model directory of a checkpoint preset (smollm2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    p = {**PRESETS[args.preset], **PRESETS[args.preset].get(args.device, {})}

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return p[name] if value is None else value

    s = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        "batch_size": pick("batch_size"),
        "new_tokens": pick("new_tokens"),
        "prompt_length": pick("prompt_length"),
        "iterations": pick("iterations"),
        "ppo_epochs": pick("ppo_epochs"),
        "repeats": pick("repeats"),
        "warmup": args.warmup,
        "seed": args.seed,
        "threads": args.threads,
        "fused_adamw": not args.no_fused_adamw,
        "ppo_minibatches": 1,
        "learning_rate": LEARNING_RATE,
        "kl_coef": KL_COEF,
        "temperature": TEMPERATURE,
        "model": {k: p[k] for k in ("arch", "hidden", "layers", "heads", "kv_heads", "vocab")},
        "checkpoint": args.checkpoint or p.get("checkpoint"),
    }
    s["micro_batch_size"] = args.micro_batch_size or s["batch_size"]
    if s["batch_size"] % s["micro_batch_size"]:
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size")
    if s["warmup"] < 1:
        raise SystemExit("--warmup must be >= 1 (the first iteration's time has no start mark)")
    return s


def run_child(system: str, settings_file: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, str(settings_file)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
    }
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-8000:])
        raise SystemExit(f"{system} run failed with exit code {res.returncode}")
    return json.loads(lines[-1])


def roofline_report(
    per_system: dict[str, dict[str, float]],
    limits: roofline.Limits,
    sizes: dict[str, roofline.ModelSize],
    work: roofline.Work,
) -> dict[str, Any]:
    """Print each phase's bound and every system's fraction of it; return them for the JSON."""
    out: dict[str, Any] = {
        "limits": {"flops": limits.flops, "bandwidth": limits.bandwidth, "source": limits.source},
        "model": {k: vars(v) for k, v in sizes.items()},
        "systems": {},
    }
    print(
        f"roofline ({limits.source}: {limits.flops / 1e12:.3g} TFLOP/s, "
        f"{limits.bandwidth / 1e9:.3g} GB/s):"
    )
    print(fmt_row(["system", "phase", "bound s", "measured s", "of limit"], [9, 10, 9, 10, 8]))
    for name, m in per_system.items():
        bound = roofline.bounds(
            sizes["policy"], sizes["reward"], work, limits, critic=name != "ours-grpo"
        )
        measured = {p: m[f"{p}_s"] for p in ("generation", "scoring", "update")}
        share = roofline.fractions(bound, measured)
        out["systems"][name] = {"bound_s": bound, "measured_s": measured, "fraction": share}
        for phase in bound:
            cells = [name, phase, f"{bound[phase]:.4f}", f"{measured[phase]:.4f}"]
            cells.append(f"{100 * share.get(phase, 0):.1f}%")
            print(fmt_row(cells, [9, 10, 9, 10, 8]))
    return out


def fmt_row(cells: list[Any], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    s = settings_from(args)
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in ("ours", "ours-grpo", "trl") for x in systems):
        raise SystemExit(f"--systems: expected ours, ours-grpo and/or trl, got {args.systems!r}")
    if "ours-grpo" in systems and s["batch_size"] % GRPO_SAMPLES:
        raise SystemExit(f"--systems ours-grpo: --batch-size must be a multiple of {GRPO_SAMPLES}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    elif args.preset == "1b":
        raise SystemExit("--preset 1b is meant for --device cuda")

    root = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    try:
        start = time.perf_counter()
        inputs = make_inputs(root, PRESETS[args.preset], s)
        print(
            f"preset {args.preset} on {args.device} ({s['dtype']}): batch {s['batch_size']}, "
            f"micro-batch {s['micro_batch_size']}, prompt {s['prompt_length']} + "
            f"{s['new_tokens']} new tokens, {s['ppo_epochs']} PPO epoch(s) x 1 minibatch, "
            f"{s['warmup']} warm-up + {s['iterations']} timed iterations, "
            f"{s['repeats']} repeat(s); checkpoints written in "
            f"{time.perf_counter() - start:.1f} s to {root}",
            flush=True,
        )
        settings_file = root / "settings.json"
        payload = {"settings": s, "inputs": inputs, "work": str(root)}
        settings_file.write_text(json.dumps(payload))

        limits = roofline.device_limits(args.device, s["dtype"])
        sizes = {k: roofline.model_size(inputs[k]) for k in ("policy", "reward")}
        work = roofline.Work(
            s["batch_size"], s["prompt_length"], s["new_tokens"], s["ppo_epochs"],
            roofline.BYTES[s["dtype"]],
        )  # fmt: skip
        widths = [9, 4, 9, 9, 10, 10, 8, 8, 8, 9, 9]
        header = ["system", "run", "iter s", "tok/s", "tok/cpu-s", "gen tok/s", "gen s", "score s"]
        header += ["update s", "peak MiB", "built MiB"]
        print(fmt_row(header, widths), flush=True)
        runs: list[dict[str, Any]] = []
        for i in range(s["repeats"]):
            for system in systems:
                run = run_child(system, settings_file, args.timeout)
                run["repeat"] = i
                runs.append(run)
                cells = [
                    system,
                    i + 1,
                    f"{run['iteration_s']:.3f}",
                    f"{run['tokens_per_s']:.1f}",
                    f"{run['tokens_per_cpu_s']:.1f}",
                    f"{run['generation_tokens_per_s']:.1f}",
                    f"{run['generation_s']:.3f}",
                    f"{run['scoring_s']:.3f}",
                    f"{run['update_s']:.3f}",
                    f"{run['peak_memory_mib']:.0f}",
                    f"{run['rss_models_built_mib']:.0f}",
                ]
                print(fmt_row(cells, widths), flush=True)
                if "decoding" in run:
                    print(f"        ours decoded with {run['decoding']}", flush=True)

        keys = ("tokens_per_s", "tokens_per_cpu_s", "generation_tokens_per_s", "iteration_s")
        keys += ("generation_s",)
        keys += ("scoring_s", "update_s", "peak_memory_mib", "rss_after_imports_mib")
        keys += ("rss_models_built_mib", "peak_rss_before_train_mib")
        per_system = {
            name: {k: statistics.median(r[k] for r in runs if r["system"] == name) for k in keys}
            for name in systems
        }
        summary: dict[str, Any] = {
            "settings": s,
            "memory_metric": "torch.cuda.max_memory_allocated"
            if args.device == "cuda"
            else "peak RSS (ru_maxrss)",
            **per_system,
            "runs": runs,
            "ratio_tokens_per_s": None,
            "ratio_generation_tokens_per_s": None,
            "ratio_peak_memory": None,
        }
        print("medians over repeats:")
        for name, m in per_system.items():
            print(
                f"  {name:9s}: {m['tokens_per_s']:.1f} tokens/s over whole iterations, "
                f"{m['tokens_per_cpu_s']:.1f} per CPU second, "
                f"{m['generation_tokens_per_s']:.1f} generation tokens/s, "
                f"peak {m['peak_memory_mib']:.0f} MiB (RSS {m['rss_after_imports_mib']:.0f} MiB "
                f"after imports, {m['rss_models_built_mib']:.0f} MiB with the models built)"
            )
        summary["roofline"] = roofline_report(per_system, limits, sizes, work)
        if {"ours", "ours-grpo"} <= set(systems):
            ppo, grpo = per_system["ours"], per_system["ours-grpo"]
            summary["ratio_grpo_peak_memory"] = round(
                grpo["peak_memory_mib"] / ppo["peak_memory_mib"], 3
            )
            print(
                f"GRPO / PPO iteration (ours, same responses): peak memory "
                f"x{summary['ratio_grpo_peak_memory']} ({grpo['peak_memory_mib']:.0f} vs "
                f"{ppo['peak_memory_mib']:.0f} MiB: no critic, no value loss), tokens/s "
                f"x{grpo['tokens_per_s'] / ppo['tokens_per_s']:.2f}"
            )
        if {"ours", "trl"} <= set(systems):
            ours, trl = per_system["ours"], per_system["trl"]
            # Each repeat's ours/trl pair ran back to back: its ratio is robust to drift.
            by = {(r["system"], r["repeat"]): r for r in runs}
            pairs = [
                by["ours", i]["tokens_per_s"] / by["trl", i]["tokens_per_s"]
                for i in range(s["repeats"])
            ]
            cpu_pairs = [
                by["ours", i]["tokens_per_cpu_s"] / by["trl", i]["tokens_per_cpu_s"]
                for i in range(s["repeats"])
            ]
            summary.update(
                ratio_tokens_per_s=round(statistics.median(pairs), 3),
                ratio_tokens_per_s_per_repeat=[round(x, 3) for x in pairs],
                ratio_tokens_per_cpu_s=round(statistics.median(cpu_pairs), 3),
                ratio_generation_tokens_per_s=round(
                    ours["generation_tokens_per_s"] / trl["generation_tokens_per_s"], 3
                ),
                ratio_peak_memory=round(ours["peak_memory_mib"] / trl["peak_memory_mib"], 3),
                ratio_peak_memory_above_imports=round(
                    (ours["peak_memory_mib"] - ours["rss_after_imports_mib"])
                    / (trl["peak_memory_mib"] - trl["rss_after_imports_mib"]),
                    3,
                )
                if args.device == "cpu"
                else None,
            )
            print(
                f"ours / TRL: tokens/s x{summary['ratio_tokens_per_s']} (per repeat "
                f"{summary['ratio_tokens_per_s_per_repeat']}; per CPU second "
                f"x{summary['ratio_tokens_per_cpu_s']}), generation tokens/s "
                f"x{summary['ratio_generation_tokens_per_s']}, peak memory "
                f"x{summary['ratio_peak_memory']}"
                + (
                    f" (above post-import RSS x{summary['ratio_peak_memory_above_imports']})"
                    if args.device == "cpu"
                    else ""
                )
            )
        print(json.dumps(summary), flush=True)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
