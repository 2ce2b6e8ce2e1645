"""The Python API of pipelines: sources, streamed stages, the sink, stops on source or sink
errors, the journal (resume, changed sources) and the run report. Real worker processes.

Task classes live at module level so that workers started by forkserver or spawn unpickle them
by reference (pytest puts tests/ on sys.path, and children inherit it). Side effects that must
survive process boundaries (runs, timestamps) go to files under tmp_path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faults import Square, append_line
from helpers import read_lines

from batchpool import JobResult, Pipeline, RunReport, Task
from batchpool.journal import Journal, JournalError
from batchpool.pipeline import ReplayedResult, SourceChangedError, UnfinishedRunError

pytestmark = pytest.mark.timeout(90)

PROCS = 2


# -- tasks (module level: picklable by reference) -------------------------------------------------


class Stamped(Task):
    """Stage with timestamps: appends ``stage n start end`` (wall clock) to ``log``."""

    retries = 0

    def __init__(self, log: str, stage: int, delay: float) -> None:
        self.log = log
        self.stage = stage
        self.delay = delay

    def run(self, payload):
        start = time.time()
        time.sleep(self.delay)
        n = payload if self.stage == 1 else payload[0]
        append_line(self.log, f"{self.stage} {n} {start!r} {time.time()!r}")
        return (n, n * 10) if self.stage == 1 else payload[1] + 1


class Started(Task):
    """Creates ``started-N`` in ``folder`` when it begins, then sleeps ``delay``."""

    retries = 0

    def __init__(self, folder: str, delay: float) -> None:
        self.folder = folder
        self.delay = delay

    def run(self, n: int) -> int:
        Path(self.folder, f"started-{n}").touch()
        time.sleep(self.delay)
        return n


class Collect:
    """A sink that keeps what it gets (it runs in this process) and may raise at call k."""

    def __init__(self, raise_at: int | None = None) -> None:
        self.results: list[JobResult] = []
        self.raise_at = raise_at

    def __call__(self, result: JobResult) -> None:
        self.results.append(result)
        if self.raise_at is not None and len(self.results) == self.raise_at:
            raise RuntimeError(f"sink refused result #{self.raise_at}")


def journal_rows(path: Path) -> list[dict]:
    with Journal.open_readonly(path) as book:
        return list(book.rows())


# -- sources and stages -----------------------------------------------------------------------


def test_list_source_and_sink_gets_each_result(tmp_path: Path) -> None:
    sink = Collect()
    pipe = Pipeline(list(range(20)), Square(), name="squares", sink=sink)
    report = pipe.run(PROCS, journal=tmp_path / "j.sqlite", progress=False)
    assert isinstance(report, RunReport)
    assert (report.succeeded, report.failed, report.interrupted) == (20, 0, False)
    assert report.stopped_by is None and report.error is None
    assert sorted(r.index for r in sink.results) == list(range(20))
    assert all(r.ok and r.value == r.index**2 and r.attempts == 1 for r in sink.results)
    rows = journal_rows(tmp_path / "j.sqlite")
    assert [(r["index"], r["value"]) for r in rows] == [(i, i * i) for i in range(20)]


def test_callable_source_is_called_at_run(tmp_path: Path) -> None:
    calls = []

    def source():
        calls.append(time.monotonic())
        yield from range(7)

    sink = Collect()
    pipe = Pipeline(source, Square(), name="gen", sink=sink)
    assert calls == []  # not when the pipeline is built
    report = pipe.run(PROCS, journal=None, progress=False)
    assert len(calls) == 1
    assert report.succeeded == 7
    assert sorted(r.value for r in sink.results) == [i * i for i in range(7)]


def test_two_stages_stream(tmp_path: Path) -> None:
    """Stage 2 starts while stage 1 still runs; stage 1's value is stage 2's payload."""
    log = str(tmp_path / "stamps.log")
    n = 16
    sink = Collect()
    pipe = Pipeline(
        list(range(n)),
        Stamped(log, 1, delay=0.15),
        Stamped(log, 2, delay=0.01),
        name="stream",
        sink=sink,
    )
    report = pipe.run(PROCS, journal=None, progress=False)
    assert report.succeeded == n
    assert sorted((r.index, r.value) for r in sink.results) == [(i, i * 10 + 1) for i in range(n)]
    stamps = [line.split() for line in read_lines(log)]
    stage1_ends = [float(s[3]) for s in stamps if s[0] == "1"]
    stage2_starts = [float(s[2]) for s in stamps if s[0] == "2"]
    assert len(stage1_ends) == n and len(stage2_starts) == n
    assert min(stage2_starts) < max(stage1_ends), "stage 2 waited for the whole of stage 1"


def test_failure_in_stage_one_stops_there(tmp_path: Path) -> None:
    stage2_runs = str(tmp_path / "stage2.runs")
    sink = Collect()
    pipe = Pipeline(
        list(range(8)),
        Square(fail=frozenset({3, 5})),
        Square(runs=stage2_runs),
        name="stops",
        sink=sink,
    )
    report = pipe.run(PROCS, journal=tmp_path / "j.sqlite", progress=False)
    assert (report.succeeded, report.failed) == (6, 2)
    assert sorted(r.index for r in report.failures) == [3, 5]
    for failure in report.failures:
        assert failure.error.type == "PermanentError" and failure.attempts == 1
    # Stage 2 got the squares of the others, never anything from 3 or 5.
    assert sorted(int(x) for x in read_lines(stage2_runs)) == sorted(
        i * i for i in range(8) if i not in (3, 5)
    )
    by_index = {r.index: r for r in sink.results}
    assert sorted(by_index) == list(range(8))  # the sink sees failed jobs too
    assert not by_index[3].ok and by_index[4].value == 4**4


# -- stops ------------------------------------------------------------------------------------


def test_source_that_raises_stops_the_run(tmp_path: Path) -> None:
    folder = tmp_path / "marks"
    folder.mkdir()

    def source():
        # Yield until a job has begun, then fail: that job is in flight when the source raises.
        deadline = time.monotonic() + 30
        i = 0
        while not any(folder.glob("started-*")):
            if time.monotonic() > deadline:
                break
            yield i
            i += 1
            if i >= 64:
                time.sleep(0.01)  # a slow source from here on
        raise OSError("the source's disk went away")

    sink = Collect()
    journal = tmp_path / "j.sqlite"
    pipe = Pipeline(source, Started(str(folder), delay=0.4), name="badsource", sink=sink)
    report = pipe.run(PROCS, journal=journal, progress=False)
    assert report.stopped_by == "source"
    assert report.interrupted
    assert "Traceback" in report.error and "OSError: the source's disk went away" in report.error
    started = {int(p.name.split("-")[1]) for p in folder.glob("started-*")}
    rows = journal_rows(journal)
    # The attempts in flight when the source failed were drained into the journal.
    assert rows, "no in-flight result was recorded"
    assert {r["index"] for r in rows} <= started
    assert {r["index"] for r in rows} == {r.index for r in sink.results}
    assert report.succeeded == len(rows)
    # The journal is left unfinished: a plain run refuses, naming both ways on.
    with pytest.raises(UnfinishedRunError, match="--resume.*--fresh"):
        pipe.run(PROCS, journal=journal, progress=False)


def test_sink_that_raises_stops_the_run(tmp_path: Path) -> None:
    sink = Collect(raise_at=3)
    journal = tmp_path / "j.sqlite"
    pipe = Pipeline(list(range(40)), Square(delay=0.05), name="badsink", sink=sink)
    report = pipe.run(PROCS, journal=journal, progress=False)
    assert report.stopped_by == "sink"
    assert report.interrupted
    assert "Traceback" in report.error and "sink refused result #3" in report.error
    assert len(sink.results) == 3  # not called again once it failed
    rows = journal_rows(journal)
    assert len(rows) >= 3 and report.succeeded == len(rows) < 40


def test_report_to_dict_is_json(tmp_path: Path) -> None:
    pipe = Pipeline(list(range(6)), Square(fail=frozenset({1})), name="report")
    report = pipe.run(PROCS, journal=None, progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["succeeded"], data["failed"], data["interrupted"]) == (5, 1, False)
    assert data["metrics"]["submitted"] == 6
    assert data["failures"][0]["index"] == 1
    assert data["failures"][0]["error"]["type"] == "PermanentError"


def test_report_elapsed_is_the_run_s_wall_time() -> None:
    """8 jobs of 0.2 s on 2 workers cannot take less than 0.8 s, nor more than the call."""
    pipe = Pipeline(list(range(8)), Square(delay=0.2), name="timed")
    begun = time.monotonic()
    report = pipe.run(PROCS, journal=None, progress=False)
    wall = time.monotonic() - begun
    assert report.succeeded == 8
    assert 8 * 0.2 / PROCS <= report.elapsed <= wall < 60
    assert report.to_dict()["elapsed"] == report.elapsed


# -- journal ----------------------------------------------------------------------------------


def interrupted_run(tmp_path: Path, payloads: list, runs: str) -> tuple[Path, set[int]]:
    """A run stopped by its sink after a few results: its journal is left unfinished."""
    journal = tmp_path / "j.sqlite"
    pipe = Pipeline(payloads, Square(runs=runs, delay=0.05), name="resumable", sink=Collect(4))
    report = pipe.run(PROCS, journal=journal, progress=False)
    assert report.stopped_by == "sink"
    recorded = {r["index"] for r in journal_rows(journal)}
    assert 4 <= len(recorded) < len(payloads)
    return journal, recorded


def test_resume_skips_finished_jobs(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    payloads = list(range(30))
    journal, recorded = interrupted_run(tmp_path, payloads, runs)
    ran_before = len(read_lines(runs))

    sink = Collect()
    # The same stages (a resume refuses others: test_run_errors.py).
    pipe = Pipeline(payloads, Square(runs=runs, delay=0.05), name="resumable", sink=sink)
    with pytest.raises(UnfinishedRunError):
        pipe.run(PROCS, journal=journal, progress=False)
    report = pipe.run(PROCS, journal=journal, resume=True, progress=False)
    assert (report.succeeded, report.failed, report.interrupted) == (30, 0, False)
    assert report.skipped == len(recorded)
    ran_after = {int(x) for x in read_lines(runs)[ran_before:]}
    assert not ran_after & recorded, "jobs recorded as final ran again"
    assert ran_after == set(payloads) - recorded
    # The sink gets the new results, and the recorded ones replayed, in index order.
    live = [r for r in sink.results if not isinstance(r, ReplayedResult)]
    replayed = [r for r in sink.results if isinstance(r, ReplayedResult)]
    assert {r.index for r in live} == set(payloads) - recorded
    assert [r.index for r in replayed] == sorted(recorded)
    assert all(r.replayed and r.payload == r.index for r in replayed)
    assert all(r.ok and r.value == r.index**2 and r.attempts == 1 for r in replayed)
    rows = journal_rows(journal)
    assert [r["index"] for r in rows] == payloads
    assert all(r["value"] == r["index"] ** 2 for r in rows)


def test_changed_source_is_refused(tmp_path: Path) -> None:
    payloads = list(range(30))
    runs = str(tmp_path / "runs")
    journal, recorded = interrupted_run(tmp_path, payloads, runs)
    changed_at = max(recorded)
    changed = list(payloads)
    changed[changed_at] = "something else"
    pipe = Pipeline(changed, Square(runs=runs, delay=0.05), name="resumable")
    with pytest.raises(SourceChangedError) as info:
        pipe.run(PROCS, journal=journal, resume=True, progress=False)
    assert isinstance(info.value, JournalError)
    assert info.value.index == changed_at
    assert f"index {changed_at}" in str(info.value)


def test_no_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pipe = Pipeline(list(range(5)), Square(), name="nojournal")
    report = pipe.run(PROCS, journal=None, progress=False)
    assert report.succeeded == 5 and report.journal is None
    assert not (tmp_path / ".batchpool").exists()
    # --output without a journal still works (a temporary one backs it).
    out = tmp_path / "out.jsonl"
    report = pipe.run(PROCS, journal=None, progress=False, output=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["index"], x["value"]) for x in lines] == [(i, i * i) for i in range(5)]
    assert not (tmp_path / ".batchpool").exists()


def test_default_journal_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    report = Pipeline(list(range(3)), Square(), name="located").run(PROCS, progress=False)
    assert report.succeeded == 3
    assert (tmp_path / ".batchpool" / "located.sqlite").is_file()
