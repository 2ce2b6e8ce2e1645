"""Exceptions raised by batchpool.

    Exception
     +-- PermanentError     raise it in Task.run() to fail the job now, without retries
     +-- JobFailed          JobResult.unwrap() on a failed job; ``.result`` holds the JobResult
     +-- WorkerCrashed      the type named by a "crash" JobError (a worker died mid-job)
    RuntimeError
     +-- PoolClosed         submit() after close() or terminate()
     +-- PoolBroken         submit() after workers failed to start 3 times in a row

A job's own failure is never raised by map/imap/submit: it is a JobResult with ``ok == False``.
Exceptions from a worker cross the process boundary as plain data (see JobError), so none of
these classes needs to be rebuilt from a pickle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import JobResult


class PermanentError(Exception):
    """A failure that no retry can fix (bad input, missing file): the job fails at once."""


class JobFailed(Exception):
    """Raised by ``JobResult.unwrap()``; carries the failed result."""

    def __init__(self, result: JobResult) -> None:
        err = result.error
        detail = f"{err.type}: {err.message}" if err else "failed"
        super().__init__(f"job {result.index} failed after {result.attempts} attempt(s): {detail}")
        self.result = result


class WorkerCrashed(Exception):
    """Names the failure of an attempt whose worker process died."""


class PoolClosed(RuntimeError):
    """The pool takes no more jobs."""


class PoolBroken(RuntimeError):
    """Workers could not start (setup failed repeatedly); the pool cannot run jobs."""
