"""The embedded default task: tiny synthetic instructions with a gold reward.

Four skill families, each with train templates (used for SFT, preference pairs and the
train/validation prompts) and out-of-distribution (OOD) templates with different wording
for the same skills (used only in ``prompts_ood.jsonl``):

========  ==================================  ===============================================
family    train templates                     OOD templates
========  ==================================  ===============================================
reverse   ``Reverse: b d a c``                ``Write backwards: b d a c``
          ``Reverse the letters: b d a c``    ``Flip the order: b d a c``
sort      ``Sort: 3 1 2``                     ``Put in order: 3 1 2``
          ``Sort ascending: 3 1 2``           ``Smallest first: 3 1 2``
count     ``Count a in: a b a c``             ``How many a in: a b a c``
          ``Count the as: a b a c``           ``Number of as in: a b a c``
add       ``Add: 8 + 7``                      ``What is 8 plus 7?``
          ``8 + 7 =``                         ``Sum of 8 and 7:``
========  ==================================  ===============================================

Payloads: reverse uses 3-6 letters from ``a``-``h``; sort uses 3-6 digits (repeats
allowed); count uses 4-7 letters from ``a``-``e`` and a target letter from ``a``-``e``;
add uses two digits 0-9 (with two-digit operands the tiny base model learned to add but not
to judge a sum, so no reward model could). Answers are space-separated symbols
(``c a d b``, ``1 2 3``) or a decimal number (``2``, ``15``).

What the files hold, and why (issue 16: RL has to be able to improve the gold reward):

* SFT demonstrations (``sft_*``): the exact answer, or, an ``imperfect_fraction`` (70 %) of
  the time, the answer with one random slip (``corrupt``: a swapped, dropped or changed
  symbol; a number off by one, or by ten for ``add``). A competent model that imitates them
  samples the exact answer about half the time and a near miss otherwise, so sampling finds
  better answers than the average one: the room RL needs.
* Preference pairs (``pairs_*``): two different-scoring ``candidate`` answers to one prompt,
  each the exact answer, a ``mistake`` (a wrong procedure: ``systematic_mistakes``) or one or
  two slips, a quarter of the time each; the higher gold reward is ``chosen`` (training
  labels flipped with probability ``label_noise``; validation labels are clean).
* Prompts (``prompts_train``, ``prompts_val``, ``prompts_ood``) with their answers.
* The base model's pre-training text (``pretraining_rows``, written by
  ``python -m salsa_lightning.embedded``, not a task file): exact demonstrations and graded
  answers (an answer, then ``yes`` or ``no`` after its end-of-turn token), so the base model
  can do the skills and judge an answer at the token where a reward model reads its score.

Gold reward, ``gold_reward(prompt, response)`` in [0, 1], computed from the two texts
alone. The prompt is matched against every template (the whole prompt, or one line of it,
so a chat-wrapped prompt also works); no match raises ``SalsaError`` (a ``ValueError``).
The response is stripped of surrounding whitespace, then:

* Sequences (reverse, sort): split the response on whitespace into tokens ``r`` and
  compare with the answer tokens ``t``:
  ``1 - levenshtein(r, t) / max(len(r), len(t))`` (token-level edit distance; an empty
  response scores 0). A swap of two letters costs 2 edits, a dropped or extra token 1.
* Numbers (count, add): the leading integer ``n`` of the response (``-?[0-9]+``; none
  scores 0) gives ``1 / (1 + |n - answer|)``, halved when the response is anything other
  than exactly ``str(n)`` (trailing text, leading zeros).

The exact answer scores 1.0; any other response scores strictly less.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from salsa_lightning.errors import SalsaError, require
from salsa_lightning.outputs import file_written_aside

FAMILIES: tuple[str, ...] = ("reverse", "sort", "count", "add")
TASK_VERSION = 2

_LETTERS = "abcdefgh"
_COUNT_LETTERS = "abcde"
_DIGITS = "0123456789"

# family -> (train templates, OOD templates)
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "reverse": (
        ("Reverse: {letters}", "Reverse the letters: {letters}"),
        ("Write backwards: {letters}", "Flip the order: {letters}"),
    ),
    "sort": (
        ("Sort: {digits}", "Sort ascending: {digits}"),
        ("Put in order: {digits}", "Smallest first: {digits}"),
    ),
    "count": (
        ("Count {c} in: {letters}", "Count the {c}s: {letters}"),
        ("How many {c} in: {letters}", "Number of {c}s in: {letters}"),
    ),
    "add": (
        ("Add: {a} + {b}", "{a} + {b} ="),
        ("What is {a} plus {b}?", "Sum of {a} and {b}:"),
    ),
}

_FIELDS = {
    "letters": r"(?P<letters>[a-z](?: [a-z])*)",
    "digits": r"(?P<digits>[0-9](?: [0-9])*)",
    "c": r"(?P<c>[a-z])",
    "a": r"(?P<a>[0-9]+)",
    "b": r"(?P<b>[0-9]+)",
}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    # re.split with a group alternates literal text and field names
    body = "".join(_FIELDS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(rf"^\s*{body}\s*$", re.MULTILINE)


_PATTERNS: list[tuple[str, str, bool, re.Pattern[str]]] = [
    (family, template, ood, _compile(template))
    for family, (train, ood_templates) in TEMPLATES.items()
    for ood, templates in ((False, train), (True, ood_templates))
    for template in templates
]


@dataclass(frozen=True)
class Example:
    """One task instance: a prompt, its exact answer, its family and whether it is OOD."""

    prompt: str
    answer: str
    family: str
    ood: bool


def _answer(family: str, fields: dict[str, str]) -> str:
    if family == "reverse":
        return " ".join(fields["letters"].split()[::-1])
    if family == "sort":
        return " ".join(sorted(fields["digits"].split()))
    if family == "count":
        return str(fields["letters"].split().count(fields["c"]))
    return str(int(fields["a"]) + int(fields["b"]))


def _match(prompt: str) -> tuple[str, str, bool, dict[str, str]]:
    """Recovers ``(family, template, ood, fields)`` from a prompt text.

    Raises:
        SalsaError: the prompt matches no template.
    """
    for family, template, ood, pattern in _PATTERNS:
        match = pattern.search(prompt)
        if match:
            return family, template, ood, match.groupdict()
    raise SalsaError(f"prompt {prompt!r} matches no template of the default task")


def _parse(prompt: str) -> tuple[str, str, bool, str]:
    """Recovers ``(family, template, ood, answer)`` from a prompt text.

    Raises:
        SalsaError: the prompt matches no template.
    """
    family, template, ood, fields = _match(prompt)
    return family, template, ood, _answer(family, fields)


def sample_example(rng: random.Random, family: str, ood: bool = False) -> Example:
    """Draws one example of ``family`` from a train template, or an OOD one if ``ood``."""
    if family not in TEMPLATES:
        raise SalsaError(f"unknown task family {family!r}; choose one of {FAMILIES}")
    template = rng.choice(TEMPLATES[family][1 if ood else 0])
    if family == "reverse":
        fields = {"letters": " ".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))}
    elif family == "sort":
        fields = {"digits": " ".join(rng.choices(_DIGITS, k=rng.randint(3, 6)))}
    elif family == "count":
        seq = rng.choices(_COUNT_LETTERS, k=rng.randint(4, 7))
        fields = {"letters": " ".join(seq), "c": rng.choice(_COUNT_LETTERS)}
    else:
        fields = {"a": str(rng.randint(0, 9)), "b": str(rng.randint(0, 9))}
    return Example(template.format(**fields), _answer(family, fields), family, ood)


def _edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def gold_reward(prompt: str, response: str) -> float:
    """Scores ``response`` to ``prompt`` in [0, 1]; see the module docstring for the rules.

    Raises:
        SalsaError: (a ``ValueError``) the prompt matches no template.
    """
    family, _, _, answer = _parse(prompt)
    text = response.strip()
    if family in ("reverse", "sort"):
        got, want = text.split(), answer.split()
        if not got:
            return 0.0
        return 1.0 - _edit_distance(got, want) / max(len(got), len(want))
    match = re.match(r"-?[0-9]+", text)
    if not match:
        return 0.0
    value = int(match.group())
    score = 1.0 / (1.0 + abs(value - int(answer)))
    return score if text == str(value) else score / 2


def corrupt(rng: random.Random, example: Example, strength: int) -> str:
    """A plausible wrong answer made by ``strength`` random edits; 0 returns the answer.

    Sequences get swaps of neighbours, dropped tokens or changed symbols; numbers get
    shifted by 1 (or by 10 for ``add``). The result always differs from the answer when
    ``strength > 0``.
    """
    if strength <= 0:
        return example.answer
    while True:
        if example.family in ("reverse", "sort"):
            symbols = _DIGITS if example.family == "sort" else _LETTERS
            tokens = example.answer.split()
            for _ in range(strength):
                op = rng.choice(("swap", "drop", "change") if len(tokens) > 1 else ("change",))
                i = rng.randrange(len(tokens) - (op == "swap"))
                if op == "swap":
                    tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
                elif op == "drop":
                    del tokens[i]
                else:
                    tokens[i] = rng.choice([s for s in symbols if s != tokens[i]])
            out = " ".join(tokens)
        else:
            value = int(example.answer)
            steps = (1, 10) if example.family == "add" else (1,)
            for _ in range(strength):
                delta = rng.choice(steps)
                value += -delta if value - delta >= 0 and rng.random() < 0.5 else delta
            out = str(value)
        if out != example.answer:
            return out


def systematic_mistakes(example: Example) -> list[str]:
    """The wrong answers a careless demonstrator gives by following a wrong procedure, each
    different from the answer (an empty list when every such procedure happens to be right):

    * reverse: the letters copied unreversed; the answer rotated by one place;
    * sort: sorted descending; sorted with the repeats dropped; the digits copied unsorted;
    * count: every letter counted; the count off by one (up, and down when above 0);
    * add: the sum without the carry (digit by digit, modulo 10); the sum off by 10.
    """
    fields = _match(example.prompt)[3]
    answer, family = example.answer, example.family
    if family == "reverse":
        seq = fields["letters"].split()
        out = [" ".join(seq), " ".join(answer.split()[1:] + answer.split()[:1])]
    elif family == "sort":
        seq = fields["digits"].split()
        out = [
            " ".join(sorted(seq, reverse=True)),
            " ".join(sorted(set(seq))),
            " ".join(seq),
        ]
    elif family == "count":
        n = int(answer)
        out = [str(len(fields["letters"].split())), str(n + 1), *([str(n - 1)] if n else [])]
    else:
        a, b = fields["a"], fields["b"]
        width = max(len(a), len(b))
        digits = [
            (int(x) + int(y)) % 10 for x, y in zip(a.zfill(width), b.zfill(width), strict=True)
        ]
        total = int(answer)
        out = [str(int("".join(map(str, digits)))), str(total + 10)]
        if total >= 10:
            out.append(str(total - 10))
    return list(dict.fromkeys(o for o in out if o != answer))


def mistake(rng: random.Random, example: Example) -> str:
    """A careless demonstrator's wrong answer: one of ``systematic_mistakes`` (chosen
    uniformly), or a one-edit ``corrupt`` when there is none."""
    wrong = systematic_mistakes(example)
    return rng.choice(wrong) if wrong else corrupt(rng, example, 1)


class GoldReward:
    """Reward function for PPO built on ``gold_reward``.

    ``GoldReward()(prompts, responses)`` takes two lists of B strings and returns a
    float32 tensor of shape [B].

    Args:
        exact: 1 for the exact answer and 0 for anything else (a verifiable, all-or-nothing
            reward, as in RL with verifiable rewards) instead of the partial credit.
    """

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise SalsaError(f"got {len(prompts)} prompts but {len(responses)} responses")
        scores = [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]
        if self.exact:  # only the exact answer scores 1.0 (module docstring)
            scores = [float(score == 1.0) for score in scores]
        return torch.tensor(scores, dtype=torch.float32)


@dataclass
class TaskConfig:
    """Sizes, seed and noise levels of the generated task files.

    ``imperfect_fraction``: the fraction of SFT demonstrations with one slip (``corrupt``);
    ``label_noise``: the fraction of training preference pairs whose labels are swapped.
    """

    seed: int = 0
    n_sft: int = 2000
    n_sft_val: int = 200
    n_pairs: int = 2000
    n_pairs_val: int = 200
    n_prompts: int = 512
    n_prompts_val: int = 128
    n_prompts_ood: int = 128
    imperfect_fraction: float = 0.7
    label_noise: float = 0.1

    def __post_init__(self) -> None:
        for name in ("imperfect_fraction", "label_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SalsaError(f"TaskConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def _examples(rng: random.Random, n: int, ood: bool = False) -> list[Example]:
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    return [sample_example(rng, f, ood) for f in families]


def _sft_row(rng: random.Random, ex: Example, config: TaskConfig) -> dict:
    response = ex.answer
    if rng.random() < config.imperfect_fraction:
        response = corrupt(rng, ex, 1)
    messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, "family": ex.family}


def candidate(rng: random.Random, example: Example) -> str:
    """One candidate answer of a preference pair, each kind a quarter of the time: the exact
    answer, a ``mistake`` (what the SFT demonstrations get wrong), or one or two random
    edits (``corrupt``, the slips a model makes on its own)."""
    kind = rng.randrange(4)
    if kind == 0:
        return example.answer
    if kind == 1:
        return mistake(rng, example)
    return corrupt(rng, example, kind - 1)


def _pair_row(rng: random.Random, ex: Example, label_noise: float) -> dict:
    while True:  # resample until the two candidates differ in gold reward
        a, b = candidate(rng, ex), candidate(rng, ex)
        ra, rb = gold_reward(ex.prompt, a), gold_reward(ex.prompt, b)
        if ra != rb:
            break
    chosen, rejected = (a, b) if ra > rb else (b, a)
    if rng.random() < label_noise:
        chosen, rejected = rejected, chosen
    return {"prompt": ex.prompt, "chosen": chosen, "rejected": rejected, "family": ex.family}


# file name -> TaskConfig field holding its row count
_SIZES = {
    "sft_train": "n_sft",
    "sft_val": "n_sft_val",
    "pairs_train": "n_pairs",
    "pairs_val": "n_pairs_val",
    "prompts_train": "n_prompts",
    "prompts_val": "n_prompts_val",
    "prompts_ood": "n_prompts_ood",
}


def _rows(name: str, config: TaskConfig) -> list[dict]:
    rng = random.Random(f"{config.seed}-{name}")  # str seeds are stable across runs
    examples = _examples(rng, getattr(config, _SIZES[name]), ood=name == "prompts_ood")
    if name.startswith("sft"):
        return [_sft_row(rng, ex, config) for ex in examples]
    if name.startswith("pairs"):
        noise = config.label_noise if name == "pairs_train" else 0.0
        return [_pair_row(rng, ex, noise) for ex in examples]
    return [{"prompt": ex.prompt, "family": ex.family, "answer": ex.answer} for ex in examples]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """``rows`` as JSON lines at ``path`` (UTF-8, ``\\n`` line ends): the task files' format."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _paths(out_dir: Path) -> dict[str, Path]:
    paths = {name: out_dir / f"{name}.jsonl" for name in _SIZES}
    paths["task"] = out_dir / "task.json"
    return paths


