"""Process mechanics under the local workers (batchpool.processes), on real processes: killing a
whole process tree, naming how a process ended, the forkserver that survives the signals a
terminal sends to its whole process group, and the lifeline that a fork does not keep alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from faults import ChildSignals
from helpers import START_METHODS, alive, all_gone, child_env, read_line, wait_for

from batchpool import Pool
from batchpool.processes import describe_exit, kill_tree

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "code, text",
    [
        (0, "exit code 0"),
        (13, "exit code 13"),
        (-signal.SIGKILL, "SIGKILL (-9)"),
        (-signal.SIGSEGV, "SIGSEGV (-11)"),
        (-signal.SIGTERM, "SIGTERM (-15)"),
        (-40, "signal 40 (-40)"),  # a real-time signal without a name of its own
        (None, "exit status unknown"),  # a backend that cannot tell (Ray)
    ],
)
def test_describe_exit(code: int | None, text: str) -> None:
    assert describe_exit(code) == text


def test_describe_exit_of_a_real_death() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.abort()"])
    assert describe_exit(proc.wait(timeout=30)) == "SIGABRT (-6)"


# A process that starts a child that starts a child; each prints its pid, then all sleep.
TREE = """
import subprocess, sys, time
depth = int(sys.argv[1])
print(__import__("os").getpid(), flush=True)
if depth:
    subprocess.Popen([sys.executable, __file__, str(depth - 1)])
time.sleep(300)
"""


def test_kill_tree_kills_every_descendant(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent(TREE))
    proc = subprocess.Popen(
        [sys.executable, str(script), "2"], stdout=subprocess.PIPE, env=child_env()
    )
    pids: list[int] = []
    try:
        pids = [int(read_line(proc, 30)) for _ in range(3)]  # grandchildren share the pipe
        assert proc.pid == pids[0] and len(set(pids)) == 3 and alive(pids) == pids
        kill_tree(proc.pid)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: all_gone(pids), 10, "the whole tree to be gone")
    finally:
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]


def test_kill_tree_of_a_process_already_gone_is_harmless() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=30) == 0  # exited and reaped: its pid names nothing now
    kill_tree(proc.pid)


# Starts the forkserver the way `batchpool run` does, with a handler of its own for SIGINT;
# prints the server's pid, the caller's handlers afterwards, and what a pool then does.
FORKSERVER = """
import json, os, signal, sys, threading

import psutil

from batchpool import Pool
from batchpool.processes import start_forkserver_ignoring_signals
from faults import RecordPid


def mine(signum, frame):
    pass


def server():
    found = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, mine)
    if sys.argv[1] == "thread":
        t = threading.Thread(target=start_forkserver_ignoring_signals)
        t.start()
        t.join()
    else:
        start_forkserver_ignoring_signals()
    pid = server().pid
    masks = [  # blocked or ignored: either way the signal cannot end the server
        int(line.split()[1], 16)
        for line in open(f"/proc/{pid}/status")
        if line.startswith(("SigIgn:", "SigBlk:"))
    ]
    ignored = {
        name: bool((masks[0] | masks[1]) >> (getattr(signal, name) - 1) & 1)
        for name in ("SIGINT", "SIGTERM")
    }
    handlers = {
        "SIGINT": signal.getsignal(signal.SIGINT) is mine,
        "SIGTERM": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
    }
    if sys.argv[1] == "signals":  # what a terminal sends to the whole group
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    with Pool(RecordPid(), 1, start_method="forkserver") as pool:
        [worker] = [r.value for r in pool.map([0])]
    parent = psutil.Process(worker).ppid() if psutil.pid_exists(worker) else None
    print(json.dumps({"server": pid, "same": server().pid == pid, "ignored": ignored,
                      "handlers": handlers, "worker_parent": parent}))
"""


def run_forkserver(tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(FORKSERVER))
    r = subprocess.run(
        [sys.executable, str(script), mode],
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_forkserver_started_for_a_run_survives_group_signals(tmp_path: Path) -> None:
    """The server starts with SIGINT and SIGTERM blocked (a blocked signal stays blocked
    across exec), so a Ctrl-C or a SIGTERM to the whole process group leaves it serving
    workers; the caller's own handlers are what they were."""
    seen = run_forkserver(tmp_path, "signals")
    assert seen["ignored"] == {"SIGINT": True, "SIGTERM": True}
    assert seen["handlers"] == {"SIGINT": True, "SIGTERM": True}
    assert seen["same"], "the signals killed the forkserver: a new one had to start"


def test_forkserver_started_from_another_thread_still_starts(tmp_path: Path) -> None:
    """Signal dispositions can only change in the main thread: from another, the server
    starts as multiprocessing starts it, and nothing fails."""
    seen = run_forkserver(tmp_path, "thread")
    assert seen["handlers"] == {"SIGINT": True, "SIGTERM": True}
    assert seen["same"]


# An open pool whose worker runs a job for an hour; then this process forks a plain child
# that lives on. It prints the pids; the test SIGKILLs it.
LIFELINE = """
import json, os, sys, time

from batchpool import Pool
from faults import SleepMarked, attempts_of

if __name__ == "__main__":
    method, markers = sys.argv[1:3]
    pool = Pool(SleepMarked(markers, 3600), procs=1, start_method=method)
    pool.submit("slow")
    deadline = time.monotonic() + 30
    while not attempts_of(markers, "slow"):
        if time.monotonic() > deadline:
            sys.exit("the job never started")
        time.sleep(0.01)
    forked = os.fork()
    if forked == 0:
        time.sleep(3600)
        os._exit(0)
    print(json.dumps({"workers": pool.pids(), "forked": forked}), flush=True)
    time.sleep(3600)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_outlive_no_parent_even_if_it_forked(tmp_path: Path, start_method: str) -> None:
    """Workers watch a pipe whose write end only their supervisor's process holds: a process
    it forked (a user's os.fork, a subprocess before exec) drops its copy, so the workers
    still see the supervisor die."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(LIFELINE))
    (tmp_path / "markers").mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), start_method, str(tmp_path / "markers")],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    forked = None
    try:
        seen = json.loads(read_line(proc, 60))
        workers, forked = seen["workers"], seen["forked"]
        assert len(workers) == 1 and alive(workers) == workers
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: all_gone(workers), 10, "the worker to notice its supervisor is gone")
        assert psutil.pid_exists(forked) and not all_gone([forked])  # the fork lived on
    finally:
        for pid in alive(workers + ([forked] if forked else [])):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_what_a_task_starts_ends_on_sigterm_while_its_worker_ignores_it(
    start_method: str,
) -> None:
    """A worker ignores the group's signals (its supervisor drains); the children of its
    tasks must not inherit that. They did: SIG_IGN survives fork and exec, so a subprocess's
    ``terminate()`` did nothing and a multiprocessing pool inside a task hung in its
    ``__exit__``."""
    with Pool(ChildSignals(), 1, start_method=start_method) as pool:
        [first] = pool.map([0])
        assert first.ok, first.error
        seen = first.value
        worker = seen.pop("pid")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(worker, sig)  # a service manager's stop, a stray kill
        [again] = pool.map([1])
        m = pool.metrics()
    assert seen == {
        "subprocess": -signal.SIGTERM,
        "fork": -signal.SIGTERM,
        "spawn": -signal.SIGTERM,
        "fork SIGINT handler": True,
    }
    assert again.ok and again.value["pid"] == worker and m.worker_restarts == 0
