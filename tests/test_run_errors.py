"""How a pipeline run fails: a sink or a source that raises (anything), stages or sources that
changed since the journal was written, workers that cannot start. The real ``batchpool run``
CLI in child processes, on pipeline files written by the tests, with real SQLite journals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import (
    bp,
    child_env,
    final_rows,
    group_alive,
    journal_meta,
    no_traceback,
    start,
    wait_for,
    write,
)

pytestmark = pytest.mark.timeout(120)


def rows(journal: Path) -> dict[int, str]:
    """index -> status of each final row (the journal must exist)."""
    assert journal.exists(), f"no journal {journal}"
    return final_rows(journal)


# -- the sink ---------------------------------------------------------------------------------

EXITING_SINK_PY = """
import os
import sys
import time

from batchpool import Pipeline, Task


class Double(Task):
    retries = 0

    def run(self, n):
        time.sleep(0.005)
        return 2 * n


seen = []


def sink(result):
    seen.append(result.index)
    with open("sink.log", "a") as f:
        f.write(f"{result.index}\\n")
    if len(seen) == 30:
        sys.exit(0)


pipeline = Pipeline(list(range(300)), Double(), name="exiting", sink=sink)
"""


def test_sink_calling_sys_exit_is_a_sink_failure(tmp_path: Path) -> None:
    write(tmp_path / "exiting.py", EXITING_SINK_PY)
    done = bp("run", "exiting.py", "--procs", 2, "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "stopped (sink)" in done.stderr and "SystemExit" in done.stderr
    seen = [int(x) for x in (tmp_path / "sink.log").read_text().split()]
    assert len(seen) == 30  # not called again once it failed
    recorded = rows(tmp_path / ".batchpool" / "exiting.sqlite")
    assert set(seen) <= set(recorded), "results the sink saw were not kept"
    assert len(recorded) < 300 and all(status == "ok" for status in recorded.values())
    assert journal_meta(tmp_path / ".batchpool" / "exiting.sqlite")["state"] == "unfinished"


# -- stages that changed ----------------------------------------------------------------------

STAGES_PY = """
import os
import time

from batchpool import Pipeline, Task

N = 300


class Add(Task):
    retries = 0

    def __init__(self, k):
        self.k = k

    def run(self, n):
        time.sleep(0.005)
        return n + self.k


def sink(result):
    if os.environ.get("STOP_AT") and result.index == int(os.environ["STOP_AT"]):
        raise RuntimeError("stop here")


STAGES = {
    "two": [Add(1), Add(10)],
    "three": [Add(1), Add(10), Add(100)],
    "other": [Add(1), Add(20)],
}
pipeline = Pipeline(list(range(N)), *STAGES[os.environ["STAGES"]], name="stages", sink=sink)
"""


def test_resume_with_other_stages_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "stages.py", STAGES_PY)
    journal = tmp_path / ".batchpool" / "stages.sqlite"
    run = ["run", "stages.py", "--procs", 2, "--no-progress"]
    env = child_env(STAGES="two", STOP_AT="5")
    done = bp(*run, cwd=tmp_path, env=env)
    assert done.returncode == 1 and "stop here" in done.stderr, done.stderr
    before = rows(journal)
    assert 0 < len(before) < 300
    for stages in ("three", "other"):  # another list of tasks; a task with another attribute
        done = bp(*run, "--resume", cwd=tmp_path, env=child_env(STAGES=stages))
        assert done.returncode == 2, done.stderr
        no_traceback(done.stderr)
        assert "stages changed" in done.stderr and "--fresh" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert rows(journal) == before
    # The same stages, with other retry settings, resume.
    done = bp(
        *run,
        "--resume",
        "--retries",
        2,
        "--output",
        "o.jsonl",
        cwd=tmp_path,
        env=env | {"STOP_AT": ""},
    )
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert [json.loads(line)["value"] for line in lines] == [n + 11 for n in range(300)]
    done = bp(*run, "--fresh", cwd=tmp_path, env=child_env(STAGES="three"))
    assert done.returncode == 0, done.stderr


# -- sources ----------------------------------------------------------------------------------

SOURCES_PY = """
import os
import sqlite3
import time

from batchpool import Pipeline, Task


class Square(Task):
    retries = 0

    def run(self, n):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        return n * n


def from_database():
    # A cursor is bound to the thread that made its connection: the run must iterate the
    # source in the thread that called this.
    with open("calls.log", "a") as f:
        f.write("called\\n")
    what = os.environ.get("BREAK")
    if what == "call":
        raise ValueError("no such table: numbers")
    if what == "oserror":
        raise OSError(5, "Input/output error", "numbers.db")
    conn = sqlite3.connect("numbers.db")
    return (n for (n,) in conn.execute("SELECT n FROM numbers ORDER BY n"))


def stop_at(result):
    if result.index == int(os.environ.get("STOP_AT", "-1")):
        raise RuntimeError("stop here")


