"""``salsa landscape``: the reward of weight-space mixtures of SFT models (the paper's Figure 2).

Two checkpoints: the reward along the line ``alpha * theta_1 + (1 - alpha) * theta_2``.
Three checkpoints: the reward on a barycentric grid of the triangle they span. Each point is a
soup built in memory (``load_soup``), sampled on the same prompts with the same noise, and
scored; results go to ``landscape.json`` and ``landscape.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from salsa_lightning.errors import SalsaError, require
from salsa_lightning.evaluate import load_prompts, sample_answers
from salsa_lightning.functional import bootstrap_mean_ci
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.outputs import check_output_dir, written_aside
from salsa_lightning.pretrained import check_causal_lm_dir, load_tokenizer
from salsa_lightning.scoring import Scorer, gold_scores
from salsa_lightning.soup import SoupReference, load_soup


def alpha_line(n_points: int) -> list[list[float]]:
    """Weights ``[a, 1 - a]`` for ``n_points`` values of ``a`` from 0 to 1 inclusive.

    Args:
        n_points: Number of points on the line between two models (>= 2).

    Returns:
        The list of weight pairs, starting at ``[0, 1]`` and ending at ``[1, 0]``.
    """
    if n_points < 2:
        raise SalsaError(f"points must be at least 2 (the line's two ends), got {n_points}.")
    return [[k / (n_points - 1), 1.0 - k / (n_points - 1)] for k in range(n_points)]


def barycentric_grid(resolution: int) -> list[list[float]]:
    """All weights ``[w1, w2, w3]`` with ``w_i = k_i / resolution`` and ``sum = 1``.

    Args:
        resolution: Number of steps along each edge of the simplex (>= 1).

    Returns:
        ``(resolution + 1) * (resolution + 2) / 2`` weight triples.
    """
    if resolution < 1:
        raise SalsaError(f"resolution must be at least 1, got {resolution}.")
    return [
        [i / resolution, j / resolution, (resolution - i - j) / resolution]
        for i in range(resolution + 1)
        for j in range(resolution + 1 - i)
    ]


@torch.no_grad()
def mean_rewards(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    generation: GenerationSettings,
    scorer: Scorer | None,
    reward_fn: Callable | None,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Mean reward-model score (``score``) and gold reward (``gold``) of one model's sampled
    answers, each with its 95 % bootstrap interval over the prompts (``score_ci``, ``gold_ci``:
    ``[low, high]``)."""
    answers, _ = sample_answers(model, tokenizer, prompts, generation, batch_size, seed)
    judged = {"score": scorer(prompts, answers) if scorer is not None else None}
    judged["gold"] = gold_scores(reward_fn, prompts, answers)
    out = {}
    for judge, values in judged.items():
        if values is not None:
            mean, low, high = bootstrap_mean_ci(values, seed=seed)
            out[judge], out[f"{judge}_ci"] = mean, [low, high]
    return out


