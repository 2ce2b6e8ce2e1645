"""Journal edges on real SQLite files: older journals, kept values for replays, locking the
journal file itself, foreign files left alone, cheap opening checks, a journal deleted or
starved of disk mid-run (the real CLI for those)."""

from __future__ import annotations

import resource
import signal
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from helpers import (
    CHILD_DEADLINE,
    cli,
    dur_env,
    dur_run,
    final_rows,
    finish,
    no_traceback,
    start_logged,
    wait_for,
)

from batchpool.journal import Journal, JournalError

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


# -- opening: cheap, and a foreign file stays as it was ---------------------------------------


def _bytes_read() -> int:
    """Bytes this process has passed to read()/pread() so far (page cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/PID/io")
def test_opening_a_big_journal_does_not_read_all_of_it(tmp_path: Path) -> None:
    path = tmp_path / "big.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=None, resume=False)
        for i in range(20_000):
            journal.add_final(
                i, "f", ok=True, value="x" * 1000, error=None, attempts=1, worker=1, elapsed=0
            )
    assert path.stat().st_size > 20_000_000
    before = _bytes_read()
    with Journal(path, "p") as journal:
        assert journal.state == "unfinished"
    with Journal.open_readonly(path) as reader:
        assert reader.pipeline == "p"
    read = _bytes_read() - before
    assert read < 2_000_000, f"opening twice read {read} bytes of a 20 MB journal"


def _foreign_database(path: Path) -> bytes:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.executemany("INSERT INTO users VALUES (?)", [(f"user{i}",) for i in range(500)])
    return path.read_bytes()


def test_foreign_sqlite_file_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    before = _foreign_database(path)
    for fresh in (False, True):
        with pytest.raises(JournalError, match="not a batchpool journal"):
            Journal(path, "p", fresh=fresh)
    with pytest.raises(JournalError, match="not a batchpool journal"):
        Journal.open_readonly(path)
    assert path.read_bytes() == before, "the refused file was changed (switched to WAL?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]


# -- the real CLI: a journal locked, deleted or starved of disk mid-run -----------------------


def committed(journal: Path) -> int:
    """Final rows committed to the journal (0 before there is one)."""
    return len(final_rows(journal))


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path: Path) -> None:
    journal, side = tmp_path / "j.sqlite", tmp_path / "side.txt"
    env = dur_env(n=200, ms="20,30", side=side)
    first = start_logged(*dur_run(journal), cwd=tmp_path, env=env)
    try:
        wait_for(lambda: committed(journal) or first.poll() is not None, CHILD_DEADLINE, "rows")
        assert first.poll() is None, "the first run ended too soon"
        for lock in tmp_path.glob("*-lock"):  # a side file, if any, is no lock
            lock.unlink()
        second = tmp_path / "second"
        second.mkdir()
        code, err = cli(*dur_run(journal), "--resume", cwd=second, env=env)
        assert code == 2, err
        assert "in use" in err and f"pid {first.pid}" in err, err
        assert first.poll() is None, "the first run must outlast the refusal"
    finally:
        code, err = finish(first, tmp_path)
    assert code == 0, err
    ran = [int(x) for x in side.read_text().split()]
    assert sorted(ran) == list(range(200)), "a job ran twice, or not at all"
    assert not list(tmp_path.glob("*-lock")), "a clean run left a lock file behind"


def test_journal_deleted_mid_run_is_reported(tmp_path: Path) -> None:
    journal, side = tmp_path / "j.sqlite", tmp_path / "side.txt"
    env = dur_env(n=300, ms="10,20", side=side)
    proc = start_logged(*dur_run(journal), cwd=tmp_path, env=env)
    try:
        wait_for(lambda: committed(journal) or proc.poll() is not None, CHILD_DEADLINE, "rows")
        assert proc.poll() is None, "the run ended too soon"
        for path in tmp_path.glob("j.sqlite*"):
            path.unlink()
    finally:
        code, err = finish(proc, tmp_path)
    assert code == 2, err
    no_traceback(err)
    assert f"journal {journal} was deleted" in err, err
    assert "journal: " not in err, "the summary names a journal that no longer exists"
    assert len(side.read_text().split()) < 300, "the run should stop once it knows"


def _small_disk(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead

    return apply


def test_disk_full_exits_2_and_counts_what_was_saved(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    env = dur_env(n=3000, ms="1,3", pad=1000)  # ~1 KB a row: the limit bites mid-run
    limit = _small_disk(2 * 1024 * 1024)
    code, err = cli(*dur_run(journal), cwd=tmp_path, env=env, preexec_fn=limit)
    assert code == 2, err
    no_traceback(err)
    assert f"journal {journal}: cannot write" in err
    saved = committed(journal)
    assert 0 < saved < 3000
    assert f"{saved} jobs: {saved} ok, 0 failed" in err, err
