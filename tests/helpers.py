"""Shared test helpers: deadlines instead of sleeps, process checks, bounded job runs, and the
pieces every test of the real ``batchpool`` command needs (its command line, a clean child
environment, children started in a session of their own, on a pipe, a log file or a
pseudo-terminal, reads of their output and journal, all with deadlines)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, wait
from contextlib import closing, suppress
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
DURABILITY_PIPELINE = str(TESTS_DIR / "durability_pipeline.py")
# Environment variables that configure the test pipelines (JOBS_PY's BP_*,
# tests/durability_pipeline.py's DUR_*, test_sink_exactly_once.py's SINK_*) and the examples in
# pipelines/: a child must see only those its test sets.
PIPELINE_SETTINGS = ("BP_", "DUR_", "SINK_", "PRIMES_", "MANDELBROT_", "LOGS_", "FETCH_")
OUTPUT_KEYS = {"index", "ok", "value", "error", "attempts"}  # one --output line (SPEC 2)
CHILD_DEADLINE = 60.0  # seconds a CLI command or script of a test may take, unless it says

# A pipeline configured by environment variables (read at import and at run, so workers under
# every start method see the same): BP_N jobs (8 unless set); each appends its payload to
# BP_RUNS (one O_APPEND write), sleeps BP_SLEEP seconds, and raises PermanentError for payloads
# in BP_FAIL (comma separated) while the file BP_FLAG exists (always, when BP_FLAG is unset).
JOBS_PY = """
import os
import time

from faults import append_line

from batchpool import PermanentError, Pipeline, Task

N = int(os.environ.get("BP_N", "8"))
FAIL = {int(x) for x in os.environ.get("BP_FAIL", "").split(",") if x}


class Work(Task):
    retries = 0

    def run(self, n):
        if os.environ.get("BP_RUNS"):
            append_line(os.environ["BP_RUNS"], str(n))
        time.sleep(float(os.environ.get("BP_SLEEP", "0")))
        flag = os.environ.get("BP_FLAG")
        if n in FAIL and (not flag or os.path.exists(flag)):
            raise PermanentError(f"payload {n} refused")
        return n * n


pipeline = Pipeline(list(range(N)), Work(), name="jobs")
"""


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


def dur_env(**dur: Any) -> dict[str, str]:
    """A child's environment with tests/durability_pipeline.py's DUR_* settings."""
    return child_env(**{f"DUR_{k.upper()}": v for k, v in dur.items()})


def dur_run(journal: Path, *extra: Any) -> list[Any]:
    """``batchpool run`` arguments: tests/durability_pipeline.py on 2 workers, journalled in
    ``journal``, without a progress bar, then ``extra``."""
    return ["run", DURABILITY_PIPELINE, "--procs", 2, "--journal", journal, "--no-progress", *extra]


def write(path: Path, text: str) -> Path:
    """A file (its folders made as needed) of ``text``, dedented: a pipeline, a script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# -- children: to their end, or started and ended by the test ---------------------------------


def run(
    argv: list[Any],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = CHILD_DEADLINE,
) -> subprocess.CompletedProcess:
    """One command (a script, ``python -m``) to its end (TimeoutExpired past ``timeout``)."""
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bp(
    *args: Any, cwd: Path, env: dict[str, str] | None = None, timeout: float = CHILD_DEADLINE
) -> subprocess.CompletedProcess:
    """One ``batchpool`` command to its end (TimeoutExpired past ``timeout``)."""
    return run([*CLI, *args], cwd=cwd, env=env, timeout=timeout)


