"""Output directories: checked before any work starts, written aside and renamed into place at
the end, and the temporaries an interrupted run left behind removed.

Every stage that writes a directory (an export, a soup, an evaluation, a converted model) goes
through :func:`check_output_dir` before it does any work and :func:`replace_atomically` when its
output is complete, so the output either holds a whole result or is untouched. Single files
(the report's, the pre-training text, training checkpoints) go through :func:`file_written_aside`
the same way. Before the work, :func:`check_free_space` compares what will be written with the
free space of each device; a write that still runs out of space (the space was taken meanwhile)
ends in a :class:`SalsaError` that names the directory, with the temporary removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from salsa_lightning.errors import SalsaError

TMP_MARK = ".tmp-"  # temporary siblings are named ``.<name>.tmp-<pid>``
PROBE_PREFIX = ".salsa-probe-"  # check_writable_dir's folder, made and removed at once


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse a directory that cannot be created or written: one under a file, or under a
    folder this process may not write. Nothing is left behind: a directory still to be made is
    tried by making and removing an empty one where it will be, since some folders refuse what
    their permission bits allow (a pseudo-filesystem such as ``/proc``, where ``os.access``
    answers yes to root)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SalsaError(f"{what} {str(path)!r} is a file, not a directory; choose another path.")
    probe = existing_parent(path)
    if not probe.is_dir():
        raise SalsaError(
            f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file; choose another path."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SalsaError(
            f"{what} {str(path)!r} cannot be written: {str(probe)!r} is not writable by this "
            "user; choose another path or fix its permissions."
        )
    if probe != path:
        try:
            made = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=probe)
        except OSError as e:
            raise SalsaError(
                f"{what} {str(path)!r} cannot be created: {str(probe)!r} refused a new folder "
                f"({e.strerror}); choose another path."
            ) from None
        with suppress(OSError):  # another rank may have moved it on
            os.rmdir(made)
    return path


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else its nearest existing parent (where it would be made)."""
    probe = Path(path).expanduser()
    while not probe.exists():
        probe = probe.parent
    return probe


def megabytes(n: int) -> str:
    """A byte count as people read it in a message (``3.8 MB``)."""
    return f"{n / 1e6:.1f} MB" if n < 1e10 else f"{n / 1e9:.1f} GB"


def check_free_space(needs: Iterable[tuple[str | os.PathLike, int, str]]) -> None:
    """Refuse, before any work, outputs that do not fit: ``needs`` lists ``(path, bytes, what)``;
    outputs on one device are added up and compared with that device's free space
    (``shutil.disk_usage`` of the nearest existing parent).

    Raises:
        SalsaError: Naming what does not fit, where, the bytes needed and the bytes free.
    """
    devices: dict[int, list[tuple[Path, int, str]]] = {}
    for path, size, what in needs:
        devices.setdefault(existing_parent(path).stat().st_dev, []).append((path, size, what))
    for outputs in devices.values():
        needed = sum(size for _, size, _ in outputs)
        where = existing_parent(outputs[0][0])
        free = shutil.disk_usage(where).free
        if needed > free:
            parts = " and ".join(f"{what} {str(p)!r} ({megabytes(n)})" for p, n, what in outputs)
            raise SalsaError(
                f"not enough disk space for {parts}: {megabytes(needed)} needed, "
                f"{megabytes(free)} free in {str(where)!r}; free space there or write elsewhere."
            )


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is a write that found the disk full
    (safetensors reports it as text, not as an ``OSError``)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(target: Path, err: BaseException) -> SalsaError:
    """The one-line error for a write of ``target`` that ran out of space."""
    free = shutil.disk_usage(existing_parent(target.parent)).free
    return SalsaError(
        f"no space left on the device of {str(target.parent)!r} while writing {target.name} "
        f"({megabytes(free)} free now): the unfinished copy was removed and what was there "
        "before is untouched; free space there or write elsewhere."
    )


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
    held = path.exists() and any(not p.name.startswith(PROBE_PREFIX) for p in path.iterdir())
    if held and not overwrite:
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
        pid = tmp.name.rpartition(TMP_MARK)[2].removesuffix(".old")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            remove(tmp)
            removed.append(tmp)
    return removed


@contextmanager
def written_aside(target: str | os.PathLike) -> Iterator[Path]:
    """``with written_aside(out) as tmp:`` write the whole output into ``tmp``; when the block
    ends without an error, ``tmp`` replaces ``target`` (an existing one is removed: the caller
    checked consent). On an error or interrupt ``tmp`` is removed and ``target`` is untouched: a
    full disk becomes a :class:`SalsaError` naming the directory, and an interrupt (Ctrl-C,
    SIGTERM) carries a note naming the temporary it removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_sibling(target)
    try:  # made inside: an interrupt right after the mkdir removes it too
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        replace_atomically(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        explain_failed_write(err, target, tmp)
        raise
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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        explain_failed_write(err, target, tmp)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def explain_failed_write(err: BaseException, target: Path, tmp: Path) -> None:
    """After a write aside failed and ``tmp`` was removed: raise a full disk as a one-line
    :class:`SalsaError`; note on an interrupt (Ctrl-C, SIGTERM) the temporary it removed; leave
    any other error as it is (the caller re-raises it)."""
    if isinstance(err, Exception) and is_disk_full(err):
        raise disk_full_error(target, err) from err
    from salsa_lightning.sigterm import sigterm_received

    if not isinstance(err, Exception) or sigterm_received():
        err.add_note(f"removed the unfinished {tmp}; {target} is as it was")


def replace_atomically(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target``, replacing what is there. What is there
    is renamed aside first and removed only once ``tmp`` is in its place: an error or interrupt
    between the two renames puts it back, so ``target`` holds the old output or the new one."""
    aside = temporary_sibling(target)
    old = aside.with_name(f"{aside.name}.old")  # removed as stale if this process dies
    try:
        if target.is_symlink() or target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if (old.is_symlink() or old.exists()) and not target.exists():
            os.replace(old, target)
        raise
    remove(old)


def remove(path: Path) -> None:
    """Remove a file, link or directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
