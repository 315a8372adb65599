"""Tests for salsa_lightning.sft (and the FineTuneModule base in stage.py): real SFT runs of the
shipped tiny base model on the embedded task with real Lightning Trainers, exports loaded back
with plain transformers / peft, and the ``salsa`` command end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import BASE, CONFIGS, adamw, make_trainer
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from salsa_lightning.cli import main
from salsa_lightning.data import IGNORE_INDEX, SFTDataModule
from salsa_lightning.errors import SalsaError
from salsa_lightning.lora import LoraSettings
from salsa_lightning.sft import SFTModule, token_stats

TOK = str(BASE)


def sft_data(task_files, **kwargs) -> SFTDataModule:
    kw = dict(
        tokenizer=TOK,
        train_files=str(task_files["sft_train"]),
        val_files=str(task_files["sft_val"]),
        batch_size=16,
        max_length=64,
    )
    kw.update(kwargs)
    return SFTDataModule(**kw)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- token_stats


def test_token_stats_by_hand():
    # B=2, T=3, V=3. Position t predicts label t+1; -100 labels are skipped.
    logits = torch.zeros(2, 3, 3)
    logits[0, 1] = torch.tensor([0.0, 0.0, math.log(2.0)])  # p(2) = 1/2, argmax 2
    logits[1, 0] = torch.tensor([0.0, 5.0, 0.0])  # argmax 1
    logits[1, 2] = torch.tensor([9.0, 9.0, 9.0])  # last position: never used
    labels = torch.tensor([[7, 1, 2], [IGNORE_INDEX, 0, IGNORE_INDEX]])
    loss, accuracy, n = token_stats(logits, labels)
    # labelled targets: label[0,1]=1 from uniform logits[0,0] (CE ln 3); label[0,2]=2 from
    # logits[0,1] (CE ln 2); label[1,1]=0 from logits[1,0] (CE ln(e^5 + 2)). Label[0,0] is unused.
    expected = (math.log(3.0) + math.log(2.0) + math.log(math.exp(5.0) + 2)) / 3
    assert n.item() == 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # argmax: uniform row -> 0 (target 1, wrong); logits[0,1] -> 2 (right); logits[1,0] -> 1 (target 0, wrong)
    assert accuracy.item() == pytest.approx(1 / 3)


def test_token_stats_all_ignored_counts_zero():
    logits = torch.randn(1, 4, 5)
    labels = torch.full((1, 4), IGNORE_INDEX)
    _, accuracy, n = token_stats(logits, labels)
    assert n.item() == 0 and accuracy.item() == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_model_token_stats_take_the_logits_numbers_in_tiles(tied):
    """SFT's loss, accuracy and count from the labelled positions' hidden states in tiles equal
    those of the full logits (left padding, ignored labels, a row with none), as do every
    weight's gradients (the shipped base; a GPT-2 whose head is its embedding), and nothing of
    vocabulary width is kept for backward."""
    from transformers import AutoConfig

    from salsa_lightning.sft import model_token_stats

    torch.manual_seed(0)
    if tied:
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=300)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(BASE)
    model.eval()  # no dropout: both paths see the same function
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    labels = ids.masked_fill(torch.arange(10) < 6, IGNORE_INDEX)  # the last 4 tokens of each
    labels[2] = IGNORE_INDEX  # a row without labels
    batch = {"input_ids": ids, "attention_mask": mask}
    results = {}
    for path in ("tiles", "logits"):
        model.zero_grad(set_to_none=True)
        saved, head = [], model.get_output_embeddings().weight.untyped_storage().data_ptr()

        def keep(t, saved=saved, head=head):  # views of the head's weight are no memory
            if t.untyped_storage().data_ptr() != head:
                saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            if path == "tiles":
                stats = model_token_stats(model, batch, labels)
            else:
                stats = token_stats(model(**batch).logits, labels)
        stats[0].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        wide = [s for s in saved if len(s) > 1 and s[-1] == vocab]
        results[path] = ([x.detach() for x in stats], grads, wide)
    (tiles, tile_grads, tile_wide), (full, full_grads, full_wide) = (
        results["tiles"],
        results["logits"],
    )
    assert int(tiles[2]) == int(full[2]) == 8
    torch.testing.assert_close(tiles[0], full[0])
    assert tiles[1].item() == full[1].item()
    assert tile_grads.keys() == full_grads.keys() and tile_grads
    for name, grad in tile_grads.items():
        torch.testing.assert_close(grad, full_grads[name], msg=name)
    assert full_wide and not tile_wide  # the logits path keeps [N, V] log-softmax for backward


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def sft_run(task_files, tmp_path_factory):
    """80 steps of SFT from the shipped base on the embedded task, exported."""
    root = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    dm = sft_data(task_files)
    module = SFTModule(model=TOK, optimizer=adamw(1e-4), export_dir=str(root / "export"))
    # inference_mode=False: see test_validate_before_fit (a bug with inference-mode metric state)
    before = make_trainer(root, inference_mode=False).validate(module, datamodule=dm, verbose=False)
    trainer = make_trainer(root, max_steps=80)
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)
    return SimpleNamespace(
        dm=dm,
        module=module,
        trainer=trainer,
        before=before[0],
        after=after[0],
        export=root / "export",
    )


def test_sft_lowers_validation_loss(sft_run):
    before, after = sft_run.before["val/loss"], sft_run.after["val/loss"]
    assert sft_run.trainer.global_step == 80
    # The shipped base was pre-trained on the task's exact answers, so it starts near the
    # demonstrations' own entropy (their slips are random): 0.650 -> 0.620 measured at seed 0,
    # lr 1e-4 (at 3e-4 the 256 training rows overfit by step 80: 0.657).
    assert after < before - 0.02, (before, after)
    assert sft_run.after["val/perplexity"] == pytest.approx(math.exp(after), rel=1e-5)
    assert 0.0 < sft_run.after["val/token_accuracy"] <= 1.0


def test_val_loss_is_token_weighted_mean_over_val_set(sft_run):
    """Recompute val/loss with the exported model in plain transformers, token by token."""
    model = AutoModelForCausalLM.from_pretrained(sft_run.export).eval()
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for batch in sft_run.dm.val_dataloader():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
            )
            total += nll[mask].sum().item()
            count += int(mask.sum())
            correct += int(((logits[:, :-1].argmax(-1) == targets) & mask).sum())
    assert sft_run.after["val/loss"] == pytest.approx(total / count, rel=1e-4)
    assert sft_run.after["val/token_accuracy"] == pytest.approx(correct / count, rel=1e-4)


def test_export_loads_in_plain_transformers_and_generates(sft_run):
    export = sft_run.export
    assert (export / "config.json").is_file()
    meta = json.loads((export / "salsa_training.json").read_text())
    assert meta["stage"] == "SFTModule"
    assert meta["hparams"]["export_dir"] == str(export)

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    trained = sft_run.module.model.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k].cpu()) for k in loaded)
    base = AutoModelForCausalLM.from_pretrained(BASE).state_dict()
    assert any(not torch.equal(loaded[k], base[k]) for k in loaded)  # it did train

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse: a b c"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    n_prompt = prompt["input_ids"].shape[1]
    assert torch.equal(out[0, :n_prompt], prompt["input_ids"][0])
    assert out.shape[1] > n_prompt
    assert tok.decode(out[0, n_prompt:], skip_special_tokens=True).strip() != ""


def test_same_seed_same_weights_other_seed_differs(task_files, tmp_path):
    def run(seed: int) -> dict[str, torch.Tensor]:
        L.seed_everything(seed)
        dm = sft_data(task_files, max_samples=64)
        module = SFTModule(model=TOK, optimizer=adamw(1e-3))
        make_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=dm)
        return state(module.model)

    a, b, c = run(5), run(5), run(6)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_adapter_only_and_exports(task_files, tmp_path):
    L.seed_everything(0)
    dm = sft_data(task_files, max_samples=64)
    export = tmp_path / "lora"
    module = SFTModule(
        model=TOK,
        lora=LoraSettings(r=4, alpha=8),
        optimizer=adamw(1e-2),
        export_dir=str(export),
        export_merged=True,
    )
    module.configure_model()  # build it now to snapshot its starting weights
    start = state(module.model)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    make_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(module, datamodule=dm)
    end = state(module.model)
    lora_keys = [k for k in end if "lora_" in k]
    base_keys = [k for k in end if "lora_" not in k]
    assert lora_keys and base_keys
    assert all(torch.equal(start[k], end[k]) for k in base_keys)
    assert all(not torch.equal(start[k], end[k]) for k in lora_keys if "lora_B" in k)
    # the frozen weights are still exactly the shipped base model's
    base = AutoModelForCausalLM.from_pretrained(BASE).state_dict()
    for k in base_keys:
        plain = k.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(end[k], base[plain]), k

    # the adapter loads with plain peft on top of the base and reproduces the trained model
    assert (export / "adapter_config.json").is_file()
    assert not (export / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(BASE), export
    ).eval()
    batch = next(iter(dm.val_dataloader()))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    module.model.eval()
    with torch.no_grad():
        trained_logits = module.model(**inputs).logits
        peft_logits = peft_model(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
        merged_logits = merged(**inputs).logits
        base_logits = AutoModelForCausalLM.from_pretrained(BASE)(**inputs).logits
    torch.testing.assert_close(peft_logits, trained_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3
    assert not any("lora" in k for k in merged.state_dict())


# ----------------------------------------------------------------------------- failing early


def test_missing_model_path_names_stage_to_run(task_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = SFTModule(model="artifacts/sft-1")
    trainer = make_trainer(tmp_path, max_steps=1)
    with pytest.raises(SalsaError, match=r"'artifacts/sft-1' does not exist.*configs/sft\.yaml"):
        trainer.fit(module, datamodule=sft_data(task_files, max_samples=16))
    assert module.model is None


def test_missing_path_under_a_local_directory_is_refused_without_asking_the_hub(
    task_files, tmp_path, monkeypatch
):
    # 'runs/sft-3' could be a hub id ('org/name'); 'runs' is a directory here, so it is a path,
    # and a typo is named at once (transformers would try the hub, about 50 s offline).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "runs").mkdir()
    module = SFTModule(model="runs/sft-3")
    with pytest.raises(SalsaError, match=r"'runs/sft-3' does not exist.*'runs' is a directory"):
        make_trainer(tmp_path, max_steps=1).fit(
            module, datamodule=sft_data(task_files, max_samples=16)
        )
    assert module.model is None


def test_model_directory_without_config_is_refused(task_files, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    module = SFTModule(model=str(tmp_path / "not-a-model"))
    with pytest.raises(SalsaError, match=r"not-a-model.*holds none of \['config\.json'"):
        make_trainer(tmp_path, max_steps=1).fit(
            module, datamodule=sft_data(task_files, max_samples=16)
        )


def test_a_reward_model_as_the_start_is_refused(stage_outputs, task_files, tmp_path):
    """transformers would load the classifier as a causal LM with a random LM head."""
    reward = stage_outputs["reward"]
    module = SFTModule(model=str(reward))
    with pytest.raises(SalsaError, match=rf"model.model '{reward}' is a sequence classifier"):
        make_trainer(tmp_path, max_steps=1).fit(
            module, datamodule=sft_data(task_files, max_samples=16)
        )
    assert module.model is None


def test_model_or_config_required():
    with pytest.raises(SalsaError, match="model.model .* or model.model_config"):
        SFTModule(model=None)


def test_existing_export_dir_refused_before_training_then_overwritten(
    task_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    module = SFTModule(model=TOK, export_dir="out")
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    with pytest.raises(SalsaError, match=r"export_dir 'out' already holds.*overwrite"):
        trainer.fit(module, datamodule=sft_data(task_files, max_samples=32))
    assert trainer.global_step == 0 and module.model is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"

    module = SFTModule(model=TOK, export_dir="out", overwrite=True)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=sft_data(task_files, max_samples=32))
    assert trainer.global_step == 2
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_a_validation_interval_longer_than_an_epoch_is_refused_before_the_model_is_built(
    task_files, tmp_path
):
    """Lightning refuses it too, but in its fit loop, after the model is built (and, with a
    warmup schedule, with a traceback from configure_optimizers)."""
    data = sft_data(task_files, max_samples=64)  # 4 batches of 16; limited to 3 below
    module = SFTModule(model=TOK)
    trainer = make_trainer(
        tmp_path, max_steps=2, val_check_interval=4, limit_train_batches=3, limit_val_batches=1
    )
    with pytest.raises(SalsaError) as err:
        trainer.fit(module, datamodule=data)
    assert "trainer.val_check_interval (4) is more than the 3 training batches" in str(err.value)
    assert "trainer.check_val_every_n_epoch: null" in str(err.value)
    assert module.model is None and trainer.global_step == 0

    # Counted across epochs, as the message offers, the same interval runs.
    module = SFTModule(model=TOK, optimizer=adamw(1e-4))
    trainer = make_trainer(
        tmp_path, max_steps=2, val_check_interval=4, limit_train_batches=3,
        limit_val_batches=1, check_val_every_n_epoch=None,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2

    # A time interval (Lightning then has no batch count to check) runs too.
    module = SFTModule(model=TOK, optimizer=adamw(1e-4))
    trainer = make_trainer(
        tmp_path, max_steps=2, val_check_interval="00:00:10:00", limit_val_batches=1
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2


def test_export_dir_that_is_a_file_is_refused(task_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("not a directory")
    module = SFTModule(model=TOK, export_dir="out")
    with pytest.raises(SalsaError, match="export_dir 'out'"):
        make_trainer(tmp_path, max_steps=1).fit(
            module, datamodule=sft_data(task_files, max_samples=16)
        )


def test_validate_before_fit(task_files, tmp_path):
    dm = sft_data(task_files, max_samples=16)
    module = SFTModule(model=TOK, optimizer=adamw(1e-3))
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)
    assert "val/loss" in trainer.callback_metrics


def test_model_config_builds_random_model_matching_tokenizer(task_files, tmp_path):
    L.seed_everything(0)
    dm = sft_data(task_files, max_samples=32)
    module = SFTModule(
        model=None,
        model_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
        optimizer=adamw(1e-2),
    )  # fmt: skip
    trainer = make_trainer(tmp_path, max_steps=15)
    before = make_trainer(tmp_path, inference_mode=False).validate(
        module, datamodule=dm, verbose=False
    )
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)
    config = module.model.config
    assert config.vocab_size == len(dm.tokenizer) and config.hidden_size == 16
    assert config.pad_token_id == dm.tokenizer.pad_token_id
    assert config.eos_token_id == dm.tokenizer.eos_token_id
    assert before[0]["val/loss"] == pytest.approx(
        math.log(len(dm.tokenizer)), rel=0.1
    )  # random init
    assert after[0]["val/loss"] < before[0]["val/loss"] - 0.5


# ----------------------------------------------------------------------------- the command


def test_cli_fit_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "fit",
            "--config", str(CONFIGS / "sft.yaml"),
            "--trainer.max_steps", "3",
            "--trainer.logger", "false",
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
            "--data.init_args.max_samples", "48",
            "--model.init_args.export_dir", "out",
        ]
    )  # fmt: skip
    assert rc == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "out" / "salsa_training.json").read_text())
    assert meta["stage"] == "SFTModule" and meta["hparams"]["export_dir"] == "out"
    # the embedded task was written under the default task_dir
    assert (tmp_path / "artifacts" / "task" / "sft_train.jsonl").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(BASE)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_cli_bad_input_returns_2_with_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "fit",
            "--config", str(CONFIGS / "sft.yaml"),
            "--trainer.logger", "false",
            "--data.init_args.train_files", "missing.jsonl",
            "--model.init_args.export_dir", "out",
        ]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: data file 'missing.jsonl' does not exist." in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.init_args.optimizer.init_args.lr", "-1",
         "model.optimizer: Invalid learning rate: -1.0; fix its init_args."),
        ("--model.init_args.optimizer.init_args.betas", "[0.9, 1.5]",
         "model.optimizer: Invalid beta parameter at index 1: 1.5; fix its init_args."),
        ("--model.init_args.warmup", "-0.1", "model.warmup must be a non-negative fraction of "
         "the steps (< 1) or step count (>= 1), got -0.1."),
        ("--trainer.accumulate_grad_batches", "0",
         "trainer.accumulate_grad_batches must be at least 1, got 0."),
    ],
)  # fmt: skip
def test_cli_bad_optimizer_settings_are_refused_by_name_before_the_model_is_built(
    flag, value, message, task_files, tmp_path, monkeypatch, capsys
):
    """torch checks an optimizer's settings when it is made, in configure_optimizers, after the
    model is built: a traceback ending in ``ValueError: Invalid learning rate: -1.0``. A negative
    warmup ran without one; ``accumulate_grad_batches 0`` ended in a ZeroDivisionError."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "sft.yaml"), "--trainer.logger", "false",
            "--model.init_args.export_dir", "out", flag, value]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_choice_is_refused_by_the_parser_with_the_choices(tmp_path, monkeypatch, capsys):
    """A choice setting is a ``Literal``: the parser refuses a bad value (exit status 2) with a
    message naming the setting, the value and the choices, before anything is built."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config", str(CONFIGS / "sft.yaml"),
                "--trainer.logger", "false",
                "--data.init_args.overflow", "bogus",
            ]
        )  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "overflow" in err and "bogus" in err and "'truncate', 'filter'" in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing was built or written


def test_cli_help_lists_the_choices_of_the_configured_classes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "salsa.yaml"), "--help"])
    out = capsys.readouterr().out
    assert "--model.init_args.reference_mode {soup, multiple_kl}" in out
    assert "--model.init_args.estimator.name {gae, grpo, rloo, reinforce_baseline}" in out
    assert "--model.init_args.kl.estimator {k1, k2, k3}" in out
    assert "--data.init_args.overflow {truncate, filter}" in out


def test_resume_with_another_world_size_is_refused(task_files, tmp_path):
    """A checkpoint records how many processes wrote it; another count fails with a message
    instead of silently resharding and continuing on other data."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = SFTModule(model=TOK, optimizer=adamw(1e-3))
    trainer = make_trainer(
        tmp_path, max_steps=2, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=sft_data(task_files, max_samples=32))
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["world_size"] == 1
    saved["world_size"] = 2  # as if written by a 2-process run
    torch.save(saved, path)
    resumed = SFTModule(model=TOK, optimizer=adamw(1e-3))
    trainer = make_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    with pytest.raises(SalsaError, match="world size 2, this run has 1"):
        trainer.fit(resumed, datamodule=sft_data(task_files, max_samples=32), ckpt_path=path)
