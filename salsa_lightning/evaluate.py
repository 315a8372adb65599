"""``salsa evaluate``: answers from several models on prompt sets, scored, compared, exported.

For each model and prompt set it samples one answer per prompt (seeded, so every model sees the
same sampling noise), scores it with a reward model and/or a reward function (the embedded
task's gold reward is used automatically when the prompts come from it), measures the KL to a
reference model on the sampled answers, and writes:

- ``answers/<set>/<model>.jsonl``: one line per prompt in the question/answer form LLM-judge
  benchmarks take (``question_id``, ``model_id``, ``choices: [{index, turns: [answer]}]``, plus
  ``prompt``, ``answer`` and the scores), so the answers can be judged elsewhere (MT-Bench,
  Arena-Hard);
- ``results.json``: mean scores with bootstrap confidence intervals and win rates per pair;
- ``report.md`` and ``rewards.png``: the same as a table and reward distributions.

With ``reward_soup`` (a soup recipe of reward models, WARM), it also reports how often each
member, their weight average (the soup) and the mean of their scores (the ensemble) order two
answers as the gold reward does: on held-out preference pairs, and on the evaluated models' own
answers (the answers RL moved toward, where a reward model gets hacked).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from salsa_lightning.data import left_padded_prompts, read_data_files
from salsa_lightning.errors import SalsaError, require
from salsa_lightning.functional import bootstrap_mean_ci, grouped_rate_ci, kl_estimate, win_rate
from salsa_lightning.generation import GenerationSettings, response_logprobs, sample
from salsa_lightning.outputs import check_output_dir, written_aside
from salsa_lightning.pretrained import (
    check_causal_lm_dir,
    check_model_source,
    load_pretrained,
    load_tokenizer,
)
from salsa_lightning.scoring import Scorer, gold_scores
from salsa_lightning.soup import SoupReference

PROMPT_COLUMNS = ("prompt", "question", "instruction")


def load_prompts(
    path: str | os.PathLike, column: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Rows of a prompt file (json, jsonl, csv or parquet) with a prompt column.

    Args:
        path: The file.
        column: The prompt column; default the first of ``prompt``, ``question``, ``instruction``.
        limit: The first this many rows (the commands' ``max_prompts``); None: every row.
    """
    require(limit is None or limit >= 1, "max_prompts", "at least 1 (null: every prompt)", limit)
    data = read_data_files([path])
    names = [column] if column else list(PROMPT_COLUMNS)
    found = next((c for c in names if c in data.column_names), None)
    if found is None:
        raise SalsaError(
            f"prompt file {str(path)!r} has no prompt column: expected one of {names}, found "
            f"{data.column_names}; name it with --prompt_column."
        )
    rows = data if limit is None else data.select(range(min(limit, len(data))))
    return [{**row, "prompt": row[found]} for row in rows]


def check_group_column(rows: list[dict[str, Any]], column: str, path: str) -> None:
    """Refuse a ``group_column`` that prompt rows have no value in (a misspelt column was
    ignored, leaving the report without its breakdown)."""
    missing = [i for i, r in enumerate(rows, 1) if r.get(column) is None]
    if missing:
        columns = sorted(k for k, v in rows[missing[0] - 1].items() if v is not None)
        raise SalsaError(
            f"prompt file {path!r}: no value in group_column {column!r} in {len(missing)} of "
            f"{len(rows)} row(s) (first: row {missing[0]}, whose columns are {columns}); name a "
            "column every row has, or set --group_column null for no breakdown."
        )


@torch.no_grad()
def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    generation: GenerationSettings,
    batch_size: int,
    seed: int,
    reference: Any = None,
) -> tuple[list[str], torch.Tensor | None]:
    """Sample one answer per prompt, the noise seeded batch by batch (so every model sees the
    same); with a ``reference`` model, also the per-answer KL estimate [N] (sum over tokens of
    log pi - log pi_ref on the sampled answer, the k1 estimator)."""
    device = next(model.parameters()).device
    answers, kls = [], []
    for i in range(0, len(prompts), batch_size):
        query, query_mask = left_padded_prompts(tokenizer, prompts[i : i + batch_size])
        query, query_mask = query.to(device), query_mask.to(device)
        with torch.random.fork_rng():
            torch.manual_seed(seed + i)
            response, mask = sample(model, tokenizer, query, query_mask, generation)
        answers += tokenizer.batch_decode(response, skip_special_tokens=True)
        if reference is not None:
            seq = torch.cat([query, response], 1)
            attn = torch.cat([query_mask, mask.long()], 1)
            lp = response_logprobs(model, seq, attn, response, generation.temperature)
            ref_lp = response_logprobs(reference, seq, attn, response, generation.temperature)
            kls.append((kl_estimate(lp, ref_lp, "k1") * mask).sum(1).cpu())
    return answers, (torch.cat(kls) if kls else None)


