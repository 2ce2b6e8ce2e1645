"""Pipelines: a source of payloads streamed through one or more Task stages, journaled.

The run loop lives in the calling thread: it reads the source a bounded window ahead, merges
it with what the journal already holds (skipping jobs that have a final outcome), submits the
rest to one pool shared by every stage, and records each final result in the journal before
handing it to the sink. Signals only set flags here; the loop acts on them between results.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .formatting import safe_repr, to_json
from .jobs import Job
from .journal import JournalError, JournalWriter, fingerprint
from .mainguard import check_main_script
from .pool import WINDOW_PER_PROC, Pool, broken_message
from .progress import Progress
from .results import JobError, JobResult, Metrics
from .task import Task, resolve_policy

log = logging.getLogger("batchpool")

MAX_FAILURES_KEPT = 1000  # RunReport.failures keeps the first ones; counts stay exact
TIMING_SAMPLES = 10_000  # reservoir for p50/p95 attempt time: bounded memory
POLL = 0.1  # seconds between looks at stop flags while waiting for results
SUBMIT_BATCH = 64  # source items per post to the supervisor, at most


class _Default:
    def __repr__(self) -> str:
        return "<default journal>"


DEFAULT_JOURNAL: Any = _Default()


class UnfinishedRunError(JournalError):
    """The journal holds a run that did not finish; resume it or start fresh."""


class StagesChangedError(JournalError):
    """The stages differ from those that wrote the journal: their outcomes would not mix."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"the stages changed since journal {path} was written (other tasks, or tasks with "
            "other attributes): their results would not mix (start over with --fresh)"
        )


class SourceChangedError(JournalError):
    """The source yields a different payload at an index than the journal recorded."""

    def __init__(self, path: Path, index: int) -> None:
        super().__init__(
            f"the source changed since journal {path} was written: the payload at index "
            f"{index} differs from the recorded one (start over with --fresh)"
        )
        self.index = index


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


@dataclass
class RunReport:
    """What a run did. ``to_dict()`` is JSON-serialisable."""

    succeeded: int
    failed: int
    elapsed: float
    metrics: Metrics
    failures: list[JobResult]
    interrupted: bool
    total: int = 0  # jobs with a final outcome, earlier runs' included
    skipped: int = 0  # of those, recorded by an earlier run and not run again
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "source", "sink", "journal", "setup"
    error: str | None = None  # traceback or message of what stopped the run
    attempt_p50: float | None = None
    attempt_p95: float | None = None
    peak_rss: int = 0  # bytes, largest worker RSS sampled
    journal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "total": self.total,
            "skipped": self.skipped,
            "elapsed": self.elapsed,
            "interrupted": self.interrupted,
            "stopped_by": self.stopped_by,
            "error": self.error,
            "attempt_p50": self.attempt_p50,
            "attempt_p95": self.attempt_p95,
            "peak_rss": self.peak_rss,
            "journal": self.journal,
            "metrics": self.metrics.to_dict(),
            "failures": [
                {
                    "index": r.index,
                    "payload": safe_repr(r.payload),
                    "attempts": r.attempts,
                    "error": r.error.to_dict() if r.error else None,
                }
                for r in self.failures
            ],
        }


