"""The ``batchpool`` command, run for real: a child Python process per command, in tmp_path (so
journals land there), on pipeline files written by the tests. Exit codes, messages, --output and
--report, pipeline specs, start methods, signals as a terminal sends them, SIGKILL of the
supervisor, ``results``, and the README's commands and example pipelines.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from faults import attempts_of
from helpers import (
    PIPELINES_DIR,
    START_METHODS,
    all_gone,
    bp,
    committed_indexes,
    environ,
    group_alive,
    jsonl,
    on_terminal,
    one_line,
    output_rows,
    read_lines,
    run,
    run_reported,
    start,
    wait_for,
    write,
)

from batchpool import __version__

pytestmark = pytest.mark.timeout(110)

PIPELINES = PIPELINES_DIR

# -- helpers ---------------------------------------------------------------------------------


class StderrSoFar:
    """A child's stderr pipe read without blocking, so a wait_for predicate can poll it.
    ``rest()``: all it wrote, once it has ended (read to the end by communicate())."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.fd = proc.stderr.fileno()
        self.data = b""
        os.set_blocking(self.fd, False)

    def text(self) -> str:
        try:
            while chunk := os.read(self.fd, 65536):
                self.data += chunk
        except BlockingIOError:
            pass
        return self.data.decode(errors="replace")

    def rest(self, timeout: float) -> str:
        text = self.text()
        os.set_blocking(self.fd, True)
        _, rest = self.proc.communicate(timeout=timeout)
        return text + rest


# -- basics ----------------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    r = bp("--version", cwd=tmp_path)
    assert r.returncode == 0
    assert __version__ in r.stdout and "batchpool" in r.stdout