def load_models(
    model_path: str, reference: str | None, device: torch.device
) -> tuple[Any, Any, Any]:
    """A model to evaluate, its tokenizer and (when given) its KL reference, in eval mode."""
    tokenizer = load_tokenizer(model_path)
    model = load_pretrained(AutoModelForCausalLM, model_path).to(device).eval()
    ref = load_pretrained(AutoModelForCausalLM, reference).to(device).eval() if reference else None
    return model, tokenizer, ref


def summarize(values: torch.Tensor, seed: int) -> dict[str, float]:
    mean, low, high = bootstrap_mean_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high}


@dataclass
class Judges:
    """What scores an answer: a reward model (``score``) and a judge (``gold``: a reward
    function, or the embedded task's gold reward when the prompts are its own)."""

    scorer: Scorer | None = None
    reward_fn: Callable[..., Any] | None = None

    def __call__(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        if self.scorer is not None:
            out["score"] = self.scorer(prompts, answers)
        gold = gold_scores(self.reward_fn, prompts, answers)
        if gold is not None:
            out["gold"] = gold
        return out


@dataclass
class Plan:
    """An evaluation's checked inputs (see :func:`evaluate`)."""

    models: dict[str, str]
    prompts: dict[str, str]
    sets: dict[str, list[dict[str, Any]]]
    references: dict[str, str]
    pairs: list[list[str]]
    generation: GenerationSettings
    batch_size: int
    seed: int
    best_of: dict[str, int]
    group_column: str | None
    preference_pairs: str | None


def evaluate(
    models: dict[str, str],
    prompts: dict[str, str],
    output: str = "artifacts/eval",
    reward_model: str | None = None,
    reward_fn: Callable[..., Any] | None = None,
    references: dict[str, str] | None = None,
    pairs: list[list[str]] | None = None,
    prompt_column: str | None = None,
    max_prompts: int | None = None,
    generation: GenerationSettings | None = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    best_of: dict[str, int] | None = None,
    group_column: str | None = None,
    preference_pairs: str | None = None,
    reward_soup: SoupReference | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` on ``prompts`` and write answers, results and a report.

    Args:
        models: ``{name: model directory}``.
        prompts: ``{set name: prompt file}``.
        output: Output directory.
        reward_model: Reward model directory scoring every answer (``score``).
        reward_fn: A reward function ``(prompts, answers) -> Tensor`` (``gold``); default the
            embedded task's gold reward when the prompts come from it.
        references: ``{model name: reference directory}`` to measure each model's KL to.
        pairs: ``[[a, b], ...]`` model pairs to compare by win rate (default: every pair).
        prompt_column: The prompt column (default: prompt, question or instruction).
        max_prompts: Evaluate at most this many prompts per set.
        generation: Sampling settings (default: sampling at temperature 1, 16 new tokens).
        batch_size: Prompts per generation batch.
        seed: Seed of the sampling noise and of the bootstrap.
        overwrite: Replace an existing output directory.
        best_of: ``{model name: n}``: also sample n answers per prompt from these models and
            report the best of them by the judge against their mean (the room RL has above a
            model); with a reward model, also its agreement with the judge on pairs of them.
        group_column: A prompt column to break the judge's mean down by (the embedded task's
            ``family``); every row of every prompt set must have a value in it.
        preference_pairs: A preference file (``prompt``, ``chosen``, ``rejected``, clean labels)
            on which to measure how often the reward model prefers the chosen answer.
        reward_soup: Reward models ``{checkpoints, weights}`` (WARM): the agreement with the
            gold reward of each member, of their soup and of their ensemble, on
            ``preference_pairs`` and on the evaluated answers (``reward_soup_agreement``).

    Returns:
        The results written to ``results.json``.
    """
    generation = generation or GenerationSettings()
    # Every input is checked before any generation starts.
    check_output_dir(output, overwrite, "evaluation output", "--overwrite true", "--output")
    require(batch_size >= 1, "batch_size", "at least 1", batch_size)
    require(bool(models), "models", "at least one {name: model directory}", models)
    require(bool(prompts), "prompts", "at least one {set name: prompt file}", prompts)
    sets = {name: load_prompts(path, prompt_column, max_prompts) for name, path in prompts.items()}
    if group_column is not None:
        for name, rows in sets.items():
            check_group_column(rows, group_column, prompts[name])
    for name, path in {**models, **(references or {})}.items():
        check_model_source(path, f"model {name!r}")
        check_causal_lm_dir(path, f"model {name!r} path")
    pairs = pairs or [[a, b] for i, a in enumerate(models) for b in list(models)[i + 1 :]]
    for pair in pairs:
        if len(pair) != 2 or any(m not in models for m in pair):
            raise SalsaError(f"pairs entry {pair} must name two of the models {list(models)}.")
    for name, n in (best_of or {}).items():
        if name not in models or int(n) < 2:
            raise SalsaError(
                f"best_of entry {name}: {n} must name one of {list(models)} and n >= 2."
            )
    preference_rows = load_preference_pairs(preference_pairs) if preference_pairs else None
    if preference_rows is not None and reward_model is None:
        raise SalsaError("preference_pairs measures the reward model: set reward_model too.")
    if reward_soup is not None:
        from salsa_lightning.scoring import check_reward_source

        check_reward_source(reward_soup, "reward_soup")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judges = Judges(Scorer(reward_model, device) if reward_model else None, reward_fn)
    plan = Plan(
        models, prompts, sets, references or {}, pairs, generation, batch_size, seed,
        dict(best_of or {}), group_column, preference_pairs,
    )  # fmt: skip
    # Written aside and swapped in at the end: a failure leaves the previous output as it was.
    with written_aside(output) as out_dir:
        results = measure(plan, judges, out_dir, device)
        if preference_rows is not None:
            results["reward_model"].update(pair_agreement(judges.scorer, preference_rows, seed))
            results["reward_model"]["pairs_file"] = preference_pairs
        if reward_soup is not None:
            results["reward_soup"] = reward_soup_agreement(
                reward_soup, preference_rows, load_answer_texts(out_dir), device, batch_size, seed
            )
        write_results(results, out_dir)
    print(f"[evaluate] written to {output}", flush=True)
    return results


def measure(plan: Plan, judges: Judges, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Answers, scores and win rates of every model on every prompt set (and the best-of-n
    samples), the answers written into ``out_dir``; returns the results."""
    results: dict[str, Any] = {
        "models": plan.models,
        "prompts": plan.prompts,
        "generation": asdict(plan.generation),
        "sets": {name: {"models": {}, "groups": {}} for name in plan.sets},
        "best_of": {},
        "reward_model": {},
    }
    per_item: dict[str, dict[str, dict[str, torch.Tensor]]] = {name: {} for name in plan.sets}
    for model_name, path in plan.models.items():
        model, tokenizer, ref = load_models(path, plan.references.get(model_name), device)
        for set_name, rows in plan.sets.items():
            texts = [r["prompt"] for r in rows]
            print(f"[evaluate] {model_name} on {set_name} ({len(texts)} prompts)", flush=True)
            answers, kl = sample_answers(
                model, tokenizer, texts, plan.generation, plan.batch_size, plan.seed, ref
            )
            item = {"length": torch.tensor([len(a) for a in answers], dtype=torch.float)}
            item.update(judges(texts, answers))
            if kl is not None:
                item["kl"] = kl
            per_item[set_name][model_name] = item
            write_answers(out_dir / "answers" / set_name / f"{model_name}.jsonl", model_name,
                          texts, answers, item)  # fmt: skip
            entry = results["sets"][set_name]
            entry["models"][model_name] = {k: summarize(v, plan.seed) for k, v in item.items()}
            groups = [r[plan.group_column] for r in rows] if plan.group_column else []
            if groups:
                entry["groups"][model_name] = group_means(item, groups)
            if model_name in plan.best_of:
                n = plan.best_of[model_name]
                print(f"[evaluate] {model_name} on {set_name}: best of {n} samples", flush=True)
                best = best_of_n(model, tokenizer, texts, n, plan, judges, groups)
                results["best_of"].setdefault(model_name, {})[set_name] = best.pop("stats")
                if (
                    "agreement_on_samples" in best
                    and "agreement_on_samples" not in results["reward_model"]
                ):
                    results["reward_model"].update(
                        best, samples_model=model_name, samples_set=set_name
                    )
        del model, ref
    for set_name in plan.sets:
        results["sets"][set_name]["win_rates"] = win_rates(
            per_item[set_name], plan.pairs, plan.seed
        )
    plot_rewards(per_item, out_dir / "rewards.png")
    return results


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown_report(results))


def group_means(item: dict[str, torch.Tensor], groups: list[str]) -> dict[str, dict[str, float]]:
    """``{group: {metric: mean}}`` of per-answer values, by each prompt's group."""
    index = torch.tensor([sorted(set(groups)).index(g) for g in groups])
    return {
        g: {k: float(v[index == i].mean()) for k, v in item.items()}
        for i, g in enumerate(sorted(set(groups)))
    }


@torch.no_grad()
def best_of_n(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int,
    plan: Plan,
    judges: Judges,
    groups: list[str],
) -> dict[str, Any]:
    """n sampled answers per prompt, judged: the mean and the best of them per prompt (overall
    and per group), and, with a reward model, how often it orders two of them as the judge does
    (pairs of one prompt's answers with different gold rewards)."""
    gold, score = [], []
    for j in range(n):
        answers, _ = sample_answers(
            model, tokenizer, prompts, plan.generation, plan.batch_size, plan.seed + 7919 * (j + 1)
        )
        judged = judges(prompts, answers)
        if "gold" not in judged:
            raise SalsaError("best_of needs a judge: a reward_fn, or the embedded task's prompts.")
        gold.append(judged["gold"])
        if "score" in judged:
            score.append(judged["score"])
    gold_n = torch.stack(gold, 1)  # [N, n]
    stats: dict[str, Any] = {
        "n": n,
        "mean": summarize(gold_n.mean(1), plan.seed),
        "best": summarize(gold_n.amax(1), plan.seed),
    }
    if groups:
        stats["groups"] = {
            g: {"mean": {"mean": float(v["mean"])}, "best": {"mean": float(v["best"])}}
            for g, v in group_means(
                {"mean": gold_n.mean(1), "best": gold_n.amax(1)}, groups
            ).items()
        }
    out: dict[str, Any] = {"stats": stats}
    if score:
        agreeing, pairs = sample_agreement(gold_n, torch.stack(score, 1))
        if pairs.sum():
            out["agreement_on_samples"] = summarize_agreement(agreeing, pairs, plan.seed)
            if groups:
                out["agreement_on_samples"]["groups"] = group_agreement(
                    agreeing, pairs, groups, plan.seed
                )
    return out


def sample_agreement(gold: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, over the pairs of its answers with different gold rewards: how many the
    reward model orders as the gold reward does, and how many there are.

    Args:
        gold: ``[N, n]`` gold rewards of n answers per prompt.
        score: ``[N, n]`` reward-model scores of the same answers.

    Returns:
        ``(agreeing, pairs)``, each ``[N]``.
    """
    i, j = torch.triu_indices(gold.shape[1], gold.shape[1], 1)
    dg, ds = gold[:, i] - gold[:, j], score[:, i] - score[:, j]
    keep = dg != 0
    agreeing = ((dg > 0) == (ds > 0)) & keep
    return agreeing.sum(1).float(), keep.sum(1).float()


def summarize_agreement(agreeing: torch.Tensor, pairs: torch.Tensor, seed: int) -> dict[str, Any]:
    """The share of agreeing pairs, with its interval over prompts (the pairs of one prompt's
    answers are resampled together: they are not independent), and the number of pairs."""
    mean, low, high = grouped_rate_ci(agreeing, pairs, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "pairs": int(pairs.sum())}


def group_agreement(
    agreeing: torch.Tensor, pairs: torch.Tensor, groups: list[str], seed: int
) -> dict[str, dict[str, Any]]:
    """:func:`summarize_agreement` of each group's prompts (a group with no pair is left out):
    where, by task family, the reward model misorders the answers it judges."""
    out = {}
    for g in sorted(set(groups)):
        rows = torch.tensor([x == g for x in groups])
        if pairs[rows].sum():
            out[g] = summarize_agreement(agreeing[rows], pairs[rows], seed)
    return out


def load_preference_pairs(path: str) -> list[dict[str, Any]]:
    """Rows of a preference file with ``prompt``, ``chosen`` and ``rejected`` text columns."""
    data = read_data_files([path])
    missing = {"prompt", "chosen", "rejected"} - set(data.column_names)
    if missing:
        raise SalsaError(f"preference_pairs {path!r} lacks column(s) {sorted(missing)}.")
    return list(data)


def pair_agreement(scorer: Scorer, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """How often the reward model scores the chosen answer of a pair above the rejected one."""
    prompts = [r["prompt"] for r in rows]
    chosen = scorer(prompts, [r["chosen"] for r in rows])
    rejected = scorer(prompts, [r["rejected"] for r in rows])
    return {"agreement": summarize((chosen > rejected).float(), seed), "pairs": len(rows)}


def load_answer_texts(output: str | os.PathLike) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{set: {model: rows}}`` of an evaluation's answers (``prompt``, ``answer``, scores)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(Path(output, "answers").glob("*/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out.setdefault(path.parent.name, {})[path.stem] = rows
    return out


def reward_soup_agreement(
    soup: SoupReference,
    pairs: list[dict[str, Any]] | None,
    answers: dict[str, dict[str, list[dict[str, Any]]]],
    device: torch.device,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """WARM's claim, measured: each member of a soup of reward models, the soup (their weight
    average) and the ensemble (the weighted mean of their scores), against the gold reward.

    For each (loaded one at a time): ``agreement`` on the held-out ``pairs`` (the share where
    it scores the chosen answer higher) with the mean and std of its scores there (the soup's
    normalisation uses its members' stats: these say how far that is from its own), and
    ``on_answers[set]``: over the evaluated models' answers to each prompt, the share of pairs
    of answers with different gold rewards that it orders as the gold reward does
    (``sample_agreement``).
    """
    names = [Path(c).name for c in soup.checkpoints]
    if len(set(names)) < len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    scorers: dict[str, Callable[[], Scorer]] = {
        name: (lambda c=c: Scorer(c, device, batch_size))
        for name, c in zip(names, soup.checkpoints, strict=True)
    }
    scorers["soup"] = lambda: Scorer(soup, device, batch_size, mode="soup")
    scorers["ensemble"] = lambda: Scorer(soup, device, batch_size, mode="ensemble")
    out: dict[str, Any] = {
        "checkpoints": list(soup.checkpoints),
        "weights": soup.resolved_weights(),
        "members": names,
        "scorers": {},
    }
    for name, make in scorers.items():
        print(f"[evaluate] reward soup: agreement of {name}", flush=True)
        scorer, entry = make(), {}
        if pairs:
            entry.update(pair_agreement(scorer, pairs, seed))
            prompts = [r["prompt"] for r in pairs] * 2
            both = scorer(prompts, [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs])
            entry["score_mean"], entry["score_std"] = float(both.mean()), float(both.std(False))
        entry["on_answers"] = {}
        for set_name, by_model in answers.items():
            rows = list(by_model.values())
            if not rows or any("gold" not in r[0] for r in rows):
                continue
            gold = torch.tensor([[r["gold"] for r in model] for model in rows]).T  # [N, M]
            texts = [r["answer"] for model in rows for r in model]
            prompts = [r["prompt"] for model in rows for r in model]
            score = scorer(prompts, texts).reshape(len(rows), -1).T  # [N, M]
            agreeing, compared = sample_agreement(gold, score)
            if compared.sum():
                entry["on_answers"][set_name] = {
                    **summarize_agreement(agreeing, compared, seed),
                    "models": len(rows),
                }
        out["scorers"][name] = entry
        del scorer
    return out


def win_rates(
    items: dict[str, dict[str, torch.Tensor]], pairs: Sequence[Sequence[str]], seed: int
) -> dict[str, Any]:
    """Per pair and judge (reward model ``score``, ``gold``): win rate of a over b (ties 0.5)."""
    out = {}
    for a, b in pairs:
        for judge in ("score", "gold"):
            if judge in items[a] and judge in items[b]:
                wins = win_rate(items[a][judge], items[b][judge])
                out[f"{a}_vs_{b}/{judge}"] = summarize(wins, seed)
    return out


def load_answers(output: str | os.PathLike) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per-answer values of an evaluation output: ``{set: {model: {score|gold|kl|length: [N]}}}``
    (read back from ``answers/<set>/<model>.jsonl``; ``plot_rewards`` takes it)."""
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for path in sorted(Path(output, "answers").glob("*/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keys = [k for k in ("score", "gold", "kl", "length") if k in rows[0]]
        out.setdefault(path.parent.name, {})[path.stem] = {
            k: torch.tensor([r[k] for r in rows], dtype=torch.float) for k in keys
        }
    return out


def write_answers(
    path: Path, model: str, prompts: list[str], answers: list[str], item: dict[str, torch.Tensor]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            row = {
                "question_id": i,
                "model_id": model,
                "choices": [{"index": 0, "turns": [answer]}],
                "prompt": prompt,
                "answer": answer,
                **{k: float(v[i]) for k, v in item.items()},
            }
            f.write(json.dumps(row) + "\n")


def markdown_report(results: dict[str, Any]) -> str:
    lines = ["# Evaluation", ""]
    for set_name, res in results["sets"].items():
        keys = sorted({k for m in res["models"].values() for k in m})
        lines += [
            f"## {set_name}",
            "",
            "| model | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for model, stats in res["models"].items():
            cells = [fmt(stats[k]) if k in stats else "" for k in keys]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if res["win_rates"]:
            lines += ["", "| comparison | win rate (95% CI) |", "|---|---|"]
            lines += [f"| {k} | {fmt(v)} |" for k, v in res["win_rates"].items()]
        lines.append("")
    if "reward_soup" in results:
        lines += reward_soup_lines(results["reward_soup"])
    return "\n".join(lines)


def reward_soup_lines(soup: dict[str, Any]) -> list[str]:
    """The members', soup's and ensemble's agreement with the gold reward, as a table."""
    sets = sorted({s for e in soup["scorers"].values() for s in e["on_answers"]})
    lines = [
        "## Reward-model soup: agreement with the gold reward",
        "",
        f"Members {', '.join(soup['members'])} with weights {soup['weights']}; the soup is their "
        "weight average, the ensemble the mean of their scores.",
        "",
        "| reward model | held-out pairs | score mean | score std | "
        + " | ".join(f"answers: {s}" for s in sets) + " |",
        "|---" * (4 + len(sets)) + "|",
    ]  # fmt: skip
    for name, e in soup["scorers"].items():
        cells = [fmt(e.get("agreement"))]
        cells += [f"{e[k]:.3f}" if k in e else "" for k in ("score_mean", "score_std")]
        cells += [fmt(e["on_answers"].get(s)) for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def fmt(stat: dict[str, float] | None) -> str:
    """``mean [ci_low, ci_high]``, or an empty cell for a missing statistic."""
    if not stat:
        return ""
    return f"{stat['mean']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def plot_rewards(per_item: dict[str, dict[str, dict[str, torch.Tensor]]], path: Path) -> None:
    """Reward distributions per prompt set and model (the paper's Figure 3)."""
    # A Figure without pyplot: no global backend switch (notebooks keep inline plots).
    from matplotlib.figure import Figure

    judges = [
        j for j in ("score", "gold") if any(j in it for s in per_item.values() for it in s.values())
    ]
    if not judges:
        return
    fig = Figure(figsize=(5 * len(per_item), 3.2 * len(judges)))
    axes = fig.subplots(len(judges), len(per_item), squeeze=False)
    for col, (set_name, items) in enumerate(per_item.items()):
        for row, judge in enumerate(judges):
            ax = axes[row][col]
            for model, item in items.items():
                if judge in item:
                    ax.hist(item[judge].numpy(), bins=20, alpha=0.5, label=model)
            ax.set_title(f"{set_name}: {judge}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
