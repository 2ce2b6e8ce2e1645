"""The run journal: states, refusals, locking, streaming reads, and durability under disk-full
and SIGKILL, all on real files and real child processes."""

from __future__ import annotations

import os
import resource
import select
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from helpers import integrity, read_line, wait_for

from batchpool.journal import Journal, JournalError, fingerprint

pytestmark = pytest.mark.timeout(60)

HELPER = str(Path(__file__).with_name("journal_helpers.py"))


def add(journal: Journal, index: int, *, ok: bool = True, value: object = None, **kw) -> None:
    error = None if ok else {"kind": "error", "type": "ValueError", "message": "bad"}
    kw.setdefault("attempts", 1)
    kw.setdefault("worker", 123)
    kw.setdefault("elapsed", 0.5)
    journal.add_final(index, f"fp{index}", ok=ok, value=value, error=error, **kw)


def spawn(mode: str, path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, HELPER, mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


# --- states -------------------------------------------------------------------------------


def test_create_reopen_and_state_transitions(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "j.sqlite"  # parent dirs are created
    with Journal(path, "p") as journal:
        assert journal.state == "empty" and journal.pipeline == "p" and journal.path == path
        journal.begin(total=3, resume=False)
        assert journal.state == "unfinished"
        add(journal, 0, value={"a": [1, 2]})
        add(journal, 1, ok=False)
        journal.add_pending(2, "fp2")
    with Journal(path, "p") as journal:  # close flushed the buffer
        assert journal.state == "unfinished"
        assert journal.counts() == {"ok": 1, "failed": 1, "pending": 1}
        journal.begin(total=3, resume=True)
        add(journal, 2, value="two")
        journal.finish(complete=True)
        assert journal.state == "complete"
    with Journal(path, "p") as journal:
        assert journal.state == "complete"
        assert [r["value"] for r in journal.rows()] == [{"a": [1, 2]}, None, "two"]
        journal.begin(total=None, resume=False)  # a plain re-run of a complete run starts over
        assert journal.counts() == {"ok": 0, "failed": 0, "pending": 0}


def test_finish_incomplete_stays_unfinished_and_begin_without_resume_refuses(tmp_path):
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 0)
        journal.finish(complete=False)
        assert journal.state == "unfinished"
        with pytest.raises(ValueError):
            journal.begin(total=None, resume=False)


def test_rows_decode_everything_in_index_order(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 5, value=[1, "x"], attempts=2, worker=None, elapsed=1.25)
        add(journal, 1, ok=False, attempts=4)
        journal.add_pending(3, "fp3")
        rows = list(journal.rows())
        assert rows == [
            {
                "index": 1,
                "ok": False,
                "value": None,
                "error": {"kind": "error", "type": "ValueError", "message": "bad"},
                "attempts": 4,
                "worker": 123,
                "elapsed": 0.5,
            },
            {
                "index": 5,
                "ok": True,
                "value": [1, "x"],
                "error": None,
                "attempts": 2,
                "worker": None,
                "elapsed": 1.25,
            },
        ]
        assert [r["index"] for r in journal.rows(failed_only=True)] == [1]
        assert list(journal.recorded()) == [
            (1, "fp1", "failed"),
            (3, "fp3", None),
            (5, "fp5", "ok"),
        ]


def test_fresh_wipes_everything(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=2, resume=False)
        add(journal, 0)
    with Journal(path, "p", fresh=True) as journal:
        assert journal.state == "empty"
        assert list(journal.recorded()) == []
        journal.begin(total=2, resume=False)  # allowed again


def test_final_replaces_failed_and_pending_never_hides_a_final(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 0, ok=False)
        add(journal, 1)
        journal.flush()
        journal.add_pending(0, "fp0")  # a --retry-failed resubmission
        journal.add_pending(1, "fp1")
        assert journal.counts() == {"ok": 1, "failed": 1, "pending": 0}
        add(journal, 0, value="second try", attempts=2)
        assert [(r["index"], r["ok"], r["value"]) for r in journal.rows()] == [
            (0, True, "second try"),
            (1, True, None),
        ]
        assert journal.counts() == {"ok": 2, "failed": 0, "pending": 0}


def test_value_that_is_not_json_falls_back_to_repr(tmp_path: Path) -> None:
    class Thing:
        def __repr__(self) -> str:
            return "Thing()"

    loop: list = []
    loop.append(loop)
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 0, value=Thing())
        add(journal, 1, value={"a": Thing(), "b": {1}})  # structure kept, parts repr'd
        add(journal, 2, value={(1, 2): "tuple key"})  # structure lost: whole repr
        add(journal, 3, value=loop)
        add(journal, 4, value=float("nan"))
        values = [r["value"] for r in journal.rows()]
    assert values[:4] == [
        "Thing()",
        {"a": "Thing()", "b": "{1}"},
        "{(1, 2): 'tuple key'}",
        "[[...]]",
    ]
    assert values[4] != values[4]  # NaN survives


