"""One execution of a pipeline: the loop that feeds the pool and collects its results.

The loop lives in the calling thread. It reads the source a bounded window ahead (``source``),
skips jobs the journal holds a final outcome for, submits the rest to one pool shared by every
stage, and hands each final result to the ``Recorder`` (journal, then sink). Signals only set
flags; the loop acts on them between results (``stopping``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import logs
from .jobs import Job
from .journal import JournalError, JournalWriter
from .pool import Pool
from .progress import Progress
from .recorder import Recorder
from .report import RunReport, cannot_start
from .results import JobError, JobResult, Metrics
from .source import EMPTY, Feed, SourceChangedError, SourceFailed, length, merge
from .stopping import Halt, HardStop, Signals
from .streaming import WINDOW_BATCH_FLOOR, WINDOW_BATCHES

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("batchpool")
POLL = 0.1  # seconds between looks at stop flags while waiting for results
SUBMIT_BATCH = 64  # source items per post to the supervisor, at most


class Inbox:
    """The run's consumer: final results, and jobs dropped by a drain or terminate; also told
    when the source has items again, so that one wait covers both."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.results: deque[JobResult] = deque()
        self.dropped = 0
        self.poked = False  # the source has items again

    def deliver(self, items: list[tuple[Job, JobResult]]) -> None:
        with self.cond:
            self.results.extend(r for _, r in items)
            self.cond.notify()

    def cancel(self, job: Job, error: JobError | None) -> None:
        with self.cond:
            self.dropped += 1
            self.cond.notify()

    def poke(self) -> None:
        with self.cond:
            self.poked = True
            self.cond.notify()

    def take(self, timeout: float) -> tuple[list[JobResult], int]:
        with self.cond:
            if not self.results and not self.dropped and not self.poked:
                self.cond.wait(timeout)
            self.poked = False
            results = list(self.results)
            self.results.clear()
            dropped, self.dropped = self.dropped, 0
            return results, dropped


