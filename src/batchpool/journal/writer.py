"""The journal of the run writing it: locked against other runs, outcomes buffered and
committed in batches.

One writer (the run loop's thread) buffers rows and commits them in batches (WAL, one
transaction each): cheap, and a SIGKILL at any moment loses only the uncommitted buffer.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from os import PathLike
from typing import Any

from .encoding import json_text, pickled
from .file import SCHEMA_VERSION, JournalError, JournalFile, Outcome, reason
from .lock import RunLock

FLUSH_ROWS = 1000  # auto-flush when this many rows are buffered ...
FLUSH_AGE = 0.5  # ... or when the oldest buffered row is this many seconds old

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value)",
    "CREATE TABLE jobs (idx INTEGER PRIMARY KEY, fp TEXT NOT NULL,"
    " status TEXT CHECK (status IN ('ok', 'failed')), value TEXT, error TEXT,"
    " attempts INTEGER, worker INTEGER, elapsed REAL, finished_at REAL, pickled BLOB)",
)
_UPGRADE_1 = "ALTER TABLE jobs ADD COLUMN pickled BLOB"
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_ADD_PENDING = "INSERT OR IGNORE INTO jobs (idx, fp) VALUES (?, ?)"  # never hides a final row
_ADD_FINAL = "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# (idx, fp) and (idx, fp, status, value, error, attempts, worker, elapsed, finished_at, pickled)
_PendingRow = tuple[int, str]
_FinalRow = tuple[int, str, str, str, str | None, int, int | None, float, float, bytes | None]


class JournalWriter(JournalFile):
    """A pipeline's journal, opened by the one run that writes it.

    Not thread-safe: one owner thread writes, as the design intends. Its reads see the rows it
    has buffered (they flush first), except ``outcome()``, which the run asks only about rows an
    earlier run committed.
    """

    def __init__(self, path: str | PathLike[str], pipeline: str, *, fresh: bool = False) -> None:
        """Open or create the journal, locked against other runs.

        Raises JournalError (one line, naming the path) when the location is unwritable, the
        journal is used by another run, the file is not a (healthy) journal, it belongs to
        another pipeline, or its schema version is unknown. ``fresh=True`` discards what it holds
        (those refusals still apply: fresh never takes over another pipeline's file).
        """
        super().__init__(path)
        self.lost = False  # the file was deleted or replaced under a run writing it
        self._lock: RunLock | None = None
        self._pending: list[_PendingRow] = []
        self._finals: list[_FinalRow] = []
        self._oldest: float | None = None  # monotonic time of the oldest buffered row
        self._retry_at = 0.0  # no auto-flush before this, after a failed write
        # Also keep each value pickled, so that outcome() gives back the very object (bytes,
        # tuples, custom classes) that JSON would turn into something else: for a sink's replay.
        self.keep_values = False
        try:
            self._lock = RunLock(self.path)
            self._connect(self.path)
            self._prepare(pipeline, fresh)
            self._commit({"pid": os.getpid()})  # for the message of a run we block
        except BaseException:
            self._shutdown()
            raise

    def _prepare(self, pipeline: str, fresh: bool) -> None:
        meta = self._read_meta(allow_blank=True)
        if meta is not None and meta.get("pipeline") != pipeline:
            owner = meta.get("pipeline")
            raise JournalError(f"journal {self.path} belongs to pipeline {owner}, not {pipeline}")
        self._use_wal()
        if meta is None:
            self._meta = {"schema": SCHEMA_VERSION, "pipeline": pipeline, "state": "empty"}
            self._commit(self._meta, schema=True)
        else:
            self._meta = meta
            if meta["schema"] != SCHEMA_VERSION:
                self._commit({"schema": SCHEMA_VERSION}, upgrade=True)
            if fresh:
                self._commit(_blank_run("empty", None), wipe=True)
        self.pipeline = pipeline

    def _use_wal(self) -> None:
        """Only once the file is known to be a journal (or blank): a refused file stays as it
        was, in its own journal mode."""
        try:
            self.connection().execute("PRAGMA journal_mode=WAL").fetchone()
            self.connection().execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {reason(exc)}") from exc

    # --- writes ---

    def begin(self, *, total: int | None, resume: bool, stages: str | None = None) -> None:
        """Mark a run as started (state 'unfinished'), durably at once, with the fingerprint
        of its ``stages`` (a resume may only continue outcomes of the same stages).

        ``resume=True`` keeps what is recorded. ``resume=False`` starts a new run: allowed on an
        empty journal, and on a complete one (its old outcomes are discarded: a plain re-run does
        all the work again); on an unfinished one it is a caller bug (ValueError), as the caller
        must ask for --resume or --fresh first.
        """
        if not resume and self.state == "unfinished":
            raise ValueError(f"journal {self.path} holds an unfinished run: resume it or wipe it")
        wipe = not resume and self.state == "complete"
        self._commit(_blank_run("unfinished", total, stages), wipe=wipe)

    def add_pending(self, index: int, fp: str) -> None:
        """Buffer: job submitted, not final. Never replaces a final outcome."""
        self.connection()
        self._pending.append((int(index), fp))
        self._added()

    def add_final(
        self,
        index: int,
        fp: str,
        *,
        ok: bool,
        value: Any,
        error: dict[str, Any] | None,
        attempts: int,
        worker: int | None,
        elapsed: float,
    ) -> None:
        """Buffer the final outcome of a job, replacing any earlier row for its index.

        ``value`` is stored as JSON; parts JSON cannot represent are stored as their repr()
        (the whole value's repr() if its structure cannot be kept, e.g. non-string dict keys).
        """
        self.connection()
        err = None if error is None else json_text(error)
        status = "ok" if ok else "failed"
        row = (int(index), fp, status, json_text(value), err, int(attempts), worker, float(elapsed))
        kept = pickled(value) if self.keep_values and value is not None else None
        self._finals.append((*row, time.time(), kept))
        self._added()

    def _added(self) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        if self._due():
            self._commit()

    def _due(self) -> bool:
        now, size = time.monotonic(), len(self._finals) + len(self._pending)
        old = self._oldest is not None and now - self._oldest >= FLUSH_AGE
        return now >= self._retry_at and (size >= FLUSH_ROWS or old)

    @property
    def buffered(self) -> int:
        """Rows written but not committed yet (0 right after a commit)."""
        return len(self._pending) + len(self._finals)

    def maybe_flush(self) -> None:
        """Flush if the buffer is due (size or age); cheap otherwise. Call it from the owner's
        loop so that a quiet spell after a result does not leave that result uncommitted."""
        if self._oldest is not None and self._due():
            self._commit()

    def flush(self) -> None:
        """Commit buffered rows in one transaction.

        On a write error (disk full, I/O error, file too large) raises
        JournalError('journal PATH: cannot write: REASON') and keeps the rows buffered, so a
        later flush can retry them.
        """
        if self._pending or self._finals:
            self._commit()

    def finish(self, *, complete: bool) -> None:
        """Flush; mark the run complete, or leave it unfinished (to be resumed)."""
        meta: dict[str, Any] = {"finished_at": time.time()}
        if complete:
            meta["state"] = "complete"
        self._commit(meta)

    def _commit(
        self,
        meta: dict[str, Any] | None = None,
        *,
        wipe: bool = False,
        schema: bool = False,
        upgrade: bool = False,
    ) -> None:
        """Write the buffer (and meta) in one transaction; clear the buffer only once committed."""
        conn = self.connection()
        self._check_file()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA if schema else ():
                conn.execute(statement)
            if upgrade:
                conn.execute(_UPGRADE_1)
            if wipe:
                conn.execute("DELETE FROM jobs")
            if self._pending:
                conn.executemany(_ADD_PENDING, self._pending)
            if self._finals:
                conn.executemany(_ADD_FINAL, self._finals)
            if meta:
                conn.executemany(_SET_META, meta.items())
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if not isinstance(exc, sqlite3.Error):
                raise
            self._retry_at = time.monotonic() + FLUSH_AGE
            raise JournalError(f"journal {self.path}: cannot write: {reason(exc)}") from exc
        self._pending, self._finals, self._oldest = [], [], None
        if meta:
            self._meta.update(meta)

    def _check_file(self) -> None:
        """A journal deleted or replaced under a run would take its commits with it: stop."""
        if self._lock is None or not self._lock.still_there():
            self.lost = True
            raise JournalError(
                f"journal {self.path} was deleted or replaced during the run: what it recorded "
                "is lost (run again to redo the work)"
            )

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # --- reads: commit the buffer first, so that they see every row written ---

    def recorded(self) -> Iterator[tuple[int, str, str | None]]:
        self.flush()
        yield from super().recorded()

    def rows(self, *, failed_only: bool = False) -> Iterator[Outcome]:
        self.flush()
        yield from super().rows(failed_only=failed_only)

    def counts(self) -> dict[str, int]:
        """What is committed: what a report may claim was saved. If the flush fails (disk
        full), the buffer is not counted."""
        try:
            self.flush()
        except JournalError:
            pass
        return super().counts()

    # --- closing ---

    def close(self, *, flush: bool = True) -> None:
        """Flush (errors raise JournalError, after closing anyway), release the lock. Idempotent.

        ``flush=False`` abandons the buffer: for giving up after a write error.
        """
        try:
            if flush and self._conn is not None:
                self.flush()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        super()._shutdown()
        if self._lock is not None:
            self._lock.release()  # after the connection: see RunLock


def _blank_run(state: str, total: int | None, stages: str | None = None) -> dict[str, Any]:
    now = time.time() if state == "unfinished" else None
    return {
        "state": state,
        "total": total,
        "started_at": now,
        "finished_at": None,
        "stages": stages,
    }
