"""Classes that tests name by ``class_path`` in ``salsa`` runs in subprocesses (the tests
folder is on their PYTHONPATH): reward functions and callbacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import torch

from salsa_lightning.task import GoldReward


class RankInGroupReward:
    """Scores each response by its position among the consecutive repeats of its prompt
    (0, 0.1, 0.2, ...): the k samples of a prompt score differently even when greedy decoding
    made them equal, so a group estimator has non-zero advantages to train on, the same in one
    process and in several."""

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores, previous, rank = [], None, 0
        for prompt in prompts:
            rank = rank + 1 if prompt == previous else 0
            previous = prompt
            scores.append(0.1 * rank)
        return torch.tensor(scores)


class RaisesOnSecondCall:
    """The embedded task's gold reward, except that its second call raises (a bug in the
    user's reward function)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            return self.score_badly(prompts)
        return GoldReward()(prompts, responses)

    def score_badly(self, prompts: list[str]) -> torch.Tensor:
        raise KeyError(f"no score for {prompts[0]!r}")


class NaNOnRankOne:
    """The embedded task's gold reward, except that on its third call the process of global
    rank 1 returns NaN for every response (the other ranks get finite rewards)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        self.calls += 1
        scores = GoldReward()(prompts, responses)
        if self.calls == 3 and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 1:
            scores[:] = float("nan")
        return scores


class DumpKLCoefficient(L.Callback):
    """Each rank writes its KL coefficient to ``<path>.rank<N>.json`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        out = Path(f"{self.path}.rank{trainer.global_rank}.json")
        out.write_text(json.dumps({"kl_coef": module.kl_ctl.value, "skips": module.skips}))


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process when optimizer step ``step`` ends, as a scheduler that
    pre-empts the job would: on the process of global rank ``rank`` only (-1: on every rank)."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank, self.sent = step, rank, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        mine = self.rank in (-1, trainer.global_rank)
        if trainer.global_step == self.step and mine and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class FillDiskWhenTrainingEnds(L.Callback):
    """When training ends (after the checks before it, before the export), fills the file system
    of ``path`` up to ``leave`` free bytes, as another job writing there meanwhile would."""

    def __init__(self, path: str, leave: int = 0) -> None:
        self.path, self.leave = Path(path), leave

    def on_train_end(self, trainer, module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path).free - self.leave
        try:
            with (self.path / "filler").open("wb") as f:
                f.write(b"\0" * max(free, 0))
        except OSError:  # full already: what was wanted
            pass


class NanGradientOnFirstStep(L.Callback):
    """A gradient that overflowed in backward: before the first optimizer step one gradient is
    NaN while every loss was finite, so the step makes that weight NaN (a diverged update)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.fill_(float("nan"))


class RecordCompiled(L.Callback):
    """Records, when training starts, which of a SALSA run's models were compiled in place
    (``model.compile``), in ``RecordCompiled.seen`` (the run is in this process)."""

    seen: list[dict[str, bool]] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from salsa_lightning.compiling import is_compiled

        models = {"policy": module.policy, "critic": module.critic, "reward": module.reward}
        models.update({f"reference {i}": m for i, m in enumerate(module.ref_models or [])})
        RecordCompiled.seen.append({k: is_compiled(m) for k, m in models.items() if m})
