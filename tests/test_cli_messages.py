"""What the ``batchpool`` command says when something is wrong, and what it writes: refusals
before any job runs (one line, exit 2), reports and exports that survive odd values, the
summary's next steps, and the logging levels. Real CLI and script subprocesses throughout."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI, bp, environ, one_line, run, run_reported, start, wait_for, write

pytestmark = pytest.mark.timeout(90)

# -- output files that cannot be written: refused before the first job -----------------------


@pytest.mark.parametrize(
    "option, path, expected",
    [
        ("--output", "no-such-dir/out.jsonl", "does not exist"),
        ("--report", "plain-file/report.json", "is not a directory"),
        ("--report", "/proc/report.json", "cannot write"),  # unwritable even for root
    ],
)
def test_unwritable_output_is_refused_before_any_job(
    tmp_path: Path, jobs: Path, option: str, path: str, expected: str
) -> None:
    (tmp_path / "plain-file").write_text("a file, not a directory\n")
    runs = tmp_path / "runs.txt"
    r = bp("run", jobs, "--procs", 1, option, path, cwd=tmp_path, env=environ(BP_RUNS=runs))
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, strict=True)
    assert line.startswith(f"batchpool: {option} {path}") and expected in line
    assert not runs.exists(), "a job ran before the refusal"


# -- reports and exports that survive odd values ---------------------------------------------

ODD_PY = """
import math

from batchpool import PermanentError, Pipeline, Task


class NoRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")


def deep(levels):
    x = []
    for _ in range(levels):
        x = [x]
    return x


class Odd(Task):
    retries = 0

    def run(self, n):
        if n < 2:
            raise PermanentError("bad payload")
        return [math.nan, math.inf, -math.inf, True, None, "text", 1.5][n - 2]


pipeline = Pipeline(lambda: [NoRepr(), deep(20000), *range(2, 9)], Odd(), name="odd")
"""


def test_report_and_output_with_unrepresentable_and_non_finite_values(tmp_path: Path) -> None:
    """A payload whose repr() raises and one nested 20,000 deep still give a report; NaN and
    infinities are JSON strings, never bare NaN/Infinity."""
    pipe = write(tmp_path / "odd.py", ODD_PY)
    r = bp(
        "run",
        pipe,
        "--procs",
        1,
        "--report",
        "report.json",
        "--output",
        "out.jsonl",
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    report = strict((tmp_path / "report.json").read_text())
    payloads = {f["index"]: f["payload"] for f in report["failures"]}
    assert sorted(payloads) == [0, 1]
    assert "NoRepr" in payloads[0] and "RuntimeError" in payloads[0]
    assert payloads[1].startswith("[[[") and len(payloads[1]) <= 1000
    lines = [strict(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    values = [x["value"] for x in lines[2:]]
    assert values == ["NaN", "Infinity", "-Infinity", True, None, "text", 1.5]


def test_results_csv_booleans_none_and_a_surrogate(tmp_path: Path) -> None:
    """CSV: ok is true/false, a value is JSON text (empty when none), and a lone surrogate in
    an error message is escaped instead of ending the export halfway."""
    pipe = write(
        tmp_path / "csvjobs.py",
        """
        from batchpool import PermanentError, Pipeline, Task


        class Mixed(Task):
            retries = 0

            def run(self, n):
                if n % 3 == 0:
                    raise PermanentError("bad byte \\udcff in record %d" % n)
                return [True, None, "x", 2.5][n % 4]


        pipeline = Pipeline(list(range(14)), Mixed(), name="csvjobs")
        """,
    )
    r = bp("run", pipe, "--procs", 1, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    r = subprocess.run(
        [*CLI, "results", ".batchpool/csvjobs.sqlite", "--format", "csv"],
        cwd=tmp_path,
        env=environ(),
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout.decode("utf-8"))))
    assert len(rows) == 15, rows  # the header and all 14 jobs
    by_index = {int(row[0]): row for row in rows[1:]}
    assert by_index[3][1:3] == ["false", ""]
    assert by_index[3][5] == "bad byte \\udcff in record 3"
    assert by_index[4][1:3] == ["true", "true"]
    assert by_index[1][1:3] == ["true", ""]  # a value of None
    assert by_index[2][1:3] == ["true", '"x"']
    assert by_index[7][1:3] == ["true", "2.5"]
    assert {row[1] for row in rows[1:]} == {"true", "false"}


def test_results_help_documents_format(tmp_path: Path) -> None:
    r = bp("results", "--help", cwd=tmp_path)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--format [jsonl|csv] jsonl: one JSON object per job" in text
    assert "csv: a header" in text and "true/false" in text


# -- a pipeline file or script that cannot work ------------------------------------------------


def test_load_error_names_the_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path / "pipe.py",
        """
        from batchpool import Pipeline, Task


        class Double(Task):
            def run(self, n):
                return 2 * n
        pipeline = Pipeline(range(4), Doubel())
        """,
    )
    r = bp("run", "pipe.py", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr, strict=True) == (
        "batchpool: error loading pipe.py:8: NameError: name 'Doubel' is not defined"
    )


def test_load_error_raised_in_an_imported_module(tmp_path: Path) -> None:
    write(tmp_path / "helper.py", "import os\nCONFIG = os.environ['NO_SUCH_VARIABLE']\n")
    write(tmp_path / "pipe.py", "import sys\nimport helper\n")
    r = bp("run", "pipe.py", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, strict=True)
    assert "pipe.py:2 (raised at " in line and "KeyError: 'NO_SUCH_VARIABLE'" in line


GUARDED_TASK_PY = """
import sys

from batchpool import Pipeline, Task

