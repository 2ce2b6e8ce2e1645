"""What a journal's writer and reader share: the file's open-time checks and the reads.

Reads page by index in short statements: no snapshot stays open (a writer's checkpoints proceed)
and memory stays bounded. Opening checks the schema, the meta table and both ends of the jobs
table, not every page: a damaged page elsewhere shows as a one-line "cannot read" error when it
is reached.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, TypeVar

from .encoding import unpickled

SCHEMA_VERSION = 2  # 2 added jobs.pickled; a version 1 journal is upgraded when opened to write
READABLE_SCHEMAS = (1, 2)
PAGE = 1000  # rows per read statement in recorded() / rows()

_COLUMNS = "idx, status, value, error, attempts, worker, elapsed"
# Each subquery walks one edge of the b-tree (min/max optimisation); one query for both would scan.
_EDGES = "SELECT (SELECT min(idx) FROM jobs), (SELECT max(idx) FROM jobs)"

_Self = TypeVar("_Self", bound="JournalFile")


class Outcome(TypedDict):
    """A job's final outcome as a journal holds it (``rows()``, ``outcome()``)."""

    index: int
    ok: bool
    value: Any  # JSON-decoded; outcome(): the object itself where it was kept pickled
    error: dict[str, Any] | None  # JobError.to_dict(), JSON-decoded
    attempts: int
    worker: int | None
    elapsed: float


class JournalError(Exception):
    """One-line, user-facing message (the CLI prints str(e) and exits 2). Never a traceback."""


def reason(exc: BaseException) -> str:
    """The one-line cause of an OS or SQLite error, for a JournalError's message."""
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


class JournalFile:
    """An open journal file: its meta data, checked when opened, and its recorded outcomes."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self.pipeline = ""
        self._conn: sqlite3.Connection | None = None
        self._meta: dict[str, Any] = {}

    def _connect(self, database: str | Path, *, uri: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(database, uri=uri, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {reason(exc)}") from exc
        self._conn = conn
        return conn

    def _read_meta(self, *, allow_blank: bool) -> dict[str, Any] | None:
        """The meta table, checked; None for a blank database we may initialise."""
        conn = self.connection()
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            meta = dict(conn.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            if "jobs" in tables:  # both edges of its b-tree, from the root: a few pages
                conn.execute(_EDGES).fetchone()
        except sqlite3.OperationalError as exc:
            raise JournalError(f"journal {self.path}: cannot open: {reason(exc)}") from exc
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"journal {self.path} is not a valid journal: {reason(exc)}"
            ) from exc
        if not tables and allow_blank:
            return None
        if "schema" not in meta or "jobs" not in tables:
            raise JournalError(f"journal {self.path} is not a batchpool journal")
        if meta["schema"] not in READABLE_SCHEMAS:
            raise JournalError(
                f"journal {self.path} has schema version {meta['schema']}, which this version "
                f"of batchpool does not know (it knows 1 to {SCHEMA_VERSION})"
            )
        return meta

    @property
    def state(self) -> str:
        """'empty' (no run recorded), 'unfinished' (a run began, did not complete), 'complete'."""
        return str(self._meta.get("state", "empty"))

    @property
    def stages(self) -> str | None:
        """The fingerprint of the stages that wrote the recorded outcomes (None: not known)."""
        stages = self._meta.get("stages")
        return None if stages is None else str(stages)

    # --- reads ---

    def recorded(self) -> Iterator[tuple[int, str, str | None]]:
        """(index, fingerprint, status) for every recorded index, ordered by index; status None
        for a job submitted but not final. Streams in pages; writes may interleave."""
        yield from self._pages("idx, fp, status")

    def rows(self, *, failed_only: bool = False) -> Iterator[Outcome]:
        """Final outcomes ordered by index, value and error decoded; streams in pages."""
        where = "status = 'failed'" if failed_only else "status IS NOT NULL"
        for idx, status, value, error, attempts, worker, elapsed in self._pages(_COLUMNS, where):
            value = None if value is None else json.loads(value)
            yield _outcome(idx, status, value, error, attempts, worker, elapsed)

    def outcome(self, index: int) -> Outcome | None:
        """The final outcome recorded for ``index`` (as in rows()), or None. The value is the
        object itself where it was kept pickled (``keep_values``), else its JSON form."""
        sql = f"SELECT {_COLUMNS}, pickled FROM jobs WHERE idx = ? AND status IS NOT NULL"
        try:
            found = self.connection().execute(sql, (index,)).fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot read: {reason(exc)}") from exc
        if found is None:
            return None
        idx, status, value, error, attempts, worker, elapsed, pickled = found
        return _outcome(idx, status, unpickled(pickled, value), error, attempts, worker, elapsed)

    def _pages(self, columns: str, where: str = "1") -> Iterator[tuple[Any, ...]]:
        """Keyset pagination: each page is one short statement, so no snapshot stays open."""
        sql = f"SELECT {columns} FROM jobs WHERE idx > ? AND {where} ORDER BY idx LIMIT {PAGE}"
        last: float = float("-inf")
        while True:
            try:
                page = self.connection().execute(sql, (last,)).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: cannot read: {reason(exc)}") from exc
            yield from page
            if len(page) < PAGE:
                return
            last = page[-1][0]

    def counts(self) -> dict[str, int]:
        """{'ok', 'failed', 'pending'} job counts of what is committed."""
        counts = {"ok": 0, "failed": 0, "pending": 0}
        sql = "SELECT coalesce(status, 'pending'), count(*) FROM jobs GROUP BY 1"
        try:
            counts.update(self.connection().execute(sql))
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot read: {reason(exc)}") from exc
        return counts

    # --- closing ---

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._shutdown()

    def _shutdown(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # committed data is safe in the WAL either way

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except JournalError:
            if exc_type is None:
                raise  # otherwise the body's own exception is the one to see

    def connection(self) -> sqlite3.Connection:
        """The open connection; JournalError once closed (a server's store adds its tables)."""
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn


def _outcome(
    idx: int,
    status: str,
    value: Any,
    error: str | None,
    attempts: int,
    worker: int | None,
    elapsed: float,
) -> Outcome:
    """A journal row as rows() and outcome() hand it out (the error decoded from JSON)."""
    return Outcome(
        index=idx,
        ok=status == "ok",
        value=value,
        error=None if error is None else json.loads(error),
        attempts=attempts,
        worker=worker,
        elapsed=elapsed,
    )
