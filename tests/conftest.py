"""Fixtures shared by every test module: start methods, the jobs pipeline file, and the
process-leak check."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import JOBS_PY, START_METHODS, write

LEAK_DEADLINE = 5.0  # seconds a test's processes get to go away after it ends
# Long-lived helpers of multiprocessing itself, started once per test session. They are ours to
# ignore, but only as direct children of this process: a worker forked by the forkserver has
# the server's command line too, and it is exactly what the check is for.
IGNORED_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
# Ray's daemons and worker processes (test_ray_backend.py runs a Ray instance for its module and
# checks its own actors are gone): they are Ray's to manage, at any depth.
RAY_PROCESSES = (
    "ray::",
    "/ray/core/src/ray/",
    "/ray/dashboard/",
    "/ray/_private/",
    "/ray/autoscaler/",
)


def _missing_module_under_ci(report: pytest.CollectReport | pytest.TestReport) -> bool:
    """A skip for a module that cannot be imported (pytest.importorskip), while the CI
    variable is set: there every optional dependency of the test extra is installed, so the
    skip would hide a broken install behind one green "s"."""
    return bool(
        os.environ.get("CI")
        and report.skipped
        and not hasattr(report, "wasxfail")
        and "could not import" in str(report.longrepr)
    )


def _fail_instead(report: pytest.CollectReport | pytest.TestReport) -> None:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)  # (path, line, text)
    report.outcome = "failed"
    report.longrepr = f"{reason}; CI is set, so this fails: pip install -e '.[test]'"


def pytest_configure(config: pytest.Config) -> None:
    """Children get a terminal's Ctrl-C: a suite started in the background by a shell
    without job control (``.ci/run &``) ignores SIGINT, every process it starts inherits the
    ignore, and a Python script then never raises KeyboardInterrupt. A Python handler is not
    inherited across exec: with it installed here, children start with the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    report = yield
    if _missing_module_under_ci(report):
        _fail_instead(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, Any, Any]:
    report = yield
    if _missing_module_under_ci(report):
        _fail_instead(report)
    return report


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    """tmp_path/jobs.py: helpers.JOBS_PY, the pipeline the CLI tests run."""
    return write(tmp_path / "jobs.py", JOBS_PY)


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


def _is_ray(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(marker in cmd for marker in RAY_PROCESSES)


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
        if _is_ignored_helper(proc, me) or _is_ray(proc):
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


def _engine_threads() -> set[threading.Thread]:
    """Live threads of batchpool (a pool's supervisor): an open pool may still start workers,
    so a test that ends with one running would leak processes the check could not see yet."""
    return {t for t in threading.enumerate() if t.name.startswith("batchpool") and t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves live descendant processes behind (zombies too, once the
    deadline has passed), or a pool still running. Leftover processes are killed, so one leak
    does not cascade."""
    threads_before = _engine_threads()
    yield
    deadline = time.monotonic() + LEAK_DEADLINE

    def check() -> tuple[list[psutil.Process], set[threading.Thread]]:
        return _leftovers(), _engine_threads() - threads_before

    left, threads = check()
    while (left or threads) and time.monotonic() < deadline:
        time.sleep(0.02)  # inside a deadline-bound condition loop
        left, threads = check()
    problems = []
    if threads:
        problems.append(
            f"{len(threads)} pool thread(s) still running {LEAK_DEADLINE:g} s after the test "
            f"(a pool left open?): {sorted(t.name for t in threads)}"
        )
    if left:
        described = [_describe(p) for p in left]
        _kill(left)
        problems.append(
            f"{len(described)} process(es) still alive {LEAK_DEADLINE:g} s after the test:\n  "
            + "\n  ".join(described)
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
