"""Invalid settings fail at Pool(...) and Pipeline(...) construction, before any process or
thread starts."""

from __future__ import annotations

import threading

import psutil
import pytest
from faults import Echo

from batchpool import Pipeline, Pool, Task

pytestmark = pytest.mark.timeout(30)


class NoRun(Task):
    pass


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _build_fails(exc_types, build, match: str | None = None) -> None:
    before_children = _children()
    before_threads = threading.active_count()
    with pytest.raises(exc_types, match=match):
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


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: Pipeline([1, 2]), ValueError, "stage"),
        (lambda: Pipeline([1, 2], name="x"), ValueError, "stage"),
        (lambda: Pipeline([1], Echo(), sink="results.jsonl"), TypeError, "sink"),
        (lambda: Pipeline([1], Echo(), sink=42), TypeError, "sink"),
        (lambda: Pipeline([1], Echo), TypeError, "Task"),  # the class, not an instance
        (lambda: Pipeline([1], Echo(), lambda x: x), TypeError, "Task"),
        (lambda: Pipeline([1], Echo(), Echo(retries=-1)), ValueError, "retries"),
        (lambda: Pipeline([1], Echo(timeout=0)), ValueError, "timeout"),
    ],
    ids=[
        "no-stage",
        "no-stage-named",
        "sink-a-string",
        "sink-a-number",
        "stage-a-class",
        "stage-a-function",
        "bad-second-stage",
        "bad-timeout",
    ],
)
def test_invalid_pipelines_fail_when_built(build, error: type, message: str) -> None:
    """SPEC: a pipeline needs one or more Task stages and a callable sink (or none); bad
    settings fail when it is built, not in a worker at run time."""
    _build_fails(error, build, match=message)
