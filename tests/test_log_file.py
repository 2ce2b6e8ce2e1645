"""``--log-file``: timestamped INFO lines appended whatever the terminal's verbosity, ``-q``
included; and ``--procs MIN:MAX`` from the command line, whose scaling the file records."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from helpers import (
    JOBS_PY,
    PIPELINES_DIR,
    cli,
    environ,
    finish,
    one_line,
    read_lines,
    start_logged,
    wait_for,
    write,
)

pytestmark = pytest.mark.timeout(120)

STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} batchpool\[\d+\] (INFO|WARNING|ERROR) ")
# The test machine is shared: its CPUs may be busy with other work, and then a pool rightly does
# not grow. The pipeline file (loaded in the supervisor's process) counts every CPU as free.
SCALED_PY = "import batchpool.scaling\nbatchpool.scaling.MIN_IDLE_CORES = 0.0\n" + JOBS_PY


def log_lines(path: Path) -> list[str]:
    lines = read_lines(path)
    for line in lines:
        assert STAMP.match(line), f"no timestamp: {line!r}"
    return lines


def having(lines: list[str], *parts: str) -> list[str]:
    return [line for line in lines if all(part in line for part in parts)]


def test_quiet_run_logs_retries_timeouts_crashes_restarts_and_counts(tmp_path: Path) -> None:
    """pipelines/flaky.py under -q: nothing on the terminal but the sink's line; the file has
    the run's start with its settings, each retry, the timeout, the crash, the replacements,
    the failures, and the end with its counts. A second run appends."""
    log = tmp_path / "flaky.log"
    args = ["run", PIPELINES_DIR / "flaky.py", "--procs", 2, "-q", "--log-file", log]
    code, err = cli(*args, cwd=tmp_path, env=environ())
    assert code == 1 and err == "", err
    lines = log_lines(log)
    assert having(lines, "run flaky: started", "procs 2", "retries 3", "timeout 1 s")
    assert len(having(lines, "retry in")) >= 9  # 7 transient payloads, the timeout, the crash
    assert having(lines, "job 11", "timeout", "killed")
    assert having(lines, "job 16", "crashed")
    assert len(having(lines, "WARNING", "replaces worker")) == 0
    assert len(having(lines, "INFO", "replaces worker")) >= 2  # after the timeout and the crash
    assert len(having(lines, "failed for good")) == 3
    assert having(lines, "run flaky: ended", "21 ok, 3 failed, 0 skipped", "1 timeouts")
    code, _ = cli(*args, "--fresh", cwd=tmp_path, env=environ())
    assert code == 1
    assert len(having(log_lines(log), "run flaky: started")) == 2


@pytest.mark.timeout(150)
def test_procs_min_max_scales_up_logs_it_and_a_signal(tmp_path: Path) -> None:
    """``--procs 1:3``: one worker, then more under the backlog, each event one line in the
    file; SIGTERM drains (exit 143), and the file says so, all under -q."""
    write(tmp_path / "scaled.py", SCALED_PY)
    log = tmp_path / "run.log"
    env = environ(BP_N=60, BP_SLEEP=0.2)
    args = ["run", "scaled.py", "--procs", "1:3", "--idle-timeout", "0.5", "-q"]
    with start_logged(*args, "--log-file", log, cwd=tmp_path, env=env) as proc:
        scaled = lambda: len(having(read_lines(log), "scaling: worker", "started")) == 2  # noqa: E731
        wait_for(scaled, 60, "two scale-ups in the log")
        os.killpg(proc.pid, signal.SIGTERM)
        code, err = finish(proc, tmp_path)
    assert code == 143 and err == "", err
    lines = log_lines(log)
    assert having(lines, "run jobs: started", "procs 1:3 (idle timeout 0.5 s)")
    ups = having(lines, "INFO", "scaling: worker")
    assert len(ups) == 2 and all("jobs waiting, all workers busy" in line for line in ups)
    assert having(lines, "SIGTERM received")
    assert having(lines, "run jobs: ended", "scaled up 2", "stopped by SIGTERM")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--procs", "3:1"], "MIN <= MAX"),
        (["--procs", "0:2"], "at least 1"),
        (["--procs", "x"], "not a number of workers"),
        (["--procs", "1:"], "not a number of workers"),
        (["--procs", "2", "--idle-timeout", "1"], "--idle-timeout is for --procs MIN:MAX"),
        (["--procs", "1:2", "--idle-timeout", "0"], "--idle-timeout"),
        (["--log-file", "no-such-dir/run.log"], "cannot write --log-file no-such-dir/run.log"),
        (["--log-file", "."], "is a directory"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    tmp_path: Path, jobs: Path, args: list[str], expected: str
) -> None:
    code, err = cli("run", jobs, *args, cwd=tmp_path, env=environ(BP_N=2))
    assert code == 2, err
    assert expected in one_line(err)
    assert not (tmp_path / ".batchpool").exists()  # refused before a journal was made
