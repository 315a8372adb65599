"""``salsa pairs``: preference pairs of a model's own sampled answers, ordered by the gold reward
(issue 26: the pairs a reward model meets during RL, as training data)."""

from __future__ import annotations

import json

import pytest
import torch

from salsa_lightning import PreferenceDataModule
from salsa_lightning.cli import main
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluate import load_models, load_prompts, sample_answers
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.reward import judged_pairs, sampled_pairs
from salsa_lightning.task import gold_reward

GEN = GenerationSettings(max_new_tokens=6)


def test_judged_pairs_orders_by_score_and_skips_ties_and_repeats():
    answers = ["a", "b", "a", "c", "d"]
    scores = [0.5, 1.0, 0.5, 0.5, 0.0]
    # "a" again (index 2) is skipped; a and c tie, so they make no pair.
    assert judged_pairs(answers, scores) == [(1, 0), (0, 4), (1, 3), (1, 4), (3, 4)]
    assert judged_pairs(["x", "x"], [1.0, 1.0]) == []


def test_sampled_pairs_are_the_models_answers_ordered_by_the_gold_reward(
    stage_outputs, task_files, tmp_path
):
    model, prompts = str(stage_outputs["sft-1"]), str(task_files["prompts_train"])
    code = main(
        [
            "pairs",
            "--model", model,
            "--prompts", prompts,
            "--output", str(tmp_path / "pairs"),
            "--samples", "3",
            "--max_prompts", "12",
            "--generation", "{max_new_tokens: 6}",
            "--batch_size", "8",
            "--seed", "5",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs/pairs.jsonl").read_text().splitlines()]
    # The same answers drawn again with the same noise give the same pairs, in the same order.
    texts = [r["prompt"] for r in load_prompts(prompts)[:12]]
    policy, tokenizer, _ = load_models(model, None, torch.device("cpu"))
    drawn = [
        sample_answers(policy, tokenizer, texts, GEN, 8, 5 + 7919 * (j + 1))[0] for j in range(3)
    ]
    expected = []
    for i, prompt in enumerate(texts):
        mine = [d[i] for d in drawn]
        golds = [gold_reward(prompt, a) for a in mine]
        expected += [(prompt, mine[c], mine[r]) for c, r in judged_pairs(mine, golds)]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == expected
    assert rows  # a tiny model's answers differ in gold reward often enough
    for r in rows:
        assert r["chosen_gold"] == pytest.approx(gold_reward(r["prompt"], r["chosen"]))
        assert r["chosen_gold"] > r["rejected_gold"]
        assert r["family"] in ("reverse", "sort", "count", "add")
    summary = json.loads((tmp_path / "pairs/pairs.json").read_text())
    assert summary["pairs"] == len(rows) and summary["n_prompts"] == 12
    data = PreferenceDataModule(
        tokenizer=model, train_files=str(tmp_path / "pairs/pairs.jsonl"), val_fraction=0
    )
    data.setup("fit")
    assert len(data.train_data) == len(rows)


def test_sampled_pairs_refuses_bad_inputs_before_sampling(stage_outputs, task_files, tmp_path):
    model, prompts = str(stage_outputs["sft-1"]), str(task_files["prompts_train"])
    with pytest.raises(SalsaError, match="samples >= 2"):
        sampled_pairs(model, prompts, str(tmp_path / "a"), samples=1)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Tell me a joke"}) + "\n")
    with pytest.raises(SalsaError, match=r"no judge for the prompts of .*other\.jsonl.*reward_fn"):
        sampled_pairs(model, str(other), str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(SalsaError, match="already holds files.*--overwrite true"):
        sampled_pairs(model, prompts, str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