class Run:
    """One execution of a pipeline, from its pool to its report. Building it makes the pool
    and starts reading the source; ``execute()`` runs the loop and drains."""

    def __init__(
        self,
        pipeline: Pipeline,
        journal: JournalWriter | None,
        *,
        procs: int | tuple[int, int] | None,
        pool_options: dict[str, Any],
        resume: bool,
        retry_failed: bool,
        progress: bool,
        signals: Signals,
        stages: str,
        deadline: float | None = None,
    ) -> None:
        """``deadline``: seconds from now after which the run stops as on a first signal."""
        self.started = time.monotonic()
        self.journal = journal
        self.resume = resume
        self.retry_failed = retry_failed
        self.signals = signals
        self.stages = stages
        self.refusal: SourceChangedError | None = None  # raised once the run has drained
        self.broken: JobError | None = None  # why workers cannot start
        self.outstanding = 0  # jobs submitted, neither final nor dropped yet
        self.inbox = Inbox()
        self.pool = Pool._for_stages(
            pipeline.stages, procs, preload=pipeline.preload, **pool_options
        )
        self.total = pipeline.total if pipeline.total is not None else length(pipeline.source)
        self.stage_names = [type(stage).__name__ for stage in pipeline.stages]
        self.name = pipeline.name
        self.progress = Progress(self.total, enabled=progress, metrics=self.pool.metrics)
        deadline_at = None if deadline is None else self.started + deadline
        self.halt = Halt(signals, self.pool, deadline_at)
        self.recorder = Recorder(journal, pipeline.sink, self.halt, self.progress)
        # The source's thread reads ahead at least the smallest window: the loop keeps as many
        # jobs in flight as the pool's window says (_window), and the thread refills meanwhile.
        ahead = WINDOW_BATCHES * WINDOW_BATCH_FLOOR * self.pool.procs
        self.feed = Feed(pipeline.source, ahead, self.inbox.poke, self.progress.set_total)
        self.source = self.feed if journal is None or not resume else merge(self.feed, journal)

    def execute(self) -> RunReport:
        """Run to the end (or until stopped), drain, mark the journal, report. Raises
        SourceChangedError, once drained, where the source changed under a resume."""
        try:
            if self.journal is not None:
                self.journal.begin(total=self.total, resume=self.resume, stages=self.stages)
            self.signals.armed = True
            self._log_start()
            self._loop()
        except HardStop:
            log.warning("a second signal: stopping now; attempts in flight are cut short")
        except BaseException:
            self.signals.armed = False
            self.pool.terminate()  # attempts cut short are not final: a resume runs them
            raise
        finally:
            self.signals.armed = False
            self.feed.close()
            self._shutdown()
            self.progress.close()
        metrics = self.pool.metrics()
        halt = self.halt
        if self.signals.reason and halt.stopped_by is None:  # a signal the loop never saw
            halt.stopped_by = self.signals.reason
        self.recorder.commit(force=True)
        complete = halt.stopped_by is None
        if self.journal is not None:
            try:
                self.journal.finish(complete=complete)
            except JournalError as exc:
                halt.stopped_by = halt.stopped_by or "journal"
                halt.error = halt.error or str(exc)
                complete = False
        report = self._report(metrics, time.monotonic() - self.started, not complete)
        _log_end(self.name, report)
        if self.refusal is not None:  # found mid-run, raised once what ran is committed
            raise self.refusal
        return report

    def _log_start(self) -> None:
        journal = "none" if self.journal is None else str(self.journal.path)
        resumed = ", resuming" if self.resume else ""
        log.info(
            "run %s: started in pid %d; %s; journal %s%s",
            self.name,
            os.getpid(),
            self.pool._describe(),
            journal,
            resumed,
        )

    def _shutdown(self) -> None:
        """Close (drain) the pool, or terminate it after a second signal, even mid-drain."""
        try:
            if self.signals.hard:
                self.pool.terminate()
            else:
                self.signals.armed = True  # a second signal cuts the drain short
                self.pool.close()
        except HardStop:
            self.pool.terminate()
        finally:
            self.signals.armed = False

    def _loop(self) -> None:
        pool, halt = self.pool, self.halt
        intake = True
        while True:
            halt.signalled()
            if self.signals.hard:
                return
            halt.deadline_passed(time.monotonic())
            broken = pool._supervisor.broken
            if broken is not None and halt.stopped_by is None:
                self.broken = broken
                halt.stop("setup", None)  # the message, once the counts are known
            intake = intake and halt.stopped_by is None
            more = False
            if intake and self.outstanding < self.pool._window():
                intake, more = self._intake()
            if not self.outstanding and not intake:
                return
            # Items ready and room for them: only collect results that are in. Otherwise wait;
            # the source thread pokes the inbox when it has items again.
            results, dropped = self.inbox.take(0.0 if more else POLL)
            self.outstanding -= dropped
            for result in results:
                self.outstanding -= 1
                # Failed unrun by a pool that cannot start workers: not final, a resume runs it.
                if result.error is None or result.error is not pool._supervisor.broken:
                    self.recorder.final(result)
            self.recorder.commit(force=False)  # also in a quiet spell: nothing waits for long

    def _intake(self) -> tuple[bool, bool]:
        """Submit source items that are ready, up to a batch and the window. Returns (the
        source may have more, items are ready now)."""
        batch: list[Job] = []
        window = self.pool._window()
        try:
            while self.outstanding < window:
                if len(batch) >= SUBMIT_BATCH:
                    return True, True
                item = next(self.source)
                if item is EMPTY:
                    return True, False
                index, payload, recorded = item if len(item) == 3 else (*item, None)
                if recorded is not None and not (recorded == "failed" and self.retry_failed):
                    self.recorder.skip(index, payload, ok=recorded == "ok")
                    if self.signals.reason:
                        return True, True
                    continue
                batch.append(self.pool._make_job(index, payload, self.inbox))
                self.outstanding += 1
            return True, False
        except StopIteration:
            return False, False
        except SourceFailed as exc:
            self.halt.stop("source", exc.text)
            return False, False
        except SourceChangedError as exc:  # drain and commit what ran, then refuse
            self.refusal = exc
            self.halt.stop("source", str(exc))
            return False, False
        except JournalError as exc:  # reading what the journal recorded failed
            self.halt.stop("journal", str(exc))
            return False, False
        finally:
            if batch:
                self.pool._post_jobs(batch)

    def _report(self, metrics: Metrics, elapsed: float, interrupted: bool) -> RunReport:
        recorder, halt = self.recorder, self.halt
        succeeded, failed = recorder.succeeded, recorder.failed
        if self.journal is not None:
            counts = self.journal.counts()
            succeeded, failed = counts["ok"], counts["failed"]
        if self.broken is not None:
            halt.error = cannot_start(self.broken, failed, journaled=self.journal is not None)
        p50, p95 = recorder.times.quantiles(0.50, 0.95)
        return RunReport(
            succeeded=succeeded,
            failed=failed,
            elapsed=elapsed,
            metrics=metrics,
            failures=recorder.failures,
            interrupted=interrupted,
            total=succeeded + failed,
            skipped=recorder.skipped,
            stopped_by=halt.stopped_by,
            error=halt.error,
            attempt_p50=p50,
            attempt_p95=p95,
            peak_rss=max(self.progress.peak_rss, metrics.peak_rss),
            stage_names=self.stage_names,
            journal=None if self.journal is None or self.journal.lost else str(self.journal.path),
        )


def _log_end(name: str | None, report: RunReport) -> None:
    stopped = f"; stopped by {report.stopped_by}" if report.stopped_by else ""
    log.info(
        "run %s: ended after %.2f s: %d ok, %d failed, %d skipped; %s%s",
        name,
        report.elapsed,
        report.succeeded,
        report.failed,
        report.skipped,
        logs.incidents(report.metrics),
        stopped,
    )
