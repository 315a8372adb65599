"""Every stage under FSDP2 (and SALSA under FSDP1 too) in 2 processes on CPU (gloo), against
the single-process run.

Both runs decode greedily so that they see the same responses: the single process takes the
global batch of 8 prompts, each FSDP rank a disjoint half of it (the sampler deals rows out
round-robin). Stated tolerance: the first rollout's scores and KL agree to 1e-4 (same weights,
same responses: only the reduction order differs); after two PPO updates the evaluation agrees
to 0.05, because each rank averages its losses over its own half before gradients are
averaged, which weights tokens slightly differently from one global mean.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS

pytestmark = pytest.mark.slow


def salsa_args(out: dict[str, Path], task_dir: Path, root: Path, batch: int) -> list[str]:
    """``salsa fit`` of configs/salsa.yaml, greedy, one PPO epoch of one minibatch of the whole
    ``batch`` (prompts over all ranks), 2 rollouts and a validation."""
    return [
        "fit",
        "--config",
        str(CONFIGS / "salsa.yaml"),
        "--model.init_args.reference.checkpoints",
        f"[{out['sft-1']}, {out['sft-2']}]",
        "--model.init_args.reward_model",
        str(out["reward"]),
        "--model.init_args.generation.do_sample",
        "false",
        "--model.init_args.generation.max_new_tokens",
        "8",
        "--model.init_args.ppo.epochs",
        "1",
        "--model.init_args.ppo.minibatch_size",
        str(batch),
        "--model.init_args.ppo.micro_batch_size",
        str(batch),
        "--model.init_args.export_dir",
        str(root / "policy"),
        "--data.init_args.tokenizer",
        str(out["sft-1"]),
        "--data.init_args.task_dir",
        str(task_dir),
        "--data.init_args.batch_size",
        str(batch),
        "--data.init_args.eval_batch_size",
        str(batch),
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root / "logs"),
    ]


ERROR_MARKERS = ("Error", "error:", "terminate called", "what():", "enforce fail", "Abort")


def first_errors(stderr: str, lines: int = 12) -> str:
    """The first lines of ``stderr`` that name an error (each rank's, not only the last one's):
    when one rank dies, the others' tracebacks fill the tail with the collective they waited in."""
    found = [line for line in stderr.splitlines() if any(m in line for m in ERROR_MARKERS)]
    return "\n".join(found[:lines])


