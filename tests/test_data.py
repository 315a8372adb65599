"""Tests for salsa_lightning.data: chat formatting, tokenization, masking, loading and batching.

Everything is real: the shipped tokenizer (trained locally), ``datasets`` pipelines over files
written here or by the embedded task, and the data modules' own DataLoaders.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
from conftest import BASE, make_trainer
from transformers import AutoTokenizer

from salsa_lightning.data import (
    IGNORE_INDEX,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    encode_chat,
    fallback_chat,
    fit_length,
    held_out_rows,
    pad,
    read_data_files,
    split_conversation,
)
from salsa_lightning.embedded import ASSISTANT
from salsa_lightning.errors import SalsaError
from salsa_lightning.pretrained import load_tokenizer
from salsa_lightning.resume import conflicts

TOK = str(BASE)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BASE)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


SFT_ROWS = [
    {"prompt": "Reverse: a b c", "response": "c b a"},
    {"prompt": "Sort: 3 1 2", "response": "1 2 3"},
    {"prompt": "Add: 12 + 7", "response": "19"},
    {"prompt": "Count a in: a b a c", "response": "2"},
]


def expected_sft(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of prompt/response rows, computed independently."""
    out = []
    for r in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        full = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ],
            tokenize=True,
            return_dict=False,
        )
        out.append((list(prompt), list(full)[len(prompt) :]))
    return out


# ----------------------------------------------------------------------------- formatting


def test_encode_chat_prompt_is_prefix_and_response_ends_with_eos(tokenizer):
    messages = [{"role": "user", "content": "Reverse: a b c"}]
    prompt, response = encode_chat(tokenizer, messages, "c b a")

    assert tokenizer.decode(prompt) == "<s><|user|>Reverse: a b c<|assistant|>"
    assert tokenizer.decode(response) == "c b a</s>"
    assert response[-1] == tokenizer.eos_token_id
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "c b a"}], tokenize=True, return_dict=False
    )
    assert list(full) == prompt + response
    assert prompt == list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )


def test_fallback_chat_documented_text():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add: 1 + 2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "Add: 2 + 2"},
    ]
    assert fallback_chat(messages, add_generation_prompt=True, eos="</s>") == (
        "### System:\nBe brief.\n\n"
        "### User:\nAdd: 1 + 2\n\n"
        "### Assistant:\n3</s>\n\n"
        "### User:\nAdd: 2 + 2\n\n"
        "### Assistant:\n"
    )
    assert fallback_chat(messages[1:3], add_generation_prompt=False, eos="<e>") == (
        "### User:\nAdd: 1 + 2\n\n### Assistant:\n3<e>\n\n"
    )


def test_encode_chat_without_template_uses_fallback(tokenizer):
    tok = load_tokenizer(BASE)
    tok.chat_template = None
    prompt, response = encode_chat(tok, [{"role": "user", "content": "Reverse: a b c"}], "c b a")
    assert tok.decode(prompt) == "### User:\nReverse: a b c\n\n### Assistant:\n"
    assert tok.decode(response) == "c b a</s>"
    assert tok.decode(prompt + response) == "### User:\nReverse: a b c\n\n### Assistant:\nc b a</s>"
    assert ASSISTANT not in tok.decode(prompt)  # the template's markers are not used


def test_fallback_format_through_sft_datamodule(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path))
    dm.tokenizer.chat_template = None
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    for i, row in enumerate(SFT_ROWS):
        n = int(batch["attention_mask"][i].sum())
        text = dm.tokenizer.decode(batch["input_ids"][i, :n])
        assert text == f"### User:\n{row['prompt']}\n\n### Assistant:\n{row['response']}</s>"
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert dm.tokenizer.decode(labelled) == f"{row['response']}</s>"


def test_pad_and_fit_length_by_hand():
    assert pad([[1, 2, 3], [4], []], 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad([[1, 2, 3], [4]], 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4]]
    assert fit_length([1, 2], [3, 4], 4, "truncate") == ([1, 2], [3, 4], True, False)
    assert fit_length([1, 2], [3, 4, 5], 4, "truncate") == ([1, 2], [3, 4], True, True)
    assert fit_length([1, 2], [3, 4, 5], 4, "filter") == ([1, 2], [3, 4, 5], False, False)
    assert fit_length([1, 2, 3, 4], [5], 4, "truncate")[2] is False  # no room for a response