pipeline = Pipeline(from_database, Square(), name="sources", sink=stop_at)
"""


def numbers_db(folder: Path, n: int) -> None:
    with closing(sqlite3.connect(folder / "numbers.db")) as conn, conn:
        conn.execute("CREATE TABLE numbers (n INTEGER)")
        conn.executemany("INSERT INTO numbers VALUES (?)", [(i,) for i in range(n)])


def calls(folder: Path) -> int:
    return (folder / "calls.log").read_text().count("called")


def test_callable_source_is_called_once_in_the_thread_that_reads_it(tmp_path: Path) -> None:
    write(tmp_path / "sources.py", SOURCES_PY)
    numbers_db(tmp_path, 200)
    run = ["run", "sources.py", "--procs", 2, "--no-progress"]
    env = child_env(STOP_AT="20", SLEEP="0.005")
    done = bp(*run, cwd=tmp_path, env=env)
    assert done.returncode == 1 and "stop here" in done.stderr, done.stderr
    assert calls(tmp_path) == 1
    done = bp(*run, "--resume", "--output", "o.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls(tmp_path) == 2  # once more for the resumed run, not twice
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert [json.loads(line)["value"] for line in lines] == [n * n for n in range(200)]


@pytest.mark.parametrize("resume", [False, True], ids=["run", "resume"])
def test_callable_source_that_raises_is_a_failed_run(tmp_path: Path, resume: bool) -> None:
    write(tmp_path / "sources.py", SOURCES_PY)
    numbers_db(tmp_path, 40)
    run = ["run", "sources.py", "--procs", 2, "--no-progress"]
    if resume:  # an unfinished journal to resume
        done = bp(*run, cwd=tmp_path, env=child_env(STOP_AT="3"))
        assert done.returncode == 1, done.stderr
    # --fresh: a failed run leaves its journal unfinished, and the next one starts over.
    run.append("--resume" if resume else "--fresh")
    for what, error in (("call", "ValueError: no such table"), ("oserror", "OSError: [Errno 5]")):
        done = bp(*run, cwd=tmp_path, env=child_env(BREAK=what))
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("batchpool: run stopped (source):\nTraceback"), done.stderr
        assert error in done.stderr and "from_database" in done.stderr
        assert "stopped by source" in done.stderr  # the summary follows
        assert "invalid settings" not in done.stderr


CHANGING_PY = """
import time

from faults import append_line

from batchpool import Pipeline, Task


class Mark(Task):
    retries = 0

    def run(self, n):
        append_line("started.log", str(n))
        time.sleep(0.01)
        return n


def started():
    try:
        with open("started.log") as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 0


def numbers():
    yield from range(50)
    deadline = time.monotonic() + 30
    while started() < 20 and time.monotonic() < deadline:  # let jobs run (and finish) first
        time.sleep(0.01)
    yield "not 50 any more"
    yield from range(51, 60)


pipeline = Pipeline(numbers(), Mark(), name="changing")  # a generator: no check before the run
"""


def test_changed_source_found_mid_run_keeps_what_ran(tmp_path: Path) -> None:
    """A generator cannot be checked before the run: the change is found when the source
    reaches index 50. What ran before is committed; the run is refused with exit 2."""
    from batchpool.journal import Journal, fingerprint
    from batchpool.pipeline import stages_fingerprint

    write(tmp_path / "changing.py", CHANGING_PY)
    journal = tmp_path / "j.sqlite"
    sys.path.insert(0, str(tmp_path))
    try:
        import changing
    finally:
        sys.path.remove(str(tmp_path))
    with Journal(journal, "changing") as book:  # an earlier run recorded index 50 only
        book.begin(total=None, resume=False, stages=stages_fingerprint(changing.pipeline.stages))
        book.add_final(
            50, fingerprint(50), ok=True, value=50, error=None, attempts=1, worker=None, elapsed=0.0
        )
        book.finish(complete=False)
    done = bp("run", "changing.py", "--procs", 2, "--journal", journal, "--resume", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    no_traceback(done.stderr)
    assert "index 50" in done.stderr and "--fresh" in done.stderr
    started = {int(x) for x in (tmp_path / "started.log").read_text().split()}
    recorded = rows(journal)
    assert started, "nothing ran before the change was found"
    assert started <= set(recorded), f"ran but not kept: {sorted(started - set(recorded))}"
    assert journal_meta(journal)["state"] == "unfinished"


# -- workers that cannot start ----------------------------------------------------------------

SETUP_PY = """
import os
import time

from batchpool import Pipeline, Task


class NeedsGpu(Task):
    retries = 0

    def setup(self):
        if os.path.exists("gpu-gone"):
            raise RuntimeError("no GPU here")

    def run(self, n):
        time.sleep(0.05)
        if n == 5 and not os.path.exists("crashed-once"):
            open("crashed-once", "w").close()
            open("gpu-gone", "w").close()  # every worker started from now on fails setup()
            os._exit(1)
        return n * n


