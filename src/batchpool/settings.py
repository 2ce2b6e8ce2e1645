"""A Pool's settings, checked before anything starts: a bad value raises ValueError (or
TypeError for a task that cannot be pickled) in the caller, never in a worker."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from .backends import check_backend
from .durations import seconds_setting
from .messages import dumps
from .scaling import Bounds, check, check_idle_timeout
from .task import Policy, Task, resolve_policy

START_TIMEOUT = 60.0  # seconds a worker gets for start-up and setup() by default
IDLE_TIMEOUT = 10.0  # seconds an idle worker of a scaling pool waits before it retires


class Settings(NamedTuple):
    policies: list[Policy]  # one per stage
    bounds: Bounds  # (low, high) workers; low == high without scaling
    scaling: bool  # procs=(min, max)
    start_method: str
    chunksize: int | None  # None: sized from the measured job time
    start_limit: float  # seconds a worker gets to start and run setup()
    tasks_blob: bytes  # the pickled tasks, sent once to each worker
    max_tasks: int | None  # jobs a worker runs before it is replaced
    max_memory: int | None  # bytes of RSS past which a worker is replaced
    backend: str
    address: str | None  # of a Ray cluster


def default_start_method() -> str:
    # fork after threads is unsafe (the supervisor is a thread), so prefer forkserver.
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def check_settings(
    tasks: list[Task],
    procs: Any,
    overrides: dict[str, Any],
    *,
    start_method: str | None = None,
    chunksize: int | str = "auto",
    max_tasks_per_worker: int | None = None,
    max_memory: int | None = None,
    start_timeout: float | None = None,
    backend: str = "local",
    address: str | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Settings:
    """Pool()'s arguments, checked; ``overrides``: the task settings a pool overrides."""
    policies = [resolve_policy(t, **overrides) for t in tasks]
    bounds = _bounds(procs, idle_timeout)
    method = start_method or default_start_method()
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {multiprocessing.get_all_start_methods()}, got {method!r}"
        )
    size = None if chunksize == "auto" else positive_int("chunksize", chunksize, allow_none=False)
    positive_int("max_tasks_per_worker", max_tasks_per_worker)
    positive_int("max_memory", max_memory)
    start_limit = _start_limit(start_timeout, policies)
    check_backend(backend, address)
    try:
        tasks_blob = dumps(tasks)
    except Exception as exc:
        raise TypeError(f"the task cannot be pickled for the workers: {exc}") from exc
    scaling = isinstance(procs, tuple)
    return Settings(
        policies,
        bounds,
        scaling,
        method,
        size,
        start_limit,
        tasks_blob,
        max_tasks_per_worker,
        max_memory,
        backend,
        address,
    )


def describe(settings: Settings, procs: int) -> str:
    """The settings in one line (the log file's run start); ``procs``: workers now."""
    b = settings.bounds
    workers = f"procs {b.low}:{b.high} (idle timeout {b.idle_timeout:g} s)"
    if not settings.scaling:
        workers = f"procs {procs}"
    stages = "; ".join(
        f"stage {i + 1}: retries {p.retries}, backoff {p.backoff:g} s, "
        f"timeout {'none' if p.timeout is None else f'{p.timeout:g} s'}"
        for i, p in enumerate(settings.policies)
    )
    return f"{workers}, {settings.start_method}, backend {settings.backend}; {stages}"


def positive_int(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _start_limit(start_timeout: float | None, policies: Sequence[Policy]) -> float:
    if start_timeout is None:
        return max([START_TIMEOUT] + [p.timeout for p in policies if p.timeout])
    return seconds_setting("start_timeout", start_timeout)


def _bounds(procs: Any, idle_timeout: Any) -> Bounds:
    """``procs`` as (low, high): a plain number N is (N, N), without scaling."""
    if isinstance(procs, tuple):
        return check(procs, idle_timeout)
    n = positive_int("procs", os.cpu_count() or 1 if procs is None else procs)
    assert n is not None
    return Bounds(n, n, check_idle_timeout(idle_timeout))