def run_reported(
    pipeline: Any, *options: Any, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``batchpool run PIPELINE OPTIONS...`` on 2 workers to its end, with --output
    cwd/out.jsonl and --report cwd/report.json."""
    reports = ["--output", "out.jsonl", "--report", "report.json"]
    return bp("run", pipeline, "--procs", 2, *reports, *options, cwd=cwd, env=env)


def kill_group(proc: subprocess.Popen) -> None:
    """If ``proc`` still runs: SIGKILL to its whole process group, then reap it."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Child(subprocess.Popen):
    """A child that leads a session of its own: its pid is its process group, as a terminal's
    foreground job's, so a test signals the whole run as a terminal (or systemd) does. Leaving
    its ``with`` block kills what still runs of it, where Popen would wait without end."""

    def __exit__(self, *exc_info: Any) -> None:
        try:
            kill_group(self)
        finally:
            super().__exit__(*exc_info)


def launch(
    argv: list[Any], *, cwd: Path | None = None, env: dict[str, str] | None = None, **popen: Any
) -> Child:
    """Start ``argv`` as a Child: stdin from /dev/null, stdout and stderr on text pipes, unless
    ``popen`` says otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return Child(
        [str(a) for a in argv],
        cwd=cwd,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **options,
    )


def start(*args: Any, cwd: Path, env: dict[str, str] | None = None, **popen: Any) -> Child:
    """Start ``batchpool ARGS...`` (see launch)."""
    return launch([*CLI, *args], cwd=cwd, env=env, **popen)


def start_logged(*args: Any, cwd: Path, env: dict[str, str] | None = None, **popen: Any) -> Child:
    """Start ``batchpool ARGS...`` with its output in cwd/stdout.txt and cwd/stderr.txt, so it
    never blocks on a full pipe while the test is busy elsewhere; finish() reads them."""
    with open(cwd / "stdout.txt", "wb") as out, open(cwd / "stderr.txt", "wb") as err:
        return start(*args, cwd=cwd, env=env, stdout=out, stderr=err, **popen)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = CHILD_DEADLINE) -> tuple[int, str]:
    """Wait for a start_logged() child with a deadline (killing its group past it): (exit
    code, stderr)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"the run did not end within {timeout:g} s") from None
    return code, (cwd / "stderr.txt").read_text(errors="replace")


def cli(
    *args: Any,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = CHILD_DEADLINE,
    **popen: Any,
) -> tuple[int, str]:
    """``batchpool ARGS...`` to its end, its output logged: (exit code, stderr)."""
    return finish(start_logged(*args, cwd=cwd, env=env, **popen), cwd, timeout)


def on_terminal(
    args: list[Any],
    cwd: Path,
    columns: int = 100,
    env: dict[str, str] | None = None,
    timeout: float = CHILD_DEADLINE,
) -> tuple[int, str]:
    """``batchpool ARGS...`` with stderr on a pseudo-terminal ``columns`` wide, as in an
    interactive shell: (exit code, everything it wrote there)."""
    master, slave = pty.openpty()
    chunks = []
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        with start(*args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=slave) as proc:
            os.close(slave)
            slave = -1
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the run did not close its terminal within {timeout:g} s: {chunks}"
                    )
                if not select.select([master], [], [], left)[0]:
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            code = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return code, b"".join(chunks).decode(errors="replace")


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


# -- what the children wrote -----------------------------------------------------------------


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


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr


def one_line(stderr: str, *, strict: bool = False) -> str:
    """The message of a refusal: no traceback, and exactly one non-empty line besides click's
    usage and hint lines (``strict``: besides nothing at all)."""
    no_traceback(stderr)
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and (strict or not line.startswith(("Usage:", "Try '")))
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


def final_rows(journal: Path) -> dict[int, str]:
    """index -> status of each final row committed to a journal, read without batchpool while
    its run may still be writing (none before the journal or its table exists)."""
    if not Path(journal).exists():
        return {}
    with closing(connect_ro(journal)) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone():
            return {}
        return dict(conn.execute("SELECT idx, status FROM jobs WHERE status IS NOT NULL"))


def journal_meta(journal: Path) -> dict[str, Any]:
    """A journal's meta table (schema, pipeline, state...), read without batchpool."""
    with closing(connect_ro(journal)) as conn:
        return dict(conn.execute("SELECT key, value FROM meta"))


def committed_indexes(journal: Path) -> list[int]:
    """Indexes with a final outcome in a journal, read in this process while its run may still
    be writing (none before the journal exists)."""
    from batchpool.journal import Journal, JournalError

    try:
        with Journal.open_readonly(journal) as book:
            return [row["index"] for row in book.rows()]
    except JournalError:
        return []


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
