"""Peak memory and time of the streaming soup versus load-everything averaging.

Creates two random ~370 MB fp32 Llama checkpoints in a temporary directory under /tmp, then
runs, each in a fresh subprocess so its peak RSS (VmHWM) is its own:

* ``stream``: :func:`salsa_lightning.soup.write_soup`;
* ``baseline``: ``from_pretrained`` both models, average the state dicts, ``save_pretrained``;
* ``load``: :func:`salsa_lightning.soup.load_soup`, the soup as a model in memory (how SALSA
  builds its policy and reference);
* ``load_baseline``: ``from_pretrained`` both models and average them into the first.

Time and peak RSS are reported for the work itself, after the imports (whose time and RSS
are reported apart), and the stream time includes hashing inputs and output for the recipe.

The systems alternate (stream, baseline, stream, baseline) so drift hits both alike. The last
line printed is one JSON object with every measurement. Usage::

    python benchmarks/soup_memory.py [--layers 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import rss_mib  # benchmarks/, this script's directory

SYSTEMS = ("stream", "baseline", "load", "load_baseline")


def make_checkpoints(root: Path, layers: int) -> list[Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(root / f"sft-{seed}")
        dirs.append(root / f"sft-{seed}")
        del model
    return dirs


def child(system: str, inputs: list[str], output: str) -> None:
    """Run one system and print its time and peak RSS as JSON.

    Imports are timed and measured apart: ``import salsa_lightning`` also loads lightning and
    datasets, which has nothing to do with how the soup is computed.
    """
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    from salsa_lightning.soup import load_soup, write_soup

    import_seconds, import_rss = time.perf_counter() - start, rss_mib("VmRSS")
    start = time.perf_counter()
    if system == "stream":
        write_soup(inputs, [0.5, 0.5], output)
    elif system == "load":
        load_soup(inputs, [0.5, 0.5], dtype=torch.float32)
    else:
        models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in inputs]
        sds = [m.state_dict() for m in models]
        avg = {k: 0.5 * sds[0][k] + 0.5 * sds[1][k] for k in sds[0]}
        models[0].load_state_dict(avg)
        if system == "baseline":
            models[0].save_pretrained(output)
    seconds, peak = time.perf_counter() - start, rss_mib("VmHWM")
    result = {
        "system": system,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "peak_above_imports_mb": peak - import_rss,
        "import_seconds": import_seconds,
        "import_rss_mb": import_rss,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, output, *inputs = args.child
        child(system, inputs, output)
        return

    root = Path(tempfile.mkdtemp(prefix="soup-bench-", dir="/tmp"))
    try:
        inputs = make_checkpoints(root, args.layers)
        size_mb = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors")) / 2**20
        print(f"2 checkpoints of {size_mb:.0f} MiB each in {root}", flush=True)
        runs = []
        for i in range(args.repeats):
            for system in SYSTEMS:
                out = root / f"out-{system}-{i}"
                cmd = [sys.executable, __file__, "--child", system, str(out), *map(str, inputs)]
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                run = json.loads(res.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(
                    f"{system:13s} run {i + 1}: {run['seconds']:6.2f} s, "
                    f"peak RSS {run['peak_rss_mb']:6.0f} MiB "
                    f"({run['peak_above_imports_mb']:5.0f} MiB above the "
                    f"{run['import_rss_mb']:.0f} MiB after imports)",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)  # the load systems write nothing

        def best(system: str, key: str) -> float:
            return min(r[key] for r in runs if r["system"] == system)

        summary = {"checkpoint_mib": round(size_mb, 1), "cpus": os.cpu_count(), "runs": runs}
        for system in SYSTEMS:
            summary[f"{system}_peak_rss_mb"] = best(system, "peak_rss_mb")
            summary[f"{system}_peak_above_imports_mb"] = best(system, "peak_above_imports_mb")
            summary[f"{system}_seconds"] = best(system, "seconds")
        summary["rss_ratio_baseline_over_stream"] = round(
            summary["baseline_peak_rss_mb"] / summary["stream_peak_rss_mb"], 2
        )
        summary["rss_above_imports_ratio"] = round(
            summary["baseline_peak_above_imports_mb"] / summary["stream_peak_above_imports_mb"], 2
        )
        summary["time_ratio_baseline_over_stream"] = round(
            summary["baseline_seconds"] / summary["stream_seconds"], 2
        )
        print(
            f"peak RSS: stream {summary['stream_peak_rss_mb']:.0f} MiB, baseline "
            f"{summary['baseline_peak_rss_mb']:.0f} MiB "
            f"(x{summary['rss_ratio_baseline_over_stream']}; above imports "
            f"x{summary['rss_above_imports_ratio']}); time: stream "
            f"{summary['stream_seconds']:.2f} s, baseline {summary['baseline_seconds']:.2f} s "
            f"(x{summary['time_ratio_baseline_over_stream']})"
        )
        summary["load_rss_above_imports_ratio"] = round(
            summary["load_baseline_peak_above_imports_mb"] / summary["load_peak_above_imports_mb"],
            2,
        )
        print(
            f"in memory: load_soup peak {summary['load_peak_above_imports_mb']:.0f} MiB above "
            f"imports, from_pretrained x2 + average "
            f"{summary['load_baseline_peak_above_imports_mb']:.0f} MiB "
            f"(x{summary['load_rss_above_imports_ratio']}); time {summary['load_seconds']:.2f} s "
            f"vs {summary['load_baseline_seconds']:.2f} s"
        )
        print(json.dumps(summary))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
