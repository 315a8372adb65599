"""LightningDataModules on top of ``datasets``: SFT conversations, preference pairs, PPO prompts.

Each reads local json/jsonl/parquet/csv files or a hub dataset (name, config, split), maps the
user's column names onto the canonical ones, formats conversations with the tokenizer's chat
template and tokenizes once with ``datasets.map``. With no files and no dataset named it writes
and reads the embedded default task (``salsa_lightning.task``).

Chat formatting: with a chat template, the prompt is ``apply_chat_template(prompt_messages,
add_generation_prompt=True)`` and the response is what the full conversation adds after it.
Without one, the documented fallback is::

    ### User:
    {content}

    ### Assistant:
    {response}<eos>

(earlier turns are written the same way), so prompt tokens are always a prefix of the full
sequence and are masked out of the SFT loss.

- ``files``: reading and checking the data files;
- ``chat``: chat formatting, padding and the length limit;
- ``base``: ``ChatDataModule``, what the three share (sources, columns, value checks,
  tokenization, resumable loaders);
- ``modules``: ``SFTDataModule``, ``PreferenceDataModule``, ``PromptDataModule``.
"""

from salsa_lightning.data.base import (
    ChatDataModule,
    ResumableLoader,
    ResumableSampler,
    held_out_rows,
)
from salsa_lightning.data.chat import (
    IGNORE_INDEX,
    as_messages,
    encode_chat,
    encode_prompt,
    fallback_chat,
    fit_length,
    left_padded_prompts,
    pad,
    padding_mask,
    right_padded_chats,
    split_conversation,
    value_problem,
)
from salsa_lightning.data.files import DATA_FORMATS, read_data_files
from salsa_lightning.data.modules import PreferenceDataModule, PromptDataModule, SFTDataModule

__all__ = [
    "DATA_FORMATS",
    "IGNORE_INDEX",
    "ChatDataModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "SFTDataModule",
    "as_messages",
    "encode_chat",
    "encode_prompt",
    "fallback_chat",
    "fit_length",
    "held_out_rows",
    "left_padded_prompts",
    "pad",
    "padding_mask",
    "read_data_files",
    "right_padded_chats",
    "split_conversation",
    "value_problem",
]
