"""Journal edges on real SQLite files: older journals, kept values for replays, locking the
journal file itself, foreign files left alone, cheap opening checks, a journal deleted or
starved of disk mid-run (the real CLI for those)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from batchpool.journal import Journal

pytestmark = pytest.mark.timeout(60)

# The schema of version 1 journals (batchpool before values were kept for replays).
SCHEMA_1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value)",
    "CREATE TABLE jobs (idx INTEGER PRIMARY KEY, fp TEXT NOT NULL,"
    " status TEXT CHECK (status IN ('ok', 'failed')), value TEXT, error TEXT,"
    " attempts INTEGER, worker INTEGER, elapsed REAL, finished_at REAL)",
)


def test_version_1_journal_is_upgraded_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as conn, conn:
        for statement in SCHEMA_1:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("schema", 1), ("pipeline", "p"), ("state", "unfinished")],
        )
        conn.execute("INSERT INTO jobs VALUES (0, 'fp0', 'ok', '[1, 2]', NULL, 1, 7, 0.5, 0.0)")
    with Journal.open_readonly(path) as reader:  # read as it is, not changed
        assert [r["value"] for r in reader.rows()] == [[1, 2]]
    with Journal(path, "p") as journal:
        assert journal.state == "unfinished"
        assert journal.outcome(0)["value"] == [1, 2]  # no pickled value: its JSON form
        journal.begin(total=None, resume=True)
        journal.keep_values = True
        journal.add_final(
            1, "fp1", ok=True, value=(b"\x00", 3), error=None, attempts=2, worker=None, elapsed=1.0
        )
        journal.finish(complete=True)
        assert journal.outcome(1)["value"] == (b"\x00", 3)  # the very object, bytes and tuple
        assert journal.outcome(2) is None
    with closing(sqlite3.connect(path)) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta"))["schema"] == 2


def test_values_are_kept_pickled_only_when_asked(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=None, resume=False)
        journal.add_final(0, "f", ok=True, value=b"ab", error=None, attempts=1, worker=1, elapsed=0)
        journal.keep_values = True
        journal.add_final(1, "f", ok=True, value=b"ab", error=None, attempts=1, worker=1, elapsed=0)
        journal.flush()
        assert journal.outcome(0)["value"] == "b'ab'"  # JSON could only keep its repr
        assert journal.outcome(1)["value"] == b"ab"
        assert [r["value"] for r in journal.rows()] == ["b'ab'", "b'ab'"]  # exports: JSON
