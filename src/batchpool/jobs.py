"""Jobs and the one place where a job changes state.

    submit --> QUEUED --dispatch--> SENT --result ok--------------------> (next stage) or DONE
                 ^                    |--failed, retries left--> WAITING --due--> QUEUED (front)
                 |                    |--failed, final------------------------------> DONE
                 +---- requeue -------+   (worker died or retired before starting it: free)

A multi-stage job re-enters QUEUED for its next stage with the previous stage's pickled value
as payload, so values are not unpickled and pickled again between stages. Counters follow the
SPEC's Metrics and count stage-jobs: each stage a job enters is one ``submitted``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

from .messages import error_tuple, loads
from .results import KIND_CRASH, KIND_SERIALIZATION, KIND_TIMEOUT, JobError, JobResult
from .retry import backoff_delay, should_retry
from .task import Policy
from .timers import Timers


class State(enum.Enum):
    QUEUED = "queued"
    SENT = "sent"
    WAITING = "waiting"
    DONE = "done"


class Job:
    __slots__ = (
        "id",
        "index",
        "stage",
        "payload",
        "blob",
        "attempts",
        "state",
        "consumer",
        "tag",
        "worker",
    )

    def __init__(
        self, id: int, index: int, payload: Any, blob: bytes | None, consumer: Any, tag: Any = None
    ) -> None:
        self.id = id
        self.index = index
        self.stage = 0
        self.payload = payload
        self.blob = blob  # None: the payload could not be pickled
        self.attempts = 0
        self.state = State.QUEUED
        self.consumer = consumer  # gets the final JobResult (see supervisor.deliver)
        self.tag = tag  # the consumer's own handle for the job (a Future, say)
        self.worker: int | None = None  # pid of the worker of the latest attempt


class JobBook:
    """Queues, retry timers and counters; no processes, no clock of its own."""

    def __init__(self, policies: list[Policy], rand: Callable[[], float]) -> None:
        self.policies = policies
        self.rand = rand
        self.ready: deque[Job] = deque()
        self.retry_timers = Timers()
        self.sent = 0  # jobs in workers' hands
        self.done: list[tuple[Job, JobResult]] = []  # final results not yet delivered
        self.submitted = self.started = self.succeeded = self.failed = self.retried = 0
        self.timed_out = self.crashed = 0

    # -- entry ---------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        self.submitted += 1
        self.ready.append(job)

    def add_unpicklable(self, job: Job, error: JobError) -> None:
        """A payload that could not be pickled: one attempt, failed, never retried."""
        self.submitted += 1
        self.started += 1
        self.failed += 1
        job.attempts = 1
        self._final(job, None, error, 0.0)

    # -- dispatch ------------------------------------------------------------------------
    def take(self, n: int, pid: int) -> list[Job]:
        ready = self.ready
        taken = []
        for _ in range(min(n, len(ready))):
            job = ready.popleft()
            job.state = State.SENT
            job.attempts += 1
            job.worker = pid
            taken.append(job)
        self.sent += len(taken)
        self.started += len(taken)
        return taken

    def requeue(self, jobs: list[Job]) -> None:
        """Jobs a worker held but never started: back to the front, no attempt charged."""
        for job in reversed(jobs):
            job.state = State.QUEUED
            job.attempts -= 1
            self.ready.appendleft(job)
        self.sent -= len(jobs)
        self.started -= len(jobs)

    # -- outcomes ------------------------------------------------------------------------
    def succeeded_blob(self, job: Job, blob: bytes, elapsed: float, now: float) -> None:
        self.sent -= 1
        self.succeeded += 1
        if job.stage + 1 < len(self.policies):
            job.stage += 1
            job.blob = blob
            job.attempts = 0
            job.state = State.QUEUED
            self.submitted += 1
            self.ready.appendleft(job)  # finish old jobs first: keeps ordered streams moving
            return
        try:
            value = loads(blob)
        except BaseException as exc:  # the value pickled in the worker but cannot load here
            self.succeeded -= 1
            self.sent += 1
            error = error_from(KIND_SERIALIZATION, exc)
            self.attempt_failed(job, error, retryable=False, elapsed=elapsed, now=now)
            return
        self._final(job, value, None, elapsed)

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
            job.state = State.WAITING
            delay = backoff_delay(
                job.attempts, policy.backoff, policy.max_backoff, policy.jitter, self.rand
            )
            self.retry_timers.schedule(now + delay, job.id, job)
            return
        self.failed += 1
        self._final(job, None, error, elapsed)

    def release_due(self, now: float) -> None:
        due = self.retry_timers.pop_due(now)
        for _, job in reversed(due):
            job.state = State.QUEUED
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
        job.state = State.DONE
        result = JobResult(job.index, job.payload, value, error, job.attempts, elapsed, job.worker)
        job.blob = None
        self.done.append((job, result))

    @property
    def unfinished(self) -> int:
        return len(self.ready) + len(self.retry_timers) + self.sent


def error_from(kind: str, exc: BaseException) -> JobError:
    return JobError(kind, *error_tuple(exc))