def launch(
    args: list[str], cwd: Path, env: dict[str, str] | None, timeout: int
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "salsa_lightning.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess, cwd: Path) -> str:
    """What a failed run said: its first errors and its end; its whole stderr is kept in ``cwd``."""
    kept = Path(cwd) / f"salsa-stderr-{len(list(Path(cwd).glob('salsa-stderr-*')))}.txt"
    kept.write_text(proc.stderr)
    return (
        f"exit {proc.returncode}; stderr in {kept}; its first errors:\n"
        f"{first_errors(proc.stderr)}\n... its end:\n{proc.stderr[-3000:]}"
    )


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """``salsa <args>`` in a subprocess (which fails the test if it fails); its stdout.

    A run killed by a signal runs once more, after what it wrote is removed, with a warning that
    shows its errors; any other failure fails at once. Gloo aborted about one 2-process run in
    ten as it exited, its work done, until ``salsa`` ended its process group itself
    (``sharding.end_process_group``, tested in test_faults); the rerun stays for gloo's TCP
    transport, which has aborted a rank inside a collective once in CI."""
    before = set(Path(cwd).rglob("*"))
    proc = launch(args, cwd, env, timeout)
    if proc.returncode < 0:
        warnings.warn(f"killed by a signal; run again. {failure(proc, cwd)}", stacklevel=2)
        written = set(Path(cwd).rglob("*")) - before - set(Path(cwd).glob("salsa-stderr-*"))
        for path in sorted(written, reverse=True):  # children before their folders
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        proc = launch(args, cwd, env, timeout)
    assert proc.returncode == 0, failure(proc, cwd)
    return proc.stdout


def metrics(root: Path) -> list[dict[str, float]]:
    (path,) = (root / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def first(rows: list[dict[str, float]], key: str) -> float:
    return next(r[key] for r in rows if key in r)


# Exactly docs/fsdp.md's flags (with the CPU accelerator): no data_parallel_size of our own.
FSDP2 = [
    "--config",
    str(CONFIGS / "fsdp.yaml"),
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
]

FSDP1 = [
    "--config",
    str(CONFIGS / "fsdp1.yaml"),
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
]


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_salsa_sharded_two_processes_agrees_with_one(strategy, stage_outputs, task_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / strategy
    run(salsa_args(stage_outputs, task_dir, single, batch=8), tmp_path)
    flags = FSDP2 if strategy == "fsdp2" else FSDP1
    fsdp = [*flags, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true"]
    args = salsa_args(stage_outputs, task_dir, sharded, batch=8)  # 4 prompts a rank
    run(args + fsdp, tmp_path)

    one, two = metrics(single), metrics(sharded)
    for key in (
        "objective/scores",
        "objective/raw_scores",
        "objective/kl",
        "rollout/response_length",
    ):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    assert first(one, "objective/kl") == 0.0  # the policy starts as the soup
    for key in ("eval/score", "eval/kl", "eval/gold"):
        assert first(two, key) == pytest.approx(first(one, key), abs=0.05), key

    # The gathered export is the single-device directory: same files, keys, shapes, dtypes;
    # it loads in plain transformers, and the two trained policies are close.
    a, b = single / "policy", sharded / "policy"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-2
    assert AutoModelForCausalLM.from_pretrained(b).state_dict().keys() == wa.keys()

    # The sharded checkpoint holds the trainable policy and critic, not the frozen soup
    # reference and reward model, and resumes on the same world size.
    last = next(sharded.rglob("last.ckpt"))
    assert last.is_dir() and any(last.glob("*.distcp"))
    from torch.distributed.checkpoint import FileSystemReader

    keys = [k for k in FileSystemReader(str(last)).read_metadata().state_dict_metadata]
    prefix = "state_dict." if strategy == "fsdp2" else "model."  # the strategies' layouts
    weights = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    assert any(k.startswith("policy.") for k in weights)
    assert any(k.startswith("critic.") for k in weights)
    assert not any(k.startswith(("ref_models.", "reward.")) for k in weights)
    resume = args + fsdp + ["--ckpt_path", str(last)]
    resume[resume.index("--model.init_args.export_dir") + 1] = str(sharded / "resumed")
    run(resume, tmp_path)
    # The checkpoint closed the epoch, so the resumed run trains no further: its export is the
    # restored policy, which must be the trained one exactly (not the soup it started from).
    wc = load_file(sharded / "resumed" / "model.safetensors")
    assert wc.keys() == wb.keys() and all(torch.equal(wc[k], wb[k]) for k in wb)


def test_salsa_grpo_fsdp2_two_processes_agrees_with_one(stage_outputs, task_dir, tmp_path):
    """SALSA-GRPO (configs/salsa-grpo.yaml) under FSDP2: each rank samples k = 2 responses to
    its own prompts, so a prompt's samples stay on one rank. Greedy decoding makes them equal,
    so a reward that scores a sample by its rank in its group gives the estimator real
    advantages. The first rollout and its update agree with one process (1e-4 and the policy
    within 1e-2), no critic exists anywhere, and the export loads."""

    def grpo_args(root: Path) -> list[str]:
        args = salsa_args(stage_outputs, task_dir, root, 8)  # 4 prompts x 2 samples
        args[args.index(str(CONFIGS / "salsa.yaml"))] = str(CONFIGS / "salsa-grpo.yaml")
        batch = args.index("--data.init_args.batch_size") + 1
        args[batch] = args[batch + 2] = "4"  # prompts, and the eval batch
        return args + [
            "--model.init_args.reward_model", "null",
            "--model.init_args.reward_fn.class_path", "cli_plugins.RankInGroupReward",
            "--model.init_args.estimator.samples_per_prompt", "2",
            "--trainer.limit_train_batches", "1",
            "--trainer.val_check_interval", "1",
        ]  # fmt: skip

    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(grpo_args(single), tmp_path, env)
    run(grpo_args(sharded) + FSDP2, tmp_path, env)
    one, two = metrics(single), metrics(sharded)
    for key in ("objective/scores", "objective/kl", "loss/policy", "rollout/response_length"):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    assert first(one, "objective/scores") == pytest.approx(0.05)  # 0 and 0.1 in each group
    assert first(one, "objective/kl") == 0.0  # the policy starts as the soup
    assert not any("loss/value" in r for r in one + two)
    for key in ("eval/kl", "eval/gold"):
        assert first(two, key) == pytest.approx(first(one, key), abs=0.05), key
    from safetensors.torch import load_file

    wa = load_file(single / "policy" / "model.safetensors")
    wb = load_file(sharded / "policy" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-2


def test_ppo_fsdp2_ranks_take_every_rl_decision_together(stage_outputs, task_dir, tmp_path):
    """Classic PPO (configs/ppo.yaml: one SFT model as the reference) in two FSDP2 ranks
    against one process, the KL coefficient adaptive (kl.target). The first rollout agrees with
    one process to 1e-4, as SALSA's does, and the export loads. The controller steps on the
    whole batch's KL, so after the first update both ranks hold the single process's
    coefficient. On the third rollout only rank 1 sees NaN rewards: both ranks skip that update
    together (a rank skipping alone would leave the other waiting in a collective: a hang)."""
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}

    def args(root: Path) -> list[str]:
        out = salsa_args(stage_outputs, task_dir, root, 8)
        out[out.index(str(CONFIGS / "salsa.yaml"))] = str(CONFIGS / "ppo.yaml")
        out[out.index("--model.init_args.reference.checkpoints") + 1] = (
            f"[{stage_outputs['sft-1']}]"
        )
        return out + [
            "--model.init_args.reward_model", "null",
            "--model.init_args.reward_fn.class_path", "cli_plugins.NaNOnRankOne",
            "--model.init_args.kl", "{coef: 0.05, target: 0.01, horizon: 64}",
            "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=cli_plugins.DumpKLCoefficient",
            "--trainer.callbacks.path", str(root / "kl"),
        ]  # fmt: skip

    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(args(single), tmp_path, env)
    run(args(sharded) + FSDP2, tmp_path, env)
    one, two = metrics(single), metrics(sharded)
    for key in ("objective/scores", "objective/raw_scores", "objective/kl"):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    assert first(one, "objective/kl") == 0.0  # the policy starts as the reference
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(single / "policy")
    b = AutoModelForCausalLM.from_pretrained(sharded / "policy")
    assert a.state_dict().keys() == b.state_dict().keys()
    coef = [r["objective/kl_coef"] for r in one if "objective/kl_coef" in r]
    coef2 = [r["objective/kl_coef"] for r in two if "objective/kl_coef" in r]
    assert coef[1] != coef[0]  # the controller moved after the first rollout...
    assert coef2[1] == pytest.approx(coef[1], rel=1e-6)  # ...by the same step on 2 ranks
    ranks = [json.loads((sharded / f"kl.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # one coefficient, one skip count on every rank
    assert ranks[0]["skips"] == 1  # rollout 3 was skipped, by both ranks, and the run ended
    assert [r["train/skipped_updates"] for r in two if "train/skipped_updates" in r] == [1.0]


# ----------------------------------------------------------------------------- SFT and reward
#
# Each stage runs 4 steps from the same start twice: one process with batches of 16, and two
# FSDP2 processes with 8 per rank (the sampler deals rows out round-robin, so every step sees
# the same 16 rows in both runs). Stated tolerances and why:
# - Step 1 (same weights, same rows): the train loss that the sharded run logs (rank 0's, over
#   its 8 rows; the stages log train/loss without syncing) equals the loss of those 8 rows
#   computed in this process without FSDP, and the single run's equals the combination of the
#   two ranks' losses, both to 1e-4: only the reduction order differs.
# - After 4 steps (validation metrics, reward stats, the exports' weights, where the distance
#   between the two trained models is compared with the distance training moved them):
#   * reward: 1e-4 absolute on metrics and stats, weights within 1e-3 of the update (seen:
#     ~1e-7). Its loss is a mean over pairs and both ranks hold 8 pairs, so the mean of the
#     ranks' gradients is the single run's gradient; only float rounding differs.
#   * SFT: 2% relative on the validation loss, perplexity and token accuracy (seen: 0.5%),
#     weights within 30% of the update (seen: 15%). Its loss is a mean over each rank's
#     labelled tokens, so averaging the ranks' gradients weights a token by 1/(2 n_rank)
#     instead of 1/n_total: a real difference, which Adam's normalised steps amplify on
#     weights with small gradients.


def stage_args(config: str, root: Path, task_dir: Path, batch: int, extra: list[str]) -> list[str]:
    """``salsa fit`` of a stage YAML for 4 steps of ``batch`` rows (over all ranks)."""
    return [
        "fit",
        "--config",
        str(CONFIGS / config),
        *extra,
        "--model.init_args.export_dir",
        str(root / "model"),
        "--data.init_args.task_dir",
        str(task_dir),
        "--data.init_args.batch_size",
        str(batch),
        "--data.init_args.max_samples",
        "64",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root / "logs"),
    ]


def run_both(config: str, tmp_path: Path, task_dir: Path, extra: list[str]) -> tuple[Path, Path]:
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(stage_args(config, single, task_dir, 16, extra), tmp_path)
    run(stage_args(config, sharded, task_dir, 16, extra) + FSDP2, tmp_path)
    return single, sharded


def first_batches(data) -> list[dict]:
    """The first training batch of rank 0 and rank 1 of a 2-process run (seed 1, as the YAML)."""
    from salsa_lightning.data import ResumableSampler

    data.setup("fit")
    out = []
    for rank in (0, 1):
        sampler = ResumableSampler(data.train_data, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(0)
        rows = [data.train_data[i] for i in list(sampler)[:8]]
        out.append(data.collate(rows))
    return out


def check_exports(single: Path, sharded: Path, auto_class, start: Path, rel: float) -> None:
    """The sharded export has the single export's files and keys, loads in plain transformers,
    and it lies close to the single run's: the distance between the two trained models is at
    most ``rel`` times the distance training moved the single run's from ``start``."""
    import json

    from safetensors.torch import load_file

    a, b = single / "model", sharded / "model"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype for k in wa)
    w0 = load_file(start / "model.safetensors")
    distance = lambda x, y: sum(float((x[k] - y[k]).square().sum()) for k in x) ** 0.5  # noqa: E731
    moved = distance(wa, w0)
    assert moved > 0.01  # training moved the weights
    assert distance(wa, wb) <= rel * moved, (distance(wa, wb), moved)
    ma, mb = auto_class.from_pretrained(a), auto_class.from_pretrained(b)
    assert ma.state_dict().keys() == mb.state_dict().keys()
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )


def test_sft_fsdp2_two_processes_agrees_with_one(task_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from salsa_lightning import SFTDataModule
    from salsa_lightning.embedded import ASSETS
    from salsa_lightning.sft import token_stats

    single, sharded = run_both("sft.yaml", tmp_path, task_dir, [])
    one, two = metrics(single), metrics(sharded)

    base = AutoModelForCausalLM.from_pretrained(ASSETS / "base")  # sft.yaml: model embedded
    data = SFTDataModule(
        tokenizer=str(ASSETS / "base"),
        task_dir=str(task_dir),
        max_length=64,
        max_samples=64,
        seed=1,  # the YAML's seed_everything
    )
    losses, counts = [], []
    with torch.no_grad():
        for batch in first_batches(data):
            out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss, _, n = token_stats(out.logits, batch["labels"])
            losses.append(float(loss))
            counts.append(float(n))
    assert first(two, "train/loss") == pytest.approx(losses[0], abs=1e-4)
    combined = sum(x * n for x, n in zip(losses, counts, strict=True)) / sum(counts)
    assert first(one, "train/loss") == pytest.approx(combined, abs=1e-4)
    assert abs(losses[0] - losses[1]) > 1e-3  # the ranks really saw different rows

    assert first(one, "val/loss") < first(one, "train/loss")  # 4 steps did train
    for key, tol in (("val/loss", 2e-2), ("val/perplexity", 2e-2), ("val/token_accuracy", 0.02)):
        assert first(two, key) == pytest.approx(first(one, key), rel=tol), key

    check_exports(single, sharded, AutoModelForCausalLM, ASSETS / "base", rel=0.3)


def test_reward_fsdp2_two_processes_agrees_with_one(stage_outputs, task_dir, tmp_path):
    """Starts from the session's reward model, so the score head is not randomly initialised
    and the first step can be recomputed here."""

    import torch
    from transformers import AutoModelForSequenceClassification

    from salsa_lightning import PreferenceDataModule
    from salsa_lightning.functional import bradley_terry_loss, reward_centering_loss
    from salsa_lightning.scoring import sequence_scores

    extra = [
        "--model.init_args.model",
        str(stage_outputs["reward"]),
        "--data.init_args.tokenizer",
        str(stage_outputs["sft-1"]),
    ]
    single, sharded = run_both("reward.yaml", tmp_path, task_dir, extra)
    one, two = metrics(single), metrics(sharded)

    start = AutoModelForSequenceClassification.from_pretrained(stage_outputs["reward"])
    data = PreferenceDataModule(
        tokenizer=str(stage_outputs["sft-1"]),
        task_dir=str(task_dir),
        max_length=64,
        max_samples=64,
        seed=1,  # the YAML's seed_everything
    )
    losses = []
    with torch.no_grad():
        for batch in first_batches(data):
            chosen, rejected = sequence_scores(
                start, batch["input_ids"], batch["attention_mask"]
            ).chunk(2)
            loss = bradley_terry_loss(chosen, rejected, 0.0)
            losses.append(float(loss + 0.01 * reward_centering_loss(chosen, rejected)))
    assert first(two, "train/loss") == pytest.approx(losses[0], abs=1e-4)
    assert first(one, "train/loss") == pytest.approx(sum(losses) / 2, abs=1e-4)
    assert abs(losses[0] - losses[1]) > 1e-3

    check_reward_runs(single, sharded, stage_outputs["reward"])


def check_reward_runs(single: Path, sharded: Path, start: Path) -> None:
    """A sharded reward run against the single one: validation metrics and the reward stats
    (measured after fit on every rank over the whole validation set) to 1e-4, the exports as
    ``check_exports`` compares them (weights within 1e-3 of the update)."""
    import json

    from transformers import AutoModelForSequenceClassification

    from salsa_lightning.scoring import REWARD_STATS

    one, two = metrics(single), metrics(sharded)
    for key in ("val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"):
        assert first(two, key) == pytest.approx(first(one, key), abs=1e-4), key
    check_exports(single, sharded, AutoModelForSequenceClassification, start, rel=1e-3)
    sa = json.loads((single / "model" / REWARD_STATS).read_text())
    sb = json.loads((sharded / "model" / REWARD_STATS).read_text())
    assert sa.keys() == sb.keys() == {"mean", "std", "accuracy"}
    assert sb == pytest.approx(sa, abs=1e-4)
