"""A real two-node Ray cluster on this machine, driven through the CLI.

Two raylets on one machine: ``ray start --head --num-cpus 1 --port P`` and ``ray start --address
127.0.0.1:P --num-cpus 1``, each with a dashboard agent port of its own (the one fixed default
port two nodes would share), the second node sharing the head's session directory. Each runs
with ``--block`` in a session of its own, so the session is the node: its daemons and the actor
processes its raylet starts. SIGKILL to that session is a node lost at once (raylet, agents and
actors together); the test tears both nodes down the same way and waits until no process of
either is left (``ray stop`` would stop every Ray instance of the machine, other tests' too).

Ray's token authentication is off for the cluster and the driver alike (RAY_AUTH_MODE=disabled):
a second node on one machine finds no token otherwise. Marked ``cluster``: about 20 s on the
2-core development machine; ``-m 'not cluster'`` leaves it out, ``-m cluster`` runs it alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

from helpers import (  # noqa: E402
    child_env,
    finish,
    group_alive,
    kill_group,
    output_rows,
    read_lines,
    start_logged,
    wait_for,
    write,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

RAY = Path(sys.executable).with_name("ray")  # the ray command of this interpreter
NODE_UP = 90.0  # seconds for a node to come up on a busy 2-core machine
N = 30
GATE = 12  # jobs from here wait for a third node's first job

# Each job appends "INDEX NODE_ID PID" to runs (next to this file) when it starts; from job
# GATE on, it then waits for the file "go" there; it sleeps 0.4 s (so each runs alone in its
# call: a crash is charged to it exactly) and returns [INDEX, NODE_ID, PID].
WHERE_PY = f"""
import os
import time
from pathlib import Path

import ray

from batchpool import Pipeline, Task

RUNS = Path(__file__).resolve().with_name("runs")
GO = RUNS.with_name("go")


class Where(Task):
    retries = 3
    backoff = 0.0

    def run(self, n):
        node = ray.get_runtime_context().get_node_id()
        fd = os.open(RUNS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"{{n}} {{node}} {{os.getpid()}}\\n".encode())
        os.close(fd)
        deadline = time.monotonic() + 120
        while n >= {GATE} and not GO.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.4)
        return [n, node, os.getpid()]


pipeline = Pipeline(list(range({N})), Where(), name="where")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cluster_env() -> dict[str, str]:
    return {**child_env(), "RAY_AUTH_MODE": "disabled"}


class Node:
    """One ``ray start --block`` in a session of its own: the node's processes."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(RAY), "start", "--block", "--num-cpus", "1", "--disable-usage-stats"]
                + ["--dashboard-agent-listen-port", str(free_port()), *args],
                env=cluster_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def raylet(self) -> psutil.Process | None:
        for pid in group_alive(self.proc.pid):
            with suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.name() == "raylet":
                    return proc
        return None

    def node_id(self) -> str:
        """The id the raylet was started with, once it runs (the node's start failing
        skips the test: ``ray start`` cannot run here)."""

        def found() -> str | None:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                pytest.skip(f"ray start cannot run here (exit {self.proc.returncode}): {tail}")
            raylet = self.raylet()
            if raylet is None:
                return None
            with suppress(psutil.Error):
                for arg in raylet.cmdline():
                    if arg.startswith("--node_id="):
                        return arg.partition("=")[2]
            return None

        node: str = wait_for(found, NODE_UP, f"the raylet of {self.log.stem}", interval=0.2)
        return node

    def kill(self) -> None:
        """SIGKILL to every process of the node, at once; back once all are gone."""
        for pid in group_alive(self.proc.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not group_alive(self.proc.pid), 30, f"{self.log.stem} to be gone")
        self.proc.wait(timeout=10)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir short enough for Ray's socket paths (a Unix socket path has 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bpray", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_node_lost_mid_run_is_retried_on_the_survivor_and_replaced_on_a_new_node(
    tmp_path: Path, short_dir: Path
) -> None:
    """30 jobs of 0.4 s on two actors, one per node; once the second node started its third
    job it is killed, in that job. Its replacement finds no free CPU: it waits in Ray while
    the head node's actor serves (missing capacity, not a broken pool), and once a third node
    joins, it is placed there and serves too (jobs from GATE on wait for its first). Every job
    ends with exactly one result, all ok; the job the second node was running is charged one
    crash (Ray's reason in the log) and runs again on a live node."""
    port = free_port()
    pipeline = write(tmp_path / "where.py", WHERE_PY)
    runs = tmp_path / "runs"
    ran_on = lambda node: sum(node in line for line in read_lines(runs))  # noqa: E731
    with ExitStack() as stack:
        head = Node(
            ["--head", "--port", str(port), "--temp-dir", str(short_dir)]
            + ["--include-dashboard", "false"],
            tmp_path / "head.log",
        )
        stack.callback(head.kill)
        head_id = head.node_id()
        second = Node(["--address", f"127.0.0.1:{port}"], tmp_path / "second.log")
        stack.callback(second.kill)
        second_id = second.node_id()

        run = start_logged(
            *["run", pipeline, "--backend", "ray", "--address", f"127.0.0.1:{port}"],
            *["--procs", 2, "--no-progress", "--output", "out.jsonl", "-v"],
            cwd=tmp_path,
            env=cluster_env(),
        )
        stack.callback(kill_group, run)
        wait_for(lambda: ran_on(second_id) >= 3, 120, "3 jobs to start on the second node")
        second.kill()
        killed_after = len(read_lines(runs))
        third = Node(["--address", f"127.0.0.1:{port}"], tmp_path / "third.log")
        stack.callback(third.kill)
        third_id = third.node_id()
        wait_for(lambda: ran_on(third_id), 120, "a job on the third node")
        (tmp_path / "go").touch()
        code, err = finish(run, tmp_path, timeout=120)

    assert code == 0, err
    rows = output_rows(tmp_path / "out.jsonl", N)  # exactly one result per job, in order
    assert all(x["ok"] and x["value"][0] == x["index"] for x in rows), rows
    assert {x["value"][1] for x in rows} == {head_id, second_id, third_id}
    started = [line.split() for line in read_lines(runs)]
    lost = [x for x in rows if x["attempts"] == 2]
    assert len(lost) == 1, rows  # the job the second node was running, and only it
    (retried,) = lost
    assert any(int(n) == retried["index"] and node == second_id for n, node, _ in started)
    assert retried["value"][1] in (head_id, third_id)  # its retry ran on a live node
    assert all(x["attempts"] == 1 for x in rows if x is not retried)
    assert second_id not in {node for _, node, _ in started[killed_after:]}
    assert "died while running the job" in err and "Ray says:" in err
    assert "Traceback" not in err
