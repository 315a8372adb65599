"""Every LightningCLI YAML under configs/ parses and instantiates with SalsaCLI, into the classes
and settings it names. Files that are not LightningCLI configs (no top-level ``model:`` with a
``class_path``, e.g. ``configs/soup.yaml``) are skipped."""

from __future__ import annotations

import importlib
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE, CONFIGS

from salsa_lightning import embedded
from salsa_lightning.cli import SalsaCLI
from salsa_lightning.finetune import FineTuneModule


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text("utf-8")) or {}


def is_cli_config(path: Path) -> bool:
    doc = load_yaml(path)
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("model"), dict)
        and "class_path" in doc["model"]
    )


ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
CLI_CONFIGS = [p for p in ALL_YAML if is_cli_config(p)]


def resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def assert_subset(expected, actual, where: str) -> None:
    """Every setting the YAML names is in ``actual`` (which may add defaults)."""
    if isinstance(expected, dict):
        actual = asdict(actual) if is_dataclass(actual) else actual
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key}"
            assert_subset(value, actual[key], f"{where}.{key}")
    else:
        assert actual == expected, where


def is_paper(path: Path) -> bool:
    return "paper" in path.relative_to(CONFIGS).parts


def test_config_discovery():
    names = {p.relative_to(CONFIGS).as_posix() for p in CLI_CONFIGS}
    assert {"base.yaml", "sft.yaml", "reward.yaml"} <= names
    assert "soup.yaml" not in names


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_instantiates(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = load_yaml(path)
    model_args = dict(doc["model"].get("init_args") or {})
    data_args = dict((doc.get("data") or {}).get("init_args") or {})
    overrides: list[str] = []
    overridden: set[str] = set()
    if is_paper(path):
        # real paper models are hub ids: swap in the tiny local base to build it offline
        if model_args.get("model") is not None:
            overrides += ["--model.init_args.model", str(BASE)]
            overridden.add("model")
        if "tokenizer" in data_args or "data" in doc:
            overrides += ["--data.init_args.tokenizer", str(BASE)]
            overridden.add("tokenizer")

    cli = SalsaCLI(args=["--config", str(path), *overrides], run=False)

    assert type(cli.model) is resolve(doc["model"]["class_path"])
    if "data" in doc:
        assert type(cli.datamodule) is resolve(doc["data"]["class_path"])
    if "seed_everything" in doc:
        assert cli.config["seed_everything"] == doc["seed_everything"]
    for key in ("max_epochs", "max_steps", "accumulate_grad_batches"):
        if key in (doc.get("trainer") or {}):
            assert getattr(cli.trainer, key) == doc["trainer"][key]

    # the settings the YAML names reach the objects (export_dir above all)
    hp = cli.model.hparams
    for key, value in model_args.items():
        if key in overridden or key == "optimizer" or key not in hp:
            continue
        assert_subset(value, hp[key], key)
    if "export_dir" in model_args:
        assert hp["export_dir"] == model_args["export_dir"]
    if isinstance(cli.model, FineTuneModule) and "model" not in overridden:
        from_config = model_args.get("model_config") is not None
        expected = None if from_config else embedded.resolve(model_args.get("model", "embedded"))
        assert cli.model.model_name == expected
    for key, value in data_args.items():
        if key in overridden or key not in cli.datamodule.hparams:
            continue
        assert_subset(value, cli.datamodule.hparams[key], key)
    if "tokenizer" in data_args and "tokenizer" not in overridden:
        assert cli.datamodule.tokenizer_name == embedded.resolve(data_args["tokenizer"])

    optimizer = model_args.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(cli.model, FineTuneModule):
        opt = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
        assert type(opt) is resolve(optimizer["class_path"])
        for key, value in (optimizer.get("init_args") or {}).items():
            assert opt.defaults[key] == value, key

    if is_paper(path) and isinstance(cli.model, FineTuneModule) and hp.get("model_config") is None:
        cli.model.configure_model()
        assert cli.model.model is not None


def test_cli_overrides_reach_the_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SalsaCLI(
        args=[
            "--config", str(CONFIGS / "sft.yaml"),
            "--model.export_dir", "elsewhere",
            "--model.init_args.lora", "{r: 4, alpha: 8}",
            "--data.init_args.max_length", "32",
            "--seed_everything", "7",
        ],
        run=False,
    )  # fmt: skip
    assert cli.model.hparams.export_dir == "elsewhere"
    assert cli.model.hparams.lora["r"] == 4 and cli.model.hparams.lora["alpha"] == 8
    assert cli.datamodule.hparams.max_length == 32
    assert cli.config["seed_everything"] == 7


def test_unknown_setting_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        SalsaCLI(
            args=["--config", str(CONFIGS / "sft.yaml"), "--model.init_args.no_such", "1"],
            run=False,
        )
    assert "no_such" in capsys.readouterr().err


def test_lora_from_yaml_builds_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SalsaCLI(
        args=["--config", str(CONFIGS / "sft.yaml"), "--model.init_args.lora", "{r: 4, alpha: 8}"],
        run=False,
    )
    cli.model.configure_model()
    trainable = [n for n, p in cli.model.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert cli.model.model.peft_config["default"].r == 4


@pytest.mark.parametrize("stage", ["sft.yaml", "reward.yaml", "salsa.yaml", "ppo.yaml"])
def test_fsdp1_config_stacks_on_every_stage(stage, tmp_path, monkeypatch):
    from salsa_lightning.strategies import FSDP1Strategy

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / stage), "--config", str(CONFIGS / "fsdp1.yaml")]
    cli = SalsaCLI(args=[*args, "--trainer.accelerator", "cpu"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is FSDP1Strategy
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "sharded"