# --- refusals -----------------------------------------------------------------------------


def test_other_pipeline_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path, "alpha").close()
    with pytest.raises(JournalError, match="belongs to pipeline alpha, not beta") as info:
        Journal(path, "beta")
    assert str(path) in str(info.value)
    Journal(path, "alpha").close()  # the failed open released the lock


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(JournalError) as info:
        Journal(path, "p")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(JournalError):
        Journal.open_readonly(path)


def test_damaged_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=None, resume=False)
        for i in range(3000):
            add(journal, i, value="x" * 200)
    data = bytearray(path.read_bytes())
    data[8192:40960] = os.urandom(32768)  # header intact, table pages smashed
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="not a valid journal"):
        Journal(path, "p")


def test_sqlite_file_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    with pytest.raises(JournalError, match="not a batchpool journal"):
        Journal(path, "p")


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path, "p").close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    conn.close()
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(path, "p")
    with pytest.raises(JournalError, match="schema version 99"):
        Journal.open_readonly(path)


def test_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    path = tmp_path / "afile" / "j.sqlite"
    with pytest.raises(JournalError, match="cannot open") as info:
        Journal(path, "p")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --- locking ------------------------------------------------------------------------------


def test_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    busy = f"in use by another run \\(pid {os.getpid()}\\)"
    with Journal(path, "p"), pytest.raises(JournalError, match=busy):
        Journal(path, "p")
    Journal(path, "p").close()  # released by close


def test_second_open_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "helper"):
        out = subprocess.run(
            [sys.executable, HELPER, "open", str(path)], capture_output=True, text=True, timeout=30
        )
        assert (
            out.stdout.strip()
            == f"error: journal {path} is in use by another run (pid {os.getpid()})"
        )
    out = subprocess.run(
        [sys.executable, HELPER, "open", str(path)], capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_lock_of_a_sigkilled_holder_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    proc = spawn("hold", path)
    try:
        assert read_line(proc, 30).strip() == "ready"
        with pytest.raises(JournalError, match=f"pid {proc.pid}"):
            Journal(path, "helper")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        reap(proc)
    with Journal(path, "helper") as journal:
        assert journal.state == "empty"


def test_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path, "p")
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: past its at-fork hooks, outlive the parent's close
        os.write(ready_w, b"1")
        os.read(stop_r, 1)
        os._exit(0)
    try:
        assert select.select([ready_r], [], [], 30)[0], "the forked child never started"
        os.read(ready_r, 1)
        journal.close()
        Journal(path, "p").close()  # not blocked by the child's inherited descriptor
    finally:
        os.write(stop_w, b"1")
        wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 30, "the forked child to exit")
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)


def test_readonly_reads_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as writer:
        writer.begin(total=None, resume=False)
        add(writer, 0, value=1)
        add(writer, 1, value=2)
        writer.flush()
        add(writer, 2, value=3)  # buffered: not visible yet
        with Journal.open_readonly(path) as reader:
            assert reader.pipeline == "p" and reader.state == "unfinished"
            assert [r["value"] for r in reader.rows()] == [1, 2]
            assert reader.counts() == {"ok": 2, "failed": 0, "pending": 0}
            with pytest.raises(JournalError, match="read-only"):
                add(reader, 3)


def test_readonly_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open_readonly(tmp_path / "nope.sqlite")
    with pytest.raises(JournalError, match="is not a file"):
        Journal.open_readonly(tmp_path)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(JournalError, match="not a batchpool journal"):
        Journal.open_readonly(empty)


# --- streaming and batching ---------------------------------------------------------------


