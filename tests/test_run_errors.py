"""How a pipeline run fails: a sink or a source that raises (anything), stages or sources that
changed since the journal was written, workers that cannot start. The real ``batchpool run``
CLI in child processes, on pipeline files written by the tests, with real SQLite journals.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-c", "from batchpool.cli import main; main(prog_name='batchpool')"]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def bp(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=cwd,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=90,
    )


def rows(journal: Path) -> dict[int, str]:
    """index -> status of each final row, read without batchpool."""
    with closing(sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        sql = "SELECT idx, status FROM jobs WHERE status IS NOT NULL"
        return dict(conn.execute(sql).fetchall())


def meta(journal: Path) -> dict[str, object]:
    with closing(sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr


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
    assert meta(tmp_path / ".batchpool" / "exiting.sqlite")["state"] == "unfinished"
