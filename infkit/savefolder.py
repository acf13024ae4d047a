"""Replacing a save folder safely: a lock file, a staging folder renamed into place, and recovery after a kill.

For a target ``runs/ekfac`` everything infkit keeps beside it is hidden in ``runs/``:

* ``.ekfac.lock`` — held (created exclusively) for the whole of a save, so saves to one path run one after the
  other. It names the process holding it; a lock whose process is gone (same machine), or that is older than
  :data:`STALE_AFTER`, is taken over.
* ``.ekfac.partial-<id>`` — the new save while it is written; renamed to ``ekfac`` when complete.
* ``.ekfac.old-<id>`` — the previous save, between the two renames that replace it, then deleted.

A save killed at any point leaves either the old or the new save at the target, or (killed between the two
renames) the old one in ``.ekfac.old-<id>``: the next save or load renames it back. The next save also deletes the
partial and old folders that killed saves left. Only a folder that ``foreign(folder)`` accepts (infkit's own
save) or an empty one is ever replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from infkit.errors import InfkitError

#: Seconds a save (or a load recovering a killed save) waits for another save to the same path to finish.
LOCK_TIMEOUT = 300.0
#: A lock older than this is taken over even when its process cannot be checked (another machine).
STALE_AFTER = 24 * 3600.0
_POLL = 0.05


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _leftovers(target: Path, kind: str) -> list[Path]:
    """The ``.<name>.<kind>-<id>`` folders beside ``target`` (kind: "partial" or "old"), newest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-[0-9a-f]{{8}}")
    found = []
    for path in target.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # another save may be deleting it right now
                found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found, reverse=True)]


def _vacant(target: Path) -> bool:
    """Nothing at ``target``, or an empty folder."""
    if target.is_symlink():
        return False
    try:
        return not any(target.iterdir())
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False


# -- the lock -------------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: assume alive (the lock's age still decides)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> tuple[str, str, bool] | None:
    """(content, pid, stale) of a lock file, None when there is none. Stale: its process is gone (same machine),
    it is older than STALE_AFTER, or it has no pid after 10 s (killed between creating and writing it)."""
    try:
        text, age = lock.read_text(), time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    parts = text.split()
    pid = parts[0] if parts and parts[0].isdigit() else "unknown"
    same_host = len(parts) > 1 and parts[1] == socket.gethostname()
    stale = age > STALE_AFTER or (pid == "unknown" and age > 10) or (same_host and not _alive(int(parts[0])))
    return text, pid, stale


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target``, waiting up to :data:`LOCK_TIMEOUT` seconds for another holder."""
    lock = _lock_path(target)
    token = f"{os.getpid()} {socket.gethostname()} {uuid.uuid4().hex}\n"
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                continue
            text, pid, stale = holder
            if stale:  # taken over: removed unless it changed meanwhile
                with contextlib.suppress(FileNotFoundError):
                    if lock.read_text() == text:
                        lock.unlink()
                continue
            if time.monotonic() > deadline:
                raise InfkitError(
                    f"another save to {target} is in progress (pid {pid}, lock file {lock}); wait until it has "
                    f"finished and try again. If no infkit process is saving there, delete {lock}"
                ) from None
            time.sleep(_POLL)
            continue
        except OSError as err:
            raise InfkitError(f"cannot create the lock file {lock} ({err}); is {target.parent} writable?") from err
        try:
            os.write(fd, token.encode())
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == token:
                lock.unlink()


# -- recovery and replacement -------------------------------------------------------------------------------------
def _restore_old(target: Path) -> None:
    """Under the lock: a save killed between its two renames left no target and the previous save in
    ``.<name>.old-<id>``: rename it back."""
    olds = _leftovers(target, "old") if _vacant(target) else []
    if olds:
        if target.exists():
            target.rmdir()
        os.replace(olds[0], target)


def recover(target: Path) -> None:
    """Before a load: when the target is missing and a save to it was killed (or is running), wait for the lock
    and put the previous save back."""
    if not target.parent.is_dir() or not _vacant(target):
        return
    if _leftovers(target, "old") or _lock_path(target).exists():
        with locked(target):
            _restore_old(target)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system (or OS) syncs a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace(target: Path, write: Callable[[Path], None], foreign: Callable[[Path], str | None]) -> Path:
    """Write a new save with ``write(folder)`` and put it at ``target`` in place of the save there.

    ``foreign(folder)`` says why an existing folder is not infkit's own save (None when it is): such a folder is
    refused and left as it is; an empty folder is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target):
        _restore_old(target)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise InfkitError(f"{target} exists and is not a folder; infkit saves to a folder: choose another path")
        why = None if _vacant(target) else foreign(target)
        if why is not None:
            raise InfkitError(
                f"{target} is not an infkit save ({why}); infkit replaces only a folder it wrote itself, so it "
                "has left this one as it was: choose another path"
            )
        for leftover in _leftovers(target, "partial") + _leftovers(target, "old"):  # from killed saves
            shutil.rmtree(leftover, ignore_errors=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            write(staging)
            for path in [*staging.iterdir(), staging]:
                _fsync(path)
            if target.exists():
                _swap(staging, target)
            else:
                os.replace(staging, target)
            _fsync(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap(staging: Path, target: Path) -> None:
    """Replace the save at ``target`` (or an empty folder) by ``staging``: two renames; a kill between them leaves
    the previous save in ``.<name>.old-<id>`` for :func:`recover`."""
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(staging, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
