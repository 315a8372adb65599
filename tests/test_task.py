import json
import random
from pathlib import Path

import pytest
import torch

from salsa_lightning.cli import main
from salsa_lightning.errors import SalsaError
from salsa_lightning.task import (
    FAMILIES,
    TEMPLATES,
    Example,
    GoldReward,
    TaskConfig,
    _parse,
    _rows,
    candidate,
    corpus,
    corrupt,
    gold_reward,
    mistake,
    new_prompts,
    pretraining_rows,
    sample_example,
    systematic_mistakes,
    write_pretraining_files,
    write_task_files,
)

SMALL = dict(
    n_sft=200, n_sft_val=40, n_pairs=400, n_pairs_val=40, n_prompts=40, n_prompts_val=20,
    n_prompts_ood=40,
)  # fmt: skip


def _read(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_exact_answer_scores_one_for_every_template():
    rng = random.Random(0)
    seen = set()
    for family in FAMILIES:
        for ood in (False, True):
            for _ in range(60):
                ex = sample_example(rng, family, ood)
                fam, template, is_ood, answer = _parse(ex.prompt)
                assert (fam, is_ood, answer) == (family, ood, ex.answer)
                assert template in TEMPLATES[family][int(ood)]
                assert gold_reward(ex.prompt, ex.answer) == 1.0
                assert gold_reward(ex.prompt, f"  {ex.answer}\n") == 1.0
                assert len(ex.prompt) < 40 and len(ex.answer) < 12
                seen.add(template)
    assert seen == {t for pair in TEMPLATES.values() for ts in pair for t in ts}


def test_corruptions_score_less_and_beat_junk():
    rng = random.Random(1)
    for family in FAMILIES:
        for _ in range(100):
            ex = sample_example(rng, family, ood=rng.random() < 0.5)
            assert corrupt(rng, ex, 0) == ex.answer
            for strength in (1, 2, 3):
                score = gold_reward(ex.prompt, corrupt(rng, ex, strength))
                assert 0.0 <= score < 1.0
            one_edit = gold_reward(ex.prompt, corrupt(rng, ex, 1))
            assert one_edit > gold_reward(ex.prompt, "zz qq xx ww")
            assert gold_reward(ex.prompt, ex.answer + " x") < 1.0


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Add: 12 + 7", "19", 1.0),
        ("Add: 12 + 7", "20", 0.5),  # 1 / (1 + 1)
        ("What is 12 plus 7?", "16", 0.25),  # 1 / (1 + 3)
        ("Add: 12 + 7", "19 apples", 0.5),  # exact value, halved for junk
        ("Add: 12 + 7", "020", 0.25),  # off by one, halved for the leading zero
        ("Add: 12 + 7", "nineteen", 0.0),
        ("Count a in: a b a c", "2", 1.0),
        ("How many a in: a b a c", "0", 1 / 3),
        ("Reverse: b d a c", "c a d b", 1.0),
        ("Reverse: b d a c", "c a b d", 0.5),  # a swap is 2 edits of 4
        ("Reverse: b d a c", "c a d", 0.75),  # one drop
        ("Write backwards: b d a c", "c a d b e", 0.8),  # one extra token of 5
        ("Sort: 3 1 2", "1 2 3", 1.0),
        ("Put in order: 3 1 2", "1 2 4", 2 / 3),
        ("Sort: 3 1 2", "", 0.0),
        ("<|user|>\nSort: 3 1 2\n<|assistant|>\n", "1 2 3", 1.0),
    ],
)
def test_hand_computed_rewards(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_unparsable_prompt_raises_naming_it():
    with pytest.raises(ValueError, match="Tell me a joke"):
        gold_reward("Tell me a joke", "no")


def test_gold_reward_callable_returns_float32_batch():
    out = GoldReward()(["Add: 1 + 1", "Sort: 2 1 3", "Count b in: b b"], ["2", "1 3 2", "x"])
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_exact_gold_reward_gives_full_marks_only_to_the_exact_answer():
    prompts = ["Add: 1 + 1", "Add: 1 + 1", "Sort: 2 1 3", "Sort: 2 1 3", "Reverse: a b"]
    responses = ["2", "2 ", "1 3 2", "1  2 3", "b"]  # surrounding and inner spaces do not count
    assert GoldReward(exact=True)(prompts, responses).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_example_is_frozen():
    ex = Example("Add: 1 + 1", "2", "add", False)
    with pytest.raises(AttributeError):
        ex.answer = "3"


def test_write_task_files_columns_counts_and_determinism(tmp_path):
    config = TaskConfig(seed=3, **SMALL)
    paths = write_task_files(tmp_path / "a", config)
    again = write_task_files(tmp_path / "b", config)
    other = write_task_files(tmp_path / "c", TaskConfig(seed=4, **SMALL))
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes()
        if name != "task":
            assert path.read_bytes() != other[name].read_bytes()

    meta = json.loads(paths["task"].read_text("utf-8"))
    assert meta["seed"] == 3 and meta["n_sft"] == 200 and "version" in meta

    sft = _read(paths["sft_train"])
    assert len(sft) == 200 and len(_read(paths["sft_val"])) == 40
    for row in sft:
        assert set(row) == {"messages", "family"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    imperfect = [gold_reward(r["messages"][0]["content"], r["messages"][1]["content"]) < 1.0 for r in sft]  # fmt: skip
    assert 0.55 < sum(imperfect) / len(sft) < 0.85  # imperfect_fraction 0.7

    train_pairs, val_pairs = _read(paths["pairs_train"]), _read(paths["pairs_val"])
    assert len(train_pairs) == 400 and len(val_pairs) == 40
    for row in train_pairs + val_pairs:
        assert set(row) == {"prompt", "chosen", "rejected", "family"}
        assert row["chosen"] != row["rejected"]
    for row in val_pairs:
        assert gold_reward(row["prompt"], row["chosen"]) > gold_reward(row["prompt"], row["rejected"])  # fmt: skip
    flipped = sum(gold_reward(r["prompt"], r["chosen"]) < gold_reward(r["prompt"], r["rejected"]) for r in train_pairs)  # fmt: skip
    assert 0.03 < flipped / len(train_pairs) < 0.2

    counts = {"prompts_train": 40, "prompts_val": 20, "prompts_ood": 40}
    for name, n in counts.items():
        rows = _read(paths[name])
        assert len(rows) == n
        for row in rows:
            assert set(row) == {"prompt", "family", "answer"}
            family, _, ood, answer = _parse(row["prompt"])
            assert ood == (name == "prompts_ood")
            assert (family, answer) == (row["family"], row["answer"])
    for name in ("sft_train", "sft_val"):
        assert not any(_parse(r["messages"][0]["content"])[2] for r in _read(paths[name]))
    for name in ("pairs_train", "pairs_val"):
        assert not any(_parse(r["prompt"])[2] for r in _read(paths[name]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left


def test_existing_dir_reused_or_rejected(tmp_path):
    config = TaskConfig(seed=1, **SMALL)
    paths = write_task_files(tmp_path / "task", config)
    mtimes = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    assert write_task_files(tmp_path / "task", TaskConfig(seed=1, **SMALL)) == paths
    assert {name: p.stat().st_mtime_ns for name, p in paths.items()} == mtimes

    with pytest.raises(SalsaError, match="delete it or choose another"):
        write_task_files(tmp_path / "task", TaskConfig(seed=2, **SMALL))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(SalsaError, match="junk"):
        write_task_files(tmp_path / "junk", config)


def test_rename_race_returns_winner(tmp_path, monkeypatch):
    config = TaskConfig(seed=5, **SMALL)
    target = tmp_path / "task"
    import salsa_lightning.task as task

    real_rows = task._rows
    raced = []

    def rows_then_other_process_wins(name, cfg):
        if name == "prompts_ood" and not raced:
            raced.append(True)
            write_task_files(target, cfg)  # the "other process" finishes first
        return real_rows(name, cfg)

    monkeypatch.setattr(task, "_rows", rows_then_other_process_wins)
    paths = write_task_files(target, config)
    assert json.loads(paths["task"].read_text("utf-8"))["seed"] == 5
    assert raced and [p.name for p in tmp_path.iterdir()] == ["task"]


def test_corpus_covers_all_templates_and_symbols():
    texts = corpus(TaskConfig(seed=0))
    joined = " ".join(texts)
    for word in ("Reverse", "Write backwards", "Put in order", "plus", "Number of"):
        assert word in joined
    assert set("abcdefgh0123456789") <= set(joined)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Reverse: b d a c", ["b d a c", "a d b c"]),  # copied unreversed; rotated by one
        ("Sort: 3 1 3", ["3 3 1", "1 3", "3 1 3"]),  # descending; repeats dropped; unsorted
        ("Count a in: a b a c", ["4", "3", "1"]),  # every letter counted; off by one
        ("Add: 7 + 5", ["2", "22"]),  # the carry dropped (= 10 down); 10 up
        ("Add: 2 + 3", ["15"]),  # no carry to drop: only off by ten
    ],
)
def test_systematic_mistakes_by_hand(prompt, expected):
    family, _, ood, answer = _parse(prompt)
    assert systematic_mistakes(Example(prompt, answer, family, ood)) == expected


def test_mistakes_and_candidates_are_plausible():
    rng = random.Random(2)
    kinds = {"exact": 0, "wrong": 0}
    for family in FAMILIES:
        for _ in range(200):
            ex = sample_example(rng, family)
            for wrong in systematic_mistakes(ex) + [mistake(rng, ex)]:
                assert wrong != ex.answer and 0.0 <= gold_reward(ex.prompt, wrong) < 1.0
            kinds["exact" if candidate(rng, ex) == ex.answer else "wrong"] += 1
    assert 0.18 < kinds["exact"] / sum(kinds.values()) < 0.32  # a quarter of candidates


def test_pretraining_rows_grade_answers_after_the_end_of_turn(tmp_path):
    rows = pretraining_rows(2000, seed=1)
    assert rows == pretraining_rows(2000, seed=1) and rows != pretraining_rows(2000, seed=2)
    graded = [r for r in rows if len(r["messages"]) == 4]
    assert 0.4 < len(graded) / len(rows) < 0.6
    for row in rows:
        m = row["messages"]
        family, _, ood, answer = _parse(m[0]["content"])
        assert not ood and family == row["family"]
        assert [x["role"] for x in m] in (
            ["user", "assistant"],
            ["user", "assistant", "system", "assistant"],
        )
        if len(m) == 2:
            assert m[1]["content"] == answer
        else:
            assert m[2]["content"] == ("yes" if m[1]["content"] == answer else "no")
            assert m[3]["content"] == ""
    exact = sum(r["messages"][2]["content"] == "yes" for r in graded)
    assert 0.4 < exact / len(graded) < 0.6
    paths = write_pretraining_files(tmp_path, n_train=300, n_val=20, seed=1)
    assert [len(_read(paths[k])) for k in ("train", "val")] == [300, 20]
    assert _read(paths["train"]) == pretraining_rows(300, seed=1)


def test_salsa_prompts_draws_new_prompts_only_in_shards(tmp_path):
    task = write_task_files(tmp_path / "task", TaskConfig(seed=0, **SMALL))
    held = [str(task[n]) for n in ("prompts_train", "prompts_val", "prompts_ood", "pairs_val")]
    held_out = {r["prompt"] for path in held for r in _read(Path(path))}
    args = ["--count", "90", "--seed", "1", "--draw", "150", "--shards", "2"]
    code = main(["prompts", "--exclude", *held, "--output", str(tmp_path / "more"), *args])
    assert code == 0
    files = [tmp_path / "more" / f"prompts-{i}.jsonl" for i in range(2)]
    rows = _read(files[0]) + _read(files[1])
    assert [len(_read(f)) for f in files] == [45, 45]
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == 90 and not set(prompts) & held_out
    # By hand: the generator's draw in order, minus held-out and repeated prompts.
    drawn = [r["prompt"] for r in _rows("prompts_train", TaskConfig(seed=1, n_prompts=150))]
    expected = [p for i, p in enumerate(drawn) if p not in held_out and p not in drawn[:i]]
    assert prompts == expected[:90]
    for row in rows:
        family, _, ood, answer = _parse(row["prompt"])
        assert not ood and (family, answer) == (row["family"], row["answer"])
    summary = json.loads((tmp_path / "more" / "prompts.json").read_text("utf-8"))
    assert summary["count"] == 90 and sum(summary["families"].values()) == 90
    # A later draw can exclude this one: no prompt of the two runs repeats.
    more, again = [*held, *map(str, files)], ["--count", "90", "--seed", "2", "--draw", "300"]
    assert main(["prompts", "--exclude", *more, "--output", str(tmp_path / "more-2"), *again]) == 0
    later = [r["prompt"] for f in (tmp_path / "more-2").glob("prompts-*.jsonl") for r in _read(f)]
    assert len(later) == 90 and not set(later) & (held_out | set(prompts))
    # Existing output is refused unless overwritten.
    assert main(["prompts", "--exclude", *held, "--output", str(tmp_path / "more"), *args]) == 2


def test_new_prompts_refuses_a_draw_too_small_for_the_count():
    held_out = {r["prompt"] for r in _rows("prompts_train", TaskConfig(seed=1, n_prompts=50))}
    with pytest.raises(SalsaError, match="raise draw"):
        new_prompts(seed=1, draw=50, count=10, held_out=held_out)