class Pipeline:
    """``source`` -> stage 1 -> stage 2 -> ... -> ``sink``, streamed.

    ``total``: the number of payloads, for the progress bar's total and ETA when the source
    has no ``len()`` (a generator); a source with one (a list, a callable returning a list)
    needs none.

    The sink runs in this process and gets each final result once the journal has committed
    it, so a result never reaches it twice, whatever kills the run. A resumed run also hands
    it the results earlier runs recorded, as ReplayedResult (``replayed`` is True), in index
    order as the source reaches them: the sink ends with the same data as an uninterrupted
    run's. Once the sink has raised, or a signal has stopped the run, it is not called again
    in that run; the results the drain records meanwhile reach it as replays on ``--resume``.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterable[Any]],
        *stages: Task,
        name: str | None = None,
        sink: Callable[[JobResult], Any] | None = None,
        total: int | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a Pipeline needs at least one Task stage")
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be a number of payloads >= 0, not {total!r}")
        for stage in stages:
            resolve_policy(stage)  # TypeError/ValueError now, not in a worker
        if sink is not None and not callable(sink):
            raise TypeError("sink must be callable")
        self.source = source
        self.stages = list(stages)
        self.name = name
        self.sink = sink
        self.total = total
        self.preload: list[tuple[str, str]] = []  # (module name, file) workers import first
        # The globals of the module that built it: its file and attribute name the journal.
        self._origin: dict[str, Any] = sys._getframe(1).f_globals

    def run(
        self,
        procs: int | None = None,
        *,
        journal: str | os.PathLike | None = DEFAULT_JOURNAL,
        resume: bool = False,
        fresh: bool = False,
        retry_failed: bool = False,
        progress: bool = True,
        output: str | os.PathLike | None = None,
        **pool_options: Any,
    ) -> RunReport:
        """Run to the end (or until stopped) and report.

        ``journal``: a path, None for none, or the default ``.batchpool/<name>.sqlite`` (an
        unnamed pipeline is named after its file and attribute: see default_name()).
        Called from a script that spawned or forkserver workers could not follow (the run
        started outside its main guard, a task class defined inside it), it prints the fix
        and exits with code 2 before any process starts (see ``mainguard``).

        A Ctrl-C drains the attempts in flight into the journal, then raises KeyboardInterrupt
        (a second one stops at once); ``resume=True`` continues from there. SIGTERM and SIGHUP
        drain too and return a report with ``interrupted`` set.
        """
        report = self._execute(
            procs,
            journal=journal,
            resume=resume,
            fresh=fresh,
            retry_failed=retry_failed,
            progress=progress,
            output=output,
            **pool_options,
        )
        if report.stopped_by == "SIGINT":
            raise KeyboardInterrupt
        return report

    def _execute(
        self,
        procs: int | None,
        *,
        journal: str | os.PathLike | None,
        resume: bool,
        fresh: bool,
        retry_failed: bool,
        progress: bool,
        output: str | os.PathLike | None,
        **pool_options: Any,
    ) -> RunReport:
        """run() without the KeyboardInterrupt: the CLI reports an interrupted run itself."""
        check_main_script(self.stages, pool_options)
        name = self._name()
        if journal is DEFAULT_JOURNAL:
            journal = Path(".batchpool") / f"{name}.sqlite"
        tmp = None
        if journal is None and output is not None:  # --output is written from a journal
            tmp = tempfile.TemporaryDirectory(prefix="batchpool-")
            journal = Path(tmp.name) / "results.sqlite"
        stop = _Stop()
        # Until run() returns: a Ctrl-C while --output is written must not escape as
        # KeyboardInterrupt and leave a half-written file.
        restore = stop.install()
        try:
            stages = stages_fingerprint(self.stages)
            book = _open_journal(journal, name, stages, resume, fresh, retry_failed)
            run = _Run(self, book, resume or retry_failed, retry_failed, progress, stop, stages)
            try:
                report = run.execute(procs, pool_options)
            except BaseException:
                if book is not None:
                    book.close(flush=False)
                raise
            if run.refusal is not None:  # found mid-run; what ran before is committed
                if book is not None:
                    book.close(flush=False)
                raise run.refusal
            if book is not None:
                try:
                    if output is not None:
                        write_jsonl(book, Path(output))
                    book.close()
                except JournalError as exc:  # the work is done; what is committed stays
                    report.stopped_by = report.stopped_by or "journal"
                    report.error = report.error or str(exc)
                    report.interrupted = True
                    book.close(flush=False)
            if tmp is not None:  # deleted below: the report must not name it
                report.journal = None
            return report
        finally:
            restore()
            if tmp is not None:
                tmp.cleanup()

    def _name(self) -> str:
        """``name``, or one made from where the pipeline is defined, so that two unnamed
        pipelines of one file keep two journals: see default_name(). "pipeline" where neither
        file nor attribute is known (an interactive session)."""
        if self.name:
            return self.name
        attr = next((k for k, v in self._origin.items() if v is self), "pipeline")
        file = self._origin.get("__file__")
        return default_name(Path(file).stem, attr) if file else attr


def default_name(stem: str, attr: str) -> str:
    """An unnamed pipeline's name: the file's stem, and the attribute unless it is the usual
    ``pipeline`` (``jobs.py`` -> "jobs", ``jobs.py:other`` -> "jobs-other")."""
    return stem if attr == "pipeline" else f"{stem}-{attr}"


def _open_journal(
    path: str | os.PathLike | None,
    name: str,
    stages: str,
    resume: bool,
    fresh: bool,
    retry_failed: bool,
) -> JournalWriter | None:
    if path is None:
        return None
    book = JournalWriter(path, name, fresh=fresh)
    if book.state == "unfinished" and not (resume or retry_failed or fresh):
        book.close()
        raise UnfinishedRunError(
            f"journal {book.path} holds an unfinished run of {name!r}: "
            "continue it with --resume, or start over with --fresh"
        )
    if (resume or retry_failed) and book.state != "empty" and book.stages not in (None, stages):
        book.close()
        raise StagesChangedError(book.path)
    return book


# Task settings left out of the stages' fingerprint: how hard a job is tried is not what it
# computes, and `--resume --retries 5` is how one tries harder.
POLICY_SETTINGS = frozenset({"retries", "backoff", "max_backoff", "jitter", "timeout", "retry_on"})


def stages_fingerprint(stages: Sequence[Task]) -> str:
    """What the stages compute, stable across processes: each task's class name and instance
    attributes (each fingerprinted alone, so one that cannot be pickled counts by its type)."""
    parts = []
    for task in stages:
        attrs = getattr(task, "__dict__", {})
        kept = sorted((k, fingerprint(v)) for k, v in attrs.items() if k not in POLICY_SETTINGS)
        parts.append((type(task).__qualname__, kept))
    return fingerprint(parts)


def output_line(row: dict[str, Any]) -> str:
    """The --output / ``results`` JSON line of a journal row."""
    line = {k: row[k] for k in ("index", "ok", "value", "error", "attempts")}
    return to_json(line) + "\n"


def write_jsonl(book: JournalWriter, path: Path) -> None:
    """One JSON object per job, ordered by index (the journal is the source of truth)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in book.rows():
            f.write(output_line(row))
    os.replace(tmp, path)


