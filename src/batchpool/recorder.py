"""Recording a run's final results: the journal first, then the sink once the journal has
committed them, so that a result never reaches the sink twice, whatever kills the run; and
replays, to a resumed run's sink, of what earlier runs recorded.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .journal import JournalError, JournalWriter, Outcome, fingerprint
from .progress import Progress
from .report import AttemptTimes
from .results import JobError, JobResult
from .stopping import Halt, HardStop

MAX_FAILURES_KEPT = 1000  # RunReport.failures keeps the first ones; counts stay exact


@dataclass(frozen=True)
class ReplayedResult(JobResult):
    """A result recorded by an earlier run, rebuilt from the journal for a resumed run's sink.

    The sink of a resumed run gets these too, so that it ends with the same data as an
    uninterrupted run's; ``replayed`` tells it this one is not new (a sink with side effects
    outside the process, like appending to a file, skips them). The value is the object the
    job returned (the journal keeps it pickled while a sink is set), or its JSON form for
    results recorded without a sink.
    """

    replayed: ClassVar[bool] = True


class Recorder:
    """Counts, journals and sinks each final result of a run.

    A journal or sink failure stops the run (``halt``); the sink is not called again in that
    run, nor after a signal: the drain waits only for the attempts in flight, never for a slow
    sink's backlog (a resume replays what it missed).
    """

    def __init__(
        self,
        journal: JournalWriter | None,
        sink: Callable[[JobResult], Any] | None,
        halt: Halt,
        progress: Progress,
    ) -> None:
        self.journal = journal
        self.sink = sink
        self.halt = halt
        self.progress = progress
        self.succeeded = self.failed = self.skipped = 0
        self.failures: list[JobResult] = []
        self.times = AttemptTimes()
        self.unsunk: list[JobResult] = []  # journaled, not committed yet: the sink waits
        if journal is not None:
            journal.keep_values = sink is not None  # for replays to a later run's sink

    def final(self, result: JobResult) -> None:
        """A job's final result: counted, shown, buffered in the journal; sunk once committed."""
        if result.ok:
            self.succeeded += 1
        else:
            self.failed += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(result)
        self.times.add(result.elapsed)
        self.progress.update(result)
        if self.sink is not None:
            self.unsunk.append(result)
        if self.journal is not None:
            try:
                self.journal.add_final(
                    result.index,
                    fingerprint(result.payload),
                    ok=result.ok,
                    value=result.value,
                    error=result.error.to_dict() if result.error else None,
                    attempts=result.attempts,
                    worker=result.worker,
                    elapsed=result.elapsed,
                )
            except JournalError as exc:  # an automatic commit failed: the rows stay buffered
                self.halt.first("journal", str(exc))
                return
        self._sink_committed()

    def skip(self, index: int, payload: Any, *, ok: bool) -> None:
        """A job an earlier run recorded as final: not run again; its outcome is replayed."""
        self.skipped += 1
        self.progress.skip(ok)
        self._replay(index, payload)

    def commit(self, *, force: bool) -> None:
        """Commit the journal's buffer when due (``force``: now), then hand the results it
        held to the sink: a result reaches the sink only once it is durable, so a resume after
        any kill never hands it over a second time."""
        if self.journal is not None:
            try:
                if force:
                    self.journal.flush()
                else:
                    self.journal.maybe_flush()
            except JournalError as exc:
                self.halt.first("journal", str(exc))
                return
        self._sink_committed()

    def _sink_committed(self) -> None:
        if not self.unsunk or (self.journal is not None and self.journal.buffered):
            return
        results, self.unsunk = self.unsunk, []
        for result in results:
            self._sink(result)

    def _replay(self, index: int, payload: Any) -> None:
        """Hand the sink the outcome an earlier run recorded for ``index``."""
        if self.journal is None or self.sink is None:  # (a skipped job implies a journal)
            return
        if self.halt.stopped_by == "sink" or self.halt.signalled():
            return
        try:
            row = self.journal.outcome(index)
        except JournalError as exc:
            self.halt.first("journal", str(exc))
            return
        if row is not None:
            self._sink(replayed(index, payload, row))

    def _sink(self, result: JobResult) -> None:
        if self.sink is None or self.halt.stopped_by == "sink" or self.halt.signalled():
            return
        try:
            self.sink(result)
        except HardStop:
            raise
        except BaseException:  # sys.exit() in a sink fails the run too; the journal stays
            self.halt.first("sink", traceback.format_exc())


def replayed(index: int, payload: Any, row: Outcome) -> ReplayedResult:
    """The result a journal row recorded, as a resumed run's sink gets it."""
    err = row["error"]
    error = None
    if err is not None:
        error = JobError(
            err.get("kind", "error"),
            err.get("type", ""),
            err.get("message", ""),
            err.get("traceback", ""),
            err.get("exitcode"),
        )
    return ReplayedResult(
        index, payload, row["value"], error, row["attempts"], row["elapsed"], row["worker"]
    )