def test_split_conversation_requires_assistant_last():
    assert split_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "messages"
    ) == ([{"role": "user", "content": "q"}], "a")
    with pytest.raises(SalsaError, match="'messages'.*must end with an assistant turn"):
        split_conversation([{"role": "user", "content": "q"}], "messages")


# ----------------------------------------------------------------------------- SFT


def test_sft_labels_mask_prompt_and_padding_exactly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # unshuffled: file order
    expected = expected_sft(tokenizer, SFT_ROWS)
    width = max(len(p) + len(r) for p, r in expected)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for i, (p, r) in enumerate(expected):
        n = len(p) + len(r)
        assert batch["input_ids"][i].tolist() == p + r + [tokenizer.pad_token_id] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * (
            width - n
        )


def test_sft_train_batch_labels_only_after_assistant_marker(task_files):
    dm = SFTDataModule(
        tokenizer=TOK,
        train_files=str(task_files["sft_train"]),
        val_fraction=0,
        batch_size=16,
        seed=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assistant_id = dm.tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert batch["input_ids"].shape[0] == 16
    for ids, mask, labels in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
    ):
        start = ids.tolist().index(assistant_id) + 1
        n = int(mask.sum())
        assert (labels[:start] == IGNORE_INDEX).all()
        assert torch.equal(labels[start:n], ids[start:n])
        assert (labels[n:] == IGNORE_INDEX).all()
        assert ids[n - 1] == dm.tokenizer.eos_token_id


def test_sft_mask_prompt_false_labels_every_non_pad_token(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path), mask_prompt=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # rows differ in length: some padding to check
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()


def test_a_resume_refuses_a_changed_mask_prompt():
    """What the loss trains on is in the data module's hyperparameters, so a resumed run that
    changes it is refused rather than mixing two objectives."""
    saved = dict(SFTDataModule().hparams)
    assert saved["mask_prompt"] is True
    now = dict(SFTDataModule(mask_prompt=False).hparams)
    assert conflicts(saved, now, "data") == ["data.mask_prompt: True in the checkpoint, False here"]


def test_messages_and_prompt_response_columns_give_same_tokens(tmp_path):
    as_messages = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in SFT_ROWS
    ]
    a = write_jsonl(tmp_path / "pr.jsonl", SFT_ROWS)
    b = write_jsonl(tmp_path / "msg.jsonl", as_messages)
    batches = []
    for path in (a, b):
        dm = SFTDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path))
        dm.setup("fit")
        batches.append(next(iter(dm.val_dataloader())))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batches[0][key], batches[1][key])


def test_column_mapping(tmp_path, tokenizer):
    rows = [
        {"instruction": r["prompt"], "output": r["response"], "id": i}
        for i, r in enumerate(SFT_ROWS)
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    dm = SFTDataModule(
        tokenizer=TOK,
        train_files=str(path),
        val_files=str(path),
        columns={"prompt": "instruction", "response": "output"},
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    p, r = expected_sft(tokenizer, SFT_ROWS)[0]
    assert batch["input_ids"][0, : len(p) + len(r)].tolist() == p + r

    bad = SFTDataModule(
        tokenizer=TOK, train_files=str(path), columns={"prompt": "question", "response": "output"}
    )
    with pytest.raises(SalsaError, match=r"\['question'\].*do not exist.*instruction"):
        bad.setup("fit")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_files(tmp_path, tokenizer, fmt):
    path = tmp_path / f"sft.{fmt}"
    data = datasets.Dataset.from_list(SFT_ROWS)
    data.to_csv(str(path), index=False) if fmt == "csv" else data.to_parquet(str(path))
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path))
    dm.setup("fit")
    assert dm.stats["train/rows"] == len(SFT_ROWS)
    batch = next(iter(dm.val_dataloader()))
    for i, (p, r) in enumerate(expected_sft(tokenizer, SFT_ROWS)):
        assert batch["input_ids"][i, : len(p) + len(r)].tolist() == p + r


