"""Shutdown: close drains, terminate kills, `with`, interpreter exit, parent death, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from faults import Echo, FailTimes, SetupFails, Sleep, SleepMarked, attempts_of
from helpers import alive, all_gone, child_env, read_line, run_jobs, wait_for

from batchpool import Pool
from batchpool.errors import PoolClosed

pytestmark = pytest.mark.timeout(120)

GONE_WITHIN = 5.0  # seconds for workers to disappear after their pool or parent is gone

CHILD = textwrap.dedent(
    """
    import json, sys, time

    from batchpool import Pool
    from faults import SleepMarked, attempts_of

    POOL = None


    def open_pool(method, marker_dir):
        pool = Pool(SleepMarked(marker_dir, 3600), procs=2, start_method=method)
        pool.submit("slow")
        deadline = time.monotonic() + 60
        while not attempts_of(marker_dir, "slow") or len(pool.pids()) < 2:
            if time.monotonic() > deadline:
                sys.exit("the job never started")
            time.sleep(0.01)
        print(json.dumps(pool.pids()), flush=True)
        return pool


    def main():
        global POOL
        method, marker_dir, mode = sys.argv[1:4]
        if mode == "clean":
            with Pool(SleepMarked(marker_dir, 0), procs=2, start_method=method) as pool:
                assert [r.value for r in pool.map(range(10))] == list(range(10))
                print(json.dumps(pool.pids()), flush=True)
            return
        if mode == "exit-global":  # module global: open at interpreter exit
            POOL = open_pool(method, marker_dir)
            return
        if mode == "exit-dropped":  # the last reference dropped without close()
            open_pool(method, marker_dir)
            return
        if mode == "hang":  # the test SIGKILLs us
            POOL = open_pool(method, marker_dir)
            time.sleep(3600)


    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    (tmp_path / "markers").mkdir()
    return path


def _clean_stderr(stderr: str) -> None:
    for bad in ("leaked", "resource_tracker", "Traceback", "Exception ignored"):
        assert bad not in stderr, stderr


def _run_child(script: Path, method: str, mode: str, timeout: float = 30.0):
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), method, str(script.parent / "markers"), mode],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
            cwd=script.parent,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the child did not exit within {timeout:g} s (mode {mode}); stderr: {exc.stderr!r}"
        ) from None
    return proc, time.monotonic() - start


# -- close / terminate / with ----------------------------------------------------------------------


def test_close_drains_submitted_jobs() -> None:
    pool = Pool(Sleep(0.05), procs=2)
    futures = [pool.submit(i) for i in range(20)]
    pids = pool.pids()
    pool.close()
    assert all(f.done() for f in futures)
    results = [f.result() for f in futures]
    assert [r.value for r in results] == list(range(20))
    assert all(r.ok for r in results)
    wait_for(lambda: all_gone(pids), GONE_WITHIN, "workers gone after close")
    assert pool.metrics().workers == 0


def test_close_drains_jobs_waiting_for_retry(tmp_path: Path) -> None:
    pool = Pool(FailTimes(1, tmp_path, retries=1, backoff=0.3), procs=1)
    futures = [pool.submit(i) for i in range(3)]
    pool.close()
    results = [f.result(timeout=0) for f in futures]
    assert all(r.ok and r.attempts == 2 for r in results)


def test_close_and_terminate_are_idempotent() -> None:
    pool = Pool(Echo(), procs=1)
    assert pool.map([1])[0].value == 1
    pool.close()
    pool.close()
    pool.terminate()
    with pytest.raises(PoolClosed):
        pool.submit(1)


def test_calls_after_close_do_not_write_to_recycled_descriptors(tmp_path: Path) -> None:
    pool = Pool(Echo(), procs=1)
    pool.map([1])
    pool.close()
    # Grab the lowest free descriptors: the ones the pool just closed get reused here.
    paths = [tmp_path / f"f{i}" for i in range(32)]
    files = [open(p, "wb") for p in paths]  # noqa: SIM115
    try:
        pool.close()
        pool.terminate()
        with pytest.raises(PoolClosed):
            pool.submit(1)
    finally:
        for f in files:
            f.close()
    written = {p.name: p.read_bytes() for p in paths if p.read_bytes()}
    assert not written, f"a closed pool wrote into unrelated files: {written}"


def test_close_without_jobs_returns_even_if_setup_fails(tmp_path: Path) -> None:
    pool = Pool(SetupFails(tmp_path), procs=2)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (pool.close(), done.set()), daemon=True)
    thread.start()
    assert done.wait(30), "close() hung"


