"""Engine hardening: nothing waits without an end, timeouts always hold, no job runs twice at
once (issue 10). Each test drives a real fault through real processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import psutil
import pytest
from faults import Sleep, Square, attempts_of
from hardening_tasks import (
    Describe,
    HangsInWorker,
    HelperThenExit,
    HoldGil,
    LeavesThread,
    Marked,
    ReduceRaises,
    RefusedInWorker,
    ReturnsParentBomb,
    SetupHangs,
    SetupWorksTwice,
    StartsChildren,
    TeardownHangs,
    pids_in,
)
from helpers import (
    START_METHODS,
    all_gone,
    bp,
    check_invariants,
    launch,
    read_line,
    run,
    wait_for,
    write,
)

import batchpool
from batchpool import Pool, PoolBroken, PoolClosed
from batchpool.workforce import STOP_GRACE

# -- 1. a job holding the GIL in C cannot stall the supervisor ----------------------------------


@pytest.mark.timeout(60)
def test_gil_holding_job_times_out_while_a_big_payload_waits(tmp_path: Path) -> None:
    task = HoldGil(tmp_path, seconds=6, retries=0, timeout=1)
    with Pool(task, procs=1, chunksize=1) as pool:
        held = pool.submit("hold")
        wait_for(lambda: attempts_of(tmp_path, "hold"), 30, "the C call to start")
        big = pool.submit(b"x" * (16 * 1024 * 1024))  # more than any socket buffer
        answered = threading.Event()

        def ask() -> None:
            pool.metrics()
            answered.set()

        threading.Thread(target=ask, daemon=True).start()
        assert answered.wait(2.0), "metrics() waited for the supervisor"
        result = held.result(timeout=4.5)  # the C call alone takes 6 s
        assert result.error is not None and result.error.kind == "timeout", result
        assert big.result(timeout=30).value == 16 * 1024 * 1024
    check_invariants(pool.metrics())


# -- 2. BaseException while (un)pickling in the supervisor ---------------------------------------


@pytest.mark.timeout(60)
def test_payload_reduce_raising_systemexit_is_a_serialization_failure() -> None:
    with Pool(Describe(), procs=1) as pool:
        results = pool.map([1, ReduceRaises(), 3])
        assert [r.ok for r in results] == [True, False, True]
        assert results[1].error.kind == "serialization"
        assert results[1].error.type == "SystemExit"
        assert results[1].attempts == 1
        assert [r.value for r in pool.map([4, 5])] == [4, 5]  # still working
        assert pool.submit(6).result(timeout=30).value == 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", ["SystemExit", "KeyboardInterrupt"])
def test_result_rebuild_raising_baseexception_in_parent(exc: str) -> None:
    with Pool(ReturnsParentBomb(), procs=1, chunksize=1) as pool:
        results = pool.map(["fine", exc, "fine"])
        assert [r.ok for r in results] == [True, False, True]
        assert results[1].error.kind == "serialization"
        assert results[1].error.type == exc
        later = pool.submit("fine").result(timeout=30)
        assert later.value == "fine"


@pytest.mark.timeout(90)
def test_cli_run_with_a_result_that_breaks_in_the_parent_ends(tmp_path: Path) -> None:
    write(
        tmp_path / "pipe.py",
        """
        from batchpool import Pipeline
        from hardening_tasks import ReturnsParentBomb

        pipeline = Pipeline(["fine", "SystemExit", "fine", "KeyboardInterrupt"],
                            ReturnsParentBomb(), name="bomb")
        """,
    )
    done = bp("run", "pipe.py", "--procs", "1", "-q", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr


# -- 3. the supervisor thread dies anyway ----------------------------------------------------------


def _break_loop(pool: Pool, method: str, after: int = 0) -> None:
    """Fault injection into the engine itself (the one place tests reach inside): the
    supervisor's ``method`` (``part.method``: of one of its parts) raises once it has run
    ``after`` times."""
    supervisor: object = pool._supervisor
    *parts, method = method.split(".")
    for part in parts:
        supervisor = getattr(supervisor, part)
    real = getattr(supervisor, method)
    calls = {"n": 0}

    def failing(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("injected supervisor fault")
        return real(*args)

    setattr(supervisor, method, failing)


@pytest.mark.timeout(60)
def test_supervisor_death_fails_every_future_and_breaks_the_pool(tmp_path: Path) -> None:
    pool = Pool(Sleep(0.5), procs=2)
    try:
        pool.map([0.0, 0.0])  # the pool works
        pids = pool.pids()
        _break_loop(pool, "inbox.on_results")  # the first result that comes back
        futures = [pool.submit(0.2) for _ in range(5)]
        for future in futures:
            result = future.result(timeout=20)
            assert not result.ok and result.error.type == "SupervisorError", result
            assert "injected supervisor fault" in result.error.message
        with pytest.raises(PoolBroken, match="supervisor failed"):
            pool.submit(1)
        with pytest.raises(PoolBroken):
            pool.map([1])
        with pytest.raises(PoolBroken):
            list(pool.imap([1]))
        wait_for(lambda: all_gone(pids), 10, "the workers to be killed")
    finally:
        pool.close()  # returns: nothing waits on the dead loop


@pytest.mark.timeout(60)
def test_supervisor_death_during_map_fails_its_jobs_then_map_raises() -> None:
    pool = Pool(Sleep(0.05), procs=2)
    try:
        pool.map([0.0])
        _break_loop(pool, "_dispatch", after=3)
        results = pool.map([0.05] * 50)  # returns: the jobs it posted fail as results
        failed = [r for r in results if not r.ok]
        assert failed and {r.error.type for r in failed} == {"SupervisorError"}
        with pytest.raises(PoolBroken):
            pool.map([0.05])
    finally:
        pool.terminate()


@pytest.mark.timeout(90)
def test_cli_ends_with_one_line_when_the_supervisor_dies(tmp_path: Path) -> None:
    write(
        tmp_path / "pipe.py",
        """
        from batchpool import Pipeline
        from batchpool.supervisor import Supervisor
        from faults import Sleep

        def _broken(self, now):  # fault injection: the supervisor's loop fails
            raise RuntimeError("injected supervisor fault")

        Supervisor._dispatch = _broken
        pipeline = Pipeline([0.01] * 20, Sleep(), name="dies")
        """,
    )
    done = bp("run", "pipe.py", "--procs", "2", "-q", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "injected supervisor fault" in done.stderr


# -- 4. setup() that hangs -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_hanging_setup_breaks_the_pool_after_three_timed_out_starts() -> None:
    with pytest.raises(ValueError, match="start_timeout"):
        Pool(SetupHangs(), procs=1, start_timeout=0)
    pool = Pool(SetupHangs(), procs=1, timeout=1, start_timeout=1)
    try:
        results = pool.map([1, 2])
        assert [r.ok for r in results] == [False, False]
        assert {r.error.type for r in results} == {"StartTimeout"}
        assert "within 1 s" in results[0].error.message
        assert pool.metrics().worker_restarts == 2  # three starts in all, then it gave up
        with pytest.raises(PoolBroken):
            pool.submit(3)
    finally:
        pool.close()


# -- 5. jobs that re-enter the queue after the pool broke ------------------------------------------


@pytest.mark.timeout(60)
def test_retries_after_the_pool_broke_fail(tmp_path: Path) -> None:
    task = SetupWorksTwice(tmp_path, retries=2)
    with Pool(task, procs=2, chunksize=1) as pool:
        fast = pool.submit("crash")
        slow = pool.submit("crash:2")  # its worker dies after the pool gave up
        for future in (fast, slow):
            result = future.result(timeout=30)
            assert not result.ok
        assert slow.result().error.message == "setup fails from the third worker on"


# -- 6. a split batch under max_tasks_per_worker ---------------------------------------------------


@pytest.mark.timeout(60)
def test_split_batch_gives_back_the_workers_quota() -> None:
    with Pool(Describe(), procs=1, chunksize=2, max_tasks_per_worker=2) as pool:
        results = pool.map([RefusedInWorker(), 1, 2, 3])
    assert [r.ok for r in results] == [False, True, True, True]
    assert results[0].error.kind == "serialization"
    assert [r.value for r in results[1:]] == [1, 2, 3]


# -- 7. a worker's death is seen while a process it started lives ---------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_death_seen_while_a_helper_holds_the_pipes(tmp_path: Path, method: str) -> None:
    task = HelperThenExit(tmp_path, "fork", retries=0)
    with Pool(task, procs=1, start_method=method) as pool:
        result = pool.submit("x").result(timeout=4)  # the helper lives for an hour
    assert result.error.kind == "crash" and result.error.exitcode == 11, result
    helpers = pids_in(tmp_path, "helper")
    assert helpers
    wait_for(lambda: all_gone(helpers), 10, "the helper processes to be killed")


# -- 8. a killed forkserver does not make live workers look dead -----------------------------------


def _forkserver_pid() -> int:
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_killed_forkserver_runs_no_job_twice(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    with Pool(Marked(tmp_path, seconds=3), procs=2, start_method="forkserver") as pool:
        pool.map(["warm", "warm2"])
        futures = [pool.submit("slow"), pool.submit("slow2")]
        wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the first job to start")
        server = _forkserver_pid()
        os.kill(server, signal.SIGKILL)
        results = [f.result(timeout=30) for f in futures]
        assert [r.ok for r in results] == [True, True]
        assert [r.attempts for r in results] == [1, 1]
        assert len(attempts_of(tmp_path, "slow")) == 1
        assert pool.metrics().crashed == 0
    with Pool(Square(), procs=1, start_method="forkserver") as pool:  # a new server
        assert pool.map([2])[0].value == 4
    assert _forkserver_pid() != server
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.timeout(60)
def test_restarted_forkserver_ignores_group_signals(tmp_path: Path) -> None:
    # A pipeline's pool (the run owns the group's signals) restarts a dead server immune.
    with Pool._for_stages([Square()], 1, start_method="forkserver") as pool:
        pool.map([1])
    os.kill(_forkserver_pid(), signal.SIGKILL)
    with Pool._for_stages([Square()], 1, start_method="forkserver") as pool:
        assert pool.map([3])[0].value == 9  # started the server again, from its thread
        server = _forkserver_pid()
        os.kill(server, signal.SIGTERM)
        os.kill(server, signal.SIGINT)
        assert pool.map([4])[0].value == 16
    assert psutil.Process(server).status() != psutil.STATUS_ZOMBIE


# -- 9. processes a task starts do not outlive the pool --------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_task_children_die_with_the_pool(tmp_path: Path, method: str) -> None:
    with Pool(StartsChildren(tmp_path), procs=2, start_method=method) as pool:
        assert [r.ok for r in pool.map([1, 2, 3])] == [True] * 3
        children = pids_in(tmp_path, "child")
        assert len(children) == 9 and not all_gone(children)
    wait_for(lambda: all_gone(children), 10, "the tasks' children to be killed")


@pytest.mark.timeout(60)
def test_children_of_a_crashed_or_timed_out_worker_die(tmp_path: Path) -> None:
    task = HelperThenExit(tmp_path, "spawn", retries=0)
    with Pool(task, procs=1) as pool:
        assert pool.submit("x").result(timeout=30).error.kind == "crash"
        helpers = pids_in(tmp_path, "helper")
        wait_for(lambda: all_gone(helpers), 10, "the crashed worker's children to die")


# -- 10. futures follow concurrent.futures ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_futures_run_and_cancel_like_concurrent_futures(tmp_path: Path) -> None:
    with Pool(Marked(tmp_path, seconds=2), procs=1) as pool:
        running = pool.submit("slow")
        queued = [pool.submit(f"q{i}") for i in range(6)]
        wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the first job to start")
        assert running.running()
        assert not running.cancel()
        last = queued[-1]
        assert not last.running()
        assert last.cancel() and last.cancelled()
        with pytest.raises(CancelledError):
            last.result(timeout=1)
        assert running.result(timeout=30).ok
        assert all(f.result(timeout=30).ok for f in queued[:-1])
    assert not attempts_of(tmp_path, "q5")  # it never ran
    m = pool.metrics()
    assert m.cancelled == 1 and m.submitted == 7 and m.succeeded == 6
    check_invariants(m)


@pytest.mark.timeout(60)
def test_terminate_cancels_running_and_queued_futures(tmp_path: Path) -> None:
    pool = Pool(Marked(tmp_path, seconds=3600), procs=1)
    running = pool.submit("slow")
    queued = [pool.submit(f"q{i}") for i in range(3)]
    wait_for(lambda: attempts_of(tmp_path, "slow"), 30, "the job to start")
    pool.terminate()
    assert running.cancelled() and all(f.cancelled() for f in queued)
    m = pool.metrics()
    assert m.cancelled == 4 and m.submitted == 4
    check_invariants(m, cut_short=True)


# -- 11. smaller ones ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_hang_while_unpickling_a_batch_times_out() -> None:
    with Pool(Describe(timeout=1, retries=0), procs=1, chunksize=3) as pool:
        results = pool.map([1, HangsInWorker(), 3])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.kind == "timeout"


@pytest.mark.timeout(60)
def test_close_kills_a_hung_teardown_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    pool = Pool(TeardownHangs(), procs=1)
    assert pool.map([1])[0].ok
    pid = pool.pids()[0]
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < STOP_GRACE + 5
    assert all_gone([pid])
    assert any("did not exit within" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", START_METHODS)
def test_close_does_not_wait_for_a_tasks_thread(method: str) -> None:
    pool = Pool(LeavesThread(), procs=1, start_method=method)
    assert pool.map([1])[0].ok
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < STOP_GRACE / 2  # no kill needed: the worker exits


@pytest.mark.timeout(30)
def test_an_interrupted_post_loses_no_wakeup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C may strike inside post(), between its steps. Simulated at the worst
    moment (the wakeup write raises): later posts must still wake the loop, not wait for its
    next timer (1 s away)."""
    import batchpool.wakeup as sup

    with Pool(Square(), procs=1) as pool:
        pool.map([1])
        real_write = os.write

        def interrupted(fd: int, data: bytes) -> int:
            monkeypatch.setattr(sup.os, "write", real_write)
            raise KeyboardInterrupt

        monkeypatch.setattr(sup.os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.submit(2)
        start = time.monotonic()
        for i in range(20):
            assert pool.submit(i).result(timeout=10).value == i * i
        assert time.monotonic() - start < 5  # 20 round trips; a lost wakeup costs ~1 s each


SPAWN_INTERRUPT = """
import faulthandler
import sys
import time
from batchpool import Pool
from faults import Square

if __name__ == "__main__":
    pool = Pool(Square(), procs=4, start_method="spawn")
    try:
        while len(pool.pids()) < 4:  # spawned, still importing: none is ready this soon
            time.sleep(0.001)
        faulthandler.dump_traceback_later(20, exit=True)  # a hang says where it is
        print("started", flush=True)
        pool.map(range(10))
        time.sleep(60)  # the Ctrl-C ends this
    except KeyboardInterrupt:
        pool.terminate()
        sys.exit(130)
"""


@pytest.mark.timeout(60)
def test_ctrl_c_while_spawned_workers_start_prints_no_tracebacks(tmp_path: Path) -> None:
    script = tmp_path / "spawn_interrupt.py"
    script.write_text(SPAWN_INTERRUPT)
    with launch([sys.executable, script]) as proc:
        assert read_line(proc, 30) == "started\n"
        os.killpg(proc.pid, signal.SIGINT)  # while the spawned interpreters start
        _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err
    assert proc.returncode == 130, err


def test_pool_errors_are_exported() -> None:
    from batchpool import errors

    assert batchpool.PoolClosed is errors.PoolClosed is PoolClosed
    assert batchpool.PoolBroken is errors.PoolBroken is PoolBroken
    assert {"PoolClosed", "PoolBroken"} <= set(batchpool.__all__)


@pytest.mark.timeout(60)
def test_pool_timeout_none_removes_the_tasks_timeout() -> None:
    with Pool(Sleep(1.0, timeout=0.3, retries=0), procs=1, timeout=None) as pool:
        result = pool.submit(None).result(timeout=30)
    assert result.ok, result


FORK_AT_EXIT = """
import os, sys, time
from batchpool import Pool, PoolClosed
from faults import Square

if __name__ == "__main__":
    mode = sys.argv[1]
    pool = Pool(Square(), procs=1)
    pool.map([1])
    child = os.fork()
    if child == 0:
        if mode == "with":
            try:
                pool.map([2])
            except PoolClosed:
                pass
            else:
                os._exit(3)
            with pool:
                pass  # leaving it closes the pool: the copy has nothing to wait for
        sys.exit(0)  # runs the exit hooks, as a forked helper process would
    start = time.monotonic()
    _, status = os.waitpid(child, 0)
    print(f"{time.monotonic() - start:.3f} {status}", flush=True)
    pool.close()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["exit", "with"])
def test_a_forked_child_exits_without_waiting_for_its_parents_pools(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "fork_at_exit.py"
    script.write_text(FORK_AT_EXIT)
    done = run([sys.executable, script, mode], timeout=45)
    assert done.returncode == 0, done.stderr
    took, status = done.stdout.split()
    assert status == "0", done.stderr  # the child's exit status
    assert float(took) < 5, "the child waited for its parent's pool"


SHARED_FORKSERVER = """
import multiprocessing
from batchpool import Pool
from faults import Square

if __name__ == "__main__":
    with Pool(Square(), procs=1, start_method="forkserver") as pool:  # starts the server
        assert pool.map([2])[0].value == 4
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(2) as peer:  # terminate() at the end: SIGTERM to its workers
        assert peer.map(abs, [-1, -2]) == [1, 2]
    print("ok", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_pool_leaves_the_shared_forkserver_usable_by_multiprocessing(tmp_path: Path) -> None:
    """A plain Pool starts the forkserver as multiprocessing would: its children are not
    immune to SIGTERM, so multiprocessing.Pool.terminate() still ends its own workers."""
    script = tmp_path / "shared_forkserver.py"
    script.write_text(SHARED_FORKSERVER)
    done = run([sys.executable, script], timeout=45)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
