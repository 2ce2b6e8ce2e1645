"""How many jobs travel in one message: pure arithmetic on what the supervisor measured.

A message should carry about TARGET_BATCH_SECONDS of work, so that per-message costs stay
under 0.5% of a core (a pass of the supervisor's loop, which reads an answer and sends the next
message, costs it 0.2-0.3 ms of CPU on a busy 2-core VM: waking on a core that workers keep
busy, with cold caches, not its few syscalls) while results still stream (a worker sends what
it has every Tuning.flush_every, as long as a batch, so one answer, and one pass, per batch);
never more than MAX_BATCH jobs; and payloads of about
MAX_MESSAGE_BYTES at most, because several moderate messages pipeline better than one giant
one that leaves the other workers idle while it travels. Results count as payloads do: a
message of 800 jobs of 0.3 ms that each return 1 MiB made an 800 MiB answer, held whole by the
worker until it went and then in a buffer the supervisor's process faulted in page by page.

Where a batch runs against one deadline (a Ray actor's call: the worker names no job inside
it, so a batch's clock is one job's timeout, counted from its start), a message carries at
most TIMEOUT_SHARE of the stage's timeout: jobs of 60 ms under a 0.2 s timeout once travelled
four to a batch of 0.24 s, past the deadline; such a batch was killed, its actor replaced, its
jobs rerun alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

TARGET_BATCH_SECONDS = 0.25  # work per message (0.1 gave ~0.8% of a core at 10 ms jobs)
MAX_BATCH = 4096  # jobs per message, however tiny they are
PER_JOB_OVERHEAD = 5e-6  # seconds a worker spends per job besides run(): (un)pickling
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # payload or result bytes per message, unless one job has more
EWMA = 0.2  # weight of the newest batch in the job-time estimate
TIMEOUT_SHARE = 0.25  # of a batch's deadline: a batch 4x slower than measured still fits


class Tuning(NamedTuple):
    """Throughput (the defaults, for batches) against latency (a server's, where every job is
    awaited): how much work a message carries, how long results wait in a worker, and the
    workers' CPU priority."""

    batch_seconds: float = TARGET_BATCH_SECONDS  # work per message
    # Seconds a finished result may wait in a local worker for the results after it: a message
    # per result costs the supervisor a loop pass, a long wait costs the result's latency.
    flush_every: float = 0.25
    # Added to each local worker's nice value at its start: a server's front (the HTTP loop,
    # the supervisor) stays responsive while the workers saturate every core.
    nice: int = 0
    # A submit wakes the supervisor only when a worker could take the job now: while every
    # worker holds jobs, their next report (within flush_every) brings a pass that takes it.
    # A server submits one job per request, and a pass costs 0.2-0.3 ms of cold CPU.
    lazy_submits: bool = False


BATCHES = Tuning()  # the default


class BatchSizer:
    """Per stage: the measured seconds per job (an EWMA over batches), and pickled payload
    and result bytes per job (the last message's each way)."""

    def __init__(
        self,
        stages: int,
        chunksize: int | None,
        batch_seconds: float = TARGET_BATCH_SECONDS,
        batch_deadlines: Sequence[float | None] = (),
    ) -> None:
        """``batch_deadlines``: per stage, the seconds a whole batch must finish in (None:
        none); empty where each job of a batch has its own clock (local workers)."""
        self.chunksize = chunksize  # fixed by the user, or by a backend
        deadlines = list(batch_deadlines) or [None] * stages
        # work per message, per stage
        self.batch_seconds = [
            batch_seconds if not d else min(batch_seconds, d * TIMEOUT_SHARE) for d in deadlines
        ]
        self.job_time: list[float | None] = [None] * stages
        self.job_bytes: list[int] = [0] * stages
        self.result_bytes: list[int] = [0] * stages

    def timed(self, stage: int, seconds: float, jobs: int) -> None:
        """A batch of ``jobs`` ran in ``seconds`` of run() time."""
        mean = seconds / jobs + PER_JOB_OVERHEAD
        old = self.job_time[stage]
        self.job_time[stage] = mean if old is None else old + EWMA * (mean - old)

    def sized(self, stage: int, payload_bytes: int, jobs: int) -> int:
        """A message of ``jobs`` pickled to ``payload_bytes``; returns bytes per job."""
        per_job = payload_bytes // jobs + 1
        self.job_bytes[stage] = per_job
        return per_job

    def answered(self, stage: int, result_bytes: int, jobs: int) -> None:
        """The results of ``jobs`` came back in a message of ``result_bytes``."""
        self.result_bytes[stage] = result_bytes // jobs + 1

    def wire_bytes(self, stage: int) -> int:
        """Bytes per job that a message carries, in whichever direction carries more."""
        return max(self.job_bytes[stage], self.result_bytes[stage])

    def jobs_per_message(self, stage: int) -> int:
        if self.chunksize:
            return self.chunksize
        t = self.job_time[stage]
        if t is None:
            return 1  # nothing measured yet: one job shows how long jobs take
        return max(1, min(MAX_BATCH, int(self.batch_seconds[stage] / t)))

    def fit_bytes(self, stage: int, jobs: int, head_bytes: int | None) -> int:
        """``jobs`` cut to the byte budget. ``head_bytes``: the next payload's pickled size,
        probed when the last message's payloads were small (they may not be any more)."""
        per_job = self.wire_bytes(stage)
        if head_bytes is not None:
            per_job = max(per_job, head_bytes)
        if per_job:
            jobs = min(jobs, max(1, MAX_MESSAGE_BYTES // per_job))
        return jobs

    def should_probe(self, stage: int, jobs: int) -> bool:
        """Would ``jobs`` payloads of the last measured size be small? Then probe the next."""
        return jobs > 1 and jobs * self.job_bytes[stage] < MAX_MESSAGE_BYTES // 2

    @staticmethod
    def oversized(jobs: int, payload_bytes: int) -> int | None:
        """Payloads behind the first grew past the estimate: how many to keep in this
        message (the rest go back to the queue), or None if it is fine as it is."""
        if jobs > 1 and payload_bytes > 2 * MAX_MESSAGE_BYTES:
            return max(1, MAX_MESSAGE_BYTES // (payload_bytes // jobs + 1))
        return None
