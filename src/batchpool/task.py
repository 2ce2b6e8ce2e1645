"""The Task base class users subclass, and the validation of its settings."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .errors import PermanentError
from .rates import parse_rate


class Task:
    """A unit of work: subclass it and implement ``run(payload)``.

    The instance is pickled once per worker process, so expensive state belongs in ``setup()``
    (a model, a connection), not in ``__init__``. Instance attributes override the class
    defaults below.
    """

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 60.0
    jitter: float = 0.25
    timeout: float | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    priority: int = 0  # of this task's jobs, unless submit/map/imap give one; higher first
    rate_limit: str | float | None = None  # attempt starts across the pool: "100/s", "30/m"...

    def setup(self) -> None:
        """Once in each worker process, before its first job."""

    def run(self, payload: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement run(payload)")

    def teardown(self) -> None:
        """Once in each worker process at a clean shutdown."""


def is_retryable(task: Task, exc: BaseException) -> bool:
    """Decided in the worker, against the real exception object."""
    if isinstance(exc, PermanentError):
        return False
    return isinstance(exc, task.retry_on)


class Policy(NamedTuple):
    """The settings the supervisor applies to one stage."""

    retries: int
    backoff: float
    max_backoff: float
    jitter: float
    timeout: float | None
    priority: int = 0  # of the stage's jobs
    rate: float | None = None  # attempt starts per second, None: no limit


def check_priority(value: Any) -> int:
    """A job priority: an int (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be an integer, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class _Unset:
    def __repr__(self) -> str:
        return "<the task's>"


UNSET: Any = _Unset()  # a pool setting that does not override the task's (None may: timeout)


def resolve_policy(
    task: Task,
    *,
    retries: int | None = UNSET,
    timeout: float | None = UNSET,
    backoff: float | None = UNSET,
    rate_limit: str | float | None = UNSET,
) -> Policy:
    """Validate a task's settings (with pool overrides) before any process starts."""
    if not isinstance(task, Task):
        raise TypeError(f"expected a batchpool.Task instance, got {type(task).__name__}")
    if type(task).run is Task.run:
        raise TypeError(f"{type(task).__name__} does not implement run(payload)")
    r = task.retries if retries is UNSET or retries is None else retries
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"retries must be an integer >= 0, got {r!r}")
    b = _number("backoff", task.backoff if backoff is UNSET or backoff is None else backoff)
    if b < 0:
        raise ValueError(f"backoff must be >= 0, got {b!r}")
    mb = _number("max_backoff", task.max_backoff)
    if mb < 0:
        raise ValueError(f"max_backoff must be >= 0, got {mb!r}")
    j = _number("jitter", task.jitter)
    if not 0.0 <= j <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {j!r}")
    t = task.timeout if timeout is UNSET else timeout
    if t is not None:
        t = _number("timeout", t)
        if t <= 0 or math.isinf(t):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {t!r}")
    retry_on = task.retry_on
    if not isinstance(retry_on, tuple) or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in retry_on
    ):
        raise ValueError(f"retry_on must be a tuple of exception classes, got {retry_on!r}")
    limit = task.rate_limit if rate_limit is UNSET or rate_limit is None else rate_limit
    return Policy(
        retries=r,
        backoff=b,
        max_backoff=mb,
        jitter=j,
        timeout=t,
        priority=check_priority(task.priority),
        rate=parse_rate(limit),
    )