def test_recorded_streams_100k_rows_in_order_while_writing(tmp_path: Path) -> None:
    n = 100_000
    with Journal(tmp_path / "j.sqlite", "p") as journal:
        journal.begin(total=2 * n, resume=False)
        for i in range(0, 2 * n, 2):  # even indices first
            journal.add_final(
                i, "f", ok=True, value=i, error=None, attempts=1, worker=None, elapsed=0.0
            )
        journal.flush()
        tracemalloc.start()
        try:
            expected = 0
            for index, fp, status in journal.recorded():
                assert (index, fp, status) == (expected, "f", "ok")
                expected += 2
                if index % 2000 == 0:  # interleaved writes, as on a resume
                    journal.add_pending(index + 1, "g")
                    journal.flush()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert expected == 2 * n
        assert peak < 5_000_000, peak  # pages, not the whole table
        assert journal.counts() == {"ok": n, "failed": 0, "pending": n // 1000}


def test_buffer_autoflushes_by_size(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=None, resume=False)
        for i in range(1000):
            add(journal, i)
        with Journal.open_readonly(path) as reader:
            assert reader.counts()["ok"] == 1000


def test_maybe_flush_commits_an_old_buffer(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 0)
        journal.maybe_flush()  # too young: stays buffered
        with Journal.open_readonly(path) as reader:
            assert reader.counts()["ok"] == 0
        journal._oldest -= 1.0  # age the buffer instead of sleeping
        journal.maybe_flush()
        with Journal.open_readonly(path) as reader:
            assert reader.counts()["ok"] == 1


def test_fingerprint_is_stable_and_canonical() -> None:
    assert fingerprint({"a": 1, "b": {3, 2, 1}}) == fingerprint({"b": {1, 2, 3}, "a": 1})
    assert fingerprint(frozenset("abc")) == fingerprint(frozenset("cba"))
    assert fingerprint({1, 2}) != fingerprint(frozenset({1, 2})) != fingerprint([1, 2])
    shared = "x" * 50
    assert fingerprint([shared, shared]) == fingerprint(["x" * 50, "".join(["x"] * 50)])
    assert fingerprint(1) != fingerprint(1.0) != fingerprint("1")
    assert len(fingerprint(None)) == 32
    assert fingerprint(lambda: 0) == fingerprint(lambda: 1)  # unpicklable: by type only
    cyclic: list = [1]
    cyclic.append(cyclic)
    assert fingerprint(cyclic) == fingerprint(cyclic)
    script = "from batchpool.journal import fingerprint; print(fingerprint({'s': {'a', 'b', 'c'}}))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            timeout=30,
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert seen == {fingerprint({"s": {"c", "b", "a"}})}


# --- durability ---------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_disk_full_keeps_committed_rows_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    proc = spawn("fill", path, preexec_fn=_limit_file_size(1_500_000))
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    lines = out.splitlines()
    assert proc.returncode == 3, (out, err)
    assert lines[-1].startswith(f"error: journal {path}: cannot write: "), lines[-1]
    committed = int(lines[-2].split()[1])
    assert committed > 0
    assert integrity(path) == "ok"
    with Journal(path, "helper") as journal:
        assert journal.state == "unfinished"
        assert [r["index"] for r in journal.rows()] == list(range(committed))
        assert all(r["value"]["n"] == r["index"] for r in journal.rows())
        journal.begin(total=None, resume=True)
        add(journal, committed, value="more")
        journal.finish(complete=True)
    assert integrity(path) == "ok"
    with Journal.open_readonly(path) as reader:
        assert reader.counts()["ok"] == committed + 1


def test_failed_flush_keeps_the_buffer_for_a_retry(tmp_path: Path) -> None:
    """In-process: a write error leaves rows buffered; once writable again, flush saves them."""
    path = tmp_path / "j.sqlite"
    with Journal(path, "p") as journal:
        journal.begin(total=None, resume=False)
        add(journal, 0)
        journal.flush()
        conn = journal._conn
        conn.execute("PRAGMA max_page_count = 1")  # no room left: SQLITE_FULL on the next write
        for i in range(1, 200):
            add(journal, i, value="x" * 1000)
        with pytest.raises(JournalError, match="cannot write: database or disk is full") as info:
            journal.flush()
        assert "\n" not in str(info.value)
        assert journal.counts() == {"ok": 1, "failed": 0, "pending": 0}  # what is saved
        conn.execute("PRAGMA max_page_count = 1073741823")
        journal.flush()
    with Journal.open_readonly(path) as reader:
        assert reader.counts()["ok"] == 200


def test_sigkill_loses_no_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    proc = spawn("loop", path)
    try:
        seen = 0
        for _ in range(20):
            line = read_line(proc, 30)
            assert line.startswith("committed "), line
            seen = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        reap(proc)
    assert integrity(path) == "ok"
    with Journal(path, "helper") as journal:
        indices = [index for index, _, _ in journal.recorded()]
        assert len(indices) >= seen
        assert indices == list(range(len(indices)))
        assert journal.state == "unfinished"