_EMPTY = object()  # the source has nothing ready yet
_END = object()  # the source is exhausted


class _SourceFailed(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Feed:
    """Reads the source in its own thread into a bounded queue.

    A slow or blocking source (a network listing, a generator reading files) then never keeps
    the run loop from collecting results, journaling them and acting on signals. ``next()``
    never blocks: it returns _EMPTY when no item is ready. A callable source is called here,
    once, in the thread that iterates what it returns: a source bound to its thread (a sqlite3
    cursor) works, and an error in the call is a source failure like any other.
    """

    def __init__(
        self,
        source: Any,
        size: int,
        poke: Callable[[], None],
        on_length: Callable[[int | None], None],
    ) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.poke = poke
        self.on_length = on_length  # told len() of what a callable source returned
        self.closed = False
        thread = threading.Thread(
            target=self._read, args=(source,), name="batchpool-source", daemon=True
        )
        thread.start()

    def _read(self, source: Any) -> None:
        try:
            if callable(source):
                source = source()
                self.on_length(_length(source))
            for item in enumerate(source):
                if not self._put(item):
                    return
        except BaseException:
            self._put(_SourceFailed(traceback.format_exc()))
            return
        self._put(_END)

    def _put(self, item: Any) -> bool:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            pass
        else:
            if self.queue.qsize() == 1:  # it was empty: the run loop may be waiting for it
                self.poke()
            return True
        while not self.closed:  # full: the run loop drains it, and will want to hear of more
            try:
                self.queue.put(item, timeout=POLL)
            except queue.Full:
                continue
            self.poke()
            return True
        return False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> Any:
        try:
            item = self.queue.get_nowait()
        except queue.Empty:
            return _EMPTY
        if item is _END:
            raise StopIteration
        if isinstance(item, _SourceFailed):
            raise item
        return item

    def close(self) -> None:
        """Stop reading (a source blocked in a call stays blocked: its thread is a daemon)."""
        self.closed = True


class _Inbox:
    """The run's consumer: final results, and jobs dropped by a drain or terminate."""

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


class _HardStop(BaseException):
    """Raised by the second signal wherever the run loop is: stop at once."""


class _Stop:
    """Stop requests from signal handlers.

    The first signal sets a flag the run loop reads between results (it drains in-flight
    attempts). The second raises _HardStop in the main thread, so that neither a drain nor a
    sink can hold the run; a BaseException, so user code catching Exception cannot swallow it.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.hard = False
        self.armed = False  # may raise (the run loop and the drain catch these)

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        elif not self.hard:
            self.hard = True
            if self.armed:
                raise _HardStop()

    def install(self) -> Callable[[], None]:
        """Route SIGINT, SIGTERM and SIGHUP here while the run lasts (main thread only): a
        hangup (a closed terminal, a dropped ssh session) drains like a SIGTERM."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
        old = {sig: signal.signal(sig, lambda s, f: self.request(names[s])) for sig in names}

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore


class _Run:
    """One execution of a pipeline."""

    def __init__(
        self,
        pipeline: Pipeline,
        journal: JournalWriter | None,
        resume: bool,
        retry_failed: bool,
        progress: bool,
        stop: _Stop,
        stages: str,
    ) -> None:
        self.pipeline = pipeline
        self.stages = stages
        self.journal = journal
        self.resume = resume
        self.retry_failed = retry_failed
        self.show_progress = progress
        self.stop = stop
        self.feed: _Feed | None = None
        self.inbox = _Inbox()
        self.error: str | None = None
        self.stopped_by: str | None = None
        self.refusal: JournalError | None = None  # raised once the run has drained
        self.broken: JobError | None = None  # why workers cannot start
        self.signal_seen = False
        self.outstanding = 0
        self.succeeded = self.failed = self.skipped = 0
        self.failures: list[JobResult] = []
        self.unsunk: list[JobResult] = []  # journaled, not committed yet: the sink waits
        self.timings: list[float] = []
        self.timed = 0
        self.rand = random.Random(0)
        if journal is not None:
            journal.keep_values = pipeline.sink is not None  # for replays to a later run's sink

    def execute(self, procs: int | None, pool_options: dict[str, Any]) -> RunReport:
        pipeline = self.pipeline
        started = time.monotonic()
        pool = Pool._for_stages(pipeline.stages, procs, preload=pipeline.preload, **pool_options)
        total = pipeline.total if pipeline.total is not None else _length(pipeline.source)
        self.progress = Progress(total, enabled=self.show_progress, metrics=pool.metrics)
        source = self._source(WINDOW_PER_PROC * pool.procs)
        try:
            if self.journal is not None:
                self.journal.begin(total=total, resume=self.resume, stages=self.stages)
            self.stop.armed = True
            self._loop(pool, source)
        except _HardStop:
            pass  # pool.terminate() below
        except BaseException:
            self.stop.armed = False
            pool.terminate()  # attempts cut short are not final: a resume runs them
            raise
        finally:
            self.stop.armed = False
            self.feed.close()  # type: ignore[union-attr]
            self._shutdown(pool)
            self.progress.close()
        metrics = pool.metrics()
        if self.stop.reason and self.stopped_by is None:  # a signal the loop never saw
            self.stopped_by = self.stop.reason
        self._commit(pool, force=True)
        complete = self.stopped_by is None
        if self.journal is not None:
            try:
                self.journal.finish(complete=complete)
            except JournalError as exc:
                self.stopped_by = self.stopped_by or "journal"
                self.error = self.error or str(exc)
                complete = False
        return self._report(metrics, time.monotonic() - started, not complete)

    def _source(self, window: int) -> Iterator[Any]:
        """(index, payload) or (index, payload, recorded status), or _EMPTY: never blocks.

        A resume checks the source against the journal as it streams (a callable source is
        called once, and a generator cannot be read twice): a change stops the run there."""
        self.feed = _Feed(self.pipeline.source, window, self.inbox.poke, self.progress.set_total)
        if self.journal is None or not self.resume:
            return self.feed
        return _merge(self.feed, self.journal)

    def _shutdown(self, pool: Pool) -> None:
        """Close (drain) the pool, or terminate it after a second signal, even mid-drain."""
        try:
            if self.stop.hard:
                pool.terminate()
            else:
                self.stop.armed = True  # a second signal cuts the drain short
                pool.close()
        except _HardStop:
            pool.terminate()
        finally:
            self.stop.armed = False

    def _loop(self, pool: Pool, source: Iterator[Any]) -> None:
        window = WINDOW_PER_PROC * pool.procs
        intake = True
        while True:
            self._signalled(pool)
            if self.stop.hard:
                return
            broken = pool._supervisor.broken
            if broken is not None and self.stopped_by is None:
                self.broken = broken
                self._halt(pool, "setup", None)  # the message, once the counts are known
            intake = intake and self.stopped_by is None
            more = False
            if intake and self.outstanding < window:
                intake, more = self._intake(pool, source, window)
            if not self.outstanding and not intake:
                return
            # Items ready and room for them: only collect results that are in. Otherwise wait;
            # the source thread pokes the inbox when it has items again.
            results, dropped = self.inbox.take(0.0 if more else POLL)
            self.outstanding -= dropped
            for result in results:
                self.outstanding -= 1
                self._final(pool, result)
            self._commit(pool, force=False)  # also in a quiet spell: nothing waits for long

    def _intake(self, pool: Pool, source: Iterator[Any], window: int) -> tuple[bool, bool]:
        """Submit source items that are ready, up to a batch and the window. Returns (the
        source may have more, items are ready now)."""
        batch: list = []
        try:
            while self.outstanding < window:
                if len(batch) >= SUBMIT_BATCH:
                    return True, True
                item = next(source)
                if item is _EMPTY:
                    return True, False
                index, payload, recorded = item if len(item) == 3 else (*item, None)
                if recorded is not None and not (recorded == "failed" and self.retry_failed):
                    self.skipped += 1
                    self.progress.skip(recorded == "ok")
                    self._replay(pool, index, payload)
                    if self.stop.reason:
                        return True, True
                    continue
                batch.append(pool._make_job(index, payload, self.inbox))
                self.outstanding += 1
            return True, False
        except StopIteration:
            return False, False
        except _SourceFailed as exc:
            self._halt(pool, "source", exc.text)
            return False, False
        except SourceChangedError as exc:  # drain and commit what ran, then refuse
            self.refusal = exc
            self._halt(pool, "source", str(exc))
            return False, False
        except JournalError as exc:  # reading what the journal recorded failed
            self._halt(pool, "journal", str(exc))
            return False, False
        finally:
            if batch:
                pool._post_jobs(batch)

    def _commit(self, pool: Pool, *, force: bool) -> None:
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
                if self.stopped_by is None:
                    self._halt(pool, "journal", str(exc))
                return
        self._sink_committed(pool)

    def _sink_committed(self, pool: Pool) -> None:
        if not self.unsunk or (self.journal is not None and self.journal.buffered):
            return
        results, self.unsunk = self.unsunk, []
        for result in results:
            self._sink(pool, result)

    def _signalled(self, pool: Pool) -> bool:
        """True once a signal asked the run to stop. The first time: stop (unless the run is
        stopping already) and say what the drain waits for and how to cut it short."""
        if self.stop.reason is None:
            return False
        if not self.signal_seen:
            self.signal_seen = True
            if self.stopped_by is None:
                self._halt(pool, self.stop.reason, None)
            if not self.stop.hard:  # after a second signal there is nothing left to finish
                running = pool.metrics().in_flight
                log.warning("finishing %d running jobs; Ctrl-C again to stop now", running)
        return True

    def _halt(self, pool: Pool, reason: str, error: str | None) -> None:
        """Stop intake; let attempts already running finish; drop jobs not started."""
        self.stopped_by = reason
        self.error = error
        pool._supervisor.post(("drain",))

    def _final(self, pool: Pool, result: JobResult) -> None:
        if result.error is not None and result.error is pool._supervisor.broken:
            return  # failed unrun by a pool that cannot start workers: a resume runs it
        if result.ok:
            self.succeeded += 1
        else:
            self.failed += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(result)
        self._sample(result.elapsed)
        self.progress.update(result)
        if self.pipeline.sink is not None:
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
                if self.stopped_by is None:
                    self._halt(pool, "journal", str(exc))
                return
        self._sink_committed(pool)

    def _replay(self, pool: Pool, index: int, payload: Any) -> None:
        """Hand the sink the outcome an earlier run recorded for ``index``."""
        if self.pipeline.sink is None or self.stopped_by == "sink" or self._signalled(pool):
            return
        try:
            row = self.journal.outcome(index)  # type: ignore[union-attr]
        except JournalError as exc:
            if self.stopped_by is None:
                self._halt(pool, "journal", str(exc))
            return
        if row is None:
            return
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
        replayed = ReplayedResult(
            index, payload, row["value"], error, row["attempts"], row["elapsed"], row["worker"]
        )
        self._sink(pool, replayed)

    def _sink(self, pool: Pool, result: JobResult) -> None:
        """After a signal the sink gets nothing more: the drain waits only for the attempts in
        flight, never for a slow sink's backlog (a resume replays what it missed)."""
        sink = self.pipeline.sink
        if sink is None or self.stopped_by == "sink" or self._signalled(pool):
            return
        try:
            sink(result)
        except _HardStop:
            raise
        except BaseException:  # sys.exit() in a sink fails the run too; the journal stays
            if self.stopped_by is None:
                self._halt(pool, "sink", traceback.format_exc())

    def _sample(self, elapsed: float) -> None:
        self.timed += 1
        if len(self.timings) < TIMING_SAMPLES:
            self.timings.append(elapsed)
        else:
            slot = self.rand.randrange(self.timed)
            if slot < TIMING_SAMPLES:
                self.timings[slot] = elapsed

    def _report(self, metrics: Metrics, elapsed: float, interrupted: bool) -> RunReport:
        succeeded, failed = self.succeeded, self.failed
        if self.journal is not None:
            counts = self.journal.counts()
            succeeded, failed = counts["ok"], counts["failed"]
        if self.broken is not None:
            self.error = self._cannot_start(self.broken, failed)
        timings = sorted(self.timings)
        return RunReport(
            succeeded=succeeded,
            failed=failed,
            elapsed=elapsed,
            metrics=metrics,
            failures=self.failures,
            interrupted=interrupted,
            total=succeeded + failed,
            skipped=self.skipped,
            stopped_by=self.stopped_by,
            error=self.error,
            attempt_p50=_quantile(timings, 0.50),
            attempt_p95=_quantile(timings, 0.95),
            peak_rss=max(self.progress.peak_rss, metrics.peak_rss),
            journal=None if self.journal is None or self.journal.lost else str(self.journal.path),
        )

    def _cannot_start(self, broken: JobError, failed: int) -> str:
        """The setup error, with its traceback, and the way on: the jobs that did not run are
        not recorded, so a resume runs them once the cause is fixed."""
        lines = [broken.traceback.rstrip()] if broken.traceback else []
        lines.append(broken_message(broken))
        if self.journal is None:
            lines.append("the jobs that did not run were not done: fix the cause and run again")
        else:
            hint = "the jobs that did not run are not recorded: fix the cause, then use --resume"
            if failed:
                jobs = "job" if failed == 1 else "jobs"
                hint += f" (or --retry-failed to rerun the {failed} failed {jobs} too)"
            lines.append(hint)
        return "\n".join(lines)


def _merge(source: Iterator[Any], journal: JournalWriter) -> Iterator[Any]:
    """(index, payload, recorded status) for each (index, payload), checking recorded
    fingerprints; _EMPTY passes through."""
    recorded = journal.recorded()
    current = next(recorded, None)
    for item in source:
        if item is _EMPTY:
            yield _EMPTY
            continue
        index, payload = item
        while current is not None and current[0] < index:
            current = next(recorded, None)
        if current is not None and current[0] == index and current[2] is not None:
            if current[1] != fingerprint(payload):
                raise SourceChangedError(journal.path, index)
            yield index, payload, current[2]
        else:
            yield index, payload, None


def _length(source: Any) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]