def _check_existing(out_dir: Path, meta: dict) -> dict[str, Path]:
    task_json = out_dir / "task.json"
    existing = json.loads(task_json.read_text("utf-8")) if task_json.is_file() else None
    if existing != meta:
        what = "a different task config" if existing else "other files (no task.json)"
        raise SalsaError(
            f"task directory {str(out_dir)!r} already exists with {what}; "
            "delete it or choose another directory"
        )
    return _paths(out_dir)


def write_task_files(out_dir: str | Path, config: TaskConfig | None = None) -> dict[str, Path]:
    """Generates the task's JSON-lines files into ``out_dir``, atomically.

    Args:
        out_dir: Directory to create. If it already holds files for the same config they
            are reused untouched.
        config: Sizes and seed; ``TaskConfig()`` when None.

    Returns:
        ``{name: path}`` for ``sft_train``, ``sft_val``, ``pairs_train``, ``pairs_val``,
        ``prompts_train``, ``prompts_val``, ``prompts_ood`` (``.jsonl``) and ``task``
        (``task.json``).

    Raises:
        SalsaError: ``out_dir`` exists with a different config or non-task contents.
    """
    config = TaskConfig() if config is None else config
    out_dir = Path(out_dir)
    meta = {"version": TASK_VERSION, **asdict(config)}
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        return _check_existing(out_dir, meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in _SIZES:
            _write_jsonl(tmp / f"{name}.jsonl", _rows(name, config))
        (tmp / "task.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # another process renamed its copy into place first
            return _check_existing(out_dir, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(out_dir)


def new_prompts(seed: int, draw: int, count: int, held_out: set[str]) -> list[dict]:
    """``count`` training prompts none of ``held_out`` has: the task's prompt generator run with
    ``seed`` for ``draw`` prompts (rows as ``prompts_train.jsonl``'s), each prompt kept once, in
    the order drawn. Some families have few distinct prompts (``add``: 100), so their share falls
    as the held-out set grows."""
    seen, rows = set(held_out), []
    for row in _rows("prompts_train", TaskConfig(seed=seed, n_prompts=draw)):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    if len(rows) < count:
        raise SalsaError(
            f"only {len(rows)} of the {draw} prompts drawn with seed {seed} are new, fewer than "
            f"count {count}: raise draw (or lower count)."
        )
    return rows[:count]


def more_prompts(
    exclude: list[str],
    output: str = "artifacts/task-more",
    count: int = 2048,
    seed: int = 1,
    draw: int = 3000,
    shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """More training prompts of the embedded task (``salsa prompts``), for ``salsa pairs``: the
    reward model's training data grows without touching the prompts anything is judged on.

    Writes ``output/prompts-{i}.jsonl`` (``shards`` files of consecutive prompts, so that
    ``salsa pairs`` stages can sample them side by side) and ``output/prompts.json`` (how they
    were drawn, and how many of each family).

    Args:
        exclude: Prompt files whose prompts must not be drawn: the task's training, validation
            and OOD prompts and validation pairs, and earlier ``salsa prompts`` outputs.
        output: Output directory.
        count: Prompts to write.
        seed: Seed of the task's prompt generator (the task files use ``TaskConfig.seed``, 0).
        draw: Prompts to draw; the new ones among them, in order, make the ``count``.
        shards: Files to split the prompts into.
        overwrite: Replace an existing output directory.

    Returns:
        The summary written to ``prompts.json``.
    """
    from salsa_lightning.evaluate import load_prompts
    from salsa_lightning.outputs import check_output_dir, written_aside

    require(count >= 1, "count", "at least 1", count)
    require(1 <= shards <= count, "shards", f"between 1 and count ({count})", shards)
    check_output_dir(output, overwrite, "prompts output", "--overwrite true", "--output")
    held_out = {row["prompt"] for path in exclude for row in load_prompts(path)}
    rows = new_prompts(seed, draw, count, held_out)
    size = -(-count // shards)
    summary = {
        "seed": seed,
        "draw": draw,
        "count": count,
        "exclude": list(exclude),
        "files": [f"prompts-{i}.jsonl" for i in range(shards)],
        "families": dict(sorted(Counter(row["family"] for row in rows).items())),
    }
    with written_aside(output) as tmp:
        for i, name in enumerate(summary["files"]):
            _write_jsonl(tmp / name, rows[i * size : (i + 1) * size])
        (tmp / "prompts.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[prompts] {count} new prompts in {shards} file(s) under {output}", flush=True)
    return summary


PRETRAIN_ROWS = 240_000  # the shipped base model's pre-training rows (configs/base.yaml)


def pretraining_rows(
    n: int, seed: int | str = "pretrain", graded_fraction: float = 0.5
) -> list[dict]:
    """``n`` rows of the text the shipped base model is pre-trained on (``configs/base.yaml``):
    exact demonstrations (train templates, families in turn) and, a ``graded_fraction`` of the
    time, a graded answer instead: an answer (exact half of the time, else a ``_wrong_answer``)
    followed, after its end of turn, by a verdict, ``yes`` when it is exact and ``no``
    otherwise (a ``system`` turn, which the chat template writes as raw text; the
    empty assistant turn after it only closes the conversation). So the base model learns to
    judge an answer at its end-of-turn token, where a reward model reads its score.

    Drawn from their own random stream, so they are not the rows of any task file (the
    chance that a given validation prompt also occurs here is what the payload space allows).
    """
    rng = random.Random(f"{seed}-pretrain")
    rows = []
    for i in range(n):
        ex = sample_example(rng, FAMILIES[i % len(FAMILIES)])
        messages = [{"role": "user", "content": ex.prompt}]
        if rng.random() < graded_fraction:
            answer = ex.answer if rng.random() < 0.5 else _wrong_answer(rng, ex)
            verdict = "yes" if answer == ex.answer else "no"
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "system", "content": verdict},
                {"role": "assistant", "content": ""},
            ]
        else:
            messages.append({"role": "assistant", "content": ex.answer})
        rows.append({"messages": messages, "family": ex.family})
    return rows


def _wrong_answer(rng: random.Random, example: Example) -> str:
    """A graded pre-training answer that is wrong: a ``mistake`` a quarter of the time, one
    random edit half of the time, two a quarter of the time."""
    kind = rng.random()
    if kind < 0.25:
        return mistake(rng, example)
    return corrupt(rng, example, 1 if kind < 0.75 else 2)


def write_pretraining_files(
    out_dir: str | Path, n_train: int = PRETRAIN_ROWS, n_val: int = 512, seed: int = 0
) -> dict[str, Path]:
    """Writes ``train.jsonl`` and ``val.jsonl`` of :func:`pretraining_rows` into ``out_dir``
    (what ``configs/base.yaml`` reads); returns ``{"train": path, "val": path}``."""
    paths = {}
    for name, n, s in (("train", n_train, seed), ("val", n_val, f"{seed}-val")):
        paths[name] = Path(out_dir) / f"{name}.jsonl"
        with file_written_aside(paths[name]) as tmp:
            _write_jsonl(tmp, pretraining_rows(n, s))
    return paths


def corpus(config: TaskConfig) -> list[str]:
    """Plain texts (prompts and answers of every family and template) for a tokenizer.

    Args:
        config: Only ``seed`` is used.

    Returns:
        A list of short strings covering train and OOD templates.
    """
    rng = random.Random(f"{config.seed}-corpus")
    texts = []
    for family in FAMILIES:
        for ood in (False, True):
            for _ in range(100):
                ex = sample_example(rng, family, ood)
                texts += [ex.prompt, ex.answer]
    return texts