def test_files_with_different_extra_columns_are_joined_on_the_shared_ones(tmp_path):
    # The task's pairs beside `salsa pairs`' output, which adds the answers' gold rewards.
    task = [{"prompt": "1 + 2 =", "chosen": "3", "rejected": "4", "family": "add"}]
    sampled = [
        {"prompt": "2 + 2 =", "chosen": "4", "rejected": "5", "chosen_gold": 1.0,
         "rejected_gold": 0.5, "family": "add"},
        {"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b", "chosen_gold": 1.0,
         "rejected_gold": 0.0, "family": "reverse"},
    ]  # fmt: skip
    files = [str(write_jsonl(tmp_path / "task.jsonl", task))]
    files.append(str(write_jsonl(tmp_path / "sampled.jsonl", sampled)))
    dm = PreferenceDataModule(tokenizer=TOK, train_files=files, val_fraction=0)
    dm.setup("fit")
    assert dm.stats["train/rows"] == 3
    assert read_data_files(files).column_names == ["prompt", "chosen", "rejected", "family"]
    write_jsonl(tmp_path / "task.jsonl", [{"prompt": "1 + 2 =", "chosen": 3, "rejected": 4}])
    with pytest.raises(SalsaError, match=r"task\.jsonl.*cannot be read as json"):
        read_data_files(files)  # the shared columns differ in type


def test_missing_columns_lists_expected_and_found(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer_text": "a"}] * 4)
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path))
    with pytest.raises(
        SalsaError,
        match=r"odd\.jsonl.*expected messages or prompt\+response, found \['question', 'answer_text'\]",
    ):
        dm.setup("fit")


