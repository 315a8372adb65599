"""Tests for salsa_lightning.reward: a real Bradley-Terry reward model trained from the shipped
tiny base on the embedded task's preference pairs, its export checked with plain transformers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import lightning as L
import pytest
import torch
from conftest import BASE, CONFIGS, adamw, make_trainer
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from salsa_lightning.cli import main
from salsa_lightning.data import PreferenceDataModule
from salsa_lightning.data.modules import group_pairs
from salsa_lightning.lora import LoraSettings
from salsa_lightning.resume import conflicts
from salsa_lightning.reward import RewardModule
from salsa_lightning.scoring import REWARD_STATS, sequence_scores

TOK = str(BASE)


def pair_data(task_files, **kwargs) -> PreferenceDataModule:
    kw = dict(
        tokenizer=TOK,
        train_files=str(task_files["pairs_train"]),
        val_files=str(task_files["pairs_val"]),
        batch_size=16,
        max_length=64,
    )
    kw.update(kwargs)
    return PreferenceDataModule(**kw)


def val_scores(model, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of the whole validation set by a plain transformers model."""
    chosen, rejected = [], []
    model.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            assert logits.shape == (batch["input_ids"].shape[0], 1)
            c, r = logits[:, 0].float().chunk(2)
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


@pytest.fixture(scope="module")
def reward_run(task_files, tmp_path_factory):
    """96 steps (3 epochs of 32 batches, validated at each epoch end) from the shipped base, at
    the learning rate of configs/reward.yaml."""
    root = tmp_path_factory.mktemp("reward")
    L.seed_everything(0)
    dm = pair_data(task_files)
    module = RewardModule(
        model=TOK, center_coef=0.01, optimizer=adamw(1e-4), export_dir=str(root / "export")
    )
    # inference_mode=False: see test_validate_before_fit in test_sft.py / below
    before = make_trainer(root, inference_mode=False).validate(module, datamodule=dm, verbose=False)
    trainer = make_trainer(root, max_steps=96)
    trainer.fit(module, datamodule=dm)
    return SimpleNamespace(
        dm=dm, module=module, trainer=trainer, before=before[0], export=root / "export"
    )


def test_reward_model_ranks_held_out_pairs(reward_run):
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.export)
    chosen, rejected = val_scores(model, reward_run.dm)
    assert chosen.numel() == 128  # every held-out pair was scored
    accuracy = (chosen > rejected).float().mean().item()
    # Agreement with the gold reward (validation labels are clean), lr 1e-4 as configs/reward.yaml:
    # 0.844 at seed 0, 0.844-0.914 over seeds 0-2 (0.16-0.42 with the fresh score head), measured.
    assert accuracy > 0.8
    assert accuracy > reward_run.before["val/accuracy"] + 0.3
    assert (chosen - rejected).mean() > 0