def test_terminate_cancels_and_kills_fast(tmp_path: Path) -> None:
    pool = Pool(SleepMarked(tmp_path, 3600), procs=1)
    running = pool.submit("slow")
    queued = [pool.submit(f"q{i}") for i in range(5)]
    [(_, pid)] = wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the job to start")
    start = time.monotonic()
    pool.terminate()
    assert time.monotonic() - start < 3.0
    assert running.cancelled()
    assert all(f.cancelled() for f in queued)
    wait_for(lambda: all_gone([pid]), GONE_WITHIN, "the worker to die")
    with pytest.raises(PoolClosed):
        pool.submit(1)


def test_terminate_unblocks_a_map_in_another_thread(tmp_path: Path) -> None:
    pool = Pool(SleepMarked(tmp_path, 3600), procs=1)
    outcome: list = []

    def mapper() -> None:
        try:
            outcome.append(pool.map(["slow", "x"]))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=mapper, daemon=True)
    thread.start()
    wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the job to start")
    pool.terminate()
    thread.join(10)
    assert not thread.is_alive(), "map() still blocked after terminate()"
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosed), outcome


def test_with_closes_on_success() -> None:
    with Pool(Sleep(0.02), procs=2) as pool:
        futures = [pool.submit(i) for i in range(10)]
        pids = pool.pids()
    assert all(f.done() and f.result().ok for f in futures)
    wait_for(lambda: all_gone(pids), GONE_WITHIN, "workers gone")


def test_with_terminates_on_exception(tmp_path: Path) -> None:
    start = None
    with (
        pytest.raises(RuntimeError, match="user error"),
        Pool(SleepMarked(tmp_path, 3600), procs=1) as pool,
    ):
        future = pool.submit("slow")
        [(_, pid)] = wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "job start")
        start = time.monotonic()
        raise RuntimeError("user error")
    assert time.monotonic() - start < 3.0
    assert future.cancelled()
    wait_for(lambda: all_gone([pid]), GONE_WITHIN, "the worker to die")


# -- signals to workers ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_workers_ignore_sigint_and_sigterm(tmp_path: Path, sig: signal.Signals) -> None:
    with Pool(SleepMarked(tmp_path, 1.0, retries=0), procs=1) as pool:
        future = pool.submit("slow")
        [(_, pid)] = wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the job to start")
        os.kill(pid, sig)
        r = future.result(timeout=30)
        assert r.ok and r.attempts == 1 and r.worker == pid
        assert pool.pids() == [pid]
        assert run_jobs(pool, ["after"])[0].worker == pid


# -- interpreter exit and parent death ------------------------------------------------------------


def test_clean_run_in_child_leaves_nothing(child_script: Path, start_method: str) -> None:
    proc, _ = _run_child(child_script, start_method, "clean")
    assert proc.returncode == 0, proc.stderr
    _clean_stderr(proc.stderr)
    pids = json.loads(proc.stdout.splitlines()[0])
    wait_for(lambda: all_gone(pids), GONE_WITHIN, "workers of the child gone")


def _check_exit(script: Path, method: str, mode: str) -> None:
    proc, elapsed = _run_child(script, method, mode, timeout=15.0)
    pids = json.loads(proc.stdout.splitlines()[0]) if proc.stdout else []
    assert pids, proc.stderr
    try:
        assert proc.returncode == 0, proc.stderr
        assert elapsed < 10
        _clean_stderr(proc.stderr)
        wait_for(lambda: all_gone(pids), GONE_WITHIN, "workers gone after the child exited")
    finally:
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)


def test_open_pool_at_interpreter_exit(child_script: Path, start_method: str) -> None:
    # The pool is a module global, still open, running a job that never ends.
    _check_exit(child_script, start_method, "exit-global")


def test_dropped_pool_at_interpreter_exit(child_script: Path) -> None:
    # The last reference to the pool went away without close(), its job never ends; exit must
    # still not hang (the start method does not matter here: the default one).
    _check_exit(child_script, "forkserver", "exit-dropped")


def test_parent_sigkill_leaves_no_worker(child_script: Path, start_method: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(child_script), start_method, str(child_script.parent / "markers")]
        + ["hang"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        cwd=child_script.parent,
    )
    pids: list[int] = []
    try:
        pids = json.loads(read_line(proc, 60))
        assert len(pids) == 2 and alive(pids) == pids
        proc.kill()
        proc.wait(10)
        wait_for(lambda: all_gone(pids), GONE_WITHIN, "workers gone after the parent's SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)
