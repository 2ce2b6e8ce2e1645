"""How a pipeline run fails: a sink or a source that raises (anything), stages or sources that
changed since the journal was written, workers that cannot start. The real ``batchpool run``
CLI in child processes, on pipeline files written by the tests, with real SQLite journals.
"""

from __future__ import annotations

import json
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
    env = {**os.environ, "STAGES": "two", "STOP_AT": "5"}
    done = bp(*run, cwd=tmp_path, env=env)
    assert done.returncode == 1 and "stop here" in done.stderr, done.stderr
    before = rows(journal)
    assert 0 < len(before) < 300
    for stages in ("three", "other"):  # another list of tasks; a task with another attribute
        done = bp(*run, "--resume", cwd=tmp_path, env={**os.environ, "STAGES": stages})
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
    done = bp(*run, "--fresh", cwd=tmp_path, env={**os.environ, "STAGES": "three"})
    assert done.returncode == 0, done.stderr
