"""SIGTERM as an exception, for every command (``commands.exit_status``): within
:func:`sigterm_raises` the signal raises :class:`Terminated`, so ``finally`` blocks remove what was
half written, and the command exits with status 143 and one line (:func:`stop_message`). During a
fit, ``preemption.StopOnSigterm`` stops every rank after the same step instead.

This module loads neither Lightning nor torch: ``salsa configs`` and ``salsa --help`` run through
it without them.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGTERM_STATUS = 128 + signal.SIGTERM  # 143: how a shell reports a process SIGTERM ended


class Terminated(SystemExit):
    """SIGTERM outside a fit: raised in the main thread so that ``finally`` blocks clean up;
    uncaught, the process exits with status 143. Notes (``add_note``) say what was removed."""

    def __init__(self) -> None:
        super().__init__(SIGTERM_STATUS)


_received: list[int] = []  # the SIGTERMs raised as Terminated in this process


def _raise_terminated(signum: int, frame: Any) -> None:
    # While a Trainer runs, Lightning installs a handler that calls the one it found (this one)
    # as well; the fit's own stop (StopOnSigterm) then decides, so raise only as the process's
    # own handler.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        _received.append(signum)
        raise Terminated


def sigterm_received() -> bool:
    """Whether SIGTERM was raised as :class:`Terminated` in this process. C code that calls
    back into Python (safetensors reading a tensor, torch) may replace the exception raised
    inside it with one of its own: an error after this is the stop, not a failure."""
    return bool(_received)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (outside a fit; see the module's
    docstring). A no-op off the main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_message(stop: BaseException) -> str:
    """The one line printed for a run SIGTERM stopped, from the notes its stages added."""
    notes = getattr(stop, "__notes__", None) or ["nothing was written"]
    return "stopped by SIGTERM: " + "; ".join(notes)


def is_stop(exc: BaseException) -> bool:
    """Whether ``exc`` is a SIGTERM stop: :class:`Terminated`, or Lightning's
    ``SIGTERMException`` (looked up only where Lightning is loaded: nothing else raises it)."""
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return isinstance(exc, Terminated) or (
        lightning is not None and isinstance(exc, lightning.SIGTERMException)
    )


def reports_for_all_ranks() -> bool:
    """Whether this process is the one that prints a stop (rank 0, as Lightning reads the
    launchers' variables once it is loaded; a process that never loaded it ran no fit)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return rank_zero is None or getattr(rank_zero.rank_zero_only, "rank", 0) == 0
