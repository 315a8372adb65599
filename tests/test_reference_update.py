"""A moving KL reference (``reference_update: {every, alpha}``, issue 23): the EMA arithmetic
against hand-worked values; ``alpha`` 0 and no update are the frozen reference to the last digit;
the reference (every model under Multiple KLs, a LoRA policy's own reference adapter) moves by
the EMA of the policy; it is in checkpoints, resumes exactly after a SIGKILL, refuses FSDP1 and
agrees over 2 FSDP2 processes with one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONFIGS, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_salsa import build, fit, prompts, same, snapshot, training_metrics, validate

from salsa_lightning import SalsaError
from salsa_lightning.functional import ema_, ema_weight_of_start
from salsa_lightning.lora import LoraSettings
from salsa_lightning.ppo import PPOSettings
from salsa_lightning.ppo.settings import EstimatorSettings, ReferenceUpdate

# ----------------------------------------------------------------------------- the arithmetic


def test_ema_matches_hand_worked_values():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    ema_(t, [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])], 0.25)
    # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 2 + 0.25 * -2 = 1; 0.75 * 4 = 3
    assert t[0].tolist() == [1.5, 1.0] and t[1].tolist() == [[3.0]]

    # Three updates toward a source that stands still: the start keeps (1 - a)^3 of its weight.
    t = [torch.tensor([0.0])]
    for _ in range(3):
        ema_(t, [torch.tensor([8.0])], 0.5)
    assert ema_weight_of_start(0.5, 3) == 0.125
    assert t[0].item() == 0.125 * 0.0 + 0.875 * 8.0 == 7.0

    # alpha 0 keeps every bit, alpha 1 copies every bit (values that no rounding would forgive).
    start, source = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    kept, synced = [start.clone()], [start.clone()]
    ema_(kept, [source], 0.0)
    ema_(synced, [source], 1.0)
    assert torch.equal(kept[0], start) and torch.equal(synced[0], source)


def test_ema_of_a_lower_precision_target_rounds_once():
    """bf16 target, fp32 source, alpha 0.5: the exact 1.005 rounds to bf16's 1.0078125; in bf16
    throughout, the source would round to 1.0078125 first and the midpoint 1.00390625 (a tie)
    to 1.0."""
    t = [torch.tensor([1.0], dtype=torch.bfloat16)]
    ema_(t, [torch.tensor([1.01])], 0.5)
    assert t[0].dtype == torch.bfloat16 and t[0].item() == 1.0078125
    pure = torch.tensor([1.0], dtype=torch.bfloat16)
    assert pure.lerp_(torch.tensor([1.01]).bfloat16(), 0.5).item() == 1.0  # what is avoided


@pytest.mark.parametrize(
    "targets, sources, alpha, match",
    [
        ([torch.zeros(2)], [torch.zeros(2)], 1.5, r"alpha must lie in \[0, 1\], got 1.5"),
        ([torch.zeros(2)], [torch.zeros(3)], 0.5, r"tensor 0 has shape \[2\], its source \[3\]"),
        ([torch.zeros(2)], [], 0.5, "EMA of 1 tensors toward 0"),
    ],
)
def test_ema_refuses_bad_inputs(targets, sources, alpha, match):
    with pytest.raises(SalsaError, match=match):
        ema_(targets, sources, alpha)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every=0), r"model.reference_update.every must be at least 1, got 0"),
        (dict(alpha=-0.1), r"model.reference_update.alpha must be in \[0, 1\], got -0.1"),
        (dict(alpha=1.1), r"model.reference_update.alpha must be in \[0, 1\], got 1.1"),
        (dict(alpha=float("nan")), r"model.reference_update.alpha must be in \[0, 1\], got nan"),
    ],
)
def test_reference_update_settings_are_range_checked(kwargs, match):
    with pytest.raises(SalsaError, match=match):
        ReferenceUpdate(**kwargs)


# ----------------------------------------------------------------------------- runs

RUNS = {  # estimator x reference mode: every mode and an estimator of each kind
    "gae-soup": dict(),
    "grpo-multiple_kl": dict(
        reference_mode="multiple_kl",
        estimator=EstimatorSettings("grpo", samples_per_prompt=2),
        ppo=PPOSettings(epochs=1, minibatch_size=8, micro_batch_size=8),
    ),
    "rloo-lora": dict(
        lora=LoraSettings(r=4, alpha=8),
        lr=1e-3,
        estimator=EstimatorSettings("rloo", samples_per_prompt=2),
        ppo=PPOSettings(epochs=1, minibatch_size=8, micro_batch_size=8),
    ),
}


def run(stage_outputs, task_dir, root: Path, name: str, update, rollouts: int = 3, **kwargs):
    """A seeded run of ``RUNS[name]`` with ``reference_update=update``: (module, recorder)."""
    L.seed_everything(5)
    settings = {**RUNS[name], **kwargs}
    module = build(stage_outputs, reference_update=update, eval_kl_to_each=False, **settings)
    batch = 4 if "estimator" in settings else 8  # 8 responses per rollout either way
    data = prompts(stage_outputs, task_dir, batch_size=batch)
    _, recorder = fit(module, data, root, rollouts)
    return module, recorder


def trained(module) -> dict[str, torch.Tensor]:
    """Every weight an optimizer trains (policy or its adapter, critic or value head)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(RUNS))