def test_reward_stats_match_exported_model(reward_run):
    stats = json.loads((reward_run.export / REWARD_STATS).read_text())
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.export)
    chosen, rejected = val_scores(model, reward_run.dm)
    both = torch.cat([chosen, rejected]).double()
    assert stats["mean"] == pytest.approx(both.mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(both.std(unbiased=False).item(), rel=1e-4)
    assert stats["accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    assert stats["std"] > 0.05  # a collapsed model would make the check above vacuous


def test_export_is_plain_one_label_classifier_scoring_last_token(reward_run):
    export = reward_run.export
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id == reward_run.dm.tokenizer.pad_token_id
    assert model.score.weight.shape == (1, model.config.hidden_size)
    meta = json.loads((export / "salsa_training.json").read_text())
    assert meta["stage"] == "RewardModule" and meta["hparams"]["center_coef"] == 0.01

    # by hand: the score is the head applied to the hidden state of each row's last real token
    batch = next(iter(reward_run.dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        by_hand = hidden[torch.arange(ids.shape[0]), last] @ model.score.weight[0]
        got = sequence_scores(model, ids, mask)
        trained = sequence_scores(reward_run.module.model.eval(), ids, mask)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5)
    assert (ids[torch.arange(ids.shape[0]), last] == tok.eos_token_id).all()


def offset_head(module: RewardModule, offset: float) -> torch.nn.Linear:
    """Give the score head a bias of ``offset``: every reward starts shifted by it.

    Bradley-Terry sees only differences, so without centering the bias gets no gradient and the
    shift stays; the centering term is the only force pulling the mean back to zero.
    """
    module.configure_model()
    old = module.model.score
    head = torch.nn.Linear(old.in_features, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.fill_(offset)
    module.model.score = head
    return head


def test_center_coef_pulls_mean_reward_to_zero(task_files, tmp_path):
    means = {}
    for coef in (0.0, 0.1):
        L.seed_everything(0)
        module = RewardModule(model=TOK, center_coef=coef, optimizer=adamw(1e-3))
        head = offset_head(module, 2.0)
        trainer = make_trainer(tmp_path, max_steps=32)  # one epoch, validated at its end
        trainer.fit(module, datamodule=pair_data(task_files))
        means[coef] = module.reward_stats["mean"]
        if coef == 0.0:
            assert head.bias.item() == pytest.approx(2.0, abs=0.01)
    # measured: 2.47 without centering, 0.07 with it
    assert abs(means[0.0]) > 1.5
    assert abs(means[0.1]) < 0.3


def test_reward_stats_fresh_when_stopping_mid_epoch(task_files, tmp_path):
    L.seed_everything(0)
    dm = pair_data(task_files)
    export = tmp_path / "rm"
    module = RewardModule(model=TOK, optimizer=adamw(1e-3), export_dir=str(export))
    trainer = make_trainer(tmp_path, max_steps=40)  # validation ran at step 32 only
    trainer.fit(module, datamodule=dm)
    stats = json.loads((export / REWARD_STATS).read_text())
    chosen, rejected = val_scores(AutoModelForSequenceClassification.from_pretrained(export), dm)
    both = torch.cat([chosen, rejected])
    assert stats["mean"] == pytest.approx(both.mean().item(), abs=1e-4)
    assert stats["std"] == pytest.approx(both.std(unbiased=False).item(), rel=1e-3)


def test_validate_before_fit(task_files, tmp_path):
    dm = pair_data(task_files, max_samples=16)
    module = RewardModule(model=TOK, optimizer=adamw(1e-3))
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)
    assert "val/accuracy" in trainer.callback_metrics


def test_lora_reward_model_exports_adapter_with_score_head(task_files, tmp_path):
    L.seed_everything(0)
    dm = pair_data(task_files, max_samples=64)
    export = tmp_path / "lora-rm"
    module = RewardModule(
        model=TOK, lora=LoraSettings(r=4, alpha=8), optimizer=adamw(1e-2), export_dir=str(export)
    )
    module.configure_model()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # the new head trains with the adapter
    assert all("lora_" in n or "score" in n for n in trainable)
    make_trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(module, datamodule=dm)
    end = module.model.state_dict()
    frozen = [k for k in end if "lora_" not in k and "score" not in k]
    assert all(torch.equal(start[k], end[k]) for k in frozen)

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)
    loaded = PeftModel.from_pretrained(base, export).eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        expected = sequence_scores(module.model.eval(), batch["input_ids"], batch["attention_mask"])
        got = sequence_scores(loaded, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def encoded(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {
        "chosen_ids": prompt + chosen,
        "rejected_ids": prompt + rejected,
        "chosen_prompt_length": len(prompt),
        "rejected_prompt_length": len(prompt),
    }


def test_group_pairs_scores_each_answer_once_and_keeps_every_pair():
    a, b, c = [5], [6, 6], [7]
    rows = [
        encoded([1, 2], a, b),
        encoded([3], a, c),  # another prompt: the same answer is another sequence
        encoded([1, 2], c, b),
        encoded([1, 2], a, c),
        encoded([], [8], [9]),  # no prompt: a row of its own, twice
        encoded([], [8], [9]),
    ]
    groups = group_pairs(datasets.Dataset.from_list(rows)).to_list()
    assert groups == [
        {
            "sequences": [[1, 2, 5], [1, 2, 6, 6], [1, 2, 7]],
            "prompt_lengths": [2, 2, 2],
            "chosen": [0, 2, 0],
            "rejected": [1, 1, 2],
        },
        {"sequences": [[3, 5], [3, 7]], "prompt_lengths": [1, 1], "chosen": [0], "rejected": [1]},
        {"sequences": [[8], [9]], "prompt_lengths": [0, 0], "chosen": [0], "rejected": [1]},
        {"sequences": [[8], [9]], "prompt_lengths": [0, 0], "chosen": [0], "rejected": [1]},
    ]


def ranked_pairs(task_files, path) -> list[dict]:
    """Pairs of every two distinct answers to each of 24 training prompts, a prompt's pairs in
    a row: its answers are the chosen and rejected ones of two of the task's first 48 pairs (up
    to four answers, six pairs)."""
    rows = [json.loads(line) for line in task_files["pairs_train"].read_text().splitlines()]
    out = []
    for first, second in zip(rows[0:48:2], rows[1:48:2], strict=True):
        answers = [first["chosen"], first["rejected"], second["chosen"], second["rejected"]]
        answers = list(dict.fromkeys(answers))
        for i, chosen in enumerate(answers):
            out += [
                {"prompt": first["prompt"], "chosen": chosen, "rejected": r}
                for r in answers[i + 1 :]
            ]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def test_pairs_grouped_by_prompt_score_as_pair_by_pair_and_train(task_files, tmp_path):
    path = tmp_path / "ranked.jsonl"
    pairs = ranked_pairs(task_files, path)
    kw = dict(train_files=str(path), val_files=str(task_files["pairs_val"]), max_samples=None)
    by_pair = pair_data(task_files, **kw, batch_size=len(pairs))
    grouped = pair_data(task_files, **kw, batch_size=24, group_by_prompt=True)
    for dm in (by_pair, grouped):
        dm.setup("fit")
    assert len(grouped.train_data) == 24  # one row per prompt
    batch = next(iter(grouped._loader(grouped.train_data, 24, shuffle=False)))
    tokenizer = grouped.tokenizer
    assert len(batch["chosen_index"]) == len(pairs)
    assert batch["input_ids"].shape[0] < len(pairs)  # 4 answers for 6 pairs a prompt
    # Each pair indexes its own two answers.
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    for k in (0, 7, len(pairs) - 1):
        assert texts[batch["chosen_index"][k]].endswith(pairs[k]["chosen"])
        assert texts[batch["rejected_index"][k]].endswith(pairs[k]["rejected"])

    L.seed_everything(0)
    module = RewardModule(model=TOK, optimizer=adamw(1e-3))
    module.configure_model()
    module.model.eval()
    with torch.no_grad():
        got = module.pair_scores(batch)
        expected = module.pair_scores(
            next(iter(by_pair._loader(by_pair.train_data, len(pairs), False)))
        )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    grouped = pair_data(task_files, **kw, batch_size=4, group_by_prompt=True)
    trainer = make_trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[Losses()])
    trainer.fit(module, datamodule=grouped)
    assert len(losses) == 24  # 6 batches of 4 prompts, 4 epochs
    assert sum(losses[-6:]) < 0.5 * sum(losses[:6])
    assert not torch.equal(start["score.weight"], module.model.state_dict()["score.weight"])


def test_a_resume_refuses_a_changed_group_by_prompt():
    """The setting is in the data module's hyperparameters, which a resumed run must keep
    (it decides what a batch, and so the data position, is)."""
    saved = dict(PreferenceDataModule().hparams)
    assert saved["group_by_prompt"] is False
    now = dict(PreferenceDataModule(group_by_prompt=True).hparams)
    assert conflicts(saved, now, "data") == [
        "data.group_by_prompt: False in the checkpoint, True here"
    ]


def test_cli_reward_without_sft_export_names_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert RewardModule().hparams.model == "artifacts/sft-1"
    rc = main(["fit", "--config", str(CONFIGS / "reward.yaml"), "--trainer.logger", "false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: " in err and "'artifacts/sft-1' does not exist" in err
    assert "salsa fit --config configs/sft.yaml" in err
    assert not (tmp_path / "artifacts" / "reward").exists()
