"""Shared test helpers: deadlines instead of sleeps, process checks, bounded job runs, and the
pieces every test of the real ``batchpool`` command needs (its command line, a clean child
environment, reads of its output and journal with deadlines)."""

from __future__ import annotations

import json
import os
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, wait
from contextlib import closing
from pathlib import Path
from typing import Any

import psutil

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
SRC_DIR = REPO_DIR / "src"
PIPELINES_DIR = REPO_DIR / "pipelines"
START_METHODS = ["fork", "forkserver", "spawn"]
# The console script's entry point, run by this interpreter: works in any virtual environment.
CLI = [sys.executable, "-c", "from batchpool.cli import main; main(prog_name='batchpool')"]
# Environment variables that configure the test pipelines (tests/test_cli.py's BP_*,
# tests/durability_pipeline.py's DUR_*): a child must see only those its test sets.
PIPELINE_SETTINGS = ("BP_", "DUR_")
OUTPUT_KEYS = {"index", "ok", "value", "error", "attempts"}  # one --output line (SPEC 2)


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes, then
    raise AssertionError naming ``what``. The sleep sits inside a condition loop with a
    deadline: never sleep-and-hope."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True if no live process has this pid (a zombie nobody reaps counts as gone: it runs
    nothing and holds nothing but its process-table slot)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_gone(pids: Iterable[int]) -> bool:
    return all(pid_gone(p) for p in pids)


def alive(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if not pid_gone(p)]


def run_jobs(
    pool: Any,
    payloads: Iterable[Any],
    timeout: float = 60.0,
    max_restarts: int | None = None,
) -> list[Any]:
    """submit() every payload and wait for all results, with a deadline: an engine that loses a
    job fails the test with an AssertionError (and the enclosing ``with Pool`` terminates the
    pool) instead of hanging the whole session. With ``max_restarts``, a restart storm (more
    worker restarts than that) fails the test as soon as it shows."""
    futures = [pool.submit(p) for p in payloads]
    deadline = time.monotonic() + timeout
    while True:
        _, not_done = wait(futures, timeout=0.05, return_when=FIRST_EXCEPTION)
        if not not_done:
            break
        problem = None
        if max_restarts is not None and pool.metrics().worker_restarts > max_restarts:
            problem = f"restart storm: more than {max_restarts} worker restarts"
        elif time.monotonic() >= deadline:
            problem = f"timed out after {timeout:g} s"
        if problem:
            try:
                metrics = pool.metrics()
            except Exception as exc:  # pragma: no cover - diagnostics only
                metrics = repr(exc)
            raise AssertionError(
                f"{problem}; {len(not_done)} of {len(futures)} jobs unfinished; metrics: {metrics}"
            )
    return [f.result() for f in futures]


def run_one(pool: Any, payload: Any, timeout: float = 60.0) -> Any:
    return run_jobs(pool, [payload], timeout)[0]


def child_env(**settings: Any) -> dict[str, str]:
    """Environment for a child interpreter that must import batchpool and tests/faults.py:
    this one, less stale pipeline settings and a Ray cluster address (a child starts its own
    Ray, or joins the one a test names), plus ``settings`` (values as strings)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(PIPELINE_SETTINGS) and k not in ("RAY_ADDRESS", "PYTHONWARNINGS")
    }
    parts = [str(TESTS_DIR), str(SRC_DIR)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update({k: str(v) for k, v in settings.items()})
    return env


environ = child_env  # the name the CLI tests use


def bp(
    *args: Any, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """One ``batchpool`` command to its end (TimeoutExpired past ``timeout``)."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=cwd,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of a child's stdout (a pipe), or AssertionError past ``timeout``: a bare
    readline() would hang the whole session if the child never writes it. Reads the file
    descriptor directly, so do not mix it with reads of ``proc.stdout``."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line from the child within {timeout:g} s: {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            byte = os.read(fd, 1)  # one byte at a time: nothing past the line is consumed
            if not byte:
                raise AssertionError(f"the child closed its output early: {data!r}")
            data += byte
    return data.decode()


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a file other processes append to (none yet if it does not exist)."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def output_rows(path: Path, n: int) -> list[dict]:
    """--output: exactly one line per job, ordered by index, with the documented keys."""
    rows = jsonl(path.read_text())
    assert [x["index"] for x in rows] == list(range(n)), "not one line per job, in index order"
    for x in rows:
        assert set(x) == OUTPUT_KEYS, x
    return rows


def one_line(stderr: str) -> str:
    """The message of a refusal: stderr without click's usage and hint lines, no traceback,
    and exactly one line."""
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Usage:", "Try '"))
    ]
    assert len(lines) == 1, f"expected a one-line message, got:\n{stderr}"
    return lines[0]


def connect_ro(journal: Path) -> sqlite3.Connection:
    """A read-only connection that neither creates nor changes the file."""
    return sqlite3.connect(f"{Path(journal).resolve().as_uri()}?mode=ro", uri=True)


def integrity(journal: Path) -> str:
    """SQLite's own verdict on a database file: "ok" when it is sound."""
    with closing(connect_ro(journal)) as conn:
        return " ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))


def committed_indexes(journal: Path) -> list[int]:
    """Indexes with a final outcome in a journal, read in this process while its run may still
    be writing (none before the journal exists)."""
    from batchpool.journal import Journal, JournalError

    try:
        with Journal.open_readonly(journal) as book:
            return [row["index"] for row in book.rows()]
    except JournalError:
        return []


def run_script(path: Path, timeout: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=path.parent,
    )


def check_invariants(m: Any, *, cut_short: bool = False) -> None:
    """The SPEC's end-of-run Metrics invariants: job counts add up; each stage's attempts
    add up (unless a cancellation cut running attempts short); the totals are the stages'."""
    assert m.succeeded + m.failed + m.cancelled == m.submitted, m
    assert m.queued == 0, m
    assert m.in_flight == 0, m
    for field in ("started", "retried", "timed_out", "crashed", "failed", "cancelled"):
        assert getattr(m, field) == sum(getattr(s, field) for s in m.stages), (field, m)
    assert m.submitted == m.stages[0].submitted and m.succeeded == m.stages[-1].succeeded, m
    for stage in m.stages:
        if not cut_short:
            assert stage.started == stage.succeeded + stage.failed + stage.retried, m
    if len(m.stages) == 1 and not cut_short:
        assert m.started == m.succeeded + m.failed + m.retried, m


def group_alive(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid``, or of the session it leads (workers
    lead process groups of their own inside the session of the run; zombies count as
    gone)."""
    found = []
    for proc in psutil.process_iter():
        try:
            mine = os.getpgid(proc.pid) == pgid or os.getsid(proc.pid) == pgid
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return found
