"""The report's landscape part (issue 26): ``salsa landscape`` outputs named in a pipeline YAML's
``report: landscapes:`` go into summary.json, report.md and the report's plots; without them the
report is what it was (the quickstart's keys)."""

from __future__ import annotations

import json

import pytest
import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluate import (
    evaluate,
    fmt,
    group_agreement,
    sample_agreement,
    summarize_agreement,
)
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.landscape import landscape
from salsa_lightning.report import Method, ReportSpec, landscape_finding, write_report

GEN = GenerationSettings(max_new_tokens=4)


def line(golds: list[float], ci: list[float]) -> dict:
    """A hand-made alpha line of three points; the middle one has the interval ``ci``."""
    points = [
        {"weights": [a, 1 - a], "gold": g} for a, g in zip((0.0, 0.5, 1.0), golds, strict=True)
    ]
    points[1]["gold_ci"] = ci
    return {"checkpoints": ["runs/sft-1", "runs/sft-2"], "points": points}


@pytest.mark.parametrize(
    "golds, ci, where",
    [
        ([0.4, 0.6, 0.5], [0.55, 0.65], "above every SFT model's mean, its interval excluding"),
        ([0.4, 0.6, 0.5], [0.45, 0.65], "above every SFT model's mean, its interval including"),
        ([0.4, 0.45, 0.5], [0.4, 0.5], "between the SFT models' means"),
        ([0.4, 0.3, 0.5], [0.2, 0.4], "below every SFT model's mean"),
    ],
)
def test_the_landscape_finding_places_the_soup_against_the_sft_models(golds, ci, where):
    text = landscape_finding("two seeds", line(golds, ci))
    assert where in text
    assert (
        f"peaks at alpha = {[0.0, 0.5, 1.0][golds.index(max(golds))]:.2f} ({max(golds):.3f})"
        in text
    )
    assert f"scores {golds[1]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in text


def test_the_report_carries_the_landscape_points_and_plot(stage_outputs, task_files, tmp_path):
    out = stage_outputs
    evaluate(
        models={"a": str(out["sft-1"]), "b": str(out["sft-2"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(tmp_path / "eval"),
        reward_model=str(out["reward"]),
        max_prompts=8,
        generation=GEN,
        batch_size=8,
        best_of={"a": 4},
        group_column="family",
        preference_pairs=str(task_files["pairs_val"]),
    )
    land = landscape(
        [str(out["sft-1"]), str(out["sft-2"])],
        str(task_files["prompts_val"]),
        output=str(tmp_path / "land"),
        reward_model=str(out["reward"]),
        points=3,
        max_prompts=8,
        generation=GEN,
        batch_size=8,
    )
    for point in land["points"]:  # each mean with its interval over the prompts
        for judge in ("gold", "score"):
            low, high = point[f"{judge}_ci"]
            assert low <= point[judge] <= high
    spec = ReportSpec(
        evaluation="eval",
        output="report",
        baselines={"sft": "a"},
        methods={"b": Method(models=["b"], reference="sft")},
        comparisons=[["b", "sft"]],
    )
    write_report(tmp_path, spec)
    plain = json.loads((tmp_path / "report/summary.json").read_text())
    assert "landscapes" not in plain  # no landscape named: the summary's keys as before

    spec.landscapes = {"sft-1 to sft-2": "land"}
    write_report(tmp_path, spec)
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["landscapes"]["sft-1 to sft-2"]["points"] == land["points"]
    assert {k: v for k, v in summary.items() if k != "landscapes"} == plain
    report = (tmp_path / "report/report.md").read_text()
    on_samples = json.loads((tmp_path / "eval/results.json").read_text())["reward_model"]
    on_samples = on_samples["agreement_on_samples"]  # a's 4 answers to each of the 8 prompts
    assert 0 < on_samples["pairs"] <= 8 * 6
    assert summary["rm_gold_agreement_on_sft_samples"] == on_samples["mean"]
    by_family = on_samples["groups"]  # the task families of the 8 prompts, pooled back
    assert sum(v["pairs"] for v in by_family.values()) == on_samples["pairs"]
    agreeing = sum(v["mean"] * v["pairs"] for v in by_family.values())
    assert agreeing == pytest.approx(on_samples["mean"] * on_samples["pairs"])
    family, first = next(iter(by_family.items()))
    assert f"By family: {family} {fmt(first)} ({first['pairs']} pairs)" in report
    assert (
        f"{on_samples['pairs']} pairs with different gold rewards, the interval over prompts)"
        in report
    )
    middle = land["points"][1]
    assert f"| alpha = 0.50 | {middle['gold']:.3f} [{middle['gold_ci'][0]:.3f}," in report
    assert "- Landscape sft-1 to sft-2: the gold reward peaks at alpha = " in report
    copied = tmp_path / "report" / "landscape-sft-1-to-sft-2.png"
    assert copied.read_bytes() == (tmp_path / "land/landscape.png").read_bytes()

    spec.landscapes = {"missing": "nowhere"}
    with pytest.raises(SalsaError, match=r"nowhere/landscape.json is missing .*'missing'"):
        write_report(tmp_path, spec)


def test_sample_agreement_counts_each_prompts_pairs_by_hand():
    """Prompt 1: gold [1, 0.5, 0.5], scores [2, 3, 1]: pairs (0,1) reversed, (0,2) agreeing,
    (1,2) tied in gold (not a pair). Prompt 2: gold all equal: no pair. The pooled share is 1
    of 2, and the summary counts 2 pairs."""
    gold = torch.tensor([[1.0, 0.5, 0.5], [0.2, 0.2, 0.2]])
    score = torch.tensor([[2.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    agreeing, pairs = sample_agreement(gold, score)
    assert agreeing.tolist() == [1.0, 0.0] and pairs.tolist() == [2.0, 0.0]
    summary = summarize_agreement(agreeing, pairs, seed=0)
    assert summary["mean"] == 0.5 and summary["pairs"] == 2
    assert summary["ci_low"] <= 0.5 <= summary["ci_high"]
    by_group = group_agreement(agreeing, pairs, ["x", "y"], seed=0)
    assert list(by_group) == ["x"]  # y's prompt has no pair
    assert by_group["x"]["mean"] == 0.5 and by_group["x"]["pairs"] == 2
