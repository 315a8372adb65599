"""DPO with any reference (salsa_lightning.dpo, functional.preference): the losses against
hand-worked values, the first step where policy == reference, learning on the embedded task,
precomputed reference log-probs, LoRA's shared reference, bad settings, the YAMLs through the
``salsa`` command, resuming with ``--ckpt_path last``, and FSDP2 / FSDP1 in two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIGS, adamw, make_trainer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from salsa_lightning import DPOModule, PreferenceDataModule, SalsaError
from salsa_lightning.cli import main
from salsa_lightning.dpo import answer_logprobs
from salsa_lightning.evaluate import load_prompts, sample_answers
from salsa_lightning.functional import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_logits,
    preference_metrics,
    sequence_logprobs,
    sigmoid_loss,
)
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.lightning_cli import SalsaCLI
from salsa_lightning.lora import LoraSettings
from salsa_lightning.soup import SoupReference, load_soup
from salsa_lightning.task import GoldReward

LOG2 = math.log(2.0)
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# ----------------------------------------------------------------------------- the losses


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_losses_match_hand_worked_values():
    # h = (log pi_c - log ref_c) - (log pi_r - log ref_r) = (-3 + 4) - (-5 + 4) = 2
    h = preference_logits(t(-3.0), t(-5.0), t(-4.0), t(-4.0))
    assert h.tolist() == [2.0]
    # DPO, beta 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    assert sigmoid_loss(h, 0.5).item() == pytest.approx(0.31326168751822286, abs=1e-12)
    # cDPO, eps 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.28193552 + 0.13132617
    assert sigmoid_loss(h, 0.5, 0.1).item() == pytest.approx(0.41326168751822286, abs=1e-12)
    # IPO, beta 0.5: (h - 1 / (2 * 0.5))^2 = (2 - 1)^2; beta 0.25: (2 - 2)^2; h = 0: (0 - 2)^2
    assert ipo_loss(t(2.0, 0.0), 0.5).tolist() == [1.0, 1.0]
    assert ipo_loss(t(2.0, 0.0), 0.25).tolist() == [0.0, 4.0]
    # hinge, beta 0.5: max(0, 1 - 0.5 h) for h = 2, 0, -2
    assert hinge_loss(t(2.0, 0.0, -2.0), 0.5).tolist() == [0.0, 1.0, 2.0]

    out = dpo_loss(t(-3.0, -2.0), t(-5.0, -2.0), t(-4.0, -2.0), t(-4.0, -2.0), beta=0.5)
    assert out.losses.tolist() == pytest.approx([0.31326168751822286, LOG2], abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5, 0.0]  # 0.5 * (-3 + 4)
    assert out.rejected_rewards.tolist() == [-0.5, 0.0]  # 0.5 * (-5 + 4)
    metrics = preference_metrics(t(-3.0, -2.0), t(-5.0, -2.0), out)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # a tie is no win, as TRL
    assert metrics["rewards/margins"].tolist() == [1.0, 0.0]
    assert metrics["logps/chosen"].tolist() == [-3.0, -2.0]
    ipo = dpo_loss(t(-3.0), t(-5.0), t(-4.0), t(-4.0), beta=0.25, loss="ipo")
    assert ipo.losses.tolist() == [0.0]


def test_loss_gradient_is_dpos():
    """d/dh of -log sigmoid(beta h) is -beta sigmoid(-beta h): at h = 0, -beta / 2."""
    chosen = t(-3.0).requires_grad_()
    dpo_loss(chosen, t(-3.0), t(-3.0), t(-3.0), beta=0.1).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05, abs=1e-12)


def test_sequence_logprobs_sum_the_answer_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    labels = ids.clone()
    labels[0, :2] = -100  # prompt of 2 tokens
    labels[1, :3] = -100  # prompt of 3 tokens
    labels[1, 4] = -100  # padding
    naive = torch.log_softmax(logits, -1)
    want = [
        sum(naive[0, p - 1, ids[0, p]] for p in (2, 3, 4)),
        naive[1, 2, ids[1, 3]],
    ]
    got = sequence_logprobs(logits, labels)
    torch.testing.assert_close(got, torch.stack(want))


def test_answer_logprobs_in_tiles_equal_those_of_the_whole_logits(stage_outputs, task_dir):
    """The answer positions' hidden states through the output layer in tiles give the log-probs
    of the whole sequences' logits, and the same gradient for every weight."""
    model = AutoModelForCausalLM.from_pretrained(stage_outputs["sft-1"])
    data = pairs(stage_outputs, task_dir, max_samples=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grads = []
    for tiles in (True, False):
        model.zero_grad()
        if tiles:
            got = answer_logprobs(model, batch)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            got = sequence_logprobs(logits.logits, batch["labels"])
        got.sum().backward()
        grads.append((got.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (tiled, tiled_grads), (full, full_grads) = grads
    assert tiled.shape == (2 * 16,) and bool((tiled < 0).all())
    torch.testing.assert_close(tiled, full)
    for name, grad in full_grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- helpers


def pairs(out: dict[str, Path], task_dir: Path, **kwargs) -> PreferenceDataModule:
    kwargs = {"batch_size": 16, "max_length": 64, **kwargs}
    return PreferenceDataModule(tokenizer=str(out["sft-1"]), task_dir=str(task_dir), **kwargs)


def build(out: dict[str, Path], checkpoints=("sft-1",), lr: float = 1e-4, **kwargs) -> DPOModule:
    reference = SoupReference([str(out[c]) for c in checkpoints])
    kwargs.setdefault("warmup", 0)  # the schedule's first step would have lr 0
    return DPOModule(reference=reference, optimizer=adamw(lr), **kwargs)


class Recorder(L.Callback):
    """The logged metrics after every training step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module: DPOModule, data: PreferenceDataModule, root: Path, steps: int, **kwargs):
    recorder = Recorder()
    kwargs.setdefault("limit_val_batches", 0)
    trainer = make_trainer(root, max_steps=steps, callbacks=[recorder], **kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, recorder.rows


# ----------------------------------------------------------------------------- the first step


@pytest.mark.parametrize("reference", ["sft-1", "soup", "lora"])
def test_first_step_where_policy_is_the_reference(reference, stage_outputs, task_dir, tmp_path):
    """The policy starts as its reference (a checkpoint, a soup, or itself with the LoRA adapter
    disabled): every pair's logit is 0, so the sigmoid loss is log 2 and every implicit reward
    0, exactly; the step then trains the policy."""
    checkpoints = ("sft-1", "sft-2") if reference == "soup" else ("sft-1",)
    lora = LoraSettings(r=4, alpha=8) if reference == "lora" else None
    L.seed_everything(0)
    module = build(stage_outputs, checkpoints, lr=1e-3, lora=lora)
    _, rows = fit(module, pairs(stage_outputs, task_dir), tmp_path, steps=2)
    first = rows[0]
    assert first["train/loss"] == pytest.approx(LOG2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == 0.0, key
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert rows[1]["rewards/margins"] != 0.0  # the first step moved the policy
    assert (module.reference_model is None) == (reference == "lora")  # LoRA: no second copy


# ----------------------------------------------------------------------------- learning


def held_out_logprobs(model, data: PreferenceDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s log-probs [N] of the chosen and the rejected answers of the held-out pairs."""
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            c, r = answer_logprobs(model.eval(), batch).chunk(2)
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def sampled_gold(model, tokenizer, prompts: list[str]) -> float:
    """Mean gold reward of one sampled answer (temperature 1, seeded) to each prompt."""
    answers, _ = sample_answers(
        model.eval(), tokenizer, prompts, GenerationSettings(max_new_tokens=16), 64, 0
    )
    return float(GoldReward()(prompts, answers).mean())


def test_dpo_raises_held_out_accuracy_and_sampled_gold(stage_outputs, task_files, tmp_path):
    """DPO from the session's sft-1 on the small task's 512 pairs (64 steps of 16 pairs, lr
    1e-4, beta 0.1), then, against sft-1, by plain transformers models: how often the policy
    gives the chosen answer of a held-out pair (128, clean labels) the higher likelihood, and
    the gold reward of sampled answers to the 32 validation prompts (4 answers each, the same
    sampling noise for both models). Measured at seeds 0, 1, 2: accuracy 0.805 -> 0.898,
    0.859, 0.875; gold 0.662 -> 0.765, 0.763, 0.770; the implicit reward ranks 0.781, 0.742,
    0.820 of the held-out pairs right (0 before: all tie), as the module's val metric logs."""
    L.seed_everything(0)
    export = tmp_path / "dpo"
    module = build(stage_outputs, lr=1e-4, export_dir=str(export))
    data = pairs(stage_outputs, task_files["task"].parent)
    trainer, _ = fit(module, data, tmp_path, steps=64, limit_val_batches=1.0)  # 2 epochs
    sft = AutoModelForCausalLM.from_pretrained(stage_outputs["sft-1"])
    dpo = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompts = [r["prompt"] for r in load_prompts(task_files["prompts_val"])] * 4
    (sft_c, sft_r), (dpo_c, dpo_r) = held_out_logprobs(sft, data), held_out_logprobs(dpo, data)
    before = {"accuracy": float((sft_c > sft_r).float().mean())}
    after = {"accuracy": float((dpo_c > dpo_r).float().mean())}
    before["gold"], after["gold"] = (sampled_gold(m, tokenizer, prompts) for m in (sft, dpo))
    implicit = float(((dpo_c - sft_c) > (dpo_r - sft_r)).float().mean())
    print(f"DPO learning: before {before}, after {after}, implicit-reward accuracy {implicit}")
    assert after["accuracy"] >= before["accuracy"] + 0.05, (before, after)
    assert after["gold"] >= before["gold"] + 0.05, (before, after)
    assert implicit > 0.7  # the implicit reward ranks most held-out pairs (0 before: all ties)
    # The module's own validation metric, on the same pairs and weights, agrees.
    logged = float(trainer.callback_metrics["val/rewards/accuracies"])
    assert logged == pytest.approx(implicit, abs=1 / 128)


# ----------------------------------------------------------------------------- variants


def test_precomputed_reference_gives_the_same_steps_without_a_reference(
    stage_outputs, task_dir, tmp_path
):
    """``precompute_ref_log_probs``: the reference scores every pair once when fit starts and is
    freed; the steps then log what per-batch reference passes log (to float rounding: the table
    was scored in other batches, padded to other widths)."""
    runs = {}
    for precompute in (False, True):
        L.seed_everything(0)
        module = build(stage_outputs, lr=1e-3, precompute_ref_log_probs=precompute)
        data = pairs(stage_outputs, task_dir, max_samples=64)
        _, rows = fit(module, data, tmp_path, steps=3, limit_val_batches=2, val_check_interval=3)
        runs[precompute] = (module, rows)
    table_module, table_rows = runs[True]
    assert table_module.reference_model is None and runs[False][0].reference_model is not None
    assert len(table_module.ref_table) == 64 + 128  # every train and validation pair
    for a, b in zip(runs[False][1], table_rows, strict=True):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, abs=1e-4)
    assert table_rows[0]["train/loss"] == pytest.approx(LOG2, abs=1e-5)


def test_lora_policy_exports_the_merged_model(stage_outputs, task_dir, tmp_path):
    """LoRA on the soup: the reference is the policy with its adapter disabled, which stays the
    soup exactly while the adapter trains, and the export is the merged model (its base exists
    only in memory), loadable on its own."""
    L.seed_everything(0)
    export = tmp_path / "lora-dpo"
    module = build(
        stage_outputs, ("sft-1", "sft-2"), lr=1e-2, lora=LoraSettings(r=4, alpha=8),
        export_dir=str(export),
    )  # fmt: skip
    data = pairs(stage_outputs, task_dir, max_samples=64)
    fit(module, data, tmp_path, steps=3)
    assert module.reference_model is None
    soup = load_soup([stage_outputs["sft-1"], stage_outputs["sft-2"]])
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad(), module.policy.disable_adapter():
        torch.testing.assert_close(
            answer_logprobs(module.policy.eval(), batch), answer_logprobs(soup, batch),
            rtol=0, atol=0,
        )  # fmt: skip
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # peft starts B at 0: it trained
    merged = module.policy.merge_and_unload().state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(export).state_dict()
    assert loaded.keys() == merged.keys()
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)


# ----------------------------------------------------------------------------- bad settings


def test_bad_beta_and_label_smoothing_are_refused_when_built(stage_outputs):
    with pytest.raises(SalsaError, match="beta must be positive, got 0"):
        build(stage_outputs, beta=0.0)
    with pytest.raises(SalsaError, match="beta must be positive, got -0.1"):
        build(stage_outputs, beta=-0.1)
    with pytest.raises(SalsaError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5"):
        build(stage_outputs, label_smoothing=0.5)
    with pytest.raises(SalsaError, match="label_smoothing .* sigmoid loss only, not 'ipo'"):
        build(stage_outputs, loss="ipo", label_smoothing=0.1)


def cli_args(out: dict[str, Path], task_dir: Path, root: Path, config: str = "dpo.yaml"):
    checkpoints = "[{}, {}]".format(out["sft-1"], out["sft-2"])
    return [
        "fit",
        "--config", str(CONFIGS / config),
        "--model.init_args.reference.checkpoints",
        checkpoints if config == "salsa-dpo.yaml" else f"[{out['sft-1']}]",
        "--model.init_args.export_dir", str(root / "model"),
        "--data.init_args.tokenizer", str(out["sft-1"]),
        "--data.init_args.task_dir", str(task_dir),
        "--data.init_args.batch_size", "16",
        "--data.init_args.max_samples", "64",
        "--trainer.accelerator", "cpu",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
    ]  # fmt: skip


def test_bad_settings_fail_on_the_command_line_before_any_model(
    stage_outputs, task_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = cli_args(stage_outputs, task_dir, tmp_path)
    assert main([*args, "--model.init_args.beta", "0"]) == 2
    assert "error: beta must be positive, got 0" in capsys.readouterr().err
    reward = stage_outputs["reward"]  # a classifier as the policy: loaded with a random LM head
    assert main([*args, "--model.init_args.policy", str(reward)]) == 2
    assert f"error: model.policy '{reward}' is a sequence classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the parser: a Literal, so --help lists the choices
        SalsaCLI(args=[*args[1:], "--model.init_args.loss", "kto"], run=False)
    err = capsys.readouterr().err
    assert "kto" in err and all(name in err for name in ("sigmoid", "ipo", "hinge"))
    assert not (tmp_path / "model").exists()


def test_pairs_whose_chosen_equals_rejected_are_refused_by_file_and_row(
    stage_outputs, task_files, tmp_path
):
    rows = [json.loads(line) for line in task_files["pairs_train"].read_text().splitlines()[:8]]
    rows[2]["rejected"] = rows[2]["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = build(stage_outputs)
    data = PreferenceDataModule(
        tokenizer=str(stage_outputs["sft-1"]),
        train_files=str(path),
        val_files=str(task_files["pairs_val"]),
        batch_size=4,
    )
    with (
        pytest.warns(UserWarning, match="dropped 1 pairs"),
        pytest.raises(SalsaError, match=rf"{path}: row 3 has chosen == rejected \(1 such train"),
    ):
        fit(module, data, tmp_path, steps=1)
    assert module.policy is None  # refused before any model was built


def test_pairs_grouped_by_prompt_are_refused(stage_outputs, task_dir, tmp_path):
    module = build(stage_outputs)
    with pytest.raises(SalsaError, match="DPO trains pair by pair: set data.group_by_prompt false"):
        fit(module, pairs(stage_outputs, task_dir, group_by_prompt=True), tmp_path, steps=1)
    assert module.policy is None


# ----------------------------------------------------------------------------- the YAMLs


@pytest.mark.parametrize("config", ["dpo.yaml", "salsa-dpo.yaml"])
def test_the_yaml_runs_offline_and_exports(config, stage_outputs, task_dir, tmp_path):
    """``salsa fit --config configs/<config>`` on the session's SFT models: the export loads in
    plain transformers, moved away from the reference it started from (sft-1, or the soup)."""
    args = cli_args(stage_outputs, task_dir, tmp_path, config)
    steps = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    assert main([*args, *steps, "--trainer.log_every_n_steps", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    checkpoints = ["sft-1", "sft-2"] if config == "salsa-dpo.yaml" else ["sft-1"]
    start = load_soup([stage_outputs[c] for c in checkpoints]).state_dict()
    trained = model.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    record = json.loads((tmp_path / "model" / "salsa_training.json").read_text())
    assert record["stage"] == "DPOModule" and len(record["reference"]["sha256"]) == len(checkpoints)
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train/loss", *TRL_METRICS, "val/loss"} <= set(header)
    assert {f"val/{name}" for name in TRL_METRICS} <= set(header)


class StopAfter(L.Callback):
    """Stops fit after ``steps`` optimizer steps, as an interruption would (named by class_path
    in the resume test)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_ckpt_path_last_resumes_to_the_same_weights(stage_outputs, task_dir, tmp_path):
    """6 steps over 2 epochs of 4 batches, uninterrupted, against 3 steps, stopped, then
    resumed with ``--ckpt_path last`` (mid-epoch: the data position is restored too)."""

    def args(root: Path) -> list[str]:
        return cli_args(stage_outputs, task_dir, root) + [
            "--trainer.max_steps", "6",
            "--trainer.callbacks.every_n_train_steps", "1",
        ]  # fmt: skip

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full)) == 0
    stop = ["--trainer.callbacks+=test_dpo.StopAfter", "--trainer.callbacks.steps", "3"]
    assert main(args(part) + stop) == 0
    (last,) = part.rglob("last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 3
    resumed = args(part)
    resumed[resumed.index("--model.init_args.export_dir") + 1] = str(part / "resumed")
    assert main([*resumed, "--ckpt_path", "last"]) == 0
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(part / "resumed" / "model.safetensors")
    stopped = load_file(part / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert any(not torch.equal(a[k], stopped[k]) for k in a)  # the resumed run trained on


# ----------------------------------------------------------------------------- FSDP


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_dpo_in_two_processes_agrees_with_one(strategy, stage_outputs, task_dir, tmp_path):
    """``configs/dpo.yaml`` 4 steps from sft-1 in one process (16 pairs a step) and in two
    (batch_size counts over all ranks: 8 a rank; the sampler deals the same 16 pairs out): the
    loss is a mean over pairs and
    each rank holds as many, so the averaged gradient is the single run's and only float
    rounding differs. Stated tolerances, as the reward model's in test_fsdp.py: validation
    metrics 1e-4, weights within 1e-3 of the update. The sharded checkpoint then resumes to the
    trained weights exactly."""
    from test_fsdp import FSDP1, FSDP2, check_exports, first, metrics, run, stage_args

    extra = [
        "--model.init_args.reference.checkpoints", f"[{stage_outputs['sft-1']}]",
        "--data.init_args.tokenizer", str(stage_outputs["sft-1"]),
        "--trainer.callbacks.every_n_train_steps", "4",
    ]  # fmt: skip
    single, sharded = tmp_path / "single", tmp_path / strategy
    run(stage_args("dpo.yaml", single, task_dir, 16, extra), tmp_path)
    flags = FSDP2 if strategy == "fsdp2" else FSDP1
    args = stage_args("dpo.yaml", sharded, task_dir, 16, extra) + flags  # 16 over all ranks
    run(args, tmp_path)
    one, two = metrics(single), metrics(sharded)
    assert first(one, "train/loss") == pytest.approx(LOG2, abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):  # step 1: the same 16 pairs, one mean
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    assert first(one, "val/rewards/margins") > 0  # 4 steps did train
    keys = ("val/loss", *(f"val/{name}" for name in TRL_METRICS))
    gaps = {key: abs(first(two, key) - first(one, key)) for key in keys}
    print(f"DPO {strategy}: largest validation gap {max(gaps.values()):.2e} ({gaps})")
    assert all(gap <= 1e-4 for gap in gaps.values()), gaps
    check_exports(single, sharded, AutoModelForCausalLM, stage_outputs["sft-1"], rel=1e-3)
    wa, wb = (load_file(root / "model" / "model.safetensors") for root in (single, sharded))
    w0 = load_file(stage_outputs["sft-1"] / "model.safetensors")
    apart = sum(float((wa[k] - wb[k]).square().sum()) for k in wa) ** 0.5
    moved = sum(float((wa[k] - w0[k]).square().sum()) for k in wa) ** 0.5
    print(f"DPO {strategy}: the two exports {apart:.2e} apart, {apart / moved:.2e} of the update")

    (last,) = sharded.rglob("last.ckpt")
    assert last.is_dir() and any(last.glob("*.distcp"))
    resume = [*args, "--ckpt_path", str(last)]
    resume[resume.index("--model.init_args.export_dir") + 1] = str(sharded / "resumed")
    run(resume, tmp_path)  # the checkpoint ended the run: nothing more to train
    wb = load_file(sharded / "model" / "model.safetensors")
    wc = load_file(sharded / "resumed" / "model.safetensors")
    assert wc.keys() == wb.keys() and all(torch.equal(wc[k], wb[k]) for k in wb)


# ----------------------------------------------------------------------------- the report


def test_the_report_gives_each_method_its_measured_kl(tmp_path):
    """The report compares methods at their measured KL: the mean over seeds and prompts of
    each answer's KL to the method's reference (as ``salsa evaluate`` writes it), in
    ``summary.json`` and in the table; a baseline, evaluated without a reference, has none."""
    from salsa_lightning.report import Method, ReportSpec, write_report

    answers = {
        "sft-1": {"gold": [0.5, 0.7], "score": [0.1, 0.2]},
        "dpo-1": {"gold": [0.6, 0.9], "score": [0.3, 0.1], "kl": [0.25, 0.75]},
        "dpo-2": {"gold": [0.8, 0.8], "score": [0.2, 0.2], "kl": [1.0, 2.0]},
    }
    folder = tmp_path / "eval" / "answers" / "in_distribution"
    folder.mkdir(parents=True)
    for model, values in answers.items():
        rows = [{k: v[i] for k, v in values.items()} for i in range(2)]
        (folder / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"sets": {}}))
    spec = ReportSpec(
        evaluation="eval",
        output="report",
        baselines={"sft": "sft-1"},
        methods={"dpo": Method(models=["dpo-1", "dpo-2"], reference="sft")},
        comparisons=[["dpo", "sft"]],
    )
    write_report(tmp_path, spec)
    flat = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert flat["dpo_kl"] == pytest.approx((0.25 + 0.75 + 1.0 + 2.0) / 4)
    assert "sft_kl" not in flat and flat["dpo_gold"] == pytest.approx(0.775)
    table = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert "| model | seeds | gold reward | reward-model score | KL to its reference |" in table
    dpo = next(line for line in table if line.startswith("| dpo | 2 |"))
    assert dpo.split(" | ")[-1].startswith("1.000 [")
    assert next(line for line in table if line.startswith("| sft | 1 |")).endswith("|  |")