def test_help_lists_commands_and_options(tmp_path: Path) -> None:
    r = bp("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "run" in r.stdout and "results" in r.stdout
    r = bp("run", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for option in (
        "--procs",
        "--retries",
        "--timeout",
        "--backoff",
        "--start-method",
        "--max-memory",
        "--journal",
        "--no-journal",
        "--resume",
        "--fresh",
        "--retry-failed",
        "--output",
        "--report",
        "--no-progress",
        "--verbose",
        "--quiet",
    ):
        assert option in r.stdout, option
    r = bp("results", "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "--format" in r.stdout and "--failed" in r.stdout


def test_all_ok_exit_0_output_and_report(tmp_path: Path, jobs: Path) -> None:
    r = run_reported(jobs, cwd=tmp_path, env=environ(BP_N=10))
    assert r.returncode == 0, r.stderr
    assert "10 jobs: 10 ok, 0 failed" in r.stderr
    assert (tmp_path / ".batchpool" / "jobs.sqlite").is_file()
    lines = output_rows(tmp_path / "out.jsonl", 10)
    assert all(x["ok"] and x["value"] == x["index"] ** 2 and x["attempts"] == 1 for x in lines)
    assert all(x["error"] is None for x in lines)
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["succeeded"], report["failed"]) == (10, 0)
    assert report["metrics"]["submitted"] == 10
    assert report["metrics"]["succeeded"] == 10


def test_some_failed_exit_1(tmp_path: Path, jobs: Path) -> None:
    r = run_reported(jobs, cwd=tmp_path, env=environ(BP_N=8, BP_FAIL="2,5"))
    assert r.returncode == 1, r.stderr
    assert "8 jobs: 6 ok, 2 failed" in r.stderr
    assert "Traceback" not in r.stderr
    lines = output_rows(tmp_path / "out.jsonl", 8)
    failed = [x for x in lines if not x["ok"]]
    assert [x["index"] for x in failed] == [2, 5]
    assert failed[0]["value"] is None
    assert failed[0]["error"]["type"] == "PermanentError"
    assert failed[0]["error"]["kind"] == "error"
    assert "payload 2 refused" in failed[0]["error"]["message"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["succeeded"], report["failed"]) == (6, 2)
    assert sorted(f["index"] for f in report["failures"]) == [2, 5]
    assert report["metrics"]["failed"] == 2


def test_quiet_prints_nothing(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 2, "-q", cwd=tmp_path, env=environ(BP_N=3))
    assert r.returncode == 0
    assert r.stdout == "" and r.stderr == ""


# -- refusals: exit 2, one line, no traceback ---------------------------------------------------


BAD_FILES = {
    "syntax.py": ("def broken(:\n", "syntax error"),
    "noattr.py": ("from batchpool import Pipeline\nother = 1\n", "pipeline"),
    "notpipe.py": ("pipeline = [1, 2, 3]\n", "not a batchpool.Pipeline"),
    "raises.py": ("raise RuntimeError('no database here')\n", "no database here"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_pipeline_file_exit_2(tmp_path: Path, name: str) -> None:
    text, expected = BAD_FILES[name]
    (tmp_path / name).write_text(text)
    r = bp("run", name, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert expected in one_line(r.stderr)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "missing.py"], "not found"),
        (["run", "missing.py:thing"], "not found"),
        (["run", "no_such_package.mod:pipeline"], "no_such_package"),
        (["run", "jobs.py:nothing"], "nothing"),
        (["run", "jobs.py", "--procs", "0"], "--procs"),
        (["run", "jobs.py", "--retries", "-1"], "--retries"),
        (["run", "jobs.py", "--timeout", "0"], "--timeout"),
        (["run", "jobs.py", "--max-memory", "lots"], "--max-memory"),
        (["run", "jobs.py", "--start-method", "teleport"], "--start-method"),
        (["run", "jobs.py", "--journal", "plain-file/sub/j.sqlite"], "plain-file"),
        (["run", "jobs.py", "--fresh", "--resume"], "--fresh"),
        (["run", "jobs.py", "--fresh", "--retry-failed"], "--fresh"),
        (["run", "jobs.py", "--journal", "j.sqlite", "--no-journal"], "--journal and --no-journal"),
        (["run", "jobs.py", "--no-journal", "--resume"], "--resume needs a journal"),
        (["run", "jobs.py", "--no-journal", "--retry-failed"], "--resume needs a journal"),
        (["run", "jobs.py", "--max-memory", "0MB"], "--max-memory"),
        (["run", "./plain-file"], "not a Python file"),
        (["results", "missing.sqlite"], "missing.sqlite"),
        (["results", "plain-file"], "plain-file"),
    ],
)
def test_bad_input_exit_2(tmp_path: Path, jobs: Path, args: list[str], expected: str) -> None:
    (tmp_path / "plain-file").write_text("not a directory, not a journal\n")
    r = bp(*args, cwd=tmp_path, env=environ(BP_N=2))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert expected in one_line(r.stderr)
    assert not (tmp_path / "plain-file").is_dir()
    assert not (tmp_path / "j.sqlite").exists() and not (tmp_path / ".batchpool").exists()


def test_settings_refused_when_the_pool_is_built_exit_2(tmp_path: Path, jobs: Path) -> None:
    """A value click lets through (nan is no number of seconds) is refused by the pool: one
    line, exit 2, no job run, and nothing left behind that blocks the next run."""
    runs = tmp_path / "runs"
    r = bp("run", jobs, "--timeout", "nan", cwd=tmp_path, env=environ(BP_N=2, BP_RUNS=runs))
    assert r.returncode == 2, r.stderr
    assert "invalid settings: timeout must be" in one_line(r.stderr)
    assert not runs.exists()
    assert not (tmp_path / ".batchpool").exists()  # refused before a journal was made
    r = bp("run", jobs, "--procs", 2, cwd=tmp_path, env=environ(BP_N=2, BP_RUNS=runs))
    assert r.returncode == 0, r.stderr
    assert sorted(read_lines(runs)) == ["0", "1"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("def broken(:\n", "syntax error in"),
        (
            "raise RuntimeError('no database here')\n",
            "error importing badpkg.mod at badpkg/mod.py:1: RuntimeError: no database here",
        ),
    ],
    ids=["syntax", "raises"],
)
def test_bad_pipeline_module_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path / "badpkg" / "__init__.py", "")
    write(tmp_path / "badpkg" / "mod.py", text)
    r = bp("run", "badpkg.mod:pipeline", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert expected in one_line(r.stderr)


def test_unfinished_journal_needs_resume_or_fresh(tmp_path: Path) -> None:
    """A run stopped by its source leaves an unfinished journal; a plain run refuses it."""
    write(
        tmp_path / "stops.py",
        """
        from batchpool import Pipeline, Task


        class Double(Task):
            def run(self, n):
                return 2 * n


        def numbers():
            yield from range(3)
            raise ValueError("the source broke at 3")


        pipeline = Pipeline(numbers, Double())
        """,
    )
    r = bp("run", "stops.py", "--procs", 2, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "ValueError: the source broke at 3" in r.stderr
    assert "stopped by source" in r.stderr
    r = bp("run", "stops.py", "--procs", 2, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    message = one_line(r.stderr)
    assert "--resume" in message and "--fresh" in message
    # --fresh starts over (and stops at the same place, the source being what it is).
    r = bp("run", "stops.py", "--procs", 2, "--fresh", cwd=tmp_path)
    assert r.returncode == 1 and "stopped by source" in r.stderr


# -- options, each shown to change what a run does ---------------------------------------------

# BP_N jobs of a task that retries 3 times with no backoff by its own settings. Each attempt is
# recorded in BP_MARKS (time and pid, tests/faults.py); the first BP_FAILS attempts of every
# job raise ValueError; BP_MODE "hang" makes job 0 hang, "hog" makes every job keep 8 MB more;
# a job that succeeds sleeps BP_SLEEP seconds and returns its worker's pid.
OPTIONS_PY = """
import os
import time

from faults import record_attempt

from batchpool import Pipeline, Task

N = int(os.environ.get("BP_N", "4"))
FAILS = int(os.environ.get("BP_FAILS", "0"))
MODE = os.environ.get("BP_MODE", "")


class Flaky(Task):
    retries = 3
    backoff = 0.0
    jitter = 0.0

    def __init__(self):
        self.hoard = []

    def run(self, n):
        attempt = record_attempt(os.environ["BP_MARKS"], n)
        if attempt <= FAILS:
            raise ValueError(f"attempt {attempt} of job {n} fails")
        if MODE == "hang" and n == 0:
            while True:
                time.sleep(3600)
        if MODE == "hog":
            self.hoard.append(bytearray(b"\\x01") * (8 * 1024 * 1024))
        time.sleep(float(os.environ.get("BP_SLEEP", "0")))
        return os.getpid()


pipeline = Pipeline(list(range(N)), Flaky(), name="options")
"""


def run_options(tmp_path: Path, *options: Any, **settings: Any) -> subprocess.CompletedProcess:
    """``batchpool run`` of OPTIONS_PY on 2 workers with --output out.jsonl and --report
    report.json, plus ``options``; attempts are recorded in tmp_path/marks."""
    write(tmp_path / "options.py", OPTIONS_PY)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    env = environ(BP_MARKS=marks, **{f"BP_{k.upper()}": v for k, v in settings.items()})
    return run_reported("options.py", *options, cwd=tmp_path, env=env)


def test_retries_option_overrides_the_task(tmp_path: Path) -> None:
    # The task would retry 3 times, and every job succeeds at its second attempt.
    r = run_options(tmp_path, "--retries", 0, n=3, fails=1)
    assert r.returncode == 1, r.stderr
    rows = output_rows(tmp_path / "out.jsonl", 3)
    assert all(not x["ok"] and x["attempts"] == 1 for x in rows), rows
    assert {(x["error"]["kind"], x["error"]["type"]) for x in rows} == {("error", "ValueError")}
    assert all(len(attempts_of(tmp_path / "marks", n)) == 1 for n in range(3))


def test_timeout_option_kills_a_hanging_job(tmp_path: Path) -> None:
    # The task has no timeout of its own: without --timeout job 0 would hang the run.
    begun = time.monotonic()
    r = run_options(tmp_path, "--timeout", 0.5, "--retries", 0, n=3, mode="hang")
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - begun < 30
    hung, *others = output_rows(tmp_path / "out.jsonl", 3)
    assert not hung["ok"] and hung["attempts"] == 1
    assert (hung["error"]["kind"], hung["error"]["type"]) == ("timeout", "TimeoutError")
    assert all(x["ok"] and x["attempts"] == 1 for x in others), others
    [(_, hung_pid)] = attempts_of(tmp_path / "marks", 0)
    wait_for(lambda: all_gone([hung_pid]), 10, "the hung worker to be gone")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["timed_out"] == 1


def test_backoff_option_spaces_the_retries(tmp_path: Path) -> None:
    # The task's own backoff is 0 (jitter 0): retries would follow each other at once.
    r = run_options(tmp_path, "--backoff", 0.4, n=1, fails=2)
    assert r.returncode == 0, r.stderr
    [row] = output_rows(tmp_path / "out.jsonl", 1)
    assert row["ok"] and row["attempts"] == 3
    times = [at for at, _ in attempts_of(tmp_path / "marks", 0)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.4 <= gaps[0] < 0.4 + 3.0, gaps  # the first retry waits --backoff
    assert 0.8 <= gaps[1] < 0.8 + 3.0, gaps  # and each further one twice as long


def summary_numbers(stderr: str) -> dict[str, float]:
    """What the end-of-run summary says: jobs/s, p50 and p95 attempt time (seconds), restarts."""
    seconds = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    rate = re.search(r"\(([\d.]+) jobs/s\)", stderr)
    times = re.search(r"p50 ([\d.]+) (us|ms|s), p95 ([\d.]+) (us|ms|s)", stderr)
    restarts = re.search(r"worker restarts (\d+)", stderr)
    assert rate and times and restarts, stderr
    return {
        "rate": float(rate[1]),
        "p50": float(times[1]) * seconds[times[2]],
        "p95": float(times[3]) * seconds[times[4]],
        "restarts": int(restarts[1]),
    }


def test_max_memory_option_recycles_workers_and_the_summary_agrees_with_the_report(
    tmp_path: Path,
) -> None:
    # 1 MB: below any Python process, so every worker retires after its first job.
    r = run_options(tmp_path, "--max-memory", "1MB", n=6, mode="hog", sleep=0.05)
    assert r.returncode == 0, r.stderr
    pids = [x["value"] for x in output_rows(tmp_path / "out.jsonl", 6)]
    assert len(set(pids)) == 6, pids  # one job per worker
    report = json.loads((tmp_path / "report.json").read_text())
    restarts = report["metrics"]["worker_restarts"]
    assert restarts >= 6 - 2

    said = summary_numbers(r.stderr)
    assert said["restarts"] == restarts
    rate = (report["total"] - report["skipped"]) / report["elapsed"]
    assert said["rate"] == pytest.approx(rate, abs=0.051)  # printed to 0.1
    for name, value in (("p50", report["attempt_p50"]), ("p95", report["attempt_p95"])):
        assert value >= 0.05  # each attempt slept that long
        assert said[name] == pytest.approx(value, rel=0.01, abs=5e-5), (name, said, value)
    assert report["attempt_p50"] <= report["attempt_p95"]

    # 2GB: accepted, and far above these workers: they keep running jobs.
    again = tmp_path / "again"
    again.mkdir()
    r = run_options(again, "--max-memory", "2GB", n=6, mode="hog")
    assert r.returncode == 0, r.stderr
    assert len({x["value"] for x in output_rows(again / "out.jsonl", 6)}) <= 2
    report = json.loads((again / "report.json").read_text())
    assert report["metrics"]["worker_restarts"] == 0
    assert summary_numbers(r.stderr)["restarts"] == 0


def test_no_journal_option_leaves_no_journal(tmp_path: Path) -> None:
    r = run_options(tmp_path, "--no-journal", n=4)
    assert r.returncode == 0, r.stderr
    assert all(x["ok"] for x in output_rows(tmp_path / "out.jsonl", 4))  # --output still works
    assert not (tmp_path / ".batchpool").exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".sqlite", ".sqlite-wal")]
    # --output is written from a temporary journal: gone with the run, wherever it was
    for named in re.findall(r"^journal: (.+)$", r.stderr, flags=re.MULTILINE):
        assert not Path(named).exists(), named
    # and so nothing to resume from
    r = run_options(tmp_path, "--no-journal", "--resume", n=4)
    assert r.returncode == 2
    assert "--resume needs a journal" in one_line(r.stderr)


def cubes_package(folder: Path, n: int) -> None:
    """folder/mypkg/pipes.py: a module of a package, whose pipeline ``cubes`` cubes 0..n-1."""
    write(folder / "mypkg" / "__init__.py", "")
    write(
        folder / "mypkg" / "pipes.py",
        f"""
        from batchpool import Pipeline, Task


        class Cube(Task):
            def run(self, n):
                return n**3


        cubes = Pipeline(list(range({n})), Cube())
        """,
    )


def test_console_script_runs_a_package_module_of_the_working_directory(tmp_path: Path) -> None:
    """The installed ``batchpool`` entry point (not ``python -c``): its sys.path starts with its
    own folder, yet package.module:NAME is found in the working directory."""
    script = Path(sys.executable).with_name("batchpool")
    assert script.is_file(), f"no console script next to {sys.executable}"
    cubes_package(tmp_path, 4)
    r = run(
        [script, "run", "mypkg.pipes:cubes", "--procs", "2", "--output", "o.jsonl"], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert [x["value"] for x in output_rows(tmp_path / "o.jsonl", 4)] == [0, 1, 8, 27]


# -- pipeline specs, start methods, output values ---------------------------------------------


def test_file_colon_name(tmp_path: Path) -> None:
    write(
        tmp_path / "two.py",
        """
        from batchpool import Pipeline, Task


        class Neg(Task):
            def run(self, n):
                return -n


        pipeline = Pipeline([1, 2], Neg(), name="first")
        second = Pipeline([3, 4, 5], Neg(), name="second")
        """,
    )
    r = bp("run", "two.py:second", "--procs", 2, "--output", "o.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["value"] for x in output_rows(tmp_path / "o.jsonl", 3)] == [-3, -4, -5]
    assert (tmp_path / ".batchpool" / "second.sqlite").is_file()


@pytest.mark.parametrize("start_method", START_METHODS)
def test_package_module_name(tmp_path: Path, start_method: str) -> None:
    cubes_package(tmp_path, 5)
    r = bp(
        "run",
        "mypkg.pipes:cubes",
        "--procs",
        2,
        "--start-method",
        start_method,
        "--output",
        "o.jsonl",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert [x["value"] for x in output_rows(tmp_path / "o.jsonl", 5)] == [0, 1, 8, 27, 64]
    assert (tmp_path / ".batchpool" / "pipes-cubes.sqlite").is_file()  # module and attribute


@pytest.mark.parametrize("start_method", START_METHODS)
def test_tasks_in_the_file_under_each_start_method(tmp_path: Path, start_method: str) -> None:
    """The task class, a helper function, a sibling module: all found by the workers."""
    write(tmp_path / "pipes" / "mathbits.py", "def poly(n):\n    return n * n + 1\n")
    write(
        tmp_path / "pipes" / "methods.py",
        """
        import os

        from mathbits import poly

        from batchpool import Pipeline, Task

        OFFSET = 100


        def shift(n):
            return n + OFFSET


        class Calc(Task):
            def __init__(self, scale):
                self.scale = scale

            def run(self, n):
                return {"value": shift(poly(n)) * self.scale, "pid": os.getpid()}


        pipeline = Pipeline(list(range(6)), Calc(scale=2))
        """,
    )
    r = bp(
        "run",
        "pipes/methods.py",
        "--procs",
        2,
        "--start-method",
        start_method,
        "--output",
        "o.jsonl",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = output_rows(tmp_path / "o.jsonl", 6)
    assert [x["value"]["value"] for x in lines] == [(n * n + 1 + 100) * 2 for n in range(6)]
    assert os.getpid() not in {x["value"]["pid"] for x in lines}


def test_output_falls_back_to_repr(tmp_path: Path) -> None:
    write(
        tmp_path / "weird.py",
        """
        from batchpool import Pipeline, Task


        class Thing:
            def __repr__(self):
                return "Thing(42)"


        VALUES = [
            {3, 1, 2},
            Thing(),
            {"nested": frozenset([7]), "ok": [1, 2]},
            {1: "int keys"},
            (1, "tuple"),
            b"raw",
            None,
        ]


        class Weird(Task):
            def run(self, i):
                return VALUES[i]


        pipeline = Pipeline(list(range(len(VALUES))), Weird())
        """,
    )
    r = bp(
        "run", "weird.py", "--procs", 2, "--output", "o.jsonl", "--report", "r.json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    values = [x["value"] for x in output_rows(tmp_path / "o.jsonl", 7)]
    assert values[0] == "{1, 2, 3}"
    assert values[1] == "Thing(42)"
    assert values[2] == {"nested": "frozenset({7})", "ok": [1, 2]}
    assert values[3] in ({"1": "int keys"}, "{1: 'int keys'}")
    assert values[4] == [1, "tuple"]
    assert values[5] == "b'raw'"
    assert values[6] is None
    assert json.loads((tmp_path / "r.json").read_text())["succeeded"] == 7


def test_retry_failed_reruns_only_the_failed(tmp_path: Path, jobs: Path) -> None:
    flag, runs = tmp_path / "flag", tmp_path / "runs"
    flag.touch()
    env = environ(BP_N=8, BP_FAIL="1,6", BP_FLAG=flag, BP_RUNS=runs)
    r = bp("run", jobs, "--procs", 2, cwd=tmp_path, env=env)
    assert r.returncode == 1
    assert len(read_lines(runs)) == 8
    flag.unlink()  # the cause of the failures is fixed
    r = bp(
        "run", jobs, "--procs", 2, "--retry-failed", "--output", "o.jsonl", cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr
    assert sorted(int(x) for x in read_lines(runs)[8:]) == [1, 6]
    lines = output_rows(tmp_path / "o.jsonl", 8)
    assert all(x["ok"] and x["value"] == x["index"] ** 2 for x in lines)
    # A plain run of a complete journal does all the work again.
    r = bp("run", jobs, "--procs", 2, cwd=tmp_path, env=env)
    assert r.returncode == 0 and len(read_lines(runs)) == 18


# -- results ---------------------------------------------------------------------------------


def test_results_of_a_complete_journal(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 2, cwd=tmp_path, env=environ(BP_N=6, BP_FAIL="4"))
    assert r.returncode == 1
    journal = ".batchpool/jobs.sqlite"
    # Warnings as errors: nothing it calls is deprecated (click 8.5 deprecated
    # get_binary_stream, which it once used).
    r = bp("results", journal, cwd=tmp_path, env=environ(PYTHONWARNINGS="error"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = jsonl(r.stdout)
    assert [x["index"] for x in rows] == list(range(6))
    assert [x["ok"] for x in rows] == [True] * 4 + [False, True]
    assert rows[3]["value"] == 9 and rows[4]["error"]["type"] == "PermanentError"

    r = bp("results", journal, "--failed", cwd=tmp_path)
    assert r.returncode == 0
    assert [x["index"] for x in jsonl(r.stdout)] == [4]

    r = bp("results", journal, "--format", "csv", cwd=tmp_path)
    assert r.returncode == 0
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [int(row["index"]) for row in table] == list(range(6))
    assert table[2]["value"] == "4" and table[2]["ok"] == "true"
    assert table[4]["ok"] == "false" and table[4]["error_type"] == "PermanentError"
    assert "payload 4 refused" in table[4]["error"]

    r = bp("results", journal, "--format", "csv", "--failed", cwd=tmp_path)
    assert [row["index"] for row in csv.DictReader(io.StringIO(r.stdout))] == ["4"]


# -- signals ---------------------------------------------------------------------------------


def interrupted_journal_results(tmp_path: Path, n: int) -> set[int]:
    """``batchpool results`` on the journal an interrupted run left: unique final rows."""
    r = bp("results", ".batchpool/jobs.sqlite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    indexes = [x["index"] for x in jsonl(r.stdout)]
    assert indexes == sorted(set(indexes)) and set(indexes) <= set(range(n))
    r = bp("results", ".batchpool/jobs.sqlite", "--format", "csv", cwd=tmp_path)
    assert r.returncode == 0
    assert len(list(csv.DictReader(io.StringIO(r.stdout)))) == len(indexes)
    return set(indexes)


def resume_completes(tmp_path: Path, jobs: Path, n: int, runs: Path, recorded: set[int]) -> None:
    """--resume finishes the run: one line per index, and no recorded job ran again."""
    ran_before = len(read_lines(runs))
    r = bp(
        "run",
        jobs,
        "--procs",
        2,
        "--resume",
        "--output",
        "o.jsonl",
        cwd=tmp_path,
        env=environ(BP_N=n, BP_SLEEP=0.01, BP_RUNS=runs),
    )
    assert r.returncode == 0, r.stderr
    lines = output_rows(tmp_path / "o.jsonl", n)
    assert all(x["ok"] and x["value"] == x["index"] ** 2 for x in lines)
    ran_after = {int(x) for x in read_lines(runs)[ran_before:]}
    assert not ran_after & recorded, f"jobs recorded as final ran again: {ran_after & recorded}"
    assert ran_after | recorded == set(range(n))


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_drains_and_resume_completes(
    tmp_path: Path, jobs: Path, sig: signal.Signals, code: int
) -> None:
    n, runs = 24, tmp_path / "runs"
    env = environ(BP_N=n, BP_SLEEP=0.3, BP_RUNS=runs)
    with start("run", jobs, "--procs", 2, cwd=tmp_path, env=env) as proc:
        wait_for(lambda: len(read_lines(runs)) >= 4, 60, "jobs to run")
        os.killpg(proc.pid, sig)  # the whole group, as a terminal (or systemd) does
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"stopped by {sig.name}" in err
    assert "Traceback" not in err
    wait_for(lambda: not group_alive(proc.pid), 15, "the process group to be empty")
    recorded = interrupted_journal_results(tmp_path, n)
    assert len(recorded) < n
    resume_completes(tmp_path, jobs, n, runs, recorded)


def test_second_sigint_stops_at_once(tmp_path: Path, jobs: Path) -> None:
    n, runs = 8, tmp_path / "runs"
    env = environ(BP_N=n, BP_SLEEP=8, BP_RUNS=runs)
    with start("run", jobs, "--procs", 2, cwd=tmp_path, env=env) as proc:
        wait_for(lambda: len(read_lines(runs)) >= 2, 60, "both workers to be busy")
        os.killpg(proc.pid, signal.SIGINT)
        first = time.monotonic()
        # The second Ctrl-C once the run says it is draining (a second one before it looked
        # is test_durability.py's test_double_sigint_before_the_loop_looks case).
        stderr = StderrSoFar(proc)
        wait_for(lambda: "finishing" in stderr.text(), 30, "the drain's message")
        os.killpg(proc.pid, signal.SIGINT)
        err = stderr.rest(timeout=60)
        took = time.monotonic() - first
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert took < 6, f"the second Ctrl-C took {took:.1f} s: it waited for the 8 s jobs"
    assert re.search(r"finishing \d+ running jobs; Ctrl-C again to stop now", err), err
    wait_for(lambda: not group_alive(proc.pid), 15, "the process group to be empty")
    recorded = interrupted_journal_results(tmp_path, n)
    assert not recorded  # nothing had finished
    resume_completes(tmp_path, jobs, n, runs, recorded)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_sigkill_of_the_supervisor(tmp_path: Path, jobs: Path, start_method: str) -> None:
    n, runs = 24, tmp_path / "runs"
    journal = tmp_path / ".batchpool" / "jobs.sqlite"
    env = environ(BP_N=n, BP_SLEEP=0.3, BP_RUNS=runs)
    args = ["run", jobs, "--procs", 2, "--start-method", start_method]
    with start(*args, cwd=tmp_path, env=env) as proc:
        wait_for(lambda: len(committed_indexes(journal)) >= 2, 60, "committed results")
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only: workers must notice alone
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    pids = [c.pid for c in children]
    assert pids, "no worker processes seen"
    try:
        wait_for(lambda: all_gone(pids), 15, "the orphaned workers to exit")
    finally:
        for pid in pids:  # do not leak them into other tests if they did not
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    recorded = interrupted_journal_results(tmp_path, n)
    assert 2 <= len(recorded) < n
    resume_completes(tmp_path, jobs, n, runs, recorded)


# -- the README's commands and the example pipelines ------------------------------------------


def test_readme_first_command(tmp_path: Path) -> None:
    r = bp("run", PIPELINES / "primes.py", "--procs", 2, cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "200 jobs: 200 ok, 0 failed" in r.stderr


def test_example_mandelbrot(tmp_path: Path) -> None:
    r = bp("run", PIPELINES / "mandelbrot.py", "--procs", 2, cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "mandelbrot.pgm").read_bytes()
    header = b"P5\n640 480\n255\n"
    assert data.startswith(header)
    pixels = data[len(header) :]
    assert len(pixels) == 640 * 480
    inside = pixels.count(0)
    assert 0.1 < inside / len(pixels) < 0.5  # the set is there, and not everywhere
    assert max(pixels) > 200  # its bright edge too


def test_example_logs_etl(tmp_path: Path) -> None:
    r = bp("run", PIPELINES / "logs_etl.py", "--procs", 2, cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "40 log files" in r.stdout
    summary = json.loads((tmp_path / "logs_summary.json").read_text())
    assert summary["files"] == 40 and summary["failed_files"] == []
    assert summary["requests"] == 40 * 5000
    assert sum(summary["status"].values()) == summary["requests"]
    assert 0 < summary["error_rate"] < 0.1
    assert len(list((tmp_path / ".batchpool" / "logs-demo").glob("*.log"))) == 40


@pytest.mark.parametrize("start_method", START_METHODS)
def test_example_flaky(tmp_path: Path, start_method: str) -> None:
    """Under each start method: the crash and timeout markers are files, not process state."""
    r = bp(
        "run",
        PIPELINES / "flaky.py",
        "--procs",
        2,
        "--start-method",
        start_method,
        "--report",
        "r.json",
        cwd=tmp_path,
        timeout=90,
    )
    assert r.returncode == 1, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["succeeded"], report["failed"]) == (21, 3)
    metrics = report["metrics"]
    assert metrics["timed_out"] == 1 and metrics["crashed"] == 1 and metrics["retried"] >= 10
    r = bp("results", ".batchpool/flaky.sqlite", "--failed", cwd=tmp_path)
    failed = {x["index"]: x for x in jsonl(r.stdout)}
    assert sorted(failed) == [7, 13, 19]
    assert failed[7]["attempts"] == 1 and failed[7]["error"]["type"] == "PermanentError"
    assert failed[13]["attempts"] == 4 and failed[13]["error"]["type"] == "ValueError"


# -- a slow or blocking source -----------------------------------------------------------------

SLOW_SOURCE_PY = """
import os
import time

from faults import append_line

from batchpool import Pipeline, Task


class Stamp(Task):
    def run(self, n):
        if os.environ.get("BP_STARTED"):
            append_line(os.environ["BP_STARTED"], str(n))
        sleeps = os.environ.get("BP_JOB_SLEEP", "").split(",")
        if n < len(sleeps) and sleeps[n]:
            time.sleep(float(sleeps[n]))
        return time.time()


def source():
    quick = int(os.environ.get("BP_QUICK", "0"))  # items yielded before the sleeps begin
    for n in range(int(os.environ["BP_N"])):
        yield n
        if n + 1 >= quick:
            time.sleep(float(os.environ["BP_SLEEP"]))


pipeline = Pipeline(source, Stamp(), name="slow")
"""


def test_slow_source_feeds_workers_as_items_arrive(tmp_path: Path) -> None:
    """Items of a slow source run as they come, not once a batch of them is read."""
    path = write(tmp_path / "slow.py", SLOW_SOURCE_PY)
    begun = time.time()
    done = bp(
        "run",
        path,
        "--procs",
        "2",
        "--output",
        "out.jsonl",
        cwd=tmp_path,
        env=environ(BP_N=10, BP_SLEEP=0.2),
    )
    assert done.returncode == 0, done.stderr
    stamps = [
        json.loads(line)["value"] for line in (tmp_path / "out.jsonl").read_text().splitlines()
    ]
    # The source yields an item every 0.2 s: run as they come, the last items run ~0.2 s apart
    # (read in a batch, they would run together at the end). Worker start-up, slow on a busy
    # machine, may bunch the first ones, never the last.
    assert stamps[-1] - stamps[-4] > 0.3, stamps
    assert stamps[0] >= begun


def test_second_signal_leaves_a_blocking_source(tmp_path: Path) -> None:
    """A source blocked for a long time cannot hold a run that got a second signal while a long
    attempt drains: it stops at once. The second signal is a SIGTERM, not another SIGINT: two
    SIGINTs sent back to back may reach the process as one (POSIX does not queue them), and
    the first must stay a drain, which this run would make last a minute."""
    path = write(tmp_path / "slow.py", SLOW_SOURCE_PY)
    journal = tmp_path / ".batchpool" / "slow.sqlite"
    # Job 0 is quick; job 1 sleeps 60 s; then the source blocks for 60 s.
    env = environ(
        BP_N=3, BP_QUICK=2, BP_SLEEP=60, BP_JOB_SLEEP="0,60", BP_STARTED=tmp_path / "started"
    )
    with start("run", path, "--procs", "2", cwd=tmp_path, env=env) as proc:
        wait_for(lambda: committed_indexes(journal) == [0], 30, "the first job recorded")
        wait_for(lambda: "1" in read_lines(tmp_path / "started"), 30, "the long job to start")
        os.killpg(proc.pid, signal.SIGINT)  # drain: job 1 has 60 s to go
        os.killpg(proc.pid, signal.SIGTERM)  # the second: stop now
        begun = time.monotonic()
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - begun
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert took < 10, f"two signals took {took:.1f} s: the run waited for the source or job 1"
    assert committed_indexes(journal) == [0]  # job 1 was cut short: not final, resumable


# -- what a person sees ------------------------------------------------------------------------


def test_progress_bar_on_a_terminal(tmp_path: Path, jobs: Path) -> None:
    code, screen = on_terminal(["run", jobs, "--procs", "2"], tmp_path)
    assert code == 0, screen
    assert "ok=" in screen and "restarts=" in screen and "job/s" in screen  # the tqdm bar
    assert "8 jobs: 8 ok, 0 failed" in screen  # the summary
    code, screen = on_terminal(["run", jobs, "--procs", "2", "--no-progress"], tmp_path)
    assert code == 0 and "ok=" not in screen and "8 jobs: 8 ok" in screen


def test_verbose_logs_retries_and_crashes_with_the_job_index(tmp_path: Path) -> None:
    done = bp("run", PIPELINES / "flaky.py", "--procs", "2", "-v", cwd=tmp_path, timeout=90)
    assert done.returncode == 1, done.stderr
    assert re.search(r"job \d+: attempt 1 failed \(\w+: .*\); retry in", done.stderr)
    assert re.search(r"job \d+: worker \d+ crashed", done.stderr)
    assert re.search(r"job \d+: attempt exceeded its 1 s timeout", done.stderr)
