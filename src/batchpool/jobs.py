"""Jobs and the one place where a job changes state.

The states are where a job is, not a field: the ready queue, a worker's outstanding list, the
retry timers, or delivered.

    submit --> QUEUED --dispatch--> SENT --result ok--------------------> (next stage) or DONE
                 ^                    |--failed, retries left--> WAITING --due--> QUEUED (front)
                 |                    |--failed, final------------------------------> DONE
                 +---- requeue -------+   (worker died or retired before starting it: free)

A multi-stage job re-enters QUEUED for its next stage with the previous stage's value as its
``data``; ``payload`` stays the source payload that the final JobResult reports. Counters follow
the SPEC's Metrics and count stage-jobs: each stage a job enters is one ``submitted``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .messages import error_tuple
from .results import KIND_CRASH, KIND_TIMEOUT, JobError, JobResult
from .retry import backoff_delay, should_retry
from .task import Policy
from .timers import Timers

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


class JobBook:
    """Queues, retry timers and counters; no processes, no clock of its own."""

    def __init__(self, policies: list[Policy], rand: Callable[[], float]) -> None:
        self.policies = policies
        self.rand = rand
        self.ready: deque[Job] = deque()
        self.retry_timers = Timers()
        self.sent = 0  # jobs in workers' hands
        # final results not yet delivered, in runs that share a consumer (a batch, usually)
        self.done: list[tuple[Any, list[tuple[Job, JobResult]]]] = []
        self.submitted = self.started = self.succeeded = self.failed = self.retried = 0
        self.timed_out = self.crashed = 0
        self.solo_queued = 0  # jobs flagged solo anywhere in the queue (rare; skip scans)

    # -- entry ---------------------------------------------------------------------------
    def add(self, jobs: list[Job]) -> None:
        self.submitted += len(jobs)
        self.ready.extend(jobs)

    # -- dispatch ------------------------------------------------------------------------
    def take(self, n: int, pid: int) -> list[Job]:
        """Up to n jobs from the front, for one message to worker ``pid``."""
        ready = self.ready
        n = min(n, len(ready))
        if self.solo_queued:
            n = self._solo_cut(n)
        taken = []
        for _ in range(n):
            job = ready.popleft()
            job.attempts += 1
            job.worker = pid
            taken.append(job)
        self.sent += len(taken)
        self.started += len(taken)
        return taken

    def _solo_cut(self, n: int) -> int:
        """A solo job travels alone; a batch stops before one."""
        ready = self.ready
        if ready[0].solo:
            return 1
        for i in range(1, n):
            if ready[i].solo:
                return i
        return n

    def requeue(self, jobs: list[Job], solo: bool = False) -> None:
        """Jobs a worker held but never started (or must run alone): back to the front, no
        attempt charged."""
        for job in reversed(jobs):
            job.attempts -= 1
            if solo and not job.solo:
                job.solo = True
                self.solo_queued += 1
            self.ready.appendleft(job)
        self.sent -= len(jobs)
        self.started -= len(jobs)

    # -- outcomes ------------------------------------------------------------------------
    def complete(self, job: Job, value: Any, elapsed: float) -> None:
        self.sent -= 1
        self.succeeded += 1
        if job.stage + 1 < len(self.policies):
            job.stage += 1
            job.data = value
            job.attempts = 0
            self.submitted += 1
            self.ready.appendleft(job)  # finish old jobs first: keeps ordered streams moving
            return
        self._final(job, value, None, elapsed)

    def complete_all(self, jobs: list[Job], values: list, elapsed: list) -> None:
        """complete() for a batch that all succeeded: one pass, counters updated once."""
        if len(self.policies) > 1 or self.solo_queued:
            for job, value, seconds in zip(jobs, values, elapsed, strict=True):
                self.complete(job, value, seconds)
            return
        n = len(jobs)
        self.sent -= n
        self.succeeded += n
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
        if error.kind == KIND_TIMEOUT:
            self.timed_out += 1
        elif error.kind == KIND_CRASH:
            self.crashed += 1
        policy = self.policies[job.stage]
        if should_retry(job.attempts, policy.retries, retryable):
            self.retried += 1
            delay = backoff_delay(
                job.attempts, policy.backoff, policy.max_backoff, policy.jitter, self.rand
            )
            self.retry_timers.schedule(now + delay, job.id, job)
            log.info(
                "job %s: attempt %d failed (%s: %s); retry in %.2f s",
                job.index,
                job.attempts,
                error.type,
                error.message,
                delay,
            )
            return
        self.failed += 1
        self._final(job, None, error, elapsed)

    def release_due(self, now: float) -> None:
        due = self.retry_timers.pop_due(now)
        for _, job in reversed(due):
            self.ready.appendleft(job)

    def fail_unsent(self, error: JobError) -> None:
        """Fail every job not in a worker's hands (the pool cannot start workers)."""
        waiting = [job for _, job in self.retry_timers.pop_due(float("inf"))]
        for job in list(self.ready) + waiting:
            # The attempt it was queued for ends here, failed: counted like one that ran.
            job.attempts += 1
            self.started += 1
            self.failed += 1
            self._final(job, None, error, 0.0)
        self.ready.clear()

    def abandon(self) -> list[Job]:
        """Every unfinished job not in a worker's hands, for terminate()."""
        waiting = [job for _, job in self.retry_timers.pop_due(float("inf"))]
        jobs = list(self.ready) + waiting
        self.ready.clear()
        return jobs

    def _final(self, job: Job, value: Any, error: JobError | None, elapsed: float) -> None:
        job.data = None
        if job.solo:
            self.solo_queued -= 1
        self.done.append((job.consumer, [(job, result_of(job, value, error, elapsed))]))

    @property
    def unfinished(self) -> int:
        return len(self.ready) + len(self.retry_timers) + self.sent


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
    d["attempts"] = job.attempts
    d["elapsed"] = elapsed
    d["worker"] = job.worker
    return result
