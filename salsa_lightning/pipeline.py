"""``salsa pipeline`` and ``salsa quickstart``: the whole experiment as a list of stages.

A pipeline YAML lists stages, each one ``salsa`` command (``fit``, ``soup``, ``evaluate``,
``landscape``) with its YAML files and extra arguments, the paths it reads (``inputs``) and the
paths it writes (``outputs``). The driver checks, before anything runs, that every input exists
or is written by an earlier stage; it runs the stages in order from the output directory,
printing a line per stage, and skips a stage whose outputs all exist (so a rerun resumes).
Config paths are relative to the pipeline YAML; stage paths are relative to the output directory.
``salsa quickstart [--output DIR]`` runs ``configs/quickstart.yaml`` and then writes the report.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salsa_lightning.errors import SalsaError

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Stage:
    """One step of a pipeline.

    Attributes:
        name: Shown in the progress lines.
        command: ``fit``, ``soup``, ``evaluate`` or ``landscape``.
        configs: YAML files, relative to the pipeline YAML (stacked in order).
        args: Extra command-line arguments, e.g. ``["--seed_everything", "2"]``.
        inputs: Paths the stage reads.
        outputs: Paths the stage writes; all present means done.
    """

    name: str
    command: str
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def check_plan(stages: list[Stage], root: Path, config_dir: Path) -> None:
    """Every config file exists and every input exists or comes from an earlier stage."""
    produced: set[str] = set()
    for stage in stages:
        for cfg in stage.configs:
            if not (config_dir / cfg).is_file():
                raise SalsaError(
                    f"stage {stage.name!r}: config file {str(config_dir / cfg)!r} does not exist."
                )
        for path in stage.inputs:
            if path not in produced and not (root / path).exists():
                raise SalsaError(
                    f"stage {stage.name!r} reads {path!r}, which neither exists under {root} nor is "
                    "an output of an earlier stage."
                )
        produced.update(stage.outputs)


def run_stage(stage: Stage, config_dir: Path) -> None:
    from salsa_lightning.cli import main

    args = [stage.command]
    for cfg in stage.configs:
        args += ["--config", str(config_dir / cfg)]
    code = main(args + [str(a) for a in stage.args])
    if code:
        raise SalsaError(
            f"stage {stage.name!r} failed (exit status {code}); see the message above."
        )


def run_pipeline(
    config: str | os.PathLike, output: str | os.PathLike = ".", stages: list[Stage] | None = None
) -> Path:
    """Run the stages of a pipeline YAML (or ``stages``) from ``output``; returns ``output``."""
    import yaml

    config_path = Path(config).resolve()
    if stages is None:
        spec = yaml.safe_load(config_path.read_text()) or {}
        stages = [Stage(**s) for s in spec.get("stages", [])]
    if not stages:
        raise SalsaError(f"pipeline {str(config_path)!r} lists no stages.")
    root = Path(output).resolve()
    check_plan(stages, root, config_path.parent)
    root.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(root)
    try:
        for i, stage in enumerate(stages, 1):
            head = f"[{i}/{len(stages)}] {stage.name}"
            if stage.outputs and all(Path(p).exists() for p in stage.outputs):
                print(f"{head}: done already ({', '.join(stage.outputs)}), skipped", flush=True)
                continue
            print(f"{head}: salsa {stage.command} ...", flush=True)
            start = time.perf_counter()
            run_stage(stage, config_path.parent)
            print(f"{head}: finished in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        os.chdir(previous)
    return root


# ----------------------------------------------------------------------------- the report


def eval_curve(log_dir: Path) -> list[dict[str, float]]:
    """``eval/*`` rows of a run's CSV log (one per validation), in order."""
    files = sorted(log_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    by_step: dict[float, dict[str, float]] = {}  # a resumed run logs some steps again: last wins
    for r in csv.DictReader(files[-1].open()):
        if r.get("eval/kl"):
            row = {
                k: float(v)
                for k, v in r.items()
                if v != "" and (k.startswith("eval/") or k == "step")
            }
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def reward_at_kl(curve: list[dict[str, float]], kl: float, key: str) -> float | None:
    """Linear interpolation of ``key`` at ``kl`` along a run's (KL, reward) points."""
    points = sorted((r["eval/kl"], r[key]) for r in curve if key in r)
    for (k0, v0), (k1, v1) in zip(points, points[1:], strict=False):
        if k0 <= kl <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def frontier(curves: dict[str, list[dict[str, float]]], key: str, n: int = 5) -> dict[str, Any]:
    """Reward of each run at matched KL values, inside the KL range every run covers."""
    ranges = [
        (min(r["eval/kl"] for r in c), max(r["eval/kl"] for r in c)) for c in curves.values() if c
    ]
    if len(ranges) < len(curves) or not ranges:
        return {}
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if high <= low:
        return {}
    grid = [low + (high - low) * i / (n - 1) for i in range(n)]
    return {
        "kl": grid,
        **{name: [reward_at_kl(c, k, key) for k in grid] for name, c in curves.items()},
    }


def plot_kl_reward(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Reward against KL to the reference over training, one line per run (from ``eval_curve``)."""
    # A Figure without pyplot: no global backend switch (notebooks keep inline plots).
    from matplotlib.figure import Figure

    keys = [
        k for k in ("eval/score", "eval/gold") if any(k in r for c in curves.values() for r in c)
    ]
    if not keys:
        return
    fig = Figure(figsize=(5 * len(keys), 4))
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        for name, curve in curves.items():
            pts = [(r["eval/kl"], r[key]) for r in curve if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("KL to the run's reference (nats per response)")
        ax.set_ylabel(key)
        ax.set_title("KL-reward frontier")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(root: Path, runs: dict[str, str], eval_dir: str, out: str) -> Path:
    """The quickstart report: evaluation tables, win rates and the KL-reward frontier."""

    results = json.loads((root / eval_dir / "results.json").read_text())
    curves = {name: eval_curve(root / log) for name, log in runs.items()}
    report = {"evaluation": results, "training_curves": curves}
    report["frontier"] = {k: frontier(curves, k) for k in ("eval/score", "eval/gold")}
    out_dir = root / out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    plot_kl_reward(curves, out_dir / "frontier.png")

    from salsa_lightning.evaluate import markdown_report

    lines = ["# SALSA quickstart report", "", markdown_report(results)]
    for key, fr in report["frontier"].items():
        if fr:
            lines += [
                f"## {key} at matched KL",
                "",
                "| KL | " + " | ".join(runs) + " |",
                "|---" * (len(runs) + 1) + "|",
            ]
            for i, k in enumerate(fr["kl"]):
                cells = [f"{fr[r][i]:.3f}" if fr[r][i] is not None else "" for r in runs]
                lines.append(f"| {k:.2f} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        f"Plots: `frontier.png` (KL-reward curves), `{root / eval_dir / 'rewards.png'}` (reward distributions).",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    print(f"[report] written to {out_dir / 'report.md'}", flush=True)
    return out_dir / "report.md"


def find_config(name: str) -> Path:
    """A YAML from ./configs, else from the configs/ of the source checkout."""
    for base in (Path.cwd() / "configs", REPO_CONFIGS):
        if (base / name).is_file():
            return base / name
    raise SalsaError(f"configs/{name} not found here or in {REPO_CONFIGS}; pass --config.")


def run_with_report(config: str | os.PathLike, output: str | os.PathLike = ".") -> Path:
    """Run a pipeline YAML, then write the report its ``report:`` section names (the quickstart);
    returns the output directory."""
    import yaml

    config = Path(config)
    start = time.perf_counter()
    root = run_pipeline(config, output)
    report = (yaml.safe_load(config.read_text()) or {}).get("report", {})
    if report:
        write_report(root, report["runs"], report["evaluation"], report["output"])
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s", flush=True)
    return root
