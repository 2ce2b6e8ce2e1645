"""Pipeline.run() from Python: Ctrl-C drains then raises KeyboardInterrupt (as Pool.map does),
``fresh=`` and ``retry_failed=``, and default journal names that keep two unnamed pipelines of
one file apart (from Python and from the CLI alike). Real child interpreters, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bp, child_env, final_rows, group_alive, launch, run, wait_for, write

pytestmark = pytest.mark.timeout(90)

SCRIPT_PY = """
import os
import sys
import time

from faults import append_line

from batchpool import PermanentError, Pipeline, Task


class Work(Task):
    retries = 0

    def run(self, n):
        append_line("runs.log", str(n))
        time.sleep(float(os.environ.get("SLEEP", "0")))
        if n in (3, 4) and os.path.exists("fail"):
            raise PermanentError(f"{n} refused")
        return n * n


pipeline = Pipeline(list(range(12)), Work())
other = Pipeline(list(range(5)), Work())


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "interrupt":
        try:
            pipeline.run(2, progress=False)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            raise
        print("returned", flush=True)
    else:
        for pipe in (pipeline, other):
            report = pipe.run(2, progress=False, **{what: True} if what != "plain" else {})
            print(report.journal, report.succeeded, report.failed, report.skipped, flush=True)
"""


def write_script(folder: Path) -> Path:
    return write(folder / "script.py", SCRIPT_PY)


def python(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "script.py", *args], cwd=folder, env=child_env(**env))


def runs(folder: Path) -> list[int]:
    try:
        return [int(x) for x in (folder / "runs.log").read_text().split()]
    except FileNotFoundError:
        return []


def test_ctrl_c_drains_then_raises_keyboard_interrupt(tmp_path: Path) -> None:
    write_script(tmp_path)
    argv = [sys.executable, "script.py", "interrupt"]
    with launch(argv, cwd=tmp_path, env=child_env(SLEEP="0.5")) as proc:
        wait_for(lambda: len(runs(tmp_path)) >= 2 or proc.poll() is not None, 60, "jobs")
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        out, err = proc.communicate(timeout=60)
    assert out == "KeyboardInterrupt\n", (out, err)
    assert proc.returncode == -signal.SIGINT, err  # re-raised to the top, as Python does
    assert "finishing" in err and "Ctrl-C again to stop now" in err, err
    wait_for(lambda: not group_alive(proc.pid), 15, "the script's processes")
    (journal,) = (tmp_path / ".batchpool").glob("*.sqlite")
    drained = final_rows(journal)
    assert drained and set(drained.values()) == {"ok"}, "the attempts in flight were not kept"


def test_retry_failed_and_fresh_from_python(tmp_path: Path) -> None:
    write_script(tmp_path)
    (tmp_path / "fail").touch()
    done = python(tmp_path, "plain")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ".batchpool/script.sqlite 10 2 0"
    (tmp_path / "fail").unlink()
    before = len(runs(tmp_path))
    done = python(tmp_path, "retry_failed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ".batchpool/script.sqlite 12 0 10"
    assert sorted(runs(tmp_path)[before:]) == [3, 3, 4, 4]  # the failed ones of both
    before = len(runs(tmp_path))
    done = python(tmp_path, "fresh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ".batchpool/script.sqlite 12 0 0"
    assert sorted(runs(tmp_path)[before:]) == sorted([*range(12), *range(5)])


def test_two_unnamed_pipelines_of_one_file_keep_two_journals(tmp_path: Path) -> None:
    write_script(tmp_path)
    done = python(tmp_path, "plain")  # from Python: named after the file and the attribute
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        ".batchpool/script.sqlite 12 0 0",
        ".batchpool/script-other.sqlite 5 0 0",
    ]
    env = child_env(SLEEP="0")
    for spec, journal, n in (("script.py", "script", 12), ("script.py:other", "script-other", 5)):
        done = bp("run", spec, "--procs", "2", "--no-progress", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert f"journal: .batchpool/{journal}.sqlite" in done.stderr
        assert len(final_rows(tmp_path / ".batchpool" / f"{journal}.sqlite")) == n
