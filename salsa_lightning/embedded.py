"""The embedded default: a locally trained tokenizer, a tiny Llama config and the shipped base model.

Every stage falls back to these when the user names no model and no data, so the whole
pipeline runs offline on a laptop CPU. The shipped base model (``assets/base``: a Llama with
hidden size 128, 4 layers, ~0.95M parameters, 3.8 MB) was made by
``python -m salsa_lightning.embedded`` (writes the pre-training text,
``salsa_lightning.task.pretraining_rows``, to ``artifacts/pretrain``; ``--tokenizer`` also
retrains the tokenizer, which is trained on the task's corpus and kept as shipped) then
``salsa fit --config configs/base.yaml`` (pre-training from random weights; its duration is in
that YAML) and copying ``artifacts/base`` there.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import LlamaConfig, PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = "embedded"  # the YAML spelling of "the shipped base model and its tokenizer"
TASK_DIR = "artifacts/task"  # where the embedded task's data files are written
PRETRAIN_DIR = "artifacts/pretrain"  # where the base model's pre-training text is written

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
USER, ASSISTANT = "<|user|>", "<|assistant|>"

# One user turn, then the assistant's answer closed by EOS. Kept short: tiny models, short contexts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def resolve(name_or_path: str | os.PathLike | None) -> str | None:
    """Map the YAML value ``embedded`` to the shipped base model's directory."""
    if name_or_path is None:
        return None
    return str(ASSETS / "base") if str(name_or_path) == EMBEDDED else str(name_or_path)


def train_tokenizer(texts: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline, digits split one per token.

    Args:
        texts: Training corpus.
        vocab_size: Target vocabulary size, special tokens included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS.values(), USER, ASSISTANT]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 128
    return fast


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 128,
) -> LlamaConfig:
    """A tiny Llama-family config matching ``tokenizer``'s vocabulary and special tokens."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def make_tokenizer_asset(out_dir: str | os.PathLike = ASSETS / "base") -> Path:
    """Train the embedded tokenizer on the task's corpus and save it (deterministic)."""
    from salsa_lightning.task import TaskConfig, corpus

    tokenizer = train_tokenizer(corpus(TaskConfig()))
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m salsa_lightning.embedded``: the pre-training text ``configs/base.yaml``
    reads (``--data``), and with ``--tokenizer`` the shipped tokenizer, retrained."""
    import argparse

    from salsa_lightning.task import PRETRAIN_ROWS, write_pretraining_files

    parser = argparse.ArgumentParser(prog="python -m salsa_lightning.embedded")
    parser.add_argument("--data", default=PRETRAIN_DIR, help="where the pre-training text goes")
    parser.add_argument("--n", type=int, default=PRETRAIN_ROWS, help="pre-training rows")
    parser.add_argument(
        "--tokenizer", action="store_true", help="also retrain the tokenizer into assets/base"
    )
    args = parser.parse_args(argv)
    if args.tokenizer:
        print(f"tokenizer written to {make_tokenizer_asset()}")
    paths = write_pretraining_files(args.data, n_train=args.n)
    print(f"pre-training text written to {paths['train']} and {paths['val']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
