"""The run journal: a durable SQLite record of each job's final outcome, so that an interrupted
run resumes with exactly one result per job.

One writer (the supervisor thread) buffers rows and commits them in batches (WAL, one transaction
each): cheap, and a SIGKILL at any moment loses only the uncommitted buffer. A ``flock`` on the
journal file itself keeps other runs out (no side file to delete, none left behind); the kernel
drops it when the holder dies, and it is independent of SQLite's own POSIX locks. Readers take
no lock (WAL readers never block the writer). Reads page by index in short statements: no
snapshot stays open (checkpoints proceed) and memory stays bounded. Opening checks the schema,
the meta table and both ends of the jobs table, not every page: a damaged page elsewhere shows
as a one-line "cannot read" error when it is reached.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2 added jobs.pickled; a version 1 journal is upgraded when opened to write
READABLE_SCHEMAS = (1, 2)
FLUSH_ROWS = 1000  # auto-flush when this many rows are buffered ...
FLUSH_AGE = 0.5  # ... or when the oldest buffered row is this many seconds old
PAGE = 1000  # rows per read statement in recorded() / rows()

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
_COLUMNS = "idx, status, value, error, attempts, worker, elapsed"
# Each subquery walks one edge of the b-tree (min/max optimisation); one query for both would scan.
_EDGES = "SELECT (SELECT min(idx) FROM jobs), (SELECT max(idx) FROM jobs)"
_KEYS = ("index", "ok", "value", "error", "attempts", "worker", "elapsed")

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


class JournalError(Exception):
    """One-line, user-facing message (the CLI prints str(e) and exits 2). Never a traceback."""


def _reason(exc: BaseException) -> str:
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


# --- fingerprints -------------------------------------------------------------------------

_ATOMS = (str, int, float, bool, bytes, type(None))
_DICT, _SET, _FROZENSET = "\x00bp:dict", "\x00bp:set", "\x00bp:frozenset"


def _dumps(obj: Any) -> bytes:
    """Pickle without the memo, so equal values give equal bytes whatever objects they share."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=4)
    pickler.fast = True  # no memo: cyclic objects raise ValueError instead
    pickler.dump(obj)
    return buf.getvalue()


def _canonical(obj: Any) -> Any:
    """Equal plain containers in one canonical shape: dict items and set members sorted."""
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if kind is list:
        return [_canonical(x) for x in obj]
    if kind is tuple:
        return tuple(_canonical(x) for x in obj)
    if kind is dict:
        items = [(_canonical(k), _canonical(v)) for k, v in obj.items()]
        return (_DICT, sorted(items, key=lambda kv: _dumps(kv[0])))
    if kind is set or kind is frozenset:
        tag = _SET if kind is set else _FROZENSET
        return (tag, sorted((_canonical(x) for x in obj), key=_dumps))
    return obj


def fingerprint(payload: Any) -> str:
    """Stable short hex digest of a payload, to detect that a source changed between runs.

    Plain dicts, sets and frozensets (nested in lists/tuples/dicts) are made canonical first, so
    their iteration order (hash randomisation) does not matter, and pickling skips the memo, so
    object identity does not either. Sets hidden inside other objects (custom classes, dict
    subclasses) may still fingerprint differently across interpreter runs. A payload that cannot
    be pickled at all fingerprints by its type name: a change to it goes unnoticed.
    """
    try:
        data = _dumps(_canonical(payload))
    except (RecursionError, ValueError):  # cyclic or very deep: plain pickle, memo and all
        try:
            data = pickle.dumps(payload, protocol=4)
        except Exception:
            data = _unpicklable(payload)
    except Exception:
        data = _unpicklable(payload)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _unpicklable(payload: Any) -> bytes:
    kind = type(payload)
    return f"unpicklable:{kind.__module__}.{kind.__qualname__}".encode()


def _to_json(value: Any) -> str:
    """JSON text; parts JSON cannot hold become their repr(), the whole value if need be."""
    if value is None:
        return "null"
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):  # non-str dict keys, cycles
        return json.dumps(_safe_repr(value))


def _pickled(value: Any) -> bytes | None:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # it crossed from a worker, so it pickles; if not, JSON will have to do
        return None


def _unpickled(pickled: bytes | None, text: str | None) -> Any:
    """The kept object, or the JSON form where there is none or it no longer loads (a class
    renamed since)."""
    if pickled is not None:
        try:
            return pickle.loads(pickled)
        except Exception:
            pass
    return None if text is None else json.loads(text)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


_ENCODER = json.JSONEncoder(default=_safe_repr)  # one instance: json.dumps(default=) builds one


# --- the journal --------------------------------------------------------------------------


