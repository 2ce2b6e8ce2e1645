"""Invalid settings fail at Pool(...) construction, before any process or thread starts."""

from __future__ import annotations

import threading

import psutil
import pytest
from faults import Echo

from batchpool import Pool, Task

pytestmark = pytest.mark.timeout(30)


class NoRun(Task):
    pass


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _build_fails(exc_types, build) -> None:
    before_children = _children()
    before_threads = threading.active_count()
    with pytest.raises(exc_types):
        build()
    assert _children() == before_children  # no process was started
    assert threading.active_count() == before_threads  # nor a supervisor thread


@pytest.mark.parametrize(
    "kwargs",
    [
        {"procs": 0},
        {"procs": -1},
        {"retries": -1},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("nan")},
        {"backoff": -0.5},
        {"max_tasks_per_worker": 0},
        {"max_memory": 0},
        {"chunksize": 0},
        {"start_method": "teleport"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_pool_arguments(kwargs: dict) -> None:
    _build_fails(ValueError, lambda: Pool(Echo(), **kwargs))


@pytest.mark.parametrize(
    "policy",
    [
        {"retries": -1},
        {"retries": 1.5},
        {"timeout": 0},
        {"timeout": -1.0},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"backoff": -1},
        {"max_backoff": -1},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_task_settings(policy: dict) -> None:
    _build_fails(ValueError, lambda: Pool(Echo(**policy), procs=1))


@pytest.mark.parametrize(
    "task",
    [lambda x: x, Echo, object(), "Echo", None],
    ids=["function", "class-not-instance", "object", "string", "none"],
)
def test_not_a_task(task) -> None:
    _build_fails(TypeError, lambda: Pool(task, procs=1))


def test_task_without_run() -> None:
    _build_fails(TypeError, lambda: Pool(NoRun(), procs=1))


def test_unpicklable_task_fails_at_construction() -> None:
    _build_fails(TypeError, lambda: Pool(Echo(lock=threading.Lock()), procs=1))


@pytest.mark.parametrize("jitter", [0.0, 1.0])
def test_boundary_settings_are_valid(jitter: float) -> None:
    with Pool(Echo(jitter=jitter, retries=0), procs=1, timeout=0.5) as pool:
        assert pool.map([1])[0].value == 1
