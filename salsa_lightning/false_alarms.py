"""Warnings that Lightning 2.6 prints during every stage's fit although they do not apply to
these modules, silenced for the length of the fit only (:class:`SilenceFalseAlarms`, a callback
of every stage module). A user's own module fitted afterwards in the same process, a notebook's
for one, still gets each of them.

- "Found N module(s) in eval mode at the start of training": the frozen reference, reward model
  and soup ingredients are kept in eval mode on purpose, so that no dropout noises their scores.
- "Using ModelCheckpoint with manual optimization ... AFTER optimization", followed by 14 lines
  of example code that save ``self.layer`` before the step: a SALSA-PPO checkpoint between
  rollouts must hold the stepped weights, so that a resumed run goes on bit for bit.
- "It is recommended to use `self.log(..., sync_dist=True)` when logging on epoch level in
  distributed setting", once per validation value on several processes: every value these
  modules log at the end of a validation epoch is a torchmetrics ``compute()``, which has
  already reduced it over the ranks.
- torch 2.13's FutureWarning on ``LeafSpec``, raised inside Lightning's ``CombinedLoader``:
  Lightning's to update, nothing a user can change.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L

FALSE_ALARMS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning),
    (
        r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level",
        UserWarning,
    ),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class SilenceFalseAlarms(L.Callback):
    """Ignores :data:`FALSE_ALARMS` from ``setup`` to ``teardown`` (or the exception that ends
    the run), then puts the warning filters back as they were."""

    def __init__(self) -> None:
        self._saved: warnings.catch_warnings | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._saved is not None:
            return
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        for message, category in FALSE_ALARMS:
            warnings.filterwarnings("ignore", message=message, category=category)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._saved = None