def test_alpha_zero_is_the_frozen_reference_to_the_last_digit(
    name, stage_outputs, task_dir, tmp_path
):
    """Updating every rollout with alpha 0 runs the EMA (and, under LoRA, the reference adapter)
    yet logs the same metrics and trains the same weights as a frozen reference, bit for bit."""
    frozen, frozen_rec = run(stage_outputs, task_dir, tmp_path / "frozen", name, None)
    still, still_rec = run(
        stage_outputs, task_dir, tmp_path / "alpha0", name, ReferenceUpdate(1, 0.0)
    )
    assert training_metrics(still_rec) == training_metrics(frozen_rec)
    a, b = trained(frozen), trained(still)
    assert same(a, b)
    assert not same(a, {k: frozen_rec.start[k] for k in a})  # and the runs did train
    assert training_metrics(frozen_rec)[-1]["objective/kl"] != 0.0  # away from the reference


@pytest.mark.parametrize("name", list(RUNS))
def test_a_hard_sync_every_rollout_keeps_the_kl_at_zero(name, stage_outputs, task_dir, tmp_path):
    """alpha 1, every rollout: from the second rollout on, the reference is the policy that
    samples the rollout, so its KL is exactly 0 (LoRA: the reference adapter is an exact copy;
    Multiple KLs: every SFT model became the policy), where the frozen reference's KL grows.
    The first rollout is before any sync (Multiple KLs: the soup policy is at a KL from each)."""
    _, recorder = run(stage_outputs, task_dir, tmp_path, name, ReferenceUpdate(1, 1.0))
    kl = [m["objective/kl"] for m in training_metrics(recorder)]
    assert kl[1:] == [0.0, 0.0]
    assert (kl[0] != 0.0) == (name == "grpo-multiple_kl")


class PolicyAtEachRollout(L.Callback):
    """The policy's weights (under the reference's names) and the references' before each
    rollout's ``training_step``."""

    def __init__(self) -> None:
        self.policy, self.references = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        from salsa_lightning.ppo.moving import policy_weights

        self.policy.append(
            {k: v.detach().clone() for k, v in policy_weights(module.policy).items()}
        )
        self.references.append([snapshot(m) for m in module.ref_models])


@pytest.mark.parametrize("mode", ["soup", "multiple_kl"])
def test_every_reference_model_moves_by_the_ema_of_the_policy(
    mode, stage_outputs, task_dir, tmp_path
):
    """every 2, alpha 0.5, 5 rollouts: before rollouts 3 and 5 each reference model (the soup;
    each checkpoint under Multiple KLs) moves halfway to the policy as it stands then; in between
    it stands still. Validation measures the KL to the moved reference and to the initial one."""
    L.seed_everything(5)
    module = build(stage_outputs, reference_mode=mode, reference_update=ReferenceUpdate(2, 0.5))
    data = prompts(stage_outputs, task_dir)
    before = validate(module, data, tmp_path)
    seen = PolicyAtEachRollout()
    fit(module, data, tmp_path, 5, callbacks=[seen])
    assert before["eval/kl_initial"] == before["eval/kl"]  # nothing moved yet
    after = validate(module, data, tmp_path)
    refs = seen.references
    for i, start in enumerate(refs[0]):
        assert same(refs[1][i], start) and same(refs[2][i], start)  # rollouts 1, 2: frozen
        # hand-worked: 0.5 * ref + 0.5 * policy after rollout 2 (seen before rollout 3) ...
        want = {k: 0.5 * v + 0.5 * seen.policy[2][k] for k, v in start.items()}
        for k in want:
            torch.testing.assert_close(refs[3][i][k], want[k], rtol=0, atol=1e-6)
        # ... then toward the policy after rollout 4, before rollout 5
        want = {k: 0.5 * v + 0.5 * seen.policy[4][k] for k, v in refs[3][i].items()}
        final = snapshot(module.ref_models[i])
        for k in want:
            torch.testing.assert_close(final[k], want[k], rtol=0, atol=1e-6)
        assert not same(final, start)
    assert after["eval/kl"] != after["eval/kl_initial"]
    # the reference follows the policy: the policy is closer to it than to where it started
    assert after["eval/kl"] < after["eval/kl_initial"]
    assert "eval/kl_initial" not in validate(build(stage_outputs), data, tmp_path / "frozen")