def landscape(
    checkpoints: list[str],
    prompts: str,
    output: str = "artifacts/landscape",
    reward_model: str | None = None,
    reward_fn: Callable[..., Any] | None = None,
    points: int = 11,
    resolution: int = 6,
    max_prompts: int | None = 128,
    generation: GenerationSettings | None = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Reward of the soups on the alpha line (2 checkpoints) or barycentric grid (3).

    Args:
        checkpoints: Two or three SFT checkpoints fine-tuned from one base.
        prompts: Prompt file (json, jsonl, csv or parquet with a prompt column).
        output: Output directory.
        reward_model: Reward model directory (``score``).
        reward_fn: Reward function (``gold``; default the embedded task's when it applies).
        points: Points on the alpha line, ends included.
        resolution: Grid steps per edge of the triangle.
        max_prompts: Prompts used per point.
        generation: Sampling settings (default: sampling at temperature 1, 16 new tokens).
        batch_size: Prompts per generation batch.
        seed: Seed of the sampling noise (the same at every point).
        overwrite: Replace an existing output directory.
    """
    # Every input is checked before any soup is built or sampled.
    check_output_dir(output, overwrite, "landscape output", "--overwrite true", "--output")
    if len(checkpoints) not in (2, 3):
        raise SalsaError(
            "landscape needs 2 checkpoints (alpha line) or 3 (barycentric grid), got "
            f"{len(checkpoints)}: {list(checkpoints)} (separate them with spaces: --checkpoints A B)."
        )
    grid = alpha_line(points) if len(checkpoints) == 2 else barycentric_grid(resolution)
    require(batch_size >= 1, "batch_size", "at least 1", batch_size)
    # Averageable (one architecture, the same tensors and vocabulary), and causal LMs.
    SoupReference(list(checkpoints)).validate()
    check_causal_lm_dir(checkpoints[0], "checkpoint")
    rows = load_prompts(prompts, limit=max_prompts)
    texts = [r["prompt"] for r in rows]
    generation = generation or GenerationSettings()
    tokenizer = load_tokenizer(checkpoints[0])
    scorer = Scorer(reward_model, torch.device("cpu")) if reward_model else None
    results = []
    for i, weights in enumerate(grid):
        model = load_soup(checkpoints, weights)
        rewards = mean_rewards(
            model, tokenizer, texts, generation, scorer, reward_fn, batch_size, seed
        )
        results.append({"weights": weights, **rewards})
        print(
            f"[landscape] {i + 1}/{len(grid)} weights {[round(w, 3) for w in weights]}: {rewards}",
            flush=True,
        )
    out = {
        "checkpoints": checkpoints,
        "prompts": prompts,
        "generation": asdict(generation),
        "points": results,
    }
    with written_aside(output) as out_dir:  # appears whole, or leaves the old one as it was
        (out_dir / "landscape.json").write_text(json.dumps(out, indent=2) + "\n")
        plot_landscape(out, out_dir / "landscape.png")
    return out


def plot_landscape(result: dict[str, Any], path: Path) -> None:
    """Alpha line (reward vs alpha) or barycentric heatmap (reward on the triangle)."""
    # A Figure without pyplot: no global backend switch (notebooks keep inline plots).
    from matplotlib.figure import Figure

    points = result["points"]
    judges = [j for j in ("score", "gold") if j in points[0]]
    fig = Figure(figsize=(5 * len(judges), 4))
    axes = fig.subplots(1, len(judges), squeeze=False)
    names = [Path(c).name for c in result["checkpoints"]]
    for ax, judge in zip(axes[0], judges, strict=True):
        values = [p[judge] for p in points]
        if len(names) == 2:
            alphas = [p["weights"][0] for p in points]
            ax.plot(alphas, values, marker="o")
            if f"{judge}_ci" in points[0]:  # the interval over prompts at each point
                low, high = zip(*[p[f"{judge}_ci"] for p in points], strict=True)
                ax.fill_between(alphas, low, high, alpha=0.2)
            ax.set_xlabel(f"alpha (weight of {names[0]}; 1 - alpha on {names[1]})")
            ax.set_ylabel(judge)
        else:
            # Barycentric -> Cartesian: corners at (0, 0), (1, 0), (0.5, sqrt(3)/2).
            xs = [p["weights"][1] + 0.5 * p["weights"][2] for p in points]
            ys = [0.866 * p["weights"][2] for p in points]
            tri = ax.tricontourf(xs, ys, values, levels=12, cmap="viridis")
            ax.scatter(xs, ys, c="k", s=6)
            for x, y, value in zip(xs, ys, values, strict=True):
                ax.annotate(f"{value:.3f}", (x, y), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
            fig.colorbar(tri, ax=ax, label=judge)
            # The corners' names outside the triangle: below the base, above the apex.
            for (x, y), name, va, dy in zip(
                [(0, 0), (1, 0), (0.5, 0.866)], names, ["top", "top", "bottom"], [-6, -6, 14],
                strict=True,
            ):  # fmt: skip
                ax.annotate(name, (x, y), xytext=(0, dy), textcoords="offset points",
                            ha="center", va=va)  # fmt: skip
            ax.set_xlim(-0.2, 1.2)
            ax.set_ylim(-0.12, 1.02)
            ax.set_axis_off()
        ax.set_title(f"{judge} of the soup")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
