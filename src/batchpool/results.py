"""What a job ends as (JobResult, JobError) and what the pool reports (Metrics): frozen data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .errors import JobFailed

#: JobError.kind values.
KIND_ERROR = "error"
KIND_TIMEOUT = "timeout"
KIND_CRASH = "crash"
KIND_SERIALIZATION = "serialization"
KIND_CANCELLED = "cancelled"


@dataclass(frozen=True)
class JobError:
    """A failure as plain data: it never needs the exception class to exist in this process."""

    kind: str
    type: str
    message: str
    traceback: str = ""
    exitcode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Fields:
    """JobResult's storage: slots (a map() of a million jobs holds a million results) in a
    base class of its own, so that the supervisor can fill a result the way any object is
    filled and only then make it the frozen JobResult (see ``new_result``): the frozen
    dataclass's own ``__init__`` costs a call per field."""

    __slots__ = ("index", "payload", "value", "error", "attempts", "elapsed", "worker")


@dataclass(frozen=True)
class JobResult(_Fields):
    """The one final outcome of a job."""

    __slots__ = ()
    index: int
    payload: Any
    value: Any
    error: JobError | None
    attempts: int
    elapsed: float
    worker: int | None
    # True on the results that a resumed pipeline replays to its sink (pipeline.ReplayedResult)
    replayed: ClassVar[bool] = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> Any:
        """The value, or raise JobFailed carrying this result."""
        if self.error is not None:
            raise JobFailed(self)
        return self.value

    def __reduce__(self) -> tuple[type[JobResult], tuple[Any, ...]]:
        # Rebuilt through __init__: the default would set the slots one by one, which a
        # frozen class refuses.
        return type(self), (
            self.index,
            self.payload,
            self.value,
            self.error,
            self.attempts,
            self.elapsed,
            self.worker,
        )


class _Unfrozen(_Fields):
    """A JobResult being filled in: its class becomes JobResult once every field is set."""

    __slots__ = ()


def new_result(
    index: int,
    payload: Any,
    value: Any,
    error: JobError | None,
    attempts: int,
    elapsed: float,
    worker: int | None,
    _new: Callable[[type[_Unfrozen]], Any] = object.__new__,
) -> JobResult:
    """``JobResult(index, payload, value, error, attempts, elapsed, worker)`` at a fifth of
    the dataclass ``__init__``'s cost (~270 ns against ~1.4 us): the supervisor builds one
    per job. The class change costs ~90 ns because ``_Unfrozen`` and ``JobResult`` add
    nothing to their base's slots; between two classes that each declare them, CPython also
    compares the slot names (~150 ns in all)."""
    r = _new(_Unfrozen)
    r.index = index
    r.payload = payload
    r.value = value
    r.error = error
    r.attempts = attempts
    r.elapsed = elapsed
    r.worker = worker
    r.__class__ = JobResult
    result: JobResult = r  # r is Any while it is filled; no cast() call per job
    return result


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    jobs: int
    busy: float  # seconds spent in run()
    rss: int  # bytes, last sample


@dataclass(frozen=True)
class StageMetrics:
    """One stage's counters; its attempts obey ``started == succeeded + failed + retried``
    once it is done (``succeeded`` here: attempts that passed the job to the next stage or
    finished it)."""

    submitted: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    timed_out: int = 0
    crashed: int = 0
    attempt_p50: float | None = None  # seconds, from a bounded sample of attempt times
    attempt_p95: float | None = None
    # attempts that returned, by time: count per bucket of sampling.BOUNDS (and one above)
    attempt_buckets: tuple[int, ...] = ()
    attempt_sum: float = 0.0  # seconds of those attempts, in all


@dataclass(frozen=True)
class Metrics:
    """A consistent snapshot of a pool's counters.

    Job counts are per job, whatever the number of stages: when a run is done
    ``succeeded + failed + cancelled == submitted``. Attempt counts (``started``, ``retried``,
    ``timed_out``, ``crashed``) add up every stage's; in a one-stage pool, when no running
    attempt was cut short by a cancellation, ``started == succeeded + failed + retried``.
    ``stages`` holds each stage's own counters. ``started`` counts attempts handed to a
    worker; one that a worker hands back unstarted (to balance load, for a higher priority, or
    cancelled) leaves it again, so it may fall while a run goes on.
    """

    submitted: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    timed_out: int = 0
    crashed: int = 0
    worker_restarts: int = 0  # workers started to replace one that died or retired
    scaled_up: int = 0  # workers added by autoscaling or resize()
    scaled_down: int = 0  # workers retired by autoscaling or resize()
    queued: int = 0
    in_flight: int = 0
    workers: int = 0
    elapsed: float = 0.0
    per_worker: tuple[WorkerStats, ...] = field(default_factory=tuple)
    peak_rss: int = 0  # bytes: the largest worker RSS sampled, workers gone since included
    stages: tuple[StageMetrics, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
