"""Shared test helpers: deadlines instead of sleeps, process checks, bounded job runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, wait
from pathlib import Path
from typing import Any

import psutil

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"
START_METHODS = ["fork", "forkserver", "spawn"]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes, then
    raise AssertionError naming ``what``. The sleep sits inside a condition loop with a
    deadline: never sleep-and-hope."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True if no live process has this pid (a zombie nobody reaps counts as gone: it runs
    nothing and holds nothing but its process-table slot)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_gone(pids: Iterable[int]) -> bool:
    return all(pid_gone(p) for p in pids)


def alive(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if not pid_gone(p)]


def run_jobs(
    pool: Any,
    payloads: Iterable[Any],
    timeout: float = 60.0,
    max_restarts: int | None = None,
) -> list[Any]:
    """submit() every payload and wait for all results, with a deadline: an engine that loses a
    job fails the test with an AssertionError (and the enclosing ``with Pool`` terminates the
    pool) instead of hanging the whole session. With ``max_restarts``, a restart storm (more
    worker restarts than that) fails the test as soon as it shows."""
    futures = [pool.submit(p) for p in payloads]
    deadline = time.monotonic() + timeout
    while True:
        _, not_done = wait(futures, timeout=0.05, return_when=FIRST_EXCEPTION)
        if not not_done:
            break
        problem = None
        if max_restarts is not None and pool.metrics().worker_restarts > max_restarts:
            problem = f"restart storm: more than {max_restarts} worker restarts"
        elif time.monotonic() >= deadline:
            problem = f"timed out after {timeout:g} s"
        if problem:
            try:
                metrics = pool.metrics()
            except Exception as exc:  # pragma: no cover - diagnostics only
                metrics = repr(exc)
            raise AssertionError(
                f"{problem}; {len(not_done)} of {len(futures)} jobs unfinished; metrics: {metrics}"
            )
    return [f.result() for f in futures]


def run_one(pool: Any, payload: Any, timeout: float = 60.0) -> Any:
    return run_jobs(pool, [payload], timeout)[0]


def child_env() -> dict[str, str]:
    """Environment for a child interpreter that must import batchpool and tests/faults.py."""
    env = dict(os.environ)
    parts = [str(TESTS_DIR), str(SRC_DIR)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("PYTHONWARNINGS", None)
    return env


def run_script(path: Path, timeout: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=path.parent,
    )


def check_invariants(m: Any, *, cut_short: bool = False) -> None:
    """The SPEC's end-of-run Metrics invariants: job counts add up; each stage's attempts
    add up (unless a cancellation cut running attempts short); the totals are the stages'."""
    assert m.succeeded + m.failed + m.cancelled == m.submitted, m
    assert m.queued == 0, m
    assert m.in_flight == 0, m
    for field in ("started", "retried", "timed_out", "crashed", "failed", "cancelled"):
        assert getattr(m, field) == sum(getattr(s, field) for s in m.stages), (field, m)
    assert m.submitted == m.stages[0].submitted and m.succeeded == m.stages[-1].succeeded, m
    for stage in m.stages:
        if not cut_short:
            assert stage.started == stage.succeeded + stage.failed + stage.retried, m
    if len(m.stages) == 1 and not cut_short:
        assert m.started == m.succeeded + m.failed + m.retried, m


def group_alive(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid``, or of the session it leads (workers
    lead process groups of their own inside the session of the run; zombies count as
    gone)."""
    found = []
    for proc in psutil.process_iter():
        try:
            mine = os.getpgid(proc.pid) == pgid or os.getsid(proc.pid) == pgid
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return found
