"""The experiment report: what ``salsa evaluate`` measured and what the runs logged, read across
seeds, as ``summary.json`` (flat keys for scripts), ``report.md`` (tables, and what they show)
and ``frontier.png`` (reward against KL, sorted by KL, with a band across seeds).

A pipeline YAML names what to report in its ``report:`` section (see ``configs/quickstart.yaml``):
the evaluation directory, the baselines (models evaluated at KL 0, e.g. the SFT model and the
soup), the methods (one evaluated model and one log directory per seed, and the baseline each is
trained from) and the comparisons to make, and optionally ``salsa landscape`` outputs (the
reward of the soups between the SFT models, the paper's Figure 2). Intervals are 95 % percentile
bootstraps that resample prompts and seeds together (``functional.seeds_bootstrap_ci``).

Reward hacking (``hacking:``, methods by name): the reward-model score minus the gold reward of
each validation during training, against the KL, at matched KL values like the frontier: a
method that hacks its reward model sees this gap grow as it moves away from its reference. A
reward-model soup in the evaluation (``salsa evaluate --reward_soup``) adds the members', soup's
and ensemble's agreement with the gold reward. A run whose reference moved is placed at its KL
to where its reference started (``kl_of``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluate import fmt, load_answers
from salsa_lightning.functional import seeds_bootstrap_ci, win_rate
from salsa_lightning.outputs import file_written_aside

JUDGES = {"gold": "gold reward", "score": "reward-model score"}


@dataclass
class Method:
    """A trained method: its evaluated models and training logs, one per seed.

    Attributes:
        models: Names of its models in the evaluation, one per seed.
        logs: Their log directories (the runs' ``save_dir/name``), in the same order.
        reference: The baseline it starts from and is held to by the KL (its KL-0 point).
        own_reward_model: It trained on another reward model than the evaluation's (a WARM
            soup): its training-time scores are that model's, so the evaluation's score of its
            reference is not the KL-0 point of its score frontier (the gold frontier keeps it).
    """

    models: list[str]
    logs: list[str] = field(default_factory=list)
    reference: str | None = None
    own_reward_model: bool = False


@dataclass
class ReportSpec:
    """The ``report:`` section of a pipeline YAML."""

    evaluation: str
    output: str
    baselines: dict[str, str] = field(default_factory=dict)  # name -> evaluated model
    methods: dict[str, Method] = field(default_factory=dict)
    comparisons: list[list[str]] = field(default_factory=list)
    title: str = "SALSA experiment"
    hacking: list[str] = field(default_factory=list)  # methods whose score - gold to report
    landscapes: dict[str, str] = field(default_factory=dict)  # name -> salsa landscape output

    @classmethod
    def from_yaml(cls, spec: dict[str, Any]) -> ReportSpec:
        methods = {k: Method(**v) for k, v in (spec.get("methods") or {}).items()}
        out = cls(**{**spec, "methods": methods})
        unknown = [name for name in out.hacking if name not in methods]
        if unknown:
            raise SalsaError(
                f"report: hacking names {unknown[0]!r}, which is not one of the methods "
                f"{list(methods)}."
            )
        return out

    def models_of(self) -> dict[str, list[str]]:
        """``{name: evaluated models}`` of every baseline (one) and method (one per seed)."""
        return {
            **{name: [model] for name, model in self.baselines.items()},
            **{name: method.models for name, method in self.methods.items()},
        }


# ----------------------------------------------------------------------------- reading


def eval_curve(log_dir: Path) -> list[dict[str, float]]:
    """``eval/*`` rows of a run's CSV log (one per validation), in step order; a step logged
    twice (a resumed run redoes the steps after its checkpoint) keeps its last row."""
    files = sorted(log_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    by_step: dict[float, dict[str, float]] = {}
    for r in csv.DictReader(files[-1].open()):
        if r.get("eval/kl"):
            row = {
                k: float(v) for k, v in r.items() if v and (k.startswith("eval/") or k == "step")
            }
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def kl_of(row: dict[str, float]) -> float:
    """The KL coordinate of a validation row: the KL to the reference the run started from
    (``eval/kl``, or ``eval/kl_initial`` when that reference moved, whose ``eval/kl`` is to
    where it moved), so that every method is placed by how far it went from its start."""
    return row.get("eval/kl_initial", row["eval/kl"])


def per_seed(
    answers: dict[str, dict[str, torch.Tensor]], models: list[str], key: str
) -> torch.Tensor | None:
    """``[seeds, prompts]`` values of ``key`` for the models of one method (None if missing)."""
    if not models or any(key not in answers.get(m, {}) for m in models):
        return None
    return torch.stack([answers[m][key] for m in models])


def key_name(name: str) -> str:
    return name.replace("-", "_")


def read_landscapes(root: Path, spec: ReportSpec) -> dict[str, dict[str, Any]]:
    """``{name: {checkpoints, points}}`` of the spec's ``salsa landscape`` outputs, each point
    ``{weights, gold, gold_ci, score, score_ci}`` as ``landscape.json`` holds it."""
    out = {}
    for name, directory in spec.landscapes.items():
        path = root / directory / "landscape.json"
        if not path.is_file():
            raise SalsaError(
                f"report: {path} is missing (report.landscapes {name!r}); run salsa landscape first."
            )
        result = json.loads(path.read_text())
        out[name] = {"checkpoints": result["checkpoints"], "points": result["points"]}
    return out


# ----------------------------------------------------------------------------- the frontier


def interpolate(points: list[tuple[float, float]], kl: float) -> float | None:
    """The reward at ``kl`` on the piecewise-linear curve through the (KL, reward) points,
    sorted by KL first (a run's KL does not grow monotonically)."""
    points = sorted(points)
    for (k0, v0), (k1, v1) in zip(points, points[1:], strict=False):
        if k0 <= kl <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def common_grid(runs: list[list[tuple[float, float]]], n: int) -> list[float]:
    """``n`` KL values spanning the range every run covers (empty when they do not overlap)."""
    ranges = [(min(p)[0], max(p)[0]) for p in runs if len(p) > 1]
    if not ranges or len(ranges) < len(runs):
        return []
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return [low + (high - low) * i / (n - 1) for i in range(n)] if high > low else []


def band(runs: list[list[tuple[float, float]]], grid: list[float]) -> dict[str, list[float]]:
    """The mean and the lowest and highest seed of ``runs`` at each KL of ``grid``."""
    at = [[interpolate(p, k) for p in runs] for k in grid]
    return {
        "mean": [sum(v) / len(v) for v in at],
        "low": [min(v) for v in at],
        "high": [max(v) for v in at],
    }


def hacking_points(rows: list[dict[str, float]]) -> list[tuple[float, float]]:
    """``(KL, reward-model score - gold reward)`` of a run's validations (``eval_curve`` rows)."""
    return [
        (kl_of(r), r["eval/score"] - r["eval/gold"])
        for r in rows
        if "eval/score" in r and "eval/gold" in r
    ]


def frontier(curves: dict[str, list[list[tuple[float, float]]]], n: int = 5) -> dict[str, Any]:
    """Each method's mean and band (lowest, highest seed) at matched KL values, inside the KL
    range that every seed of every method covers (empty when there is none)."""
    grid = common_grid([p for runs in curves.values() for p in runs], n)
    if not grid:
        return {}
    return {"kl": grid, **{name: band(runs, grid) for name, runs in curves.items()}}


# ----------------------------------------------------------------------------- the report


def interval(values: torch.Tensor, seed: int) -> dict[str, float]:
    """The mean of ``[seeds, prompts]`` values with its interval over seeds and prompts."""
    mean, low, high = seeds_bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high}


def build_summary(
    spec: ReportSpec, results: dict[str, Any], answers: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    """The report's numbers: per method and baseline, per prompt set and judge, the mean over
    seeds with its interval; the comparisons' win rates; the reward model's agreement."""
    sets: dict[str, Any] = {}
    for set_name, by_model in answers.items():
        entry: dict[str, Any] = {"methods": {}, "win_rates": {}}
        groups = spec.models_of()
        for name, models in groups.items():
            stats = {}
            for judge in JUDGES:
                values = per_seed(by_model, models, judge)
                if values is not None:
                    stats[judge] = interval(values, seed)
                    stats[f"{judge}_per_seed"] = values.mean(1).tolist()
            kl = per_seed(by_model, models, "kl")  # models evaluated against their reference
            if kl is not None:
                stats["kl"] = interval(kl, seed)
                stats["kl_per_seed"] = kl.mean(1).tolist()
            entry["methods"][name] = stats
        for a, b in spec.comparisons:
            for judge in JUDGES:
                va, vb = per_seed(by_model, groups[a], judge), per_seed(by_model, groups[b], judge)
                if va is None or vb is None:
                    continue
                # Seed i of one against seed i of the other; a single run (a baseline) against
                # every seed of the other.
                s = max(len(va), len(vb)) if 1 in (len(va), len(vb)) else min(len(va), len(vb))
                va, vb = (
                    va.expand(s, -1) if len(va) == 1 else va[:s],
                    vb.expand(s, -1) if len(vb) == 1 else vb[:s],
                )
                wins = interval(win_rate(va, vb), seed)
                entry["win_rates"][f"{a}_vs_{b}/{judge}"] = {**wins, "seeds": s}
        sets[set_name] = entry
    return {"sets": sets, "reward_model": results.get("reward_model", {})}


def flat_summary(spec: ReportSpec, summary: dict[str, Any], results: dict[str, Any]) -> dict:
    """``summary.json``: flat keys for scripts, in-distribution means over seeds."""
    first_set = next(iter(summary["sets"]))
    ind = summary["sets"].get("in_distribution", summary["sets"][first_set])
    flat: dict[str, Any] = {}
    for name, stats in ind["methods"].items():
        for judge in JUDGES:
            if judge in stats:
                flat[f"{key_name(name)}_{judge}"] = stats[judge]["mean"]
        if "kl" in stats:
            flat[f"{key_name(name)}_kl"] = stats["kl"]["mean"]
    for pair, stats in ind["win_rates"].items():
        comparison, judge = pair.split("/")
        flat[f"{key_name(comparison)}_{judge}_win_rate"] = {
            k: stats[k] for k in ("mean", "ci_low", "ci_high")
        }
    rm = summary["reward_model"]
    if "agreement" in rm:
        flat["rm_gold_agreement"] = rm["agreement"]["mean"]
        flat["rm_gold_agreement_ci"] = [rm["agreement"]["ci_low"], rm["agreement"]["ci_high"]]
    if "agreement_on_samples" in rm:
        flat["rm_gold_agreement_on_sft_samples"] = rm["agreement_on_samples"]["mean"]
    soup = results.get("reward_soup")
    if soup:  # absent unless the evaluation measured a reward-model soup
        scorers = soup["scorers"].items()
        flat["reward_soup_agreement"] = {
            key_name(n): e["agreement"]["mean"] for n, e in scorers if "agreement" in e
        }
        set_name = "in_distribution" if "in_distribution" in summary["sets"] else first_set
        flat["reward_soup_agreement_on_answers"] = {
            key_name(n): e["on_answers"][set_name]["mean"]
            for n, e in scorers
            if set_name in e["on_answers"]
        }
    best = results.get("best_of", {})
    for model, per_set in best.items():
        stats = per_set.get("in_distribution") or next(iter(per_set.values()))
        name = next((n for n, m in spec.baselines.items() if m == model), model)
        flat[f"{key_name(name)}_best_of_{stats['n']}_gold"] = stats["best"]["mean"]
        flat[f"{key_name(name)}_sampled_gold"] = stats["mean"]["mean"]
    flat["seeds"] = {n: len(m.models) for n, m in spec.methods.items()}
    if summary.get("landscapes"):
        flat["landscapes"] = summary["landscapes"]
    return flat


def plot_frontier(curves: dict[str, dict[str, list]], path: Path, n: int = 12) -> None:
    """Reward against KL per method: every seed's validation points, and across its seeds the
    mean (line, sorted by KL) and the band from the lowest to the highest seed, over the KL range
    all its seeds cover, from the KL-0 point of the model it starts from."""
    from matplotlib.figure import Figure

    judges = [j for j in JUDGES if curves.get(j)]
    if not judges:
        return
    fig = Figure(figsize=(5.5 * len(judges), 4.2))
    for ax, judge in zip(fig.subplots(1, len(judges), squeeze=False)[0], judges, strict=True):
        for i, (name, runs) in enumerate(curves[judge].items()):
            color = f"C{i}"
            kl, reward = zip(*[p for points in runs for p in points], strict=True)
            ax.scatter(kl, reward, color=color, s=9, alpha=0.45)
            grid = common_grid(runs, n)
            if grid:
                b = band(runs, grid)
                seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
                ax.plot(grid, b["mean"], color=color, lw=2.2, label=f"{name} ({seeds})")
                ax.fill_between(grid, b["low"], b["high"], color=color, alpha=0.15)
        ax.set_xlabel("KL to the run's reference (nats per response)")
        ax.set_ylabel(JUDGES[judge])
        ax.set_title(f"{JUDGES[judge]} at matched KL")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def markdown(
    spec: ReportSpec,
    summary: dict,
    flat: dict,
    results: dict,
    fr: dict,
    hacking: dict | None = None,
) -> str:
    """``report.md``: every number of ``summary.json`` explained, then what they show."""
    lines = [f"# {spec.title}", "", READING_GUIDE, ""]
    rm = summary["reward_model"]
    if "agreement" in rm:
        lines += [
            "## The reward model against the gold reward",
            "",
            f"- `rm_gold_agreement`: on held-out preference pairs with clean labels "
            f"({rm.get('pairs', '?')} pairs), the reward model ranks the gold-better answer first "
            f"in {fmt(rm['agreement'])} of them.",
        ]
        if "agreement_on_samples" in rm:
            on_samples = rm["agreement_on_samples"]
            # Evaluations before December 2026 counted the pairs beside it, resampled pairs.
            over = "prompts" if "pairs" in on_samples else "pairs"
            pairs = on_samples.get("pairs", rm.get("sample_pairs", "?"))
            lines.append(
                f"- On pairs of answers sampled from {rm.get('samples_model', 'the SFT model')} "
                f"(what it judges during RL; {pairs} pairs with different gold rewards, the "
                f"interval over {over}): {fmt(on_samples)}."
            )
            if on_samples.get("groups"):
                by = ", ".join(
                    f"{g} {fmt(v)} ({v['pairs']} pairs)" for g, v in on_samples["groups"].items()
                )
                lines.append(f"  By family: {by}.")
        lines.append("")
    for name, land in summary.get("landscapes", {}).items():
        lines += landscape_table(name, land)
    for model, per_set in results.get("best_of", {}).items():
        lines += [f"## Room above the SFT model: {model}, best of n sampled answers", ""]
        lines += ["| set | family | one sample (mean) | best of n | gap |", "|---|---|---|---|---|"]
        for set_name, stats in per_set.items():
            rows = [("all", stats)] + sorted(stats.get("groups", {}).items())
            for family, st in rows:
                gap = st["best"]["mean"] - st["mean"]["mean"]
                lines.append(
                    f"| {set_name} | {family} | {st['mean']['mean']:.3f} | "
                    f"{st['best']['mean']:.3f} (n = {stats['n']}) | {gap:+.3f} |"
                )
        lines.append("")
    for set_name, entry in summary["sets"].items():
        lines += [f"## {set_name}: mean over seeds (95 % CI over prompts and seeds)", ""]
        lines += [
            "| model | seeds | gold reward | reward-model score | KL to its reference |",
            "|---|---|---|---|---|",
        ]
        for name, stats in entry["methods"].items():
            seeds = len(spec.methods[name].models) if name in spec.methods else 1
            lines.append(
                f"| {name} | {seeds} | {fmt(stats.get('gold'))} | {fmt(stats.get('score'))} "
                f"| {fmt(stats.get('kl'))} |"
            )
        if entry["win_rates"]:
            lines += [
                "",
                "| comparison | judge | win rate (ties 1/2) | seeds |",
                "|---|---|---|---|",
            ]
            for pair, stats in entry["win_rates"].items():
                comparison, judge = pair.split("/")
                lines.append(
                    f"| {comparison.replace('_vs_', ' vs ')} | {JUDGES[judge]} | {fmt(stats)} | {stats['seeds']} |"
                )
        groups = results["sets"].get(set_name, {}).get("groups")
        if groups:
            families = sorted({f for g in groups.values() for f in g})
            lines += ["", "Gold reward per family (mean over the models' seeds):", ""]
            lines += [
                "| model | " + " | ".join(families) + " |",
                "|---" * (len(families) + 1) + "|",
            ]
            for name, models in spec.models_of().items():
                cells = []
                for f in families:
                    vals = [groups[m][f]["gold"] for m in models if m in groups and f in groups[m]]
                    cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for judge, table in fr.items():
        if table:
            names = [n for n in table if n != "kl"]
            lines += [
                f"## {JUDGES[judge]} at matched KL (training-time validation; mean [lowest, highest seed])",
                "",
            ]
            lines += ["| KL | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for i, k in enumerate(table["kl"]):
                cells = [
                    f"{table[n]['mean'][i]:.3f} [{table[n]['low'][i]:.3f}, {table[n]['high'][i]:.3f}]"
                    for n in names
                ]
                lines.append(f"| {k:.2f} | " + " | ".join(cells) + " |")
            lines.append("")
    if results.get("reward_soup"):
        from salsa_lightning.evaluate import reward_soup_lines

        lines += reward_soup_lines(results["reward_soup"])
    if hacking:
        names = [n for n in hacking if n != "kl"]
        lines += [
            "## Reward hacking along the KL frontier: reward-model score minus gold reward",
            "",
            "Training-time validation, each method's own reward model (a soup's score for a "
            "soup); mean [lowest, highest seed] at matched KL. A gap that grows with the KL is "
            "the reward model being hacked.",
            "",
            "| KL | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for i, k in enumerate(hacking["kl"]):
            cells = [
                f"{hacking[n]['mean'][i]:+.3f} [{hacking[n]['low'][i]:+.3f}, {hacking[n]['high'][i]:+.3f}]"
                for n in names
            ]
            lines.append(f"| {k:.2f} | " + " | ".join(cells) + " |")
        lines += [""]
        for n in names:
            rise = hacking[n]["mean"][-1] - hacking[n]["mean"][0]
            lines.append(
                f"- {n}: the gap moves by {rise:+.3f} from KL {hacking['kl'][0]:.2f} to "
                f"{hacking['kl'][-1]:.2f}."
            )
        lines.append("")
    lines += ["## What the numbers show", "", *findings(spec, summary, flat)]
    for name, land in summary.get("landscapes", {}).items():
        lines.append(landscape_finding(name, land))
    lines += [
        "",
        "Plots: `frontier.png` (reward against KL), and `rewards.png` in the evaluation directory"
        + (", `landscape-<name>.png` (the landscapes)." if summary.get("landscapes") else "."),
        "",
    ]
    return "\n".join(lines)


def landscape_label(weights: list[float], names: list[str]) -> str:
    """``alpha = 0.25`` on a line of two checkpoints, ``sft-1 0.33 / sft-2 0.33 / ...`` else."""
    if len(weights) == 2:
        return f"alpha = {weights[0]:.2f}"
    return " / ".join(f"{n} {w:.2f}" for n, w in zip(names, weights, strict=True))


def landscape_table(name: str, land: dict[str, Any]) -> list[str]:
    """A landscape's points as a markdown table: weights, gold reward and score with intervals."""
    names = [Path(c).name for c in land["checkpoints"]]
    what = (
        f"alpha * {names[0]} + (1 - alpha) * {names[1]}"
        if len(names) == 2
        else "the triangle of " + ", ".join(names)
    )
    lines = [
        f"## The soups' reward, {name}: {what} (95 % CI over prompts)",
        "",
        "| weights | gold reward | reward-model score |",
        "|---|---|---|",
    ]
    for p in land["points"]:
        cells = [landscape_cell(p, judge) for judge in JUDGES]
        lines.append(f"| {landscape_label(p['weights'], names)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def landscape_cell(point: dict[str, Any], judge: str) -> str:
    if judge not in point:
        return ""
    low, high = point.get(f"{judge}_ci", [point[judge], point[judge]])
    return fmt({"mean": point[judge], "ci_low": low, "ci_high": high})


def landscape_finding(name: str, land: dict[str, Any]) -> str:
    """Where the gold reward peaks on a landscape, and the soup of equal weights against the SFT
    models it mixes (the corners): above all of them, between, or below all of them."""
    points = [p for p in land["points"] if "gold" in p]
    if not points:
        return f"- Landscape {name}: no gold reward measured."
    names = [Path(c).name for c in land["checkpoints"]]
    best = max(points, key=lambda p: p["gold"])
    corners = [p for p in points if max(p["weights"]) == 1.0]
    middle = min(points, key=lambda p: max(p["weights"]) - min(p["weights"]))
    ends = ", ".join(f"{p['gold']:.3f}" for p in corners)
    low, high = middle.get("gold_ci", [middle["gold"]] * 2)
    if low > max(p["gold"] for p in corners):
        where = "above every SFT model's mean, its interval excluding them"
    elif middle["gold"] > max(p["gold"] for p in corners):
        where = "above every SFT model's mean, its interval including the best of them"
    elif middle["gold"] < min(p["gold"] for p in corners):
        where = "below every SFT model's mean"
    else:
        where = "between the SFT models' means"
    return (
        f"- Landscape {name}: the gold reward peaks at {landscape_label(best['weights'], names)} "
        f"({best['gold']:.3f}); the soup {landscape_label(middle['weights'], names)} scores "
        f"{middle['gold']:.3f} [{low:.3f}, {high:.3f}] against the SFT models' {ends}: {where}."
    )


READING_GUIDE = """\
How to read this report: *gold reward* is the embedded task's own scorer (the truth the reward
model is trained to approximate); *reward-model score* is what RL optimised. A method that raises
the score but not the gold reward is hacking the reward model. `summary.json` holds the flat
numbers: `<model>_gold` and `<model>_score` (in-distribution means over seeds), `<model>_kl` (the
KL of its sampled answers to the reference it was trained against, summed over each answer's
tokens: methods are compared at this measured KL), `<a>_vs_<b>_gold_win_rate`
(the share of prompts where a's answer has the higher gold reward, ties counting half, seed i
against seed i, with its interval), `rm_gold_agreement` (the reward model's agreement with the gold
reward on held-out pairs), `<model>_best_of_<n>_gold` (the room above the SFT model) and `seeds`."""


def findings(spec: ReportSpec, summary: dict, flat: dict) -> list[str]:
    """Sentences that state what the numbers show, whatever their sign."""
    out = []
    ind = summary["sets"].get("in_distribution") or next(iter(summary["sets"].values()))
    methods = ind["methods"]
    for name, method in spec.methods.items():
        base = method.reference
        if base in methods and "gold" in methods[name] and "gold" in methods[base]:
            g, b = methods[name]["gold"], methods[base]["gold"]
            delta = g["mean"] - b["mean"]
            sure = g["ci_low"] > b["mean"] or g["ci_high"] < b["mean"]
            verb = "raises" if delta > 0 else "lowers"
            line = (
                f"- {name} {verb} the gold reward from {b['mean']:.3f} ({base}) to {g['mean']:.3f} "
                f"({delta:+.3f}; its interval [{g['ci_low']:.3f}, {g['ci_high']:.3f}] "
                f"{'excludes' if sure else 'includes'} {base}'s mean)"
            )
            if "score" in methods[name] and "score" in methods[base]:
                ds = methods[name]["score"]["mean"] - methods[base]["score"]["mean"]
                line += f"; the reward-model score moves by {ds:+.3f}"
                if ds > 0 and delta <= 0:
                    line += ": the reward model is being hacked"
            out.append(line + ".")
    for pair, stats in ind["win_rates"].items():
        comparison, judge = pair.split("/")
        a, b = comparison.split("_vs_")
        side = "above" if stats["ci_low"] > 0.5 else "below" if stats["ci_high"] < 0.5 else "around"
        out.append(
            f"- {a} against {b} by the {JUDGES[judge]}: win rate {fmt(stats)} over "
            f"{stats['seeds']} seed(s): {side} one half"
            + (" (no clear difference)." if side == "around" else ".")
        )
    return out


def slug(name: str) -> str:
    """A file-name-safe form of a landscape's name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def write_report(root: str | os.PathLike, spec: ReportSpec) -> Path:
    """Write ``summary.json``, ``report.md``, ``report.json`` and ``frontier.png`` (and a copy of
    each landscape's plot, ``landscape-<name>.png``); returns the report's path."""
    root = Path(root)
    eval_dir = root / spec.evaluation
    if not (eval_dir / "results.json").is_file():
        raise SalsaError(
            f"report: {eval_dir / 'results.json'} is missing; run the evaluation first."
        )
    results = json.loads((eval_dir / "results.json").read_text())
    answers = load_answers(eval_dir)
    summary = build_summary(spec, results, answers)
    landscapes = read_landscapes(root, spec)
    if landscapes:
        summary["landscapes"] = landscapes
    flat = flat_summary(spec, summary, results)
    id_answers = answers.get("in_distribution") or next(iter(answers.values()))
    curves: dict[str, dict[str, list]] = {j: {} for j in JUDGES}
    for name, method in spec.methods.items():
        for judge in JUDGES:
            runs = []
            for log in method.logs:
                points = [
                    (kl_of(r), r[f"eval/{judge}"])
                    for r in eval_curve(root / log)
                    if f"eval/{judge}" in r
                ]
                base = spec.baselines.get(method.reference or "")
                own = judge == "score" and method.own_reward_model
                if points and not own and base in id_answers and judge in id_answers[base]:
                    points.append((0.0, float(id_answers[base][judge].mean())))  # its KL-0 point
                if points:
                    runs.append(points)
            if runs:
                curves[judge][name] = runs
    fr = {j: frontier(c) for j, c in curves.items()}
    gaps = {
        name: [
            p
            for p in (hacking_points(eval_curve(root / log)) for log in spec.methods[name].logs)
            if p
        ]
        for name in spec.hacking
    }
    hacking = frontier({name: runs for name, runs in gaps.items() if runs}) if spec.hacking else {}
    if hacking:
        flat["hacking_at_matched_kl"] = {
            "kl": hacking["kl"],
            **{key_name(n): hacking[n]["mean"] for n in hacking if n != "kl"},
        }
    out = root / spec.output
    everything = {"summary": summary, "frontier": fr, "curves": curves}
    if spec.hacking:
        everything.update(hacking=hacking, hacking_curves=gaps)
    texts = {
        "summary.json": json.dumps(flat, indent=2) + "\n",
        "report.json": json.dumps(everything, indent=2) + "\n",
        "report.md": markdown(spec, summary, flat, results, fr, hacking),
    }
    for name, text in texts.items():  # each file whole or not at all
        with file_written_aside(out / name) as tmp:
            tmp.write_text(text)
    if any(curves.values()):
        with file_written_aside(out / "frontier.png") as tmp:
            plot_frontier(curves, tmp)
    for name, directory in spec.landscapes.items():
        plot = root / directory / "landscape.png"
        if plot.is_file():
            with file_written_aside(out / f"landscape-{slug(name)}.png") as tmp:
                shutil.copyfile(plot, tmp)
    print(f"[report] written to {out / 'report.md'}", flush=True)
    return out / "report.md"
