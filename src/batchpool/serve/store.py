"""A server's journal (``batchpool serve --journal PATH``): every accepted job and every result.

It is a run journal (``journal.JournalWriter``: its lock, its checks, its ``jobs`` table, so
``batchpool results PATH`` exports what a server finished) plus a ``requests`` table holding each
accepted payload. One thread writes: it takes whatever is queued, commits it in one transaction
(WAL), and only then calls back, so an answer that says "accepted" or carries a result is never
sent before that is on disk. Many requests share one commit under load; alone, a request waits
for one commit of its own (well under a millisecond). Committed rows survive the death of the
process (SIGKILL included); ``synchronous=NORMAL`` leaves the last commits to the operating
system's page cache, so a power cut may lose them, as for a run's journal.

Lookups of results that left the server's memory read through a JournalReader: a connection of
their own, which sees only what is committed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

from ..journal import JournalError, JournalReader, JournalWriter
from ..journal.file import reason
from .final import Final

log = logging.getLogger("batchpool")

_REQUESTS = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, payload TEXT NOT NULL,"
    " priority INTEGER, accepted_at REAL NOT NULL)"
)
_ACCEPT = "INSERT INTO requests (id, payload, priority, accepted_at) VALUES (?, ?, ?, ?)"
_FORGET = "DELETE FROM requests WHERE id = ?"
# The first result recorded for an id stays: one result per job, whatever runs it again.
_FINISH = (
    "INSERT OR IGNORE INTO jobs (idx, fp, status, value, error, attempts, worker, elapsed,"
    " finished_at) VALUES (?, '', ?, ?, ?, ?, ?, ?, ?)"
)
_UNFINISHED = (
    "SELECT r.id, r.payload, r.priority FROM requests r LEFT JOIN jobs j ON j.idx = r.id"
    " WHERE j.status IS NULL ORDER BY r.id"
)
_LAST_ID = (
    "SELECT max(coalesce((SELECT max(id) FROM requests), 0),"
    " coalesce((SELECT max(idx) FROM jobs), 0))"
)

Done = Callable[[JournalError | None], None]  # called in the writer thread after the commit


@dataclass(frozen=True)
class Accepted:
    """A job the journal holds but has no result for: a restart runs it."""

    id: int
    payload: Any
    priority: int | None  # None: the task's own


class ServeJournal:
    """The journal of one server (one at a time: the run lock)."""

    def __init__(self, path: str | PathLike[str], name: str) -> None:
        """Open or create it; JournalError (one line) if it is another pipeline's, a run's,
        not a journal, unwritable, or in use by another process."""
        self._book = JournalWriter(path, name)
        self.path = self._book.path
        try:
            conn = self._book.connection()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "requests" not in tables and self._book.state != "empty":
                raise JournalError(
                    f"journal {self.path} holds a run of pipeline {name!r}, not a server's jobs "
                    "(give the server a journal of its own)"
                )
            conn.execute(_REQUESTS)
            if self._book.state == "empty":
                self._book.begin(total=None, resume=True)  # 'unfinished': a server never ends
            self.last_id: int = conn.execute(_LAST_ID).fetchone()[0] or 0
            self._reader = JournalReader(self.path)
        except sqlite3.Error as exc:
            self._book.close()
            raise JournalError(f"journal {self.path}: cannot open: {reason(exc)}") from exc
        except BaseException:
            self._book.close()
            raise
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[str, tuple[Any, ...], Done]] = deque()
        self._closing = False
        self._thread = threading.Thread(target=self._write, name="batchpool-journal", daemon=True)
        self._thread.start()

    # -- what a restart finds --------------------------------------------------------------
    def unfinished(self) -> Iterator[Accepted]:
        """Accepted jobs without a result, oldest first."""
        for id, payload, priority in self._book.connection().execute(_UNFINISHED).fetchall():
            yield Accepted(id, json.loads(payload), priority)

    def lookup(self, id: int) -> Final | None:
        """The committed result of job ``id``, or None."""
        row = self._reader.outcome(id)
        return None if row is None else Final.from_journal(row)

    # -- writes, committed by the writer thread --------------------------------------------
    def accept(self, id: int, payload: str, priority: int | None, done: Done) -> None:
        """Record an accepted job (``payload``: its JSON text)."""
        self._put("accept", (id, payload, priority, time.time()), done)

    def forget(self, id: int, done: Done) -> None:
        """Take back an accepted job that could not be queued after all (the pool stopped)."""
        self._put("forget", (id,), done)

    def finish(self, final: Final, done: Done) -> None:
        """Record a job's result."""
        status = "ok" if final.ok else "failed"
        row = (final.id, status, final.value, final.error_text, final.attempts, final.worker)
        self._put("finish", (*row, final.elapsed, time.time()), done)

    def _put(self, kind: str, row: tuple[Any, ...], done: Done) -> None:
        with self._cond:
            if self._closing:
                raise JournalError(f"journal {self.path} is closed")
            self._queue.append((kind, row, done))
            self._cond.notify()

    def _write(self) -> None:
        conn = self._book.connection()
        sql = {"accept": _ACCEPT, "forget": _FORGET, "finish": _FINISH}
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            error = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                for kind, row, _ in batch:
                    conn.execute(sql[kind], row)
                conn.execute("COMMIT")
            except Exception as exc:  # whatever it is, every waiting request gets an answer
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                error = JournalError(f"journal {self.path}: cannot write: {reason(exc)}")
            for _, _, done in batch:
                try:
                    done(error)
                except Exception:  # a callback's failure must not stop the journal
                    log.exception("journal callback failed")

    def close(self) -> None:
        """Commit what is queued, stop the writer, release the file. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._reader.close()
        self._book.close(flush=False)
