"""The paper's configs (``configs/paper/``): Llama-2-7B, Mistral-7B and Gemma-2B on
UltraFeedback-binarized, each through SFT, the reward model, SALSA and PPO.

Two checks per config:

- the documented command (the config stacked with ``configs/fsdp.yaml --trainer.devices 8``)
  builds its Trainer, model and data module with the YAML's settings (CPU here: no GPUs);
- the config runs end to end once its names point at real files: one training step on CPU,
  with the hub model swapped for the shipped tiny base, the hub dataset for a local directory
  laid out like ``HuggingFaceH4/ultrafeedback_binarized`` (same split and column names, rows of
  the embedded task), and the earlier stages' outputs placed at the YAML's own
  ``artifacts/paper/<model>/...`` paths (the tiny SFT and reward models of ``stage_outputs``).
  Only the names, the context lengths (the tiny model has 128 positions) and the Trainer's
  devices and run length are overridden; every other setting is the YAML's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE, CONFIGS
from lightning.pytorch.strategies import ModelParallelStrategy

from salsa_lightning import PreferenceDataModule, PromptDataModule, SFTDataModule
from salsa_lightning.lightning_cli import SalsaCLI
from salsa_lightning.ppo import SALSAModule
from salsa_lightning.pretrained import load_tokenizer
from salsa_lightning.reward import RewardModule
from salsa_lightning.scoring import REWARD_STATS
from salsa_lightning.sft import SFTModule

PAPER = CONFIGS / "paper"
FSDP = CONFIGS / "fsdp.yaml"
DATASET = "HuggingFaceH4/ultrafeedback_binarized"

# Hub id and context window (config.json max_position_embeddings) of each paper model; the
# stand-in tokenizer is like the real one: Llama-2 has no pad token and no chat template,
# Mistral no pad token, Gemma has a pad token.
MODELS = {
    "llama2-7b": {"hub": "meta-llama/Llama-2-7b-hf", "context": 4096, "pad": False, "chat": False},
    "mistral-7b": {
        "hub": "mistralai/Mistral-7B-v0.1",
        "context": 32768,
        "pad": False,
        "chat": True,
    },
    "gemma-2b": {"hub": "google/gemma-2b", "context": 8192, "pad": True, "chat": True},
}
STAGES = {  # stage -> (module, data module, train split, val split, learning rate)
    "sft": (SFTModule, SFTDataModule, "train_sft", "test_sft", 2e-5),
    "reward": (RewardModule, PreferenceDataModule, "train_prefs", "test_prefs", 1e-5),
    "salsa": (SALSAModule, PromptDataModule, "train_gen", "test_gen", 1e-6),
    "ppo": (SALSAModule, PromptDataModule, "train_gen", "test_gen", 1e-6),
}
NAMES = [f"{m}-{s}" for m in MODELS for s in STAGES]
INPUTS = {
    "sft": [],
    "reward": ["sft-1"],
    "salsa": ["sft-1", "sft-2", "reward"],
    "ppo": ["sft-1", "reward"],
}
EXPORT = {"sft": "sft-1", "reward": "reward", "salsa": "salsa", "ppo": "ppo"}


def split_name(name: str) -> tuple[str, str]:
    model, _, stage = name.rpartition("-")
    return model, stage


def load(name: str) -> dict:
    return yaml.safe_load((PAPER / f"{name}.yaml").read_text("utf-8"))


def init_args(doc: dict, part: str) -> dict:
    return doc[part]["init_args"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ultrafeedback_dir(tmp_path_factory: pytest.TempPathFactory, task_files) -> Path:
    """A local dataset directory laid out like UltraFeedback-binarized: the six splits, each with
    its columns (prompt, prompt_id, messages, chosen, rejected, score_chosen, score_rejected;
    chosen/rejected/messages as conversations), filled with a few rows of the embedded task."""

    def rows(key: str, n: int) -> list[dict]:
        lines = task_files[key].read_text("utf-8").splitlines()[:n]
        return [json.loads(line) for line in lines]

    def convo(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    def row(prompt: str, chosen: str, rejected: str) -> dict:
        return {
            "prompt": prompt,
            "prompt_id": str(abs(hash(prompt))),
            "chosen": convo(prompt, chosen),
            "rejected": convo(prompt, rejected),
            "messages": convo(prompt, chosen),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }

    def sft(r: dict) -> dict:
        user, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        return row(user, answer, answer + " " + answer)

    splits = {
        "train_sft": [sft(r) for r in rows("sft_train", 32)],
        "test_sft": [sft(r) for r in rows("sft_val", 16)],
        "train_prefs": [
            row(r["prompt"], r["chosen"], r["rejected"]) for r in rows("pairs_train", 32)
        ],
        "test_prefs": [row(r["prompt"], r["chosen"], r["rejected"]) for r in rows("pairs_val", 16)],
        "train_gen": [row(r["prompt"], r["answer"], "") for r in rows("prompts_train", 32)],
        "test_gen": [row(r["prompt"], r["answer"], "") for r in rows("prompts_val", 16)],
    }
    root = tmp_path_factory.mktemp("ultrafeedback_binarized")
    card = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, data in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        card += [f"  - split: {split}", f"    path: {split}.jsonl"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-in tokenizers (the tiny base's vocabulary) with each paper model's pad token and
    chat template situation."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for model, spec in MODELS.items():
        path = root / model
        path.mkdir()
        for f in BASE.iterdir():
            if f.name.startswith("tokenizer") or (f.name == "chat_template.jinja" and spec["chat"]):
                shutil.copy(f, path / f.name)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        if not spec["pad"]:
            config.pop("pad_token", None)
        config_file.write_text(json.dumps(config))
        out[model] = path
    return out


# ----------------------------------------------------------------------------- the files


def test_the_paper_configs_are_the_twelve():
    assert sorted(p.stem for p in PAPER.glob("*.y*ml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_file_starts_with_what_it_does_and_its_command(name):
    text = (PAPER / f"{name}.yaml").read_text("utf-8")
    assert text.startswith("# SALSA paper, ")
    header = text.split("\nseed_everything:")[0]
    command = f"salsa fit --config configs/paper/{name}.yaml --config configs/fsdp.yaml --trainer.devices 8"
    assert command in header
    model, stage = split_name(name)
    if stage == "sft" and not MODELS[model]["pad"]:
        assert "no pad token" in header and "EOS" in header


@pytest.mark.parametrize("model", list(MODELS))
def test_the_paths_chain_through_the_stages(model):
    root = f"artifacts/paper/{model}"
    sft, reward, salsa, ppo = (load(f"{model}-{s}") for s in STAGES)
    hub = MODELS[model]["hub"]
    assert init_args(sft, "model")["model"] == init_args(sft, "data")["tokenizer"] == hub
    assert init_args(sft, "model")["export_dir"] == f"{root}/sft-1"
    sft_text = (PAPER / f"{model}-sft.yaml").read_text("utf-8")
    assert f"--seed_everything 2 --model.export_dir {root}/sft-2" in sft_text
    assert init_args(reward, "model")["model"] == f"{root}/sft-1"
    assert init_args(reward, "model")["export_dir"] == f"{root}/reward"
    for doc, stage, refs, weights in (
        (salsa, "salsa", ["sft-1", "sft-2"], [0.5, 0.5]),
        (ppo, "ppo", ["sft-1"], [1.0]),
    ):
        args = init_args(doc, "model")
        assert args["reference"] == {
            "checkpoints": [f"{root}/{r}" for r in refs],
            "weights": weights,
        }
        assert args["reward_model"] == f"{root}/reward"
        assert args["export_dir"] == f"{root}/{stage}"
        assert args.get("policy") is None  # starts from the reference
    for doc in (reward, salsa, ppo):
        assert init_args(doc, "data")["tokenizer"] == f"{root}/sft-1"
    for stage, doc in zip(STAGES, (sft, reward, salsa, ppo), strict=True):
        logger = doc["trainer"]["logger"]
        assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
        assert logger["init_args"] == {
            "save_dir": "artifacts/paper/logs",
            "name": f"{model}-{stage}",
        }
    # SALSA and its PPO baseline differ only in the reference, the export and the log name
    a, b = load(f"{model}-salsa"), load(f"{model}-ppo")
    for doc in (a, b):
        del doc["model"]["init_args"]["reference"], doc["model"]["init_args"]["export_dir"]
        del doc["trainer"]["logger"]
    assert a == b


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize("name", NAMES)
def test_the_documented_command_builds_with_the_settings(name, tmp_path, monkeypatch):
    """``--config configs/paper/X.yaml --config configs/fsdp.yaml --trainer.devices 8`` (with
    accelerator cpu: no GPUs here) makes an 8-device ModelParallelStrategy Trainer that accepts
    the precision, and the model and data settings for the real run."""
    monkeypatch.chdir(tmp_path)
    model, stage = split_name(name)
    module_cls, data_cls, train_split, val_split, lr = STAGES[stage]
    cli = SalsaCLI(
        args=["--config", str(PAPER / f"{name}.yaml"), "--config", str(FSDP),
              "--trainer.devices", "8", "--trainer.accelerator", "cpu"],
        run=False,
    )  # fmt: skip
    trainer, hp, data = cli.trainer, cli.model.hparams, cli.datamodule.hparams
    assert isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.num_devices == 8 and trainer.precision == "bf16-mixed"
    assert trainer.checkpoint_callback is not None  # checkpointing on
    assert type(cli.model) is module_cls and type(cli.datamodule) is data_cls
    assert hp.dtype is None and hp.gradient_checkpointing is True  # fp32 master weights
    if stage in ("salsa", "ppo"):
        assert hp.frozen_dtype == "bfloat16"
    assert cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == lr
    assert (data.dataset, data.train_split, data.val_split) == (DATASET, train_split, val_split)
    if stage in ("sft", "reward"):
        assert data.max_length == 1024
        sequences = data.batch_size * (2 if stage == "reward" else 1)  # over all 8 devices
        assert sequences * trainer.accumulate_grad_batches == 128
    else:
        assert trainer.accumulate_grad_batches == 1  # manual optimisation: PPO accumulates itself
        generation = cli.model.generation
        assert data.max_length == 512 and generation.max_new_tokens == 512
        # what SALSAModule.setup enforces against the real model's context window
        assert data.max_length + generation.max_new_tokens <= MODELS[model]["context"]
        assert hp.eval_kl_to_each is False
        assert cli.model.ppo_settings.minibatch_size % cli.model.ppo_settings.micro_batch_size == 0
        assert data.batch_size % cli.model.ppo_settings.minibatch_size == 0


# ----------------------------------------------------------------------------- one real step


def place_inputs(model: str, stage: str, stage_outputs: dict[str, Path]) -> None:
    """The earlier stages' outputs (tiny stand-ins) at the YAML's own paths, in the cwd."""
    root = Path("artifacts/paper") / model
    root.mkdir(parents=True, exist_ok=True)
    for name in INPUTS[stage]:
        (root / name).symlink_to(stage_outputs[name], target_is_directory=True)


@pytest.mark.parametrize("name", NAMES)
def test_the_config_runs_a_step(
    name, stage_outputs, ultrafeedback_dir, tokenizers, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model, stage = split_name(name)
    doc = load(name)
    place_inputs(model, stage, stage_outputs)
    args = [
        "--config", str(PAPER / f"{name}.yaml"), "--config", str(FSDP),
        "--trainer.strategy", "auto", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.dataset", str(ultrafeedback_dir),
    ]  # fmt: skip
    if stage == "sft":  # the hub model and its tokenizer
        args += ["--model.init_args.model", str(BASE)]
        args += ["--data.init_args.tokenizer", str(tokenizers[model])]
    else:  # the tiny base has 128 positions
        args += ["--data.init_args.max_length", "64"] if stage != "reward" else []
    if stage in ("salsa", "ppo"):
        args += ["--model.init_args.generation.max_new_tokens", "8"]
    cli = SalsaCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    assert not trainer.interrupted
    model_args, data_args = init_args(doc, "model"), init_args(doc, "data")
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["lr"] == model_args["optimizer"]["init_args"]["lr"]
    assert trainer.accumulate_grad_batches == doc["trainer"].get("accumulate_grad_batches", 1)
    assert data.hparams.batch_size == data_args["batch_size"]
    assert data.hparams.train_split == data_args["train_split"]
    assert data.hparams.val_split == data_args["val_split"]

    if stage in ("sft", "reward"):
        assert data.hparams.max_length == data_args["max_length"] == 1024
        assert trainer.global_step == 1
        trained = [module.model]
        frozen = []
    else:
        trained = [module.policy, module.critic.classifier]
        frozen = [*module.ref_models, module.reward]
        reference = model_args["reference"]
        assert module.reference.checkpoints == reference["checkpoints"]
        assert module.reference.resolved_weights() == reference["weights"]
        assert len(module.ref_models) == 1  # soup mode: one frozen soup
        assert module.reward_stats is not None  # the reward model's reward_stats.json
        assert module.hparams.eval_kl_to_each is False
        assert module.ppo_settings.minibatch_size == model_args["ppo"]["minibatch_size"]
        assert module.ppo_settings.micro_batch_size == model_args["ppo"]["micro_batch_size"]
        # one batch is one PPO iteration; global_step counts its optimizer steps (the stand-in
        # dataset holds fewer prompts than the YAML's global batch: the batch is all of them)
        ppo = model_args["ppo"]
        rows = min(data_args["batch_size"], len(data.train_data))
        assert trainer.global_step == ppo["epochs"] * -(-rows // ppo["minibatch_size"])
    for m in trained:  # fp32 master weights under bf16-mixed
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    for m in frozen:
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    for m in trained:
        assert m.is_gradient_checkpointing
        assert any(p.requires_grad for p in m.parameters())
    for m in frozen:
        assert not any(p.requires_grad for p in m.parameters())

    tok = data.tokenizer
    if stage == "sft" and not MODELS[model]["pad"]:
        assert tok.pad_token == tok.eos_token  # the documented EOS fallback

    export = Path("artifacts/paper") / model / EXPORT[stage]
    assert export.resolve() == (tmp_path / model_args["export_dir"]).resolve()
    assert (export / "config.json").is_file()
    if stage == "reward":
        assert (export / REWARD_STATS).is_file()
    assert load_tokenizer(export).pad_token is not None  # the next stage's tokenizer
