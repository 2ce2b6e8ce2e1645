"""Jobs and the one place where a job changes state.

The states are where a job is, not a field: the ready queue, a worker's outstanding list, the
retry timers, or delivered.

    submit --> QUEUED --dispatch--> SENT --result ok--------------------> (next stage) or DONE
                 ^                    |--failed, retries left--> WAITING --due--> QUEUED (front)
                 |                    |--failed, final------------------------------> DONE
                 +---- requeue -------+   (worker died or retired before starting it: free)

A multi-stage job re-enters QUEUED for its next stage with the previous stage's value as its
``data``; ``payload`` stays the source payload that the final JobResult reports, and its
``attempts`` add up every stage's. Counters are kept per stage (StageCount); Metrics sums them
into per-job counts. A job with a Future (``tag``) moves it to RUNNING when first dispatched; a
future cancelled before that drops its job at dispatch (or at once, through ``cancel``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .messages import ERROR, OK, SPLIT, UNPICKLABLE, error_tuple
from .results import (
    KIND_CRASH,
    KIND_ERROR,
    KIND_SERIALIZATION,
    KIND_TIMEOUT,
    JobError,
    JobResult,
)
from .retry import backoff_delay, should_retry
from .scheduler import Scheduler
from .task import Policy

log = logging.getLogger("batchpool")


class Job:
    __slots__ = (
        "id",
        "index",
        "stage",
        "payload",
        "data",
        "attempts",
        "consumer",
        "tag",
        "worker",
        "solo",
        "prior",
    )

    def __init__(self, id: int, index: int, payload: Any, consumer: Any, tag: Any = None) -> None:
        self.id = id
        self.index = index
        self.stage = 0
        self.payload = payload  # as the source gave it
        self.data = payload  # what the current stage runs on
        self.attempts = 0
        self.consumer = consumer  # gets the final JobResult (see supervisor.deliver)
        self.tag = tag  # the consumer's own handle for the job (a Future, say)
        self.worker: int | None = None  # pid of the worker of the latest attempt
        self.solo = False  # sent alone: its batch failed as a whole (see messages.SPLIT)
        self.prior = 0  # attempts made in the stages before this one


class StageCount:
    """One stage's counters (see results.StageMetrics)."""

    __slots__ = (
        "submitted",
        "started",
        "succeeded",
        "failed",
        "cancelled",
        "retried",
        "timed_out",
        "crashed",
    )

    def __init__(self) -> None:
        self.submitted = self.started = self.succeeded = self.failed = self.cancelled = 0
        self.retried = self.timed_out = self.crashed = 0

    def counts(self) -> tuple[int, ...]:
        """In results.StageMetrics' field order."""
        return (
            self.submitted,
            self.started,
            self.succeeded,
            self.failed,
            self.cancelled,
            self.retried,
            self.timed_out,
            self.crashed,
        )


