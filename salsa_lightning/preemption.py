"""SIGTERM, the signal of pre-emption (SLURM, Kubernetes, spot instances): a run it stops ends
with exit status 143, one line that says what was kept and how to go on, and no partial output.

During a fit, :class:`StopOnSigterm` (every stage module adds it) stops every rank after the same
optimizer step, writes ``last.ckpt`` where the run checkpoints, and raises Lightning's own
``SIGTERMException`` with status 143, so Lightning's ``on_exception`` hooks, logger finalisation
and teardown run as for any interrupt and no export is written. Outside a fit (building models, a
soup, an evaluation, between pipeline stages), ``sigterm.sigterm_raises`` turns SIGTERM into
``sigterm.Terminated``, so ``finally`` blocks remove what was half written.

Lightning 2.6.6 alone, measured: its handler sets ``trainer.received_sigterm`` on the rank that
got the signal, and the loop raises ``SIGTERMException`` (a ``SystemExit`` with status 0) at the
end of that rank's step, so the run exits 0 with nothing written. With several processes a rank
that stops alone leaves the others in the next collective (Lightning issue #20806), and the
broadcast its handler issues from inside the signal handler can meet another rank's unrelated
collective. :class:`StopOnSigterm` therefore replaces only that handler, by one that sets a flag;
the ranks decide together (``reduce_boolean_decision``) at the end of each optimizer step. SLURM's
requeue signal (``SLURMEnvironment(auto_requeue=True)``, SIGUSR1 by default) is left to
Lightning: it saves its ``hpc_ckpt`` and requeues the job, and the SIGTERM with which SLURM then
ends the job is handled here.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from salsa_lightning.resume import LAST
from salsa_lightning.sigterm import SIGTERM_STATUS

log = logging.getLogger(__name__)


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """Where this run writes ``last.ckpt`` (the checkpoint callback's directory, where
    ``--ckpt_path last`` looks), or None for a run without a checkpoint callback."""
    callback = trainer.checkpoint_callback
    if callback is None or not getattr(callback, "dirpath", None):
        return None
    return Path(callback.format_checkpoint_name({}, LAST))


def save_last(trainer: L.Trainer, path: Path) -> None:
    """Write ``last.ckpt`` (every rank its part) as the checkpoint callback's own."""
    # The callback's record of its last.ckpt travels in the checkpoint: a run resumed from this
    # one then writes last.ckpt again rather than a new last-v1.ckpt beside it.
    trainer.checkpoint_callback.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)


class StopOnSigterm(L.Callback):
    """On SIGTERM, stop every rank after the same optimizer step with a resumable ``last.ckpt``.

    The checkpoint is written where ``ModelCheckpoint`` writes its periodic ones, at the same
    point of the loop (the end of a training batch, or of a validation during fit), so
    ``--ckpt_path last`` continues exactly as from those. The loop then stops at its next hook
    (after this step's metrics are logged, before any further validation or batch): Lightning's
    ``SIGTERMException``, with status 143 and a note for ``sigterm.stop_message``. A run without a
    checkpoint callback (``--trainer.enable_checkpointing false``) stops the same way and says
    that nothing was kept. A run that checkpoints also writes ``last.ckpt`` when training ends,
    before the export, so a failed export (a full disk) leaves the trained weights on disk.
    """

    def __init__(self) -> None:
        self.requested = False  # this rank received SIGTERM
        self.stopping: str | None = None  # every rank agreed to stop: what to say
        self.saved_step: int | None = None  # the step of this run's latest checkpoint
        self.trainer: L.Trainer | None = None

    # -- the signal: a flag, set by the handler, read at the end of each step

    def listen(self, trainer: L.Trainer) -> None:
        """Replace Lightning's SIGTERM handler (registered just before the run starts; its
        teardown restores the handler that was there before)."""
        self.trainer = trainer
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request)

    def request(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        trainer = self.trainer
        log.warning(rank_prefixed_message("SIGTERM: stopping after this step", trainer.local_rank))
        launcher = trainer.strategy.launcher
        if launcher is not None:  # the processes Lightning started get it too, as in Lightning
            launcher.kill(signum)

    def on_sanity_check_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.listen(trainer)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.listen(trainer)

    # -- the decision, taken by every rank together

    def stop_if_requested(self, trainer: L.Trainer) -> None:
        """Every rank calls this at the same point; if any rank got SIGTERM, every rank writes
        its part of ``last.ckpt`` and stops at the next hook."""
        if self.stopping or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        step, path = trainer.global_step, last_checkpoint(trainer)
        if path is None:
            self.stopping = (
                f"no checkpoint written after step {step} (this run has no checkpoint callback: "
                "trainer.enable_checkpointing is false); a rerun starts over"
            )
            return
        save_last(trainer, path)
        self.stopping = (
            f"{path} written after step {step}; resume with the same command and --ckpt_path last"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if (i + 1) % trainer.accumulate_grad_batches == 0:  # an optimizer step just ended
            self.stop_if_requested(trainer)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.stop_if_requested(trainer)
            self.raise_if_stopping()

    def raise_if_stopping(self) -> None:
        if self.stopping:
            stop = SIGTERMException(SIGTERM_STATUS)
            stop.add_note(self.stopping)
            raise stop

    # The first hook after the step that decided: its metrics are logged by then.
    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.raise_if_stopping()

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int
    ) -> None:
        self.raise_if_stopping()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.raise_if_stopping()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.raise_if_stopping()
        # Training is over: keep the final weights in last.ckpt before the export is written.
        # (ModelCheckpoint itself writes one here only when it wrote none during the run.)
        path, callback = last_checkpoint(trainer), trainer.checkpoint_callback
        saved = self.saved_step
        if (
            path
            and getattr(callback, "save_last", False)
            and saved not in (None, trainer.global_step)
        ):
            save_last(trainer, path)

    def on_save_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.saved_step = trainer.global_step

    def on_exception(
        self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning's loops raise SIGTERMException themselves (with status 0) when a SIGTERM
        # came before this callback listened (during setup): nothing was trained or kept.
        if isinstance(exception, SIGTERMException) and not self.stopping:
            exception.code = SIGTERM_STATUS
            exception.add_note(f"stopped at step {trainer.global_step}; no checkpoint written")