def numel(params) -> int:
    return sum(p.numel() for p in params)


def test_lora_reference_is_an_adapter_of_its_own_not_a_second_model(
    stage_outputs, task_dir, tmp_path
):
    """LoRA on the soup: the moving reference is a second adapter on the same base. The module
    holds exactly one adapter's parameters more than with a frozen reference, not a second
    model; the reference adapter moves by the EMA of the policy's factors."""
    lora = LoraSettings(r=4, alpha=8)
    L.seed_everything(5)
    frozen = build(stage_outputs, lora=lora, lr=1e-3, eval_kl_to_each=False)
    data = prompts(stage_outputs, task_dir)
    validate(frozen, data, tmp_path / "frozen")  # builds its models
    L.seed_everything(5)
    module = build(
        stage_outputs, lora=lora, lr=1e-3, eval_kl_to_each=False,
        reference_update=ReferenceUpdate(1, 0.5),
    )  # fmt: skip
    seen = []

    class Adapters(L.Callback):
        def on_train_batch_start(self, trainer, m, batch, batch_idx) -> None:
            seen.append(
                {n: p.detach().clone() for n, p in m.policy.named_parameters() if "lora_" in n}
            )

    fit(module, data, tmp_path, 2, callbacks=[Adapters()])
    assert module.ref_models is None and frozen.ref_models is None
    adapter = numel(p for n, p in frozen.policy.named_parameters() if "lora_" in n)
    base = numel(p for n, p in frozen.policy.named_parameters() if "lora_" not in n)
    assert adapter > 0 and base > 10 * adapter  # a copy of the model would add `base`
    assert numel(module.parameters()) == numel(frozen.parameters()) + adapter
    # Trainable parameters: only the policy's adapter and the critic's, as with a frozen reference.
    trains = lambda m: numel(p for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trains(module) == trains(frozen)
    # Before rollout 2 the reference's factors moved halfway to the policy's after rollout 1
    # (they started as a copy of the policy's initial adapter).
    now = {n: p for n, p in module.policy.named_parameters() if ".reference." in n}
    assert now
    for name, value in now.items():
        own = name.replace(".reference.", ".default.")
        want = 0.5 * seen[0][own] + 0.5 * seen[1][own]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-7)
        assert not value.requires_grad
    ev = validate(module, data, tmp_path)
    assert ev["eval/kl"] != ev["eval/kl_initial"]


# ----------------------------------------------------------------------------- checkpoints