pipeline = Pipeline(list(range(30)), NeedsGpu(), name="gpu")
"""


def test_jobs_that_never_ran_are_not_recorded_when_workers_cannot_start(tmp_path: Path) -> None:
    write(tmp_path / "gpu.py", SETUP_PY)
    journal = tmp_path / ".batchpool" / "gpu.sqlite"
    run = ["run", "gpu.py", "--procs", 1, "--no-progress"]  # no other worker takes the rest
    done = bp(*run, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: no GPU here" in done.stderr
    assert "--resume" in done.stderr and "--retry-failed" in done.stderr, done.stderr
    recorded = rows(journal)
    assert recorded[5] == "failed"  # it ran (and crashed its worker): recorded as usual
    assert [i for i, status in recorded.items() if status == "failed"] == [5]
    assert len(recorded) < 30, "jobs that never ran were recorded"
    assert f"{len(recorded)} jobs: {len(recorded) - 1} ok, 1 failed" in done.stderr

    (tmp_path / "gpu-gone").unlink()  # the cause is fixed
    done = bp(*run, "--resume", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # job 5 stays failed: --resume keeps outcomes
    assert "30 jobs: 29 ok, 1 failed" in done.stderr
    done = bp(*run, "--retry-failed", "--output", "o.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert [json.loads(line)["value"] for line in lines] == [n * n for n in range(30)]


# -- signals ----------------------------------------------------------------------------------

SLOW_PY = """
import os
import time

from faults import append_line

from batchpool import Pipeline, Task


class Slow(Task):
    retries = 0

    def run(self, n):
        append_line("runs.log", str(n))
        time.sleep(float(os.environ.get("SLEEP", "0.3")))
        return n


pipeline = Pipeline(list(range(int(os.environ.get("N", "24")))), Slow(), name="slow")
"""


def started_jobs(folder: Path) -> list[int]:
    try:
        return [int(x) for x in (folder / "runs.log").read_text().split()]
    except FileNotFoundError:
        return []


def test_sighup_drains_like_sigterm(tmp_path: Path) -> None:
    """A hangup (the shell forwards it to the whole job's process group) drains the attempts
    in flight into the journal and exits 129 (128 + SIGHUP); --resume completes the run."""
    write(tmp_path / "slow.py", SLOW_PY)
    with start("run", "slow.py", "--procs", 2, "--no-progress", cwd=tmp_path) as proc:
        wait_for(lambda: len(started_jobs(tmp_path)) >= 4 or proc.poll() is not None, 60, "jobs")
        os.killpg(proc.pid, signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by SIGHUP" in err and "crashes 0" in err, err
    no_traceback(err)
    wait_for(lambda: not group_alive(proc.pid), 15, "the process group to be empty")
    recorded = rows(tmp_path / ".batchpool" / "slow.sqlite")
    assert recorded and set(recorded.values()) == {"ok"}  # drained: the jobs in flight ended ok
    assert len(recorded) < 24
    ran = len(started_jobs(tmp_path))
    done = bp("run", "slow.py", "--procs", 2, "--resume", cwd=tmp_path, env=child_env(SLEEP="0"))
    assert done.returncode == 0, done.stderr
    assert sorted(started_jobs(tmp_path)[ran:]) == sorted(set(range(24)) - set(recorded))


SLOW_SINK_PY = """
import os
import time

from batchpool import Pipeline, Task


class Quick(Task):
    def run(self, n):
        time.sleep(0.002)
        return n


def sink(result):
    with open("sink.log", "a") as f:
        f.write(f"{result.index}\\n")
    time.sleep(0.3)


pipeline = Pipeline(list(range(2000)), Quick(), name="slowsink", sink=sink)
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_first_sigint_says_what_it_waits_for_and_not_for_a_slow_sink(
    tmp_path: Path, quiet: bool
) -> None:
    write(tmp_path / "slowsink.py", SLOW_SINK_PY)
    sink_log = tmp_path / "sink.log"
    args = ["run", "slowsink.py", "--procs", "2", "--no-progress", *(["-q"] if quiet else [])]
    with start(*args, cwd=tmp_path) as proc:
        wait_for(
            lambda: (
                (sink_log.exists() and len(sink_log.read_text().split()) >= 2)
                or proc.poll() is not None
            ),
            60,
            "the sink to be called",
        )
        os.killpg(proc.pid, signal.SIGINT)
        struck = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - struck
    assert proc.returncode == 130, err
    assert took < 5, f"one Ctrl-C took {took:.1f} s: the drain fed the slow sink its backlog"
    said = [line for line in err.splitlines() if "finishing" in line]
    if quiet:
        assert err == ""
    else:
        assert len(said) == 1, err
        assert re.fullmatch(
            r"batchpool: finishing \d+ running jobs; Ctrl-C again to stop now", said[0]
        )
    recorded = rows(tmp_path / ".batchpool" / "slowsink.sqlite")
    assert len(sink_log.read_text().split()) < len(recorded), "the sink got all it would anyway"