class Journal:
    """A pipeline's journal file: opened by one run at a time, read by any number of readers.

    Not thread-safe: one owner thread writes (the supervisor), as the design intends.
    """

    def __init__(self, path: str | os.PathLike, pipeline: str, *, fresh: bool = False) -> None:
        """Open or create the journal, locked against other runs.

        Raises JournalError (one line, naming the path) when the location is unwritable, the
        journal is used by another run, the file is not a (healthy) journal, it belongs to
        another pipeline, or its schema version is unknown. ``fresh=True`` discards what it holds
        (those refusals still apply: fresh never takes over another pipeline's file).
        """
        self._init(path, readonly=False)
        try:
            self._lock()
            self._conn = self._connect()
            self._prepare(pipeline, fresh)
            self._commit({"pid": os.getpid()})  # for the message of a run we block
        except BaseException:
            self._shutdown()
            raise

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> Journal:
        """Open for reading (``batchpool results``): no lock, so it works while a run writes."""
        self = cls.__new__(cls)
        self._init(path, readonly=True)
        if not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise JournalError(f"journal {self.path} {what}")
        try:
            self._conn = self._connect()
            self._meta = self._read_meta(allow_blank=False) or {}
        except BaseException:
            self._shutdown()
            raise
        self.pipeline = str(self._meta.get("pipeline"))
        return self

    def _init(self, path: str | os.PathLike, *, readonly: bool) -> None:
        self.path = Path(path)
        self.pipeline = ""
        self._readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] | None = None  # the locked file's (st_dev, st_ino)
        self.lost = False  # the file was deleted or replaced under a run writing it
        self._owner = os.getpid()
        self._meta: dict[str, Any] = {}
        self._pending: list[tuple] = []
        self._finals: list[tuple] = []
        self._oldest: float | None = None  # monotonic time of the oldest buffered row
        self._retry_at = 0.0  # no auto-flush before this, after a failed write
        # Also keep each value pickled, so that outcome() gives back the very object (bytes,
        # tuples, custom classes) that JSON would turn into something else: for a sink's replay.
        self.keep_values = False

    # --- opening ---

    def _lock(self) -> None:
        """flock the journal file itself (creating it empty: SQLite takes that for a blank
        database). A journal this process holds is refused without opening it a second time:
        closing that second descriptor would drop SQLite's POSIX locks of the first."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and _identity(os.stat(self.path)) in _LOCKED:
                raise JournalError(
                    f"journal {self.path} is in use by another run (pid {os.getpid()})"
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(f"journal {self.path}: cannot open: {_reason(exc)}") from exc
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            msg = f"journal {self.path} is in use by another run (pid {holder or 'unknown'})"
            raise JournalError(msg) from None
        except OSError as exc:  # e.g. no locks on this file system
            raise JournalError(f"journal {self.path}: cannot lock: {_reason(exc)}") from exc
        _LOCK_FDS.add(fd)
        self._identity = _identity(os.fstat(fd))
        _LOCKED[self._identity] = fd

    def _holder(self) -> int | None:
        """The pid the run holding the journal wrote into it (None if it cannot be read)."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as conn:
                found = conn.execute("SELECT value FROM meta WHERE key = 'pid'").fetchone()
            return int(found[0]) if found else None
        except (sqlite3.Error, TypeError, ValueError):
            return None

    def _check_file(self) -> None:
        """A journal deleted or replaced under a run would take its commits with it: stop."""
        try:
            same = _identity(os.stat(self.path)) == self._identity
        except OSError:
            same = False
        if not same:
            self.lost = True
            raise JournalError(
                f"journal {self.path} was deleted or replaced during the run: what it recorded "
                "is lost (run again to redo the work)"
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            if self._readonly:
                uri, wal = f"{self.path.resolve().as_uri()}?mode=ro", f"{self.path}-wal"
                if not os.access(self.path.parent, os.W_OK) and not os.path.exists(wal):
                    uri += "&immutable=1"  # nobody can be writing; SQLite could not make -shm
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {_reason(exc)}") from exc
        self._conn = conn
        return conn

    def _use_wal(self) -> None:
        """Only once the file is known to be a journal (or blank): a refused file stays as it
        was, in its own journal mode."""
        try:
            self._require().execute("PRAGMA journal_mode=WAL").fetchone()
            self._require().execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {_reason(exc)}") from exc

    def _damaged(self, reason: str) -> JournalError:
        return JournalError(f"journal {self.path} is not a valid journal: {reason}")

    def _read_meta(self, *, allow_blank: bool) -> dict[str, Any] | None:
        """The meta table, checked; None for a blank database we may initialise."""
        conn = self._require()
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            meta = dict(conn.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            if "jobs" in tables:  # both edges of its b-tree, from the root: a few pages
                conn.execute(_EDGES).fetchone()
        except sqlite3.OperationalError as exc:
            raise JournalError(f"journal {self.path}: cannot open: {_reason(exc)}") from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(_reason(exc)) from exc
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

    # --- state and writes ---

    @property
    def state(self) -> str:
        """'empty' (no run recorded), 'unfinished' (a run began, did not complete), 'complete'."""
        return str(self._meta.get("state", "empty"))

    @property
    def stages(self) -> str | None:
        """The fingerprint of the stages that wrote the recorded outcomes (None: not known)."""
        stages = self._meta.get("stages")
        return None if stages is None else str(stages)

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
        self._require_writable()
        self._pending.append((int(index), fp))
        self._added()

    def add_final(
        self,
        index: int,
        fp: str,
        *,
        ok: bool,
        value: Any,
        error: dict | None,
        attempts: int,
        worker: int | None,
        elapsed: float,
    ) -> None:
        """Buffer the final outcome of a job, replacing any earlier row for its index.

        ``value`` is stored as JSON; parts JSON cannot represent are stored as their repr()
        (the whole value's repr() if its structure cannot be kept, e.g. non-string dict keys).
        """
        self._require_writable()
        err = None if error is None else _to_json(error)
        status = "ok" if ok else "failed"
        row = (int(index), fp, status, _to_json(value), err, int(attempts), worker, float(elapsed))
        pickled = _pickled(value) if self.keep_values and value is not None else None
        self._finals.append((*row, time.time(), pickled))
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
        if self._oldest is not None and not self._readonly and self._due():
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
        conn = self._require_writable()
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
            raise JournalError(f"journal {self.path}: cannot write: {_reason(exc)}") from exc
        self._pending, self._finals, self._oldest = [], [], None
        if meta:
            self._meta.update(meta)

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # --- reads ---

    def recorded(self) -> Iterator[tuple[int, str, str | None]]:
        """(index, fingerprint, status) for every recorded index, ordered by index; status None
        for a job submitted but not final. Streams in pages; writes may interleave."""
        if not self._readonly:
            self.flush()
        yield from self._pages("idx, fp, status")

    def rows(self, *, failed_only: bool = False) -> Iterator[dict[str, Any]]:
        """Final outcomes ordered by index, value and error decoded; streams in pages."""
        if not self._readonly:
            self.flush()
        where = "status = 'failed'" if failed_only else "status IS NOT NULL"
        for idx, status, value, error, attempts, worker, elapsed in self._pages(_COLUMNS, where):
            value = None if value is None else json.loads(value)
            error = None if error is None else json.loads(error)
            row = (idx, status == "ok", value, error, attempts, worker, elapsed)
            yield dict(zip(_KEYS, row, strict=True))

    def outcome(self, index: int) -> dict[str, Any] | None:
        """The final outcome recorded for ``index`` (as in rows()), or None. The value is the
        object itself where it was kept pickled (``keep_values``), else its JSON form."""
        sql = f"SELECT {_COLUMNS}, pickled FROM jobs WHERE idx = ? AND status IS NOT NULL"
        try:
            found = self._require().execute(sql, (index,)).fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot read: {_reason(exc)}") from exc
        if found is None:
            return None
        idx, status, value, error, attempts, worker, elapsed, pickled = found
        value = _unpickled(pickled, value)
        error = None if error is None else json.loads(error)
        row = (idx, status == "ok", value, error, attempts, worker, elapsed)
        return dict(zip(_KEYS, row, strict=True))

    def _pages(self, columns: str, where: str = "1") -> Iterator[tuple]:
        """Keyset pagination: each page is one short statement, so no snapshot stays open."""
        sql = f"SELECT {columns} FROM jobs WHERE idx > ? AND {where} ORDER BY idx LIMIT {PAGE}"
        last: float = float("-inf")
        while True:
            try:
                page = self._require().execute(sql, (last,)).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: cannot read: {_reason(exc)}") from exc
            yield from page
            if len(page) < PAGE:
                return
            last = page[-1][0]

    def counts(self) -> dict[str, int]:
        """{'ok', 'failed', 'pending'} job counts of what is committed: what a report may
        claim was saved. Flushes first; if that fails (disk full), the buffer is not counted."""
        try:
            if not self._readonly:
                self.flush()
        except JournalError:
            pass
        counts = {"ok": 0, "failed": 0, "pending": 0}
        sql = "SELECT coalesce(status, 'pending'), count(*) FROM jobs GROUP BY 1"
        try:
            counts.update(self._require().execute(sql))
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot read: {_reason(exc)}") from exc
        return counts

    # --- closing ---

    def close(self, *, flush: bool = True) -> None:
        """Flush (errors raise JournalError, after closing anyway), release the lock. Idempotent.

        ``flush=False`` abandons the buffer: for giving up after a write error.
        """
        if self._conn is None and self._lock_fd is None:
            return
        try:
            if flush and not self._readonly and self._conn is not None:
                self.flush()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # committed data is safe in the WAL either way
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None and os.getpid() == self._owner:
            _LOCK_FDS.discard(fd)
            if self._identity is not None and _LOCKED.get(self._identity) == fd:
                del _LOCKED[self._identity]
            os.close(fd)  # releases the flock (after the connection: see _lock)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except JournalError:
            if exc_type is None:
                raise  # otherwise the body's own exception is the one to see

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn

    def _require_writable(self) -> sqlite3.Connection:
        if self._readonly:
            raise JournalError(f"journal {self.path} was opened read-only")
        return self._require()


def _blank_run(state: str, total: int | None, stages: str | None = None) -> dict[str, Any]:
    now = time.time() if state == "unfinished" else None
    return {
        "state": state,
        "total": total,
        "started_at": now,
        "finished_at": None,
        "stages": stages,
    }


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
