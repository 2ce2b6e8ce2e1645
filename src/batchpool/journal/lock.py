"""The run lock: an exclusive ``flock`` on the journal file itself, held by the one run writing.

No side file to delete, none left behind; the kernel drops it when the holder dies, and it is
independent of SQLite's own POSIX locks. Readers take no lock.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import closing
from pathlib import Path

from .file import JournalError, reason

_LOCK_FDS: set[int] = set()  # lock fds of this process's open journals
_LOCKED: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a journal this process holds


def _forget_locks_in_child() -> None:
    """A forked child must not keep the lock alive after the parent dies (the parent keeps it)."""
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    _LOCKED.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class RunLock:
    """The lock on one journal file, taken when built; ``release()`` lets the next run in."""

    def __init__(self, path: Path) -> None:
        """flock the journal file (creating it empty: SQLite takes that for a blank database).
        A journal this process holds is refused without opening it a second time: closing that
        second descriptor would drop SQLite's POSIX locks of the first."""
        self.path = path
        self._owner = os.getpid()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and _identity(os.stat(path)) in _LOCKED:
                raise JournalError(f"journal {path} is in use by another run (pid {os.getpid()})")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(f"journal {path}: cannot open: {reason(exc)}") from exc
        try:
            self.identity = _take(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def still_there(self) -> bool:
        """Whether the path still names the locked file: a journal deleted or replaced under a
        run would take its commits with it."""
        try:
            return _identity(os.stat(self.path)) == self.identity
        except OSError:
            return False

    def release(self) -> None:
        """Release the flock (after the journal's connection is closed: see __init__).
        Idempotent; a forked child's copy releases nothing."""
        fd, self._fd = self._fd, None
        if fd is not None and os.getpid() == self._owner:
            _LOCK_FDS.discard(fd)
            if _LOCKED.get(self.identity) == fd:
                del _LOCKED[self.identity]
            os.close(fd)


def _take(fd: int, path: Path) -> tuple[int, int]:
    """flock ``fd`` and register it; returns the locked file's (st_dev, st_ino)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        msg = f"journal {path} is in use by another run (pid {holder or 'unknown'})"
        raise JournalError(msg) from None
    except OSError as exc:  # e.g. no locks on this file system
        raise JournalError(f"journal {path}: cannot lock: {reason(exc)}") from exc
    identity = _identity(os.fstat(fd))
    _LOCK_FDS.add(fd)
    _LOCKED[identity] = fd
    return identity


def _holder(path: Path) -> int | None:
    """The pid the run holding the journal wrote into it (None if it cannot be read)."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as conn:
            found = conn.execute("SELECT value FROM meta WHERE key = 'pid'").fetchone()
        return int(found[0]) if found else None
    except (sqlite3.Error, TypeError, ValueError):
        return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
