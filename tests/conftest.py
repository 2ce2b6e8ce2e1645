"""Fixtures shared by every test module: start methods, and the process-leak check."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from helpers import START_METHODS

LEAK_DEADLINE = 5.0  # seconds a test's processes get to go away after it ends
# Long-lived helpers of multiprocessing itself, started once per test session. They are ours to
# ignore, but only as direct children of this process: a worker forked by the forkserver has
# the server's command line too, and it is exactly what the check is for.
IGNORED_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return request.param


def _describe(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    try:
        status = proc.status()
    except psutil.Error:
        status = "gone"
    return f"pid {proc.pid} ({status}): {cmd[:200]}"


def _is_ignored_helper(proc: psutil.Process, me: int) -> bool:
    try:
        if proc.ppid() != me:
            return False
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(marker in cmd for marker in IGNORED_HELPERS)


def _leftovers() -> list[psutil.Process]:
    """Descendants of this process, the multiprocessing helpers excepted (their children
    included: the forkserver's children are workers)."""
    me = os.getpid()
    try:
        procs = psutil.Process(me).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in procs:
        if _is_ignored_helper(proc, me):
            continue
        try:
            if not proc.is_running():
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=3)
    for proc in procs:  # reap our own zombies, so the next test starts clean
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves live descendant processes behind (zombies too, once the
    deadline has passed). Leftovers are killed, so one leak does not cascade."""
    yield
    deadline = time.monotonic() + LEAK_DEADLINE
    left = _leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.02)  # inside a deadline-bound condition loop
        left = _leftovers()
    if left:
        described = [_describe(p) for p in left]
        _kill(left)
        pytest.fail(
            f"{len(described)} process(es) still alive {LEAK_DEADLINE:g} s after the test:\n  "
            + "\n  ".join(described),
            pytrace=False,
        )