if __name__ == "__main__":

    class Double(Task):
        def run(self, n):
            return 2 * n

    report = Pipeline(range(4), Double()).run(
        procs=1, journal=None, progress=False, start_method=sys.argv[1]
    )
    print("ok", report.succeeded)
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_task_class_under_main_guard_is_refused(tmp_path: Path, method: str) -> None:
    """Before any worker starts: such a class does not exist in the workers."""
    script = write(tmp_path / "guarded.py", GUARDED_TASK_PY)
    r = run([sys.executable, script, method], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, strict=True)
    assert line.startswith("batchpool: guarded.py:8: task class Double is defined under")
    assert "define task classes at module level" in line and method in line


def test_task_class_under_main_guard_works_with_fork(tmp_path: Path) -> None:
    script = write(tmp_path / "guarded.py", GUARDED_TASK_PY)
    r = run([sys.executable, script, "fork"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok 4"


def test_script_without_main_guard_gets_one_line(tmp_path: Path) -> None:
    """Not multiprocessing's bootstrapping error once per worker start: one line, at once."""
    script = write(
        tmp_path / "noguard.py",
        """
        from batchpool import Pipeline, Task


        class Double(Task):
            def run(self, n):
                return 2 * n


        pipeline = Pipeline(range(4), Double(), name="noguard")
        report = pipeline.run(procs=2, journal=None, progress=False)
        print(report.succeeded)
        """,
    )
    r = run([sys.executable, script], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, strict=True)
    assert line.startswith("batchpool: noguard.py:11: the run starts when noguard.py is imported")
    assert 'under `if __name__ == "__main__":`' in line


# -- option values --------------------------------------------------------------------------


@pytest.mark.parametrize("size, hint", [("10", "10MB"), ("512K", "512MB"), ("0.5MB", "0.5MB")])
def test_max_memory_under_1mb_is_refused(tmp_path: Path, jobs: Path, size: str, hint: str) -> None:
    r = bp("run", jobs, "--max-memory", size, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, strict=True)
    assert line.startswith("batchpool: Invalid value for '--max-memory'")
    assert f"did you mean {hint}?" in line


def test_max_memory_of_a_megabyte_or_more_runs(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 1, "--max-memory", "1GB", cwd=tmp_path, env=environ(BP_N=2))
    assert r.returncode == 0, r.stderr


def test_quiet_and_verbose_exclude_each_other(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "-q", "-v", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr, strict=True).startswith("batchpool: -q and -v exclude each other")


@pytest.mark.parametrize(
    "args",
    [
        ["run"],  # missing argument
        ["run", "jobs.py", "--bogus"],  # unknown option
        ["run", "jobs.py", "--procs", "zero"],  # bad value
        ["run", "jobs.py", "--fresh", "--resume"],  # the command's own refusal
        ["run", "missing.py"],  # a loading error
        ["nosuchcommand"],
        ["results", "missing.sqlite"],
    ],
)
def test_every_error_has_the_same_prefix(tmp_path: Path, jobs: Path, args: list[str]) -> None:
    r = bp(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr, strict=True).startswith("batchpool: ")
    assert "Error:" not in r.stderr and "Usage:" not in r.stderr


def test_python_dash_m_runs_the_command(tmp_path: Path) -> None:
    r = run([sys.executable, "-m", "batchpool.cli", "--version"], cwd=tmp_path)
    assert r.returncode == 0 and "batchpool" in r.stdout


# -- logging levels ---------------------------------------------------------------------------


def test_verbose_logs_each_final_failure_with_its_index(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 2, "-v", cwd=tmp_path, env=environ(BP_FAIL="1,4"))
    assert r.returncode == 1, r.stderr
    for n in (1, 4):
        assert (
            f"batchpool: job {n} failed after 1 attempt(s): PermanentError: payload {n} refused"
        ) in r.stderr
    assert "job 0: ok" not in r.stderr  # -v: failures only


def test_double_verbose_adds_results_and_pool_state(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 2, "-vv", cwd=tmp_path, env=environ(BP_N=3))
    assert r.returncode == 0, r.stderr
    for n in range(3):
        assert f"batchpool: job {n}: ok after 1 attempt(s)" in r.stderr
    assert "batchpool: pool: " in r.stderr and " queued, " in r.stderr


# -- the summary's next steps -------------------------------------------------------------------


def test_summary_after_failures_names_the_results_command(tmp_path: Path, jobs: Path) -> None:
    r = bp("run", jobs, "--procs", 2, cwd=tmp_path, env=environ(BP_FAIL="2"))
    assert r.returncode == 1, r.stderr
    assert "failed jobs: batchpool results .batchpool/jobs.sqlite --failed" in r.stderr
    assert "--resume" not in r.stderr  # the run is complete


def test_summary_after_an_interrupt_names_resume(tmp_path: Path, jobs: Path) -> None:
    journal = tmp_path / "my journal.sqlite"
    runs = tmp_path / "runs.txt"
    env = environ(BP_N=20, BP_SLEEP=0.2, BP_RUNS=runs)
    with start("run", jobs, "--procs", 1, "--journal", journal, cwd=tmp_path, env=env) as proc:
        wait_for(lambda: runs.exists() and runs.read_text().count("\n") >= 2, 30, "two jobs")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"continue with: batchpool run {jobs} --journal '{journal}' --resume" in err


def test_no_journal_names_no_journal(tmp_path: Path, jobs: Path) -> None:
    """--no-journal with --output runs on a temporary journal: never named, it is gone."""
    r = run_reported(jobs, "--no-journal", cwd=tmp_path, env=environ(BP_N=6, BP_FAIL="1"))
    assert r.returncode == 1, r.stderr
    assert "journal" not in r.stderr and "batchpool results" not in r.stderr
    assert json.loads((tmp_path / "report.json").read_text())["journal"] is None
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 6
