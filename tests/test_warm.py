"""Reward-model soups (WARM, issue 23): ``reward_model: {checkpoints, weights}`` scores as the
weight average of reward models trained from one init with different seeds, or (``reward_mode:
ensemble``) as the weighted mean of their scores; members that differ are refused by name;
``salsa evaluate --reward_soup`` reports each member's agreement with the gold reward, the
soup's and the ensemble's; the report adds the reward-model score minus the gold reward along
the KL frontier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIGS, _fit
from safetensors.torch import load_file, save_file
from test_salsa import build, fit, prompts, tiny_llama
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from salsa_lightning import PreferenceDataModule, RewardModule, SalsaError
from salsa_lightning.embedded import train_tokenizer
from salsa_lightning.evaluate import evaluate
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.report import Method, ReportSpec, hacking_points, write_report
from salsa_lightning.scoring import (
    REWARD_STATS,
    RewardEnsemble,
    load_reward_model,
    reward_stats,
    sequence_scores,
    text_scores,
)
from salsa_lightning.soup import SoupReference
from salsa_lightning.task import TaskConfig, corpus

WEIGHTS = [0.3, 0.7]


@pytest.fixture(scope="module")
def members(stage_outputs, task_dir, tmp_path_factory) -> list[str]:
    """The session's reward model and a second one from the same init (sft-1 with the score head
    that seed 1 draws) on another data order (data seed 2), as configs/warm.yaml's members are."""
    root = tmp_path_factory.mktemp("reward-2")
    L.seed_everything(1)
    module = RewardModule(
        model=str(stage_outputs["sft-1"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        export_dir=str(root / "reward-2"),
    )
    data = PreferenceDataModule(
        tokenizer=str(stage_outputs["sft-1"]), task_dir=str(task_dir), batch_size=16,
        max_length=64, seed=2,
    )  # fmt: skip
    _fit(module, data, root, steps=15)
    return [str(stage_outputs["reward"]), str(root / "reward-2")]


def texts(task_dir: Path, n: int = 8) -> tuple[list[str], list[str]]:
    rows = [json.loads(x) for x in (task_dir / "pairs_val.jsonl").read_text().splitlines()[:n]]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows]


def test_a_reward_soup_is_the_weight_average_and_the_ensemble_the_mean_score(members, task_dir):
    one, two = (AutoModelForSequenceClassification.from_pretrained(m).eval() for m in members)
    a, b = one.state_dict(), two.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two data orders, two models
    soup = load_reward_model(SoupReference(members, WEIGHTS), "soup")
    for k, v in soup.state_dict().items():
        torch.testing.assert_close(v, 0.3 * a[k] + 0.7 * b[k], rtol=0, atol=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(members[0])
    questions, answers = texts(task_dir)
    s1, s2 = (text_scores(m, tokenizer, questions, answers) for m in (one, two))
    ensemble = load_reward_model(SoupReference(members, WEIGHTS), "ensemble")
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 2
    mean = text_scores(ensemble, tokenizer, questions, answers)
    torch.testing.assert_close(mean, 0.3 * s1 + 0.7 * s2, rtol=0, atol=1e-5)
    souped = text_scores(soup, tokenizer, questions, answers)
    assert torch.isfinite(souped).all() and not torch.allclose(souped, mean, atol=1e-4)


def test_a_soups_reward_stats_are_its_members_weighted_mean(members):
    stats = [json.loads((Path(m) / REWARD_STATS).read_text()) for m in members]
    got = reward_stats(SoupReference(members, WEIGHTS))
    for key in ("mean", "std", "accuracy"):
        assert got[key] == pytest.approx(0.3 * stats[0][key] + 0.7 * stats[1][key], abs=1e-9)
    assert reward_stats(members[0]) == stats[0]  # a directory: its own file, as before


class KeepRollout(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch = batch


@pytest.mark.parametrize("mode", ["soup", "ensemble"])
def test_ppo_on_a_reward_soup_scores_with_it(mode, members, stage_outputs, task_dir, tmp_path):
    """PPO with ``reward_model`` a soup recipe: the rollouts are scored by the soup (or the
    ensemble), normalised with the members' stats, the critic starts from the soup, and the
    recipe records the members' hashes and the mode."""
    L.seed_everything(0)
    soup = SoupReference(members, WEIGHTS)
    module = build(stage_outputs, checkpoints=("sft-1",), weights=None, reward_model=soup,
                   reward_mode=mode)  # fmt: skip
    keep = KeepRollout()
    _, recorder = fit(module, prompts(stage_outputs, task_dir), tmp_path, 1, callbacks=[keep])
    want = load_reward_model(soup, mode)
    got = {k.removeprefix("reward."): v for k, v in snapshot_of(module.reward).items()}
    assert got.keys() == want.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    rollout = module.generate(keep.batch)
    expected = sequence_scores(want, rollout.sequence, rollout.attention_mask)
    torch.testing.assert_close(module.raw_scores(rollout), expected, rtol=1e-5, atol=1e-5)
    assert module.reward_stats == reward_stats(soup)
    critic_start = {k.removeprefix("critic.classifier."): v for k, v in recorder.start.items()
                    if k.startswith("critic.")}  # fmt: skip
    souped = load_reward_model(soup, "soup").state_dict()
    assert critic_start and all(torch.equal(critic_start[k], souped[k]) for k in critic_start)
    recipe = module.recipe()["reward_model"]
    assert recipe["reward_mode"] == mode and len(recipe["sha256"]) == 2
    assert recipe["weights"] == WEIGHTS


def snapshot_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def other_vocabulary(member: str, dst: Path) -> Path:
    """A copy of ``member`` whose tokenizer has other tokens (same model, same vocab size)."""
    shutil.copytree(member, dst)
    tokenizer = train_tokenizer(corpus(TaskConfig(seed=9)), vocab_size=300)
    tokenizer.save_pretrained(dst)
    return dst


def with_nan(member: str, dst: Path) -> Path:
    shutil.copytree(member, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in weights if k.endswith("score.weight"))
    weights[name] = weights[name] * float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def without_stats(member: str, dst: Path) -> Path:
    shutil.copytree(member, dst)
    (dst / REWARD_STATS).unlink()
    return dst


@pytest.mark.parametrize(
    "case", ["not-a-classifier", "other-architecture", "other-vocabulary", "nan", "no-stats"]
)
def test_reward_soup_members_that_differ_are_refused_by_name(
    case, members, stage_outputs, task_dir, tmp_path
):
    good = members[0]
    if case == "not-a-classifier":
        bad, match = str(stage_outputs["sft-1"]), r"differs from .*'architectures'"
    elif case == "other-architecture":
        bad = str(tiny_llama(tmp_path / "other", vocab_size=512))
        match = r"config.json differs from .*'hidden_size' is 16"
    elif case == "other-vocabulary":
        bad = str(other_vocabulary(members[1], tmp_path / "vocab"))
        match = r"tokenizer vocabulary differs from"
    elif case == "nan":
        bad = str(with_nan(members[1], tmp_path / "nan"))
        match = r"model.safetensors: tensor 'score.weight' holds \d+ non-finite"
    else:
        bad = str(without_stats(members[1], tmp_path / "no-stats"))
        match = r"model.reward_model.checkpoints: .*no-stats has no reward_stats.json"
    module = build(stage_outputs, reward_model=SoupReference([good, bad]))
    with pytest.raises(SalsaError, match=match) as refused:
        fit(module, prompts(stage_outputs, task_dir), tmp_path, 1)
    assert bad in str(refused.value)
    if case != "nan":  # the NaN is found reading the weights, every other case from headers
        assert module.policy is None


def test_evaluate_reports_member_soup_and_ensemble_agreement(
    members, stage_outputs, task_files, tmp_path
):
    results = evaluate(
        models={"a": str(stage_outputs["sft-1"]), "b": str(stage_outputs["sft-2"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(tmp_path / "eval"),
        reward_model=members[0],
        max_prompts=16,
        generation=GenerationSettings(max_new_tokens=8),
        batch_size=8,
        preference_pairs=str(task_files["pairs_val"]),
        reward_soup=SoupReference(members),
    )
    soup = results["reward_soup"]
    names = [Path(m).name for m in members]
    assert list(soup["scorers"]) == [*names, "soup", "ensemble"]
    # The first member is the evaluation's reward model: the same agreement, measured twice.
    assert soup["scorers"][names[0]]["agreement"] == results["reward_model"]["agreement"]
    for entry in soup["scorers"].values():
        assert 0.0 <= entry["agreement"]["mean"] <= 1.0 and entry["pairs"] == 128
        assert entry["score_std"] > 0
        assert entry["on_answers"]["val"]["models"] == 2
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Reward-model soup: agreement with the gold reward" in report
    assert "| ensemble |" in report


def test_the_report_gives_the_hacking_gap_along_the_kl_frontier(
    stage_outputs, task_files, tmp_path
):
    """Score minus gold at each validation, at matched KL: hand-made logs of two seeds of two
    methods; the quickstart's summary keys appear unchanged beside the new ones."""
    evaluate(
        models={"a": str(stage_outputs["sft-1"]), "b": str(stage_outputs["sft-2"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(tmp_path / "eval"),
        reward_model=str(stage_outputs["reward"]),
        max_prompts=8,
        generation=GenerationSettings(max_new_tokens=4),
        batch_size=8,
    )
    # step, KL, score, gold: b hacks (the gap grows with the KL), w does not. w's reference
    # moved: its eval/kl is to the moved reference, eval/kl_initial to where it started, which
    # places it on the frontier.
    plain, moved = (
        "step,eval/kl,eval/score,eval/gold",
        "step,eval/kl,eval/kl_initial,eval/score,eval/gold",
    )
    logs = {
        "b-1": (plain, [(16, 1.0, 0.5, 0.4), (32, 3.0, 1.5, 0.5)]),
        "b-2": (plain, [(16, 1.0, 0.7, 0.4), (32, 3.0, 1.7, 0.5)]),
        "w-1": (moved, [(16, 0.5, 1.0, 0.5, 0.4), (32, 0.5, 3.0, 0.8, 0.7)]),
        "w-2": (moved, [(16, 0.5, 1.0, 0.5, 0.4), (32, 0.5, 3.0, 0.8, 0.7)]),
    }
    for name, (header, rows) in logs.items():
        log = tmp_path / "logs" / name / "version_0"
        log.mkdir(parents=True)
        lines = [header] + [",".join(map(str, r)) for r in rows]
        (log / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert hacking_points([{"eval/kl": 1.0, "eval/score": 0.5, "eval/gold": 0.4}]) == [
        (1.0, pytest.approx(0.1))
    ]
    raw = {
        "evaluation": "eval",
        "output": "report",
        "baselines": {"sft": "a"},
        "methods": {
            "b": {"models": ["b"], "logs": ["logs/b-1", "logs/b-2"], "reference": "sft"},
            "w": {
                "models": ["b"],
                "logs": ["logs/w-1", "logs/w-2"],
                "reference": "sft",
                "own_reward_model": True,
            },
        },  # fmt: skip
        "comparisons": [["b", "sft"]],
        "hacking": ["b", "w"],
    }
    spec = ReportSpec.from_yaml(raw)
    assert spec.methods["w"] == Method(["b"], ["logs/w-1", "logs/w-2"], "sft", True)
    write_report(tmp_path, spec)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    gap = summary["hacking_at_matched_kl"]
    assert gap["kl"][0] == 1.0 and gap["kl"][-1] == 3.0
    # b: (0.1 + 0.3) / 2 at KL 1 and (1.0 + 1.2) / 2 at KL 3; w: 0.1 and 0.1.
    assert gap["b"][0] == pytest.approx(0.2) and gap["b"][-1] == pytest.approx(1.1)
    assert gap["w"][0] == pytest.approx(0.1) and gap["w"][-1] == pytest.approx(0.1)
    # Without hacking: the summary the report wrote before (the quickstart's), key for key.
    plain = ReportSpec.from_yaml({**raw, "hacking": [], "output": "plain"})
    write_report(tmp_path, plain)
    before = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert {"sft_gold", "b_gold", "b_vs_sft_gold_win_rate", "seeds"} <= set(before)
    assert summary == {**before, "hacking_at_matched_kl": gap}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Reward hacking along the KL frontier" in report
    assert "- b: the gap moves by +0.900 from KL 1.00 to 3.00." in report
    curves = json.loads((tmp_path / "report" / "report.json").read_text())["curves"]
    # w trained on its own reward model: no KL-0 point from the evaluation's score, b has one
    assert [p[0] for p in curves["score"]["w"][0]] == [1.0, 3.0]
    assert [p[0] for p in curves["score"]["b"][0]] == [1.0, 3.0, 0.0]
    with pytest.raises(SalsaError, match="hacking names 'x'"):
        ReportSpec.from_yaml({"evaluation": "e", "output": "o", "hacking": ["x"]})


def test_a_reward_soup_from_the_command_line(members, tmp_path, monkeypatch):
    """configs/warm.yaml's ``reward_model:`` mapping reaches SALSAModule as a soup recipe; a
    string stays a directory."""
    from salsa_lightning.lightning_cli import SalsaCLI

    monkeypatch.chdir(tmp_path)
    soup = f"{{checkpoints: [{members[0]}, {members[1]}], weights: [0.3, 0.7]}}"
    cli = SalsaCLI(args=["--config", str(CONFIGS / "warm.yaml"), "--model.init_args.reward_model",
                         soup, "--model.init_args.reward_mode", "ensemble"], run=False)  # fmt: skip
    assert cli.model.reward_source == SoupReference(members, WEIGHTS)
    assert cli.model.hparams.reward_mode == "ensemble"
    cli = SalsaCLI(args=["--config", str(CONFIGS / "ppo.yaml")], run=False)
    assert cli.model.reward_source == "artifacts/reward"
    with pytest.raises(SystemExit):
        SalsaCLI(args=["--config", str(CONFIGS / "warm.yaml"), "--model.init_args.reward_mode",
                       "median"], run=False)  # fmt: skip


def test_the_experiment_runs_and_reports_the_new_rows(tmp_path):
    """configs/experiment.yaml: the moving-reference and WARM rows, 5 seeds each, their reward
    models as stages, every model evaluated (KL to where its reference started) and reported
    against PPO; the stage plan is consistent."""
    import yaml

    from salsa_lightning.pipeline import Stage, check_plan

    spec = yaml.safe_load((CONFIGS / "experiment.yaml").read_text())
    stages = [Stage(**s) for s in spec["stages"]]
    check_plan(stages, tmp_path, CONFIGS)  # every config exists, every input is made first
    names = {s.name for s in stages}
    assert {"reward-2", "reward-3"} <= names
    report = ReportSpec.from_yaml(spec["report"])
    evaluation = yaml.safe_load((CONFIGS / "experiment-evaluate.yaml").read_text())
    (evaluate_stage,) = [s for s in stages if s.command == "evaluate"]
    references = {
        "ppo-ema": "artifacts/sft-1",
        "salsa-ema": "artifacts/soup",
        "warm": "artifacts/sft-1",
    }
    for method, reference in references.items():
        models = report.methods[method].models
        assert models == [f"{method}-{seed}" for seed in range(1, 6)]
        assert set(models) <= names
        for m in models:
            assert (
                evaluation["models"][m] == f"artifacts/{m}"
                and f"artifacts/{m}" in evaluate_stage.inputs
            )
            assert evaluation["references"][m] == reference
        assert [method, "ppo"] in report.comparisons
    assert report.methods["warm"].own_reward_model and report.hacking == ["ppo", "warm"]
    assert evaluation["reward_soup"]["checkpoints"] == [
        "artifacts/reward", "artifacts/reward-2", "artifacts/reward-3"
    ]  # fmt: skip
    warm = yaml.safe_load((CONFIGS / "warm.yaml").read_text())["model"]["init_args"]
    assert warm["reward_model"]["checkpoints"] == evaluation["reward_soup"]["checkpoints"]