class JobBook:
    """Counters and outcomes; the queue itself is the scheduler's. No processes, no clock of
    its own."""

    def __init__(self, policies: list[Policy], rand: Callable[[], float]) -> None:
        self.policies = policies
        self.rand = rand
        self.queue = Scheduler()
        self.sent = 0  # jobs in workers' hands
        # final results not yet delivered, in runs that share a consumer (a batch, usually)
        self.done: list[tuple[Any, list[tuple[Job, JobResult]]]] = []
        self.stages = [StageCount() for _ in policies]

    # -- entry ---------------------------------------------------------------------------
    def add(self, jobs: list[Job]) -> None:
        self.stages[0].submitted += len(jobs)
        self.queue.add(jobs)

    # -- dispatch ------------------------------------------------------------------------
    def take(self, n: int, pid: int) -> list[Job]:
        """Up to n jobs for one message to worker ``pid``. A job whose Future was cancelled
        is dropped here instead; the others' futures become RUNNING."""
        taken = self.queue.take(n)
        started = []
        for job in taken:
            tag = job.tag
            if tag is not None and not tag.claim():  # a pool.JobFuture, cancelled
                self._cancelled(job)
                continue
            job.attempts += 1
            job.worker = pid
            started.append(job)
        self.sent += len(started)
        if len(self.stages) == 1:
            self.stages[0].started += len(started)
        else:
            for job in started:
                self.stages[job.stage].started += 1
        return started

    def requeue(self, jobs: list[Job], solo: bool = False) -> None:
        """Jobs a worker held but never started (or must run alone): back to the front, no
        attempt charged."""
        for job in jobs:
            job.attempts -= 1
            self.stages[job.stage].started -= 1
            if solo:
                job.solo = True
        self.sent -= len(jobs)
        self.queue.push_front(jobs)

    def cancel(self, job: Job) -> bool:
        """Drop a queued job whose Future was cancelled; False if it is not queued (taken
        already, or dropped at dispatch)."""
        if not self.queue.remove(job):
            return False
        self._cancelled(job)
        return True

    def cancel_held(self, jobs: list[Job], *, sent: bool = True) -> None:
        """Count as cancelled jobs that no queue holds: taken by killed workers (``sent``),
        or never added."""
        for job in jobs:
            self._cancelled(job)
        if sent:
            self.sent -= len(jobs)

    def _cancelled(self, job: Job) -> None:
        self.stages[job.stage].cancelled += 1
        job.data = None

    # -- outcomes ------------------------------------------------------------------------
    def complete(self, job: Job, value: Any, elapsed: float) -> None:
        self.sent -= 1
        self.stages[job.stage].succeeded += 1
        if job.stage + 1 < len(self.policies):
            job.stage += 1
            job.data = value
            job.prior += job.attempts
            job.attempts = 0
            self.stages[job.stage].submitted += 1
            self.queue.push_front([job])  # finish old jobs first: keeps ordered streams moving
            return
        self._final(job, value, None, elapsed)

    def complete_all(self, jobs: list[Job], values: list, elapsed: list) -> None:
        """complete() for a batch that all succeeded: one pass, counters updated once."""
        if len(self.policies) > 1:
            for job, value, seconds in zip(jobs, values, elapsed, strict=True):
                self.complete(job, value, seconds)
            return
        n = len(jobs)
        self.sent -= n
        self.stages[0].succeeded += n
        consumer = jobs[0].consumer
        run: list[tuple[Job, JobResult]] = []
        for job, value, seconds in zip(jobs, values, elapsed, strict=True):
            job.data = None
            if job.consumer is not consumer:
                self.done.append((consumer, run))
                consumer, run = job.consumer, []
            run.append((job, result_of(job, value, None, seconds)))
        self.done.append((consumer, run))

    def attempt_failed(
        self, job: Job, error: JobError, *, retryable: bool, elapsed: float, now: float
    ) -> None:
        self.sent -= 1
        count = self.stages[job.stage]
        if error.kind == KIND_TIMEOUT:
            count.timed_out += 1
        elif error.kind == KIND_CRASH:
            count.crashed += 1
        policy = self.policies[job.stage]
        if should_retry(job.attempts, policy.retries, retryable):
            count.retried += 1
            delay = backoff_delay(
                job.attempts, policy.backoff, policy.max_backoff, policy.jitter, self.rand
            )
            self.queue.defer(job, now + delay)
            log.info(
                "job %s: attempt %d failed (%s: %s); retry in %.2f s",
                job.index,
                job.attempts,
                error.type,
                error.message,
                delay,
            )
            return
        count.failed += 1
        log.info("job %s: failed for good (%s: %s)", job.index, error.type, error.message)
        self._final(job, None, error, elapsed)

    def settle(self, jobs: list, outcomes: list, elapsed: list, values: list, now: float) -> int:
        """The outcomes of one answered batch, job by job (``jobs`` may hold None for a job
        already charged elsewhere); returns how many were split off to run alone."""
        split = 0
        for job, outcome, seconds, value in zip(jobs, outcomes, elapsed, values, strict=True):
            if job is None:
                continue
            if outcome == OK:
                self.complete(job, value, seconds)
            elif outcome == SPLIT:
                split += 1
                self.requeue([job], solo=True)
            else:
                kind = KIND_SERIALIZATION if outcome == UNPICKLABLE else KIND_ERROR
                error = JobError(kind, *value)
                retryable = outcome == ERROR
                self.attempt_failed(job, error, retryable=retryable, elapsed=seconds, now=now)
        return split

    def unloadable(self, jobs: list[Job], exc: BaseException, now: float) -> None:
        """Their values pickled in the worker but do not load here: alone, the job fails
        (never retried); in a batch, each runs alone to find which, no attempt charged."""
        if len(jobs) == 1:
            error = error_from(KIND_SERIALIZATION, exc)
            self.attempt_failed(jobs[0], error, retryable=False, elapsed=0.0, now=now)
        else:
            self.requeue(jobs, solo=True)

    def fail_unsent(self, error: JobError) -> None:
        """Fail every job not in a worker's hands (the pool cannot start workers)."""
        for job in self.queue.drain():
            # The attempt it was queued for ends here, failed: counted like one that ran.
            job.attempts += 1
            count = self.stages[job.stage]
            count.started += 1
            count.failed += 1
            self._final(job, None, error, 0.0)

    def abandon(self) -> list[Job]:
        """Every unfinished job not in a worker's hands, counted as cancelled: for a drain or
        terminate()."""
        jobs = self.queue.drain()
        for job in jobs:
            self._cancelled(job)
        return jobs

    def _final(self, job: Job, value: Any, error: JobError | None, elapsed: float) -> None:
        job.data = None
        self.done.append((job.consumer, [(job, result_of(job, value, error, elapsed))]))

    @property
    def unfinished(self) -> int:
        return len(self.queue) + self.queue.waiting + self.sent

    @property
    def queued(self) -> int:
        return len(self.queue) + self.queue.waiting


def error_from(kind: str, exc: BaseException) -> JobError:
    return JobError(kind, *error_tuple(exc))


_new = object.__new__


def result_of(job: Job, value: Any, error: JobError | None, elapsed: float) -> JobResult:
    """JobResult(...) at a third of the cost: a frozen dataclass's __init__ sets each field
    through object.__setattr__, and this runs once per job in the supervisor."""
    result = _new(JobResult)
    d = result.__dict__
    d["index"] = job.index
    d["payload"] = job.payload
    d["value"] = value
    d["error"] = error
    d["attempts"] = job.prior + job.attempts
    d["elapsed"] = elapsed
    d["worker"] = job.worker
    return result