def test_one_row_file_with_default_val_fraction(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", SFT_ROWS[:1])
    dm = SFTDataModule(tokenizer=TOK, train_files=str(path))
    with pytest.raises(SalsaError, match="val_fraction"):
        dm.setup("fit")


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    dm = SFTDataModule(tokenizer=TOK, train_files=str(missing))
    with pytest.raises(SalsaError, match=rf"data file '{missing}' does not exist"):
        dm.setup("fit")


def test_unknown_file_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(SalsaError, match=r"train\.txt.*must all be one of"):
        SFTDataModule(tokenizer=TOK, train_files=str(path)).setup("fit")


def test_bad_settings_fail_at_construction(tmp_path):
    with pytest.raises(SalsaError, match="data.overflow is 'cut'; choose one of truncate, filter"):
        SFTDataModule(tokenizer=TOK, overflow="cut")
    with pytest.raises(SalsaError, match="train_files or data.dataset, not both"):
        SFTDataModule(tokenizer=TOK, train_files="a.jsonl", dataset="some/dataset")
    with pytest.raises(SalsaError, match=r"data.val_files \(v.jsonl\) is set but data.train_files"):
        SFTDataModule(tokenizer=TOK, val_files="v.jsonl")  # was read as the embedded task's


def test_hub_dataset_offline_fails_fast():
    assert datasets.config.HF_HUB_OFFLINE  # set by conftest
    dm = SFTDataModule(tokenizer=TOK, dataset="nobody-here/no-such-dataset-xyz")
    start = time.monotonic()
    with pytest.raises(SalsaError, match=r"'nobody-here/no-such-dataset-xyz'.*offline"):
        dm.setup("fit")
    assert time.monotonic() - start < 20


def test_truncate_and_filter_counts_match_hand_count(task_files, tokenizer):
    max_length = 14
    rows = read_jsonl(task_files["sft_val"])
    lengths = []
    for row in rows:
        messages, response = split_conversation(row["messages"], "messages")
        p, r = encode_chat(tokenizer, messages, response)
        lengths.append((len(p), len(r)))
    too_long = sum(p + r > max_length for p, r in lengths)
    no_room = sum(p >= max_length for p, _ in lengths)
    assert too_long > no_room > 0  # both cases occur in this data

    kw = dict(
        tokenizer=TOK, train_files=str(task_files["sft_val"]), val_fraction=0, max_length=max_length
    )
    trunc = SFTDataModule(overflow="truncate", **kw)
    trunc.setup("fit")
    assert trunc.stats == {
        "train/rows": len(rows),
        "train/truncated": too_long - no_room,
        "train/dropped": no_room,
    }
    assert len(trunc.train_data) == len(rows) - no_room
    assert max(len(ids) for ids in trunc.train_data["input_ids"]) == max_length

    filt = SFTDataModule(overflow="filter", **kw)
    filt.setup("fit")
    assert filt.stats == {"train/rows": len(rows), "train/truncated": 0, "train/dropped": too_long}
    assert len(filt.train_data) == len(rows) - too_long
    assert max(len(ids) for ids in filt.train_data["input_ids"]) <= max_length


def test_empty_after_filtering_names_max_length(task_files):
    dm = SFTDataModule(
        tokenizer=TOK, train_files=str(task_files["sft_val"]), max_length=6, overflow="filter"
    )
    with pytest.raises(SalsaError, match=r"no train rows left after filtering to max_length=6"):
        dm.setup("fit")
    # Under truncate (which cuts responses only), no advice to use truncate.
    dm = SFTDataModule(
        tokenizer=TOK, train_files=str(task_files["sft_val"]), max_length=2, overflow="truncate"
    )
    with pytest.raises(SalsaError) as err:
        dm.setup("fit")
    assert str(err.value).endswith("max_length=2 (overflow: truncate); raise data.max_length.")


def first_train_batch(task_files, **kwargs) -> dict[str, torch.Tensor]:
    dm = SFTDataModule(
        tokenizer=TOK,
        train_files=str(task_files["sft_train"]),
        batch_size=16,
        max_samples=64,
        **kwargs,
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_order_is_deterministic_per_seed(task_files):
    a = first_train_batch(task_files, seed=3)
    b = first_train_batch(task_files, seed=3)
    c = first_train_batch(task_files, seed=4)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape != c["input_ids"].shape or not torch.equal(
        a["input_ids"], c["input_ids"]
    )
    # seed=None follows seed_everything
    L.seed_everything(3)
    d = first_train_batch(task_files)
    assert torch.equal(a["input_ids"], d["input_ids"])


def test_val_fraction_split(task_files):
    n = len(read_jsonl(task_files["sft_train"]))
    dm = SFTDataModule(
        tokenizer=TOK, train_files=str(task_files["sft_train"]), val_fraction=0.25, seed=0
    )
    dm.setup("fit")
    assert dm.stats["val/rows"] == n // 4
    assert dm.stats["train/rows"] == n - n // 4
    train = {tuple(x) for x in dm.train_data["input_ids"]}
    val = [tuple(x) for x in dm.val_data["input_ids"]]
    # held-out rows are not training rows (duplicated texts aside)
    assert sum(v in train for v in val) < len(val) // 4

    no_val = SFTDataModule(tokenizer=TOK, train_files=str(task_files["sft_train"]), val_fraction=0)
    no_val.setup("fit")
    assert no_val.val_data is None and no_val.val_dataloader() == []
    assert no_val.stats["train/rows"] == n


class RecordBatches(L.Callback):
    """Records (epoch, batch index, the batch's token ids) of every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batch["input_ids"].clone()))


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(5, id="mid-epoch"),
        pytest.param(4, id="epoch-end"),
    ],
)
def test_resume_continues_data_position(task_files, tmp_path, stop):
    """A run resumed from a step-``stop`` checkpoint sees exactly the batches the uninterrupted
    run saw after that step, and ends with bit-identical weights (4 batches per epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from salsa_lightning.sft import SFTModule

    def parts():
        data = SFTDataModule(
            tokenizer=TOK,
            train_files=str(task_files["sft_train"]),
            max_samples=64,
            batch_size=16,
            val_fraction=0,
            seed=0,
        )
        module = SFTModule(model=TOK, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return data, module

    L.seed_everything(0)
    full, module_a = parts()
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1, filename="{step}"
    )
    seen_a = RecordBatches()
    make_trainer(tmp_path, max_steps=7, callbacks=[seen_a, ckpt], enable_checkpointing=True).fit(
        module_a, datamodule=full
    )
    assert [(e, i) for e, i, _ in seen_a.seen] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    # each epoch has its own order
    assert not torch.equal(seen_a.seen[0][2], seen_a.seen[4][2])

    L.seed_everything(0)
    data, module_b = parts()
    seen_b = RecordBatches()
    make_trainer(tmp_path / "resumed", max_steps=7, callbacks=[seen_b]).fit(
        module_b, datamodule=data, ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt"
    )
    expected = seen_a.seen[stop:]
    assert [(e, i) for e, i, _ in seen_b.seen] == [(e, i) for e, i, _ in expected]
    assert all(
        torch.equal(b, a) for (_, _, b), (_, _, a) in zip(seen_b.seen, expected, strict=True)
    )
    a, b = module_a.model.state_dict(), module_b.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- preferences


def test_preference_batches_are_chosen_then_rejected(task_files):
    rows = read_jsonl(task_files["pairs_val"])[:4]
    dm = PreferenceDataModule(
        tokenizer=TOK,
        train_files=str(task_files["pairs_train"]),
        val_files=str(task_files["pairs_val"]),
        batch_size=4,
        max_samples=32,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert (
        batch["input_ids"].shape[0] == 8
        and batch["attention_mask"].shape == batch["input_ids"].shape
    )
    tok = dm.tokenizer
    for i, row in enumerate(rows):
        for j, side in ((i, "chosen"), (i + 4, "rejected")):
            n = int(batch["attention_mask"][j].sum())
            assert (batch["attention_mask"][j, n:] == 0).all()
            assert tok.decode(batch["input_ids"][j, :n]) == (
                f"<s><|user|>{row['prompt']}<|assistant|>{row[side]}</s>"
            )
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["input_ids"].shape[0] == 2 * 4


def test_identical_pairs_are_dropped_counted_and_warned(tmp_path):
    rows = [
        {"prompt": "Sort: 3 1 2", "chosen": "1 2 3", "rejected": "1 3 2"},
        {"prompt": "Add: 1 + 1", "chosen": "2", "rejected": "2"},
        {"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b"},
        {"prompt": "Add: 2 + 2", "chosen": "4", "rejected": "4"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(tokenizer=TOK, train_files=str(path), val_fraction=0)
    with pytest.warns(UserWarning, match="dropped 2 pairs whose chosen and rejected are identical"):
        dm.setup("fit")
    assert dm.stats["train/identical"] == 2
    assert dm.stats["train/dropped"] == 2
    assert len(dm.train_data) == 2
    texts = [dm.tokenizer.decode(ids) for ids in dm.train_data["chosen_ids"]]
    assert texts == [
        "<s><|user|>Sort: 3 1 2<|assistant|>1 2 3</s>",
        "<s><|user|>Reverse: a b<|assistant|>b a</s>",
    ]


def test_conversational_pairs(tmp_path):
    def conv(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    rows = [
        {
            "prompt": "Sort: 3 1 2",
            "chosen": conv("Sort: 3 1 2", "1 2 3"),
            "rejected": conv("Sort: 3 1 2", "3 2 1"),
        },
        {
            "prompt": "Add: 5 + 5",
            "chosen": conv("Add: 5 + 5", "10"),
            "rejected": conv("Add: 5 + 5", "11"),
        },
    ]
    path = tmp_path / "ultrafeedback.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    dm = PreferenceDataModule(
        tokenizer=TOK, train_files=str(path), val_files=str(path), batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    decoded = [
        tok.decode(ids[: int(mask.sum())])
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    assert decoded == [
        "<s><|user|>Sort: 3 1 2<|assistant|>1 2 3</s>",
        "<s><|user|>Add: 5 + 5<|assistant|>10</s>",
        "<s><|user|>Sort: 3 1 2<|assistant|>3 2 1</s>",
        "<s><|user|>Add: 5 + 5<|assistant|>11</s>",
    ]


def test_pairs_without_prompt_are_plain_texts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "good text", "rejected": "bad text"}])
    dm = PreferenceDataModule(tokenizer=TOK, train_files=str(path), val_fraction=0)
    dm.setup("fit")
    row = dm.train_data[0]
    assert dm.tokenizer.decode(row["chosen_ids"]) == "good text</s>"
    assert dm.tokenizer.decode(row["rejected_ids"]) == "bad text</s>"


def test_preference_column_mapping(tmp_path):
    rows = [{"q": "Sort: 3 1 2", "good": "1 2 3", "bad": "3 2 1"}] * 3
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(
        tokenizer=TOK,
        train_files=str(path),
        val_fraction=0,
        columns={"prompt": "q", "chosen": "good", "rejected": "bad"},
    )
    dm.setup("fit")
    assert len(dm.train_data) == 3
    assert dm.tokenizer.decode(dm.train_data[0]["chosen_ids"]).endswith("1 2 3</s>")


# ----------------------------------------------------------------------------- prompts


def test_prompt_batches_are_left_padded_with_extra_columns(task_files):
    rows = read_jsonl(task_files["prompts_val"])[:8]
    dm = PromptDataModule(
        tokenizer=TOK,
        train_files=str(task_files["prompts_train"]),
        val_files=str(task_files["prompts_val"]),
        batch_size=8,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8
    assert (mask[:, -1] == 1).all()
    lengths = mask.sum(1)
    assert lengths.min() < ids.shape[1]  # some rows are padded, so left padding is visible
    for i, row in enumerate(rows):
        pad_n = ids.shape[1] - int(lengths[i])
        assert mask[i].tolist() == [0] * pad_n + [1] * int(lengths[i])
        assert (ids[i, :pad_n] == dm.tokenizer.pad_token_id).all()
        assert dm.tokenizer.decode(ids[i, pad_n:]) == f"<s><|user|>{row['prompt']}<|assistant|>"
    assert batch["prompt"] == [r["prompt"] for r in rows]
    assert batch["answer"] == [r["answer"] for r in rows]
    assert batch["family"] == [r["family"] for r in rows]


def test_prompt_messages_drop_trailing_assistant(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Add: 1 + 2"},
                {"role": "assistant", "content": "3"},
            ]
        }
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    dm = PromptDataModule(tokenizer=TOK, train_files=str(path), val_files=str(path))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert dm.tokenizer.decode(batch["input_ids"][0]) == "<s><|user|>Add: 1 + 2<|assistant|>"
    assert batch["prompt"] == ["Add: 1 + 2"]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(BASE)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(tmp_path / "nopad").pad_token is None
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
    assert any(
        "no pad token" in r.getMessage() and "</s>" in r.getMessage() for r in caplog.records
    )

    # the SFT batches then pad with EOS, and padding stays out of the loss
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(
        tokenizer=str(tmp_path / "nopad"), train_files=str(path), val_files=str(path)
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    pad_positions = batch["attention_mask"] == 0
    assert pad_positions.any()
    assert (batch["input_ids"][pad_positions] == loaded.eos_token_id).all()
    assert (batch["labels"][pad_positions] == IGNORE_INDEX).all()


def test_tokenizer_directory_without_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SalsaError, match=r"tokenizer directory .*empty.* holds none of"):
        load_tokenizer(tmp_path / "empty")


def test_held_out_rows_drop_the_copies_a_distributed_sampler_appends() -> None:
    """7 rows over 2 ranks, 2 per batch: rank 0 serves rows 0 2 4 6, rank 1 rows 1 3 5 and a
    copy of row 0, which its second batch holds in second place. One process adds no copies."""
    from torch.utils.data import DistributedSampler, SequentialSampler

    rows = list(range(7))
    rank0 = DistributedSampler(rows, num_replicas=2, rank=0, shuffle=False)
    rank1 = DistributedSampler(rows, num_replicas=2, rank=1, shuffle=False)
    assert list(rank1) == [1, 3, 5, 0]
    assert held_out_rows(rank0, 1, 2, 2).tolist() == [True, True]
    assert held_out_rows(rank1, 0, 2, 2).tolist() == [True, True]
    assert held_out_rows(rank1, 1, 2, 2).tolist() == [True, False]
    assert held_out_rows(rank1, 3, 1, 1).tolist() == [False]  # batches of one: the 4th is the copy
    assert held_out_rows(SequentialSampler(rows), 3, 2, 1).tolist() == [True]
    dropped = DistributedSampler(rows, num_replicas=2, rank=1, shuffle=False, drop_last=True)
    assert held_out_rows(dropped, 1, 1, 1).tolist() == [True]  # no copies when the tail is dropped