def test_the_moving_reference_is_checkpointed_and_its_setting_checked_on_resume(
    stage_outputs, task_dir, tmp_path
):
    """The moving reference's weights are in the checkpoint (a frozen one's are not); resuming
    with another reference_update is refused before training."""
    L.seed_everything(5)
    module = build(stage_outputs, reference_update=ReferenceUpdate(1, 0.5), eval_kl_to_each=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    fit(module, prompts(stage_outputs, task_dir), tmp_path, 2, callbacks=[ckpt],
        enable_checkpointing=True)  # fmt: skip
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    refs = {k for k in saved["state_dict"] if k.startswith("ref_models.")}
    assert refs == {f"ref_models.{k}" for k in module.ref_models.state_dict()}
    assert not any(k.startswith("reward.") for k in saved["state_dict"])
    assert saved["salsa"]["recipe"]["reference_update"] == {"every": 1, "alpha": 0.5}
    for key in refs:  # the moved reference, as the module holds it
        assert torch.equal(saved["state_dict"][key], module.state_dict()[key])
    for update in (None, ReferenceUpdate(1, 0.3)):
        other = build(stage_outputs, reference_update=update, eval_kl_to_each=False)
        trainer = make_trainer(tmp_path / "resumed", max_steps=4, limit_val_batches=0)
        with pytest.raises(SalsaError, match="written with model.reference_update"):
            trainer.fit(
                other, prompts(stage_outputs, task_dir), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
            )


def cli_args(out: dict[str, Path], task_dir: Path, root: Path, export: Path) -> list[str]:
    """``salsa fit`` of configs/salsa-ema.yaml at test size: 6 rollouts of 8 sampled responses,
    the reference moving halfway every 2 rollouts, a last.ckpt after every rollout."""
    return [
        "fit", "--config", str(CONFIGS / "salsa-ema.yaml"),
        "--model.init_args.reference.checkpoints", f"[{out['sft-1']}, {out['sft-2']}]",
        "--model.init_args.reward_model", str(out["reward"]),
        "--model.init_args.reference_update", "{every: 2, alpha: 0.5}",
        "--model.init_args.generation.max_new_tokens", "8",
        "--model.init_args.ppo.epochs", "1",
        "--model.init_args.ppo.minibatch_size", "8",
        "--model.init_args.ppo.micro_batch_size", "8",
        "--model.init_args.eval_kl_to_each", "false",
        "--model.init_args.export_dir", str(export),
        "--data.init_args.tokenizer", str(out["sft-1"]),
        "--data.init_args.task_dir", str(task_dir),
        "--data.init_args.batch_size", "8",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "6",
        "--trainer.limit_val_batches", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
    ]  # fmt: skip


def salsa(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "salsa_lightning.cli", *args], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_and_resumed_exports_the_uninterrupted_runs_policy_bit_for_bit(
    stage_outputs, task_dir, tmp_path
):
    """SIGKILL after the first checkpoints, ``--ckpt_path last``: the export equals the
    uninterrupted run's byte for byte, the moving reference restored from the checkpoint (a
    reference rebuilt from its recipe would give other KLs, so other updates)."""
    full = salsa(
        cli_args(stage_outputs, task_dir, tmp_path / "full", tmp_path / "full.out"), tmp_path
    )
    assert full.wait(timeout=900) == 0, full.stderr.read()[-3000:]

    part = tmp_path / "part"
    args = cli_args(stage_outputs, task_dir, part, tmp_path / "part.out")
    killed = salsa(args, tmp_path)
    last = part / "logs" / "salsa-ema" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 900
    # Kill once a checkpoint after rollout 3 exists: the reference has moved (before rollout 3).
    while killed.poll() is None and time.time() < deadline:
        if _steps(last) >= 3:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    steps = _steps(last)
    assert 3 <= steps < 6, steps
    assert not (tmp_path / "part.out").exists()

    resumed = salsa([*args, "--ckpt_path", "last"], tmp_path)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    a, b = tmp_path / "full.out", tmp_path / "part.out"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    recipe = json.loads((b / "salsa_training.json").read_text())["recipe"]
    assert recipe["reference_update"] == {"every": 2, "alpha": 0.5}


def _steps(last: Path) -> int:
    """The global step of ``last.ckpt`` (-1 while none is readable)."""
    try:
        return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # absent, or being written
        return -1


# ----------------------------------------------------------------------------- strategies


def test_fsdp1_is_refused_before_any_model_is_built(stage_outputs, task_dir, tmp_path):
    """FSDP1's flat parameters shard the policy and the reference into units of different
    layouts: a moving reference is refused there, in setup, with the way out."""
    args = cli_args(stage_outputs, task_dir, tmp_path, tmp_path / "export")
    args += ["--config", str(CONFIGS / "fsdp1.yaml"), "--trainer.devices", "1"]
    proc = salsa(args, tmp_path)
    assert proc.wait(timeout=600) == 2
    err = proc.stderr.read()
    assert "model.reference_update is not supported under FSDP1 (configs/fsdp1.yaml)" in err
    assert "Use FSDP2 (configs/fsdp.yaml)" in err
    assert "SALSA: one rollout" not in err  # it never reached training


COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor")  # fmt: skip


class WatchMoves(L.Callback):
    """On each rank: counts the collectives (FSDP2's gathers among them) called while the
    reference moves and while the policy samples, and checks each move on the local shards:
    the reference's shard after it against ``lerp(shard before, the policy's shard, alpha)``.
    Writes ``<path>.rank<N>.json``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.out = {"move_reference": 0, "generate": 0, "moved": 0, "error": 0.0, "shards": []}

    def setup(self, trainer, module, stage) -> None:
        for method in ("move_reference", "generate"):
            self.count_in(module, method)

    def count_in(self, module, method: str) -> None:
        import torch.distributed as dist

        from salsa_lightning.ppo.moving import local, policy_weights, resharded

        inner = getattr(module, method)

        def shards():
            refs = dict(resharded(module.ref_models[0]).named_parameters())
            policy = policy_weights(module.policy)
            return {n: (local(p).clone(), local(policy[n]).clone()) for n, p in refs.items()}

        def counted(*args, **kwargs):
            before = shards() if method == "move_reference" else None
            originals = {n: getattr(dist, n) for n in COLLECTIVES}

            def counting(fn):
                def call(*a, **k):
                    self.out[method] += 1
                    return fn(*a, **k)

                return call

            for name, fn in originals.items():
                setattr(dist, name, counting(fn))
            try:
                return inner(*args, **kwargs)
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
                if before is not None:
                    self.check(before, shards(), module.reference_update.alpha)

        setattr(module, method, counted)

    def check(self, before, after, alpha: float) -> None:
        if all(torch.equal(after[n][0], ref) for n, (ref, _) in before.items()):
            return  # not a rollout that moves the reference
        self.out["moved"] += 1
        self.out["shards"] = sorted({list(ref.shape)[0] for ref, _ in before.values()})
        for name, (ref, policy) in before.items():
            want = ref.lerp(policy, alpha)
            self.out["error"] = max(self.out["error"], float((after[name][0] - want).abs().max()))

    def on_train_end(self, trainer, module) -> None:
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.out))


@pytest.mark.slow
def test_a_moving_reference_under_fsdp2_agrees_with_one_process(stage_outputs, task_dir, tmp_path):
    """configs/salsa.yaml with a reference moving halfway every rollout, greedy decoding, one
    process against two FSDP2 processes (8 prompts a rollout over all ranks: 4 each, the shipped configs/fsdp.yaml).
    Each rank moves its own shard: no collective runs during a move (the same counter sees the
    gathers of sampling), and each local shard of the reference becomes exactly the lerp of
    itself and the policy's local shard. The first rollout agrees to 1e-4 (nothing moved yet),
    the later ones and the evaluation to 0.05 (the ranks' losses weigh tokens slightly
    differently, as in tests/test_fsdp.py), and the moved reference in the sharded checkpoint is
    the single run's within 1e-3."""
    from test_fsdp import FSDP2, first, metrics, run, salsa_args

    moving = [
        "--model.init_args.reference_update", "{every: 1, alpha: 0.5}",
        "--trainer.limit_train_batches", "3",
        "--trainer.val_check_interval", "3",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true",
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(salsa_args(stage_outputs, task_dir, single, 8) + moving, tmp_path)
    watch = ["--trainer.callbacks+=test_reference_update.WatchMoves",
             "--trainer.callbacks.path", str(sharded / "moves")]  # fmt: skip
    run(salsa_args(stage_outputs, task_dir, sharded, 8) + moving + FSDP2 + watch, tmp_path, env)

    for rank in (0, 1):
        seen = json.loads((sharded / f"moves.rank{rank}.json").read_text())
        assert seen["move_reference"] == 0 and seen["generate"] > 0, seen  # no collective
        assert seen["moved"] == 2 and seen["error"] == 0.0, seen  # before rollouts 2 and 3
    one, two = metrics(single), metrics(sharded)
    kl = lambda rows: [r["objective/kl"] for r in rows if "objective/kl" in r]  # noqa: E731
    assert kl(two)[0] == pytest.approx(kl(one)[0], abs=1e-4) and kl(one)[0] == 0.0
    assert kl(two)[1:] == pytest.approx(kl(one)[1:], abs=0.05)
    for key in ("eval/kl", "eval/kl_initial", "eval/gold"):
        assert first(two, key) == pytest.approx(first(one, key), abs=0.05), key
    assert first(one, "eval/kl") != first(one, "eval/kl_initial")

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(next(sharded.rglob("last.ckpt")), tmp_path / "sharded.pt")
    a = torch.load(next(single.rglob("last.ckpt")), weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "sharded.pt", weights_only=False)["state_dict"]
    refs = [k for k in a if k.startswith("ref_models.")]
    assert refs and all(k in b for k in refs)
    from salsa_lightning.soup import load_soup

    soup = load_soup([stage_outputs["sft-1"], stage_outputs["sft-2"]]).state_dict()
    moved = max(float((a[k] - soup[k.removeprefix("ref_models.0.")]).abs().max()) for k in refs)
    apart = max(float((a[k] - b[k]).abs().max()) for k in refs)
    assert moved > 0 and apart < 1e-3, (apart, moved)
