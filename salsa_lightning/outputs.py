"""Output directories: checked before any work starts, written aside and renamed into place at
the end, and the temporaries an interrupted run left behind removed.

Every stage that writes a directory (an export, a soup, an evaluation, a converted model) goes
through :func:`check_output_dir` before it does any work and :func:`replace_atomically` when its
output is complete, so the output either holds a whole result or is untouched. Single files
(the report's, the pre-training text) go through :func:`file_written_aside` the same way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from salsa_lightning.errors import SalsaError

TMP_MARK = ".tmp-"  # temporary siblings are named ``.<name>.tmp-<pid>``


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse a directory that cannot be created or written: one under a file, or under a
    folder this process may not write. Nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SalsaError(f"{what} {str(path)!r} is a file, not a directory; choose another path.")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SalsaError(
            f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file; choose another path."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SalsaError(
            f"{what} {str(path)!r} cannot be written: {str(probe)!r} is not writable by this "
            "user; choose another path or fix its permissions."
        )
    return path


def check_output_dir(
    path: str | os.PathLike | None,
    overwrite: bool,
    what: str,
    flag: str = "--overwrite true",
    path_flag: str | None = None,
) -> None:
    """Before any work: ``path`` can be written, and an existing, non-empty one is only replaced
    when ``overwrite`` says so (``flag`` is how the user says it; ``path_flag`` how they name
    another path)."""
    if path is None:
        return
    path = check_writable_dir(path, what)
    if path.exists() and any(path.iterdir()) and not overwrite:
        other = f"another {path_flag}" if path_flag else "another path"
        raise SalsaError(
            f"{what} {str(path)!r} already holds files. Choose {other}, delete it, or pass "
            f"{flag} to replace it."
        )


def temporary_sibling(target: str | os.PathLike) -> Path:
    """The hidden sibling a directory or file is written into before it is renamed to
    ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``target`` that interrupted runs left (their process is
    gone); a live process's temporary is left alone. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for tmp in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        pid = tmp.name.rpartition(TMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def written_aside(target: str | os.PathLike) -> Iterator[Path]:
    """``with written_aside(out) as tmp:`` write the whole output into ``tmp``; when the block
    ends without an error, ``tmp`` replaces ``target`` (an existing one is removed: the caller
    checked consent). On an error or interrupt ``tmp`` is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_atomically(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_written_aside(target: str | os.PathLike) -> Iterator[Path]:
    """:func:`written_aside` for one file: ``with file_written_aside(path) as tmp:`` write the
    whole file at ``tmp``; when the block ends without an error it replaces ``path``, on an
    error or interrupt it is removed and ``path`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def replace_atomically(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target``, replacing what is there."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
